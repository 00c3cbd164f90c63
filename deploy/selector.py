#!/usr/bin/env python3
"""Write the monitoring pack for another job selector.

    python3 deploy/selector.py --selector 'job="lab-exporter"' --out ../my-pack
    python3 deploy/selector.py --check      exit 1 if the shipped pack has a job selector
                                           other than the default one

The pack's rules, rule tests, Prometheus config, ServiceMonitor (and dashboards, should one
ever name a job) select the exporter's scrape job with one selector, DEFAULT_SELECTOR. The
shipped files keep it; this script copies the pack (prometheus/, grafana/, alertmanager/,
deploy/, docker-compose.yml) into --out with the selector replaced, then runs the copy's
deploy/generate.py so the Kubernetes objects there match the rewritten rules. Writing a copy,
never the shipped files, keeps this re-runnable from them at any time.

A selector is one or more equality matchers, `job="NAME"` first: `job="lab",env="prod"`.
`job_name` in prometheus.yml and the ServiceMonitor's job relabelling take NAME; any other
label must come from your own scrape configuration. The dashboards select jobs with their
`$job` variable (every job that has skillable_up), so they need no rewrite.

tests/test_selector.py checks that the default selector reproduces the shipped pack byte for
byte, and that another one passes promtool's rule check and rule tests.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SELECTOR = 'job="skillable"'
DEFAULT_JOB = "skillable"
PACK = ("prometheus", "grafana", "alertmanager", "deploy", "docker-compose.yml")
TEXT_SUFFIXES = {".yml", ".yaml", ".json", ".py", ".md", ".service"}
_SELECTOR = re.compile(r'^job="(?P<job>[a-zA-Z_][\w:.-]*)"(,[a-zA-Z_]\w*="[^"\\]*")*$')
# Where the pack names the job outside a PromQL selector.
_JOB_NAME = re.compile(rf"^([ \t]*-?[ \t]*job_name:[ \t]*){DEFAULT_JOB}[ \t]*$", re.M)  # prometheus.yml
_RELABEL = re.compile(rf"^([ \t]*replacement:[ \t]*){DEFAULT_JOB}[ \t]*$", re.M)  # servicemonitor.yaml
_EXP_LABELS = re.compile(rf"(\bexp_labels: \{{[^}}]*?)\bjob: {DEFAULT_JOB}\b")  # promtool tests
# A job matcher in the pack's PromQL that is not the variable of a dashboard.
_ANY_JOB_MATCHER = re.compile(r'\bjob\s*(=~|!=|!~|=)\s*\\?"(?P<value>[^"\\]*)\\?"')


class SelectorError(Exception):
    pass


def parse_selector(selector: str) -> str:
    """The job name of a selector, or SelectorError."""
    match = _SELECTOR.match(selector.strip())
    if match is None:
        raise SelectorError(f"{selector!r} is not job=\"NAME\" followed by optional ,label=\"value\" matchers")
    return match.group("job")


def rewrite(text: str, selector: str) -> str:
    """`text` with the default selector (and the job name where the pack spells it) replaced."""
    job = parse_selector(selector)
    text = text.replace(DEFAULT_SELECTOR, selector)
    text = text.replace(DEFAULT_SELECTOR.replace('"', '\\"'), selector.replace('"', '\\"'))
    text = _JOB_NAME.sub(lambda m: m.group(1) + job, text)
    text = _RELABEL.sub(lambda m: m.group(1) + job, text)
    labels = ", ".join(f"{k}: {v!r}".replace("'", '"') if k != "job" else f"job: {v}"
                       for k, v in re.findall(r'(\w+)="([^"]*)"', selector))
    return _EXP_LABELS.sub(lambda m: m.group(1) + labels, text)


def pack_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for name in PACK:
        path = root / name
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and "__pycache__" not in p.parts)
    return files


def stray_job_selectors(root: Path = ROOT) -> list[str]:
    """Job matchers in the shipped pack other than the default selector and `$job`: each one
    would be missed by a rewrite."""
    found = []
    for path in pack_files(root):
        if path.suffix not in {".yml", ".yaml", ".json"} or "generated" in path.parts:
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in _ANY_JOB_MATCHER.finditer(line):
                value = match.group("value")
                if value in ("$job", "${job}"):
                    continue
                if match.group(1) == "=" and value == DEFAULT_JOB:
                    continue
                if "/tests/" in path.as_posix() and match.group(1) == "=":
                    continue  # a rule test's other targets (job="node"): input data, not a selector
                found.append(f"{path.relative_to(root)}:{number}: {match.group(0)}")
    return found


def write_pack(selector: str, out: Path, root: Path = ROOT) -> list[Path]:
    """Copy the pack into `out` with `selector`, then regenerate the copy's Kubernetes objects."""
    parse_selector(selector)
    if out.resolve() == root.resolve():
        raise SelectorError("--out must be another folder: the shipped files keep the default selector")
    written = []
    for source in pack_files(root):
        target = out / source.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.suffix in TEXT_SUFFIXES or source.name == "docker-compose.yml":
            target.write_text(rewrite(source.read_text(encoding="utf-8"), selector), encoding="utf-8")
        else:
            shutil.copyfile(source, target)
        shutil.copymode(source, target)
        written.append(target)
    generated = subprocess.run([sys.executable, str(out / "deploy" / "generate.py")],
                               capture_output=True, text=True, timeout=120)
    if generated.returncode != 0:
        raise SelectorError(f"deploy/generate.py in {out} failed: {generated.stderr.strip()}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--selector", default=DEFAULT_SELECTOR, help=f"default: {DEFAULT_SELECTOR}")
    parser.add_argument("--out", type=Path, help="folder to write the pack into")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the shipped pack selects the job other than with the default selector")
    args = parser.parse_args(argv)
    if args.check:
        stray = stray_job_selectors()
        for line in stray:
            print(f"selector.py: {line}: use {DEFAULT_SELECTOR} (or $job in a dashboard)", file=sys.stderr)
        return 1 if stray else 0
    if args.out is None:
        parser.error("--out is required")
    try:
        written = write_pack(args.selector, args.out)
    except SelectorError as exc:
        print(f"selector.py: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {len(written)} files to {args.out} for {args.selector}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
