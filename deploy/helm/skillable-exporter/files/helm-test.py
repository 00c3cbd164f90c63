"""`helm test`: the exporter answers /healthz, and /metrics shows every account up.

Runs in the exporter's own image (python3, standard library only), so the test needs no other
image. EXPORTER_URL is the Service, METRICS_PATH the telemetry path, TIMEOUT_SECONDS how long to
wait for the first successful poll. Exit 0 when every skillable_up sample is 1; else exit 1 with
one line saying what was seen.
"""

import os
import re
import sys
import time
import urllib.request

BASE = os.environ["EXPORTER_URL"].rstrip("/")
METRICS_PATH = os.environ.get("METRICS_PATH", "/metrics")
DEADLINE = time.monotonic() + float(os.environ.get("TIMEOUT_SECONDS", "60"))
UP = re.compile(r"^skillable_up(\{[^}]*\})? (\S+)$", re.MULTILINE)


def get(path: str) -> str:
    with urllib.request.urlopen(BASE + path, timeout=15) as answer:
        return answer.read().decode("utf-8", "replace")


def main() -> int:
    if get("/healthz").strip() != "OK":
        print(f"FAIL: {BASE}/healthz did not answer OK")
        return 1
    seen = "no skillable_up sample"
    while True:
        body = get(METRICS_PATH)
        ups = UP.findall(body)
        if "skillable_exporter_build_info" not in body:
            seen = "no skillable_exporter_build_info"
        elif ups and all(float(value) == 1 for _, value in ups):
            print(f"OK: {len(ups)} account(s) up at {BASE}{METRICS_PATH}")
            return 0
        elif ups:
            seen = "down: " + ", ".join(labels or "(single account)" for labels, value in ups if float(value) != 1)
        if time.monotonic() > DEADLINE:
            print(f"FAIL: {BASE}{METRICS_PATH}: {seen} (see the exporter's log and landing page)")
            return 1
        time.sleep(3)


if __name__ == "__main__":
    sys.exit(main())
