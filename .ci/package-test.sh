#!/usr/bin/env bash
# Build the sdist and the wheel as a release would, check what they hold, install the wheel into
# a fresh virtual environment outside the checkout and run it: --version, then --demo answering
# /metrics. Everything it makes is in one mktemp directory, removed on exit.
#
# Usage: bash .ci/package-test.sh
#
#   1. `python3 -m build` on a copy of the checkout (git's files, without ignored ones): the
#      sdist first, then the wheel built from the unpacked sdist, so a file the sdist lacks
#      fails the wheel;
#   2. the wheel holds every module of exporter/, the LICENSE, the Apache-2.0 licence metadata
#      and the skillable-exporter command; the sdist holds the LICENSE, README.md and
#      pyproject.toml;
#   3. a new venv (python3 -m venv) installs the wheel and its dependencies with pip;
#   4. from the work directory (not the checkout, so nothing imports the source tree), the
#      installed command prints its version and serves the demo on a free loopback port until
#      /metrics shows skillable_up 1 and the package's version in skillable_exporter_build_info.
#
# Environment (optional):
#   PYTHON   a Python 3.11+ with the `build` package (default: the checkout's .venv/bin/python,
#            where `pip install -e '.[test]'` puts it)
set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
T0=$SECONDS
WORK=$(mktemp -d)
PID=""

log() { printf 'package-test [%3ds] %s\n' "$((SECONDS - T0))" "$*"; }
fail() {
    printf 'package-test: FAIL: %s\n' "$*" >&2
    exit 1
}
cleanup() {
    local rc=$?
    set +e
    trap - EXIT INT TERM
    if [[ -n $PID ]] && kill -0 "$PID" 2>/dev/null; then
        kill -TERM "$PID"
        wait "$PID" 2>/dev/null
    fi
    if ((rc != 0)) && [[ -f $WORK/exporter.log ]]; then
        echo "---- exporter log (last 20 lines) ----" >&2
        tail -n 20 "$WORK/exporter.log" >&2
    fi
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT INT TERM

log "copying the checkout"
mkdir "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -c --no-recursion -f -) |
    tar -C "$WORK/src" -x

log "python3 -m build (sdist, then the wheel from it)"
"$PYTHON" -m build --outdir "$WORK/dist" "$WORK/src" >"$WORK/build.log" 2>&1 ||
    { tail -n 30 "$WORK/build.log" >&2; fail "python3 -m build failed"; }
wheels=("$WORK"/dist/*.whl)
sdists=("$WORK"/dist/*.tar.gz)
((${#wheels[@]} == 1 && ${#sdists[@]} == 1)) || fail "expected one wheel and one sdist, got: $(ls "$WORK/dist")"
log "built $(basename "${wheels[0]}") and $(basename "${sdists[0]}")"

"$PYTHON" - "${wheels[0]}" "${sdists[0]}" "$REPO" <<'EOF' || fail "the wheel or the sdist is incomplete"
import sys, tarfile, tomllib, zipfile
from email.parser import Parser
from pathlib import Path

wheel, sdist, repo = sys.argv[1], sys.argv[2], Path(sys.argv[3])
problems = []
names = set(zipfile.ZipFile(wheel).namelist())
modules = sorted(f"exporter/{p.name}" for p in (repo / "exporter").glob("*.py"))
problems += [f"wheel lacks {m}" for m in modules if m not in names]
dist_info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
if not any(n.startswith(dist_info) and n.endswith("/LICENSE") for n in names):
    problems.append("wheel lacks the LICENSE")
with zipfile.ZipFile(wheel) as archive:
    metadata = Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
if "Apache-2.0" not in (metadata.get("License-Expression") or metadata.get("License") or ""):
    problems.append("wheel metadata does not name the Apache-2.0 licence")
command = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["scripts"]["skillable-exporter"]
if f"skillable-exporter = {command}" not in entry_points:
    problems.append(f"wheel lacks the skillable-exporter command ({command})")
with tarfile.open(sdist) as archive:
    top = archive.getnames()[0].split("/")[0]
    sdist_names = set(archive.getnames())
problems += [f"sdist lacks {f}" for f in ("LICENSE", "README.md", "pyproject.toml") if f"{top}/{f}" not in sdist_names]
for problem in problems:
    print(f"package-test: {problem}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

log "fresh venv with the wheel"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check "${wheels[0]}" >"$WORK/pip.log" 2>&1 ||
    { tail -n 20 "$WORK/pip.log" >&2; fail "pip install of the wheel failed"; }

cd "$WORK"  # not the checkout: the installed package must serve, not the source tree
expected=$("$PYTHON" -c 'import sys, tomllib, re; print(re.search(r"__version__ = \"([^\"]+)\"", open(sys.argv[1]).read()).group(1))' \
    "$REPO/exporter/__init__.py")
"$WORK/venv/bin/skillable-exporter" --version | grep -q "version $expected " ||
    fail "--version does not say $expected"
port=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log "skillable-exporter --demo on 127.0.0.1:$port"
env -u SKILLABLE_API_KEY -u SKILLABLE_API_KEY_FILE -u SKILLABLE_STATE_FILE \
    "$WORK/venv/bin/skillable-exporter" --demo --web.listen-address="127.0.0.1:$port" >"$WORK/exporter.log" 2>&1 &
PID=$!
for _ in $(seq 1 150); do
    kill -0 "$PID" 2>/dev/null || fail "the installed exporter exited"
    if curl -sf "http://127.0.0.1:$port/metrics" -o "$WORK/metrics.txt" && grep -q '^skillable_up 1' "$WORK/metrics.txt"; then
        break
    fi
    sleep 0.2
done
grep -q '^skillable_up 1' "$WORK/metrics.txt" 2>/dev/null || fail "/metrics never showed skillable_up 1 within 30 s"
grep -q "^skillable_exporter_build_info{.*version=\"$expected\"" "$WORK/metrics.txt" ||
    fail "skillable_exporter_build_info does not carry version $expected"
grep -q '^skillable_lab_instances_started_total{' "$WORK/metrics.txt" || fail "no lab series in /metrics"
log "OK: the installed wheel serves the demo's metrics ($(grep -c '^skillable_' "$WORK/metrics.txt") skillable_ samples)"
