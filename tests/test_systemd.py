"""deploy/systemd/skillable-exporter.service: checked by systemd's own tools (`systemd-analyze
verify` and the offline `systemd-analyze security` score), and its command line by the exporter."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "skillable-exporter.service"
INSTALLED_BINARY = "/opt/skillable-exporter/bin/skillable-exporter"


def systemd_analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: install Debian's systemd package (.ci/run does)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def service_section() -> dict[str, list[str]]:
    """[Service] as key -> every value given (systemd allows a key more than once)."""
    values: dict[str, list[str]] = {}
    section = None
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif section == "Service" and "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def local_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's exporter: `verify` wants it to exist."""
    binary = Path(sys.executable).with_name("skillable-exporter")
    assert binary.exists(), "pip install -e . makes .venv/bin/skillable-exporter"
    path = tmp_path / UNIT.name
    path.write_text(UNIT.read_text().replace(INSTALLED_BINARY, str(binary)))
    return path


@pytest.mark.integration
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    result = systemd_analyze("verify", f"./{local_copy(tmp_path).name}", cwd=tmp_path)
    assert result.returncode == 0 and result.stderr.strip() == "", result.stderr
    # The same tool refuses a broken unit, so the check above means something.
    (tmp_path / "broken.service").write_text("[Service]\nExecStart=relative/path\n")
    assert systemd_analyze("verify", "./broken.service", cwd=tmp_path).returncode != 0


@pytest.mark.integration
def test_the_unit_is_hardened(tmp_path: Path) -> None:
    service = service_section()
    for key, value in {"DynamicUser": "yes", "ProtectSystem": "strict", "StateDirectory": "skillable-exporter",
                       "NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectHome": "yes"}.items():
        assert service.get(key) == [value], key
    assert service["ExecReload"] == ["/bin/kill -HUP $MAINPID"]  # SIGHUP: a reload, never a lost state file
    assert service["EnvironmentFile"] == ["/etc/skillable-exporter/skillable-exporter.env"]
    assert "SKILLABLE_STATE_FILE=/var/lib/skillable-exporter/state.json" in service["Environment"]
    score = systemd_analyze("security", "--offline=yes", f"./{local_copy(tmp_path).name}", cwd=tmp_path)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", score.stdout)
    assert match, score.stdout[-2000:] + score.stderr
    assert float(match.group(1)) <= 2.0, score.stdout  # systemd rates 0-10; under 2 is its "OK"


def test_the_unit_waits_for_the_exporter_to_serve() -> None:
    """Type=notify: `systemctl start` returns, and a `reload` goes out, once the
    exporter has told systemd READY=1 (tests/test_signals.py checks that it does)."""
    service = service_section()
    assert service["Type"] == ["notify"] and service["NotifyAccess"] == ["main"]


@pytest.mark.integration
def test_the_units_command_line_is_one_the_exporter_accepts() -> None:
    command = shlex.split(service_section()["ExecStart"][0])
    assert command[0] == INSTALLED_BINARY
    args = [a.replace("/etc/skillable-exporter/config.yaml", str(ROOT / "config.yaml")) for a in command[1:]]
    result = subprocess.run([sys.executable, "-m", "exporter", *args, "--config.check"],
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "config.yaml is valid" in result.stdout
