"""The exporter a user would write in an afternoon: the benchmark's baseline. Do not optimise it.

Every scrape fetches the whole window with requests, parses it with
response.json(), and loops over the results setting prometheus_client Gauges and
Counters one result at a time. It remembers which instances it has counted so
its counters do not double-count, the way a careful afternoon script would.

    python3 bench/baseline.py --port 9999 --url http://127.0.0.1:8000 --window-minutes 60
"""

from __future__ import annotations

import argparse
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

STATUS = {1: "cancelled", 2: "no_show", 3: "incomplete", 4: "complete", 10: "storage_provisioning_failed",
          20: "lab_creation_failed", 30: "resume_failed", 40: "save_failed", 50: "submitted_for_grading",
          60: "grading_in_progress"}
LABELS = ["datacenter_id", "delivery_region_id", "lab_host_id"]

INSTANCES = Gauge("skillable_lab_instances", "Lab instances in the window", LABELS + ["completion_status"])
RUNNING = Gauge("skillable_lab_instances_running", "Running lab instances", LABELS)
STARTED = Counter("skillable_lab_instances_started", "Lab instances started", LABELS)
ENDED = Counter("skillable_lab_instances_ended", "Lab instances ended", LABELS + ["completion_status"])
EXAMS = Counter("skillable_exams", "Scored exams", LABELS)
PASSED = Counter("skillable_exams_passed", "Passed exams", LABELS)
RUN_TIME = Histogram("skillable_lab_run_time_seconds", "Run time", ["datacenter_id", "delivery_region_id"],
                     buckets=(60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400))
UP = Gauge("skillable_up", "Last poll worked")

seen_started: set = set()
seen_ended: set = set()
seen_exam: set = set()
lock = threading.Lock()


def update(url: str, key: str, minutes: int) -> None:
    try:
        response = requests.get(f"{url}/LatestResults", params={"minutes": minutes},
                                headers={"api_key": key}, timeout=60)
        data = response.json()
    except (requests.RequestException, ValueError):  # no answer, or an answer that is not JSON
        UP.set(0)
        return
    INSTANCES.clear()
    RUNNING.clear()
    for r in data["Results"] or []:
        labels = [str(r.get("DatacenterId")), str(r.get("DeliveryRegionId")), str(r.get("LabHostId"))]
        status = STATUS.get(r.get("CompletionStatus"), "unknown")
        INSTANCES.labels(*labels, status).inc()
        if r.get("End") is None:
            RUNNING.labels(*labels).inc()
        if r["LabInstanceId"] not in seen_started:
            seen_started.add(r["LabInstanceId"])
            STARTED.labels(*labels).inc()
        if r.get("End") is not None and r["LabInstanceId"] not in seen_ended:
            seen_ended.add(r["LabInstanceId"])
            ENDED.labels(*labels, status).inc()
            if r.get("TotalRunTimeSeconds") is not None:
                RUN_TIME.labels(labels[0], labels[1]).observe(r["TotalRunTimeSeconds"])
        if r.get("ExamScore") is not None and r["LabInstanceId"] not in seen_exam:
            seen_exam.add(r["LabInstanceId"])
            EXAMS.labels(*labels).inc()
            if r.get("ExamPassed"):
                PASSED.labels(*labels).inc()
    UP.set(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", default="anything")
    parser.add_argument("--window-minutes", type=int, default=60)
    args = parser.parse_args()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/metrics":
                self.send_response(404)
                self.end_headers()
                return
            with lock:
                update(args.url, args.key, args.window_minutes)
                body = generate_latest()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_LATEST)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    ThreadingHTTPServer(("127.0.0.1", args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
