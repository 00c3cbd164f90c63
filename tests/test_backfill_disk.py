"""The backfill and the disk, on real filesystems: an unusable --output, the estimate and its refusal,
a disk that fills mid-way, a run that dies between a day's blocks and its checkpoint, and what a
finished run leaves (blocks only, unless --keep-openmetrics).

Full and read-only disks are real ones: a tmpfs of a chosen size mounted for the test (and grown with
`mount -o remount,size=` for the rerun), so ENOSPC and EROFS come from the kernel where the exporter
writes them, in its files and in promtool's. Mounting needs root (CI runs as root); a test that
cannot mount fails, it is never skipped. The TSDB is checked through the blocks' own meta.json
(samples and time range of each block: a day written twice shows as overlapping blocks and more
samples) and `promtool tsdb dump` (every sample).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from itertools import pairwise
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable, Iterator

import pytest

from exporter.backfill import (BLOCK_BYTES_PER_SAMPLE, BLOCK_BYTES_PER_SERIES, PROMTOOL_PREALLOCATED_BYTES,
                               estimate_disk)
from exporter.persistence import read_state_file

from .fakeapi import FakeSkillable
from .harness import ROOT, tool
from .test_backfill import DAY, backfill, iso, traffic

LABELS = ("--label=job=skillable", "--label=instance=x:1")


# -- real filesystems ---------------------------------------------------------------


class Tmpfs:
    """A tmpfs of `size` bytes mounted at `path` for one test (read-only if asked), unmounted after."""

    def __init__(self, path: Path, size: int, read_only: bool = False) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        options = f"size={size},mode=0755" + (",ro" if read_only else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                              text=True)
        if done.returncode != 0:
            pytest.fail(f"cannot mount a tmpfs at {path} ({done.stderr.strip()}): these tests need a real small "
                        "or read-only filesystem and run as root (as in CI); they are never skipped")

    def resize(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "--lazy", str(self.path)], check=True)


MountTmpfs = Callable[..., Tmpfs]


class Ext4:
    """An ext4 file system of `size` bytes in a sparse image, loop-mounted at `path` for one test. Its
    free space is set with a filler file preallocated on it (unwritten extents: no data written)."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        self.image = path.with_name(path.name + ".img")
        path.mkdir(parents=True)
        with open(self.image, "wb") as image:
            image.truncate(size)
        for command in (["mkfs.ext4", "-q", "-m", "0", str(self.image)],
                        ["mount", "-o", "loop", str(self.image), str(path)]):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                pytest.fail(f"{' '.join(command)} failed ({done.stderr.strip()}): this test needs a real ext4 "
                            "file system on a loop device, as root (as in CI); it is never skipped")
        self.filler = path / "filler"

    def free(self) -> int:
        stats = os.statvfs(self.path)
        return stats.f_bavail * stats.f_frsize

    def leave_free(self, size: int) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.posix_fallocate(fd, 0, self.free() - size)
        finally:
            os.close(fd)
        assert abs(self.free() - size) < 1 << 20, (self.free(), size)

    def remove_filler(self) -> None:
        self.filler.unlink()

    def unmount(self) -> None:
        subprocess.run(["umount", str(self.path)], check=True)
        self.image.unlink()


MountExt4 = Callable[[Path, int], Ext4]


@pytest.fixture
def ext4() -> Iterator[MountExt4]:
    mounted: list[Ext4] = []

    def mount(path: Path, size: int) -> Ext4:
        fs = Ext4(path, size)
        mounted.append(fs)
        return fs

    yield mount
    for fs in mounted:
        fs.unmount()


@pytest.fixture
def tmpfs() -> Iterator[MountTmpfs]:
    mounted: list[Tmpfs] = []

    def mount(path: Path, size: int, read_only: bool = False) -> Tmpfs:
        fs = Tmpfs(path, size, read_only)
        mounted.append(fs)
        return fs

    yield mount
    for fs in mounted:
        fs.unmount()


# -- the TSDB a run leaves ------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    name: str
    min_time: int  # ms
    max_time: int  # ms, exclusive
    samples: int


def blocks(folder: Path) -> list[Block]:
    """Every block in `folder`, by its meta.json, in time order."""
    found = []
    for entry in folder.iterdir():
        meta = json.loads((entry / "meta.json").read_text())
        found.append(Block(entry.name, meta["minTime"], meta["maxTime"], meta["stats"]["numSamples"]))
    return sorted(found, key=lambda b: (b.min_time, b.max_time))


def samples_by_day(found: list[Block]) -> dict[int, int]:
    by_day: dict[int, int] = {}
    for block in found:
        day = block.min_time // 1000 // DAY * DAY
        by_day[day] = by_day.get(day, 0) + block.samples
    return by_day


def assert_no_overlap(found: list[Block]) -> None:
    for earlier, later in pairwise(found):
        assert earlier.max_time <= later.min_time, f"blocks {earlier} and {later} overlap: a day written twice"


def dump(folder: Path, scratch: Path) -> list[str]:
    """Every sample of the blocks in `folder`, sorted, as `promtool tsdb dump` prints them (a copy with an
    empty wal/, which promtool 2.42 needs to open the folder)."""
    shutil.copytree(folder, scratch)
    (scratch / "wal").mkdir()
    done = subprocess.run([tool("promtool"), "tsdb", "dump", str(scratch)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return sorted(done.stdout.splitlines())


def disk_usage(path: Path) -> int:
    """Bytes a file, or the files under a folder, take on a tmpfs (whole pages)."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return sum(-(-f.stat().st_size // 4096) * 4096 for f in files)


# -- an --output that cannot be used ---------------------------------------------------


@pytest.mark.integration
def test_an_output_under_a_regular_file_or_a_regular_file_exits_2_with_one_line_before_any_work(
    fake: FakeSkillable, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    plain.write_text("not a folder\n")
    for output, problem in ((plain / "out", "Not a directory"), (plain, "is not a folder")):
        done = backfill(fake, "--from=2026-11-01", "--to=2026-11-02", f"--output={output}", *LABELS)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and "invalid setting output" in done.stderr, done.stderr
        assert problem in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and "backfilling" not in done.stdout
    assert fake.results_requests() == []  # refused before any work
    assert plain.read_text() == "not a folder\n"


@pytest.mark.integration
def test_an_output_on_a_read_only_mount_exits_2_with_one_line_before_any_work(
    fake: FakeSkillable, tmp_path: Path, tmpfs: MountTmpfs
) -> None:
    read_only = tmpfs(tmp_path / "ro", 1 << 20, read_only=True).path
    for output in (read_only, read_only / "out"):  # the mount itself, and a folder still to create on it
        done = backfill(fake, "--from=2026-11-01", "--to=2026-11-02", f"--output={output}", *LABELS)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"invalid setting output: {output} cannot be written (Read-only file system)" in done.stderr
    assert fake.results_requests() == []
    assert os.listdir(read_only) == []


@pytest.mark.integration
def test_an_output_on_a_full_disk_exits_2_with_one_line_before_any_work(
    fake: FakeSkillable, tmp_path: Path, tmpfs: MountTmpfs
) -> None:
    full = tmpfs(tmp_path / "full", 64 * 1024).path
    (full / "filler").write_bytes(b"x" * 64 * 1024)  # the tmpfs now has no page left
    done = backfill(fake, "--from=2026-11-01", "--to=2026-11-02", f"--output={full / 'out'}", *LABELS)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and "(No space left on device)" in done.stderr, done.stderr
    assert fake.results_requests() == []


# -- the estimate ------------------------------------------------------------------------


def test_the_estimate_holds_one_days_file_at_a_time_unless_the_files_are_kept() -> None:
    # 1.5 days at 60 s steps: 720 steps in the first (partial) day, 1440 in the second.
    start, end = 10 * DAY + DAY // 2, 12 * DAY
    deleted = estimate_disk(100, 1000, 50, 4000, start, end, 60, blocks=6 * 3600, keep=False)
    kept = estimate_disk(100, 1000, 50, 4000, start, end, 60, blocks=6 * 3600, keep=True)
    files_only = estimate_disk(100, 1000, 50, 4000, start, end, 60, blocks=None, keep=False)
    assert deleted.days == kept.days == 2
    assert deleted.openmetrics == deleted.openmetrics_day == 50 + 1440 * 1000  # the larger day, alone
    assert kept.openmetrics == (50 + 720 * 1000) + (50 + 1440 * 1000)  # every day
    assert files_only.openmetrics == kept.openmetrics and files_only.blocks == 0  # no promtool: files stay
    # 6-hour blocks: the half day touches 2 block windows, the whole day 4.
    assert deleted.blocks == kept.blocks == 100 * (BLOCK_BYTES_PER_SERIES * (2 + 4) + BLOCK_BYTES_PER_SAMPLE * 2160)
    assert deleted.checkpoint == 12000  # a temporary file beside the last, each the first day's state half again
    assert deleted.promtool == kept.promtool == PROMTOOL_PREALLOCATED_BYTES and files_only.promtool == 0
    assert deleted.total < kept.total


# -- a history of three days from the fake, and a clean run of it to compare with ------


@dataclass
class History:
    fake: FakeSkillable
    start: int
    end: int
    clean: Path  # a clean run's --output (with --keep-openmetrics)

    def args(self, output: Path, *more: str) -> tuple[str, ...]:
        return (f"--from={iso(self.start)}", f"--to={iso(self.end)}", f"--output={output}", "--step=5m",
                *LABELS, *more)

    def day_file(self, day: int) -> Path:
        return self.clean / "openmetrics" / time.strftime("%Y-%m-%dT%H%M%SZ.om", time.gmtime(day))


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    fake = FakeSkillable(live=True)
    end = (int(time.time()) - 4 * 3600) // DAY * DAY  # a midnight past Prometheus' head block
    start = end - 3 * DAY
    traffic(fake, start - 3600, end, per_hour=40)
    clean = tmp_path_factory.mktemp("clean")
    history = History(fake, start, end, clean)
    done = backfill(fake, *history.args(clean, "--keep-openmetrics"))
    assert done.returncode == 0, done.stderr
    yield history
    fake.stop()


@pytest.mark.integration
def test_an_output_too_small_for_the_estimate_is_refused_with_one_line(
    history: History, tmp_path: Path, tmpfs: MountTmpfs
) -> None:
    largest = max(f.stat().st_size for f in (history.clean / "openmetrics").iterdir())
    small = tmpfs(tmp_path / "small", largest // 2).path  # not even one day's file fits
    done = backfill(history.fake, *history.args(small / "out"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    line = done.stderr
    assert "invalid setting output" in line and "--no-disk-check" in line and "needs about" in line, line
    assert not list((small / "out" / "openmetrics").iterdir()) and not list((small / "out" / "blocks").iterdir())
    assert not list((small / "out" / ".backfill").iterdir())  # no settings bound: the folder takes any next run


def day_one_room(history: History) -> int:
    """What a run with --keep-openmetrics holds on disk once day one is complete: its file, its blocks,
    a checkpoint and its temporary copy, and a page or so for every folder and small file."""
    blocks_of_day_one = sum(disk_usage(history.clean / "blocks" / b.name) for b in blocks(history.clean / "blocks")
                            if b.min_time < (history.start + DAY) * 1000)
    checkpoint = disk_usage(history.clean / ".backfill" / "state.json")
    return disk_usage(history.day_file(history.start)) + blocks_of_day_one + 2 * checkpoint + 256 * 1024


@pytest.mark.integration
def test_a_disk_that_fills_while_a_file_is_written_stops_with_one_line_naming_the_day_and_a_rerun_resumes_exactly(
    history: History, tmp_path: Path, tmpfs: MountTmpfs
) -> None:
    # Files only (no promtool on the PATH): a tmpfs with room for day one and half of day two.
    second = history.start + DAY
    room = day_one_room(history) + history.day_file(second).stat().st_size // 2
    fs = tmpfs(tmp_path / "disk", room)
    out = fs.path / "out"
    files_only = {"PATH": "/nonexistent"}
    done = backfill(history.fake, *history.args(out), "--no-disk-check", env=files_only)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "warning:" not in line]  # the estimate's warning
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    day_two = time.strftime("%Y-%m-%d", time.gmtime(second))
    assert f"stopped: day 2 of 3 ({day_two}): {out}/openmetrics/" in errors[0], errors
    assert ".om.tmp could not be written (No space left on device)" in errors[0], errors
    assert "day 1 of 3" in done.stdout and "day 2 of 3" not in done.stdout
    # Day one is complete (its file, the checkpoint as of its end); nothing of day two is left.
    assert [p.name for p in (out / "openmetrics").iterdir()] == [history.day_file(history.start).name]
    assert read_state_file(str(out / ".backfill" / "state.json"))[""].last_success == second

    fs.resize(4 * room)
    again = backfill(history.fake, *history.args(out), "--no-disk-check", env=files_only)
    assert again.returncode == 0, again.stderr
    assert f"resuming after the last complete day, from {iso(second)}" in again.stdout
    assert "day 1 of 3" not in again.stdout and "day 3 of 3" in again.stdout
    files = {p.name: p.read_bytes() for p in (out / "openmetrics").iterdir()}
    assert files == {p.name: p.read_bytes() for p in (history.clean / "openmetrics").iterdir()}


@pytest.mark.integration
def test_a_disk_that_fills_while_promtool_writes_stops_with_one_line_naming_the_day_and_a_rerun_resumes_exactly(
    history: History, tmp_path: Path, ext4: MountExt4
) -> None:
    # An ext4 (loop) file system whose free space is set by a preallocated filler: room for day one,
    # promtool's preallocation and half of day two's file. With the files kept, day two's file still
    # fits, and then promtool cannot preallocate. (On a tmpfs the preallocation would take 512 MiB of memory.)
    second = history.start + DAY
    disk = ext4(tmp_path / "disk", 1 << 30)
    out = disk.path / "out"
    disk.leave_free(PROMTOOL_PREALLOCATED_BYTES + day_one_room(history) + history.day_file(second).stat().st_size // 2)
    args = history.args(out, "--keep-openmetrics")
    done = backfill(history.fake, *args, "--no-disk-check")
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "warning:" not in line]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    day_two = time.strftime("%Y-%m-%d", time.gmtime(second))
    assert f"stopped: day 2 of 3 ({day_two}): promtool failed on " in errors[0], errors
    assert "no space left on device" in errors[0].lower(), errors
    assert [p.name for p in (out / "openmetrics").iterdir()] == [history.day_file(history.start).name]
    clean_blocks = blocks(history.clean / "blocks")
    assert samples_by_day(blocks(out / "blocks")) == {history.start: samples_by_day(clean_blocks)[history.start]}
    assert not list((out / "blocks").glob(".tmp-*"))
    assert read_state_file(str(out / ".backfill" / "state.json"))[""].last_success == second

    disk.remove_filler()
    again = backfill(history.fake, *args)
    assert again.returncode == 0, again.stderr
    assert f"resuming after the last complete day, from {iso(second)}" in again.stdout
    assert "day 1 of 3" not in again.stdout and "day 3 of 3" in again.stdout
    # The TSDB is the clean run's: every day once, no block overlapping another, the same samples.
    resumed = blocks(out / "blocks")
    assert_no_overlap(resumed)
    assert samples_by_day(resumed) == samples_by_day(clean_blocks) and len(samples_by_day(resumed)) == 3
    assert dump(out / "blocks", tmp_path / "dump-resumed") == dump(history.clean / "blocks", tmp_path / "dump-clean")
    files = {p.name: p.read_bytes() for p in (out / "openmetrics").iterdir()}
    assert files == {p.name: p.read_bytes() for p in (history.clean / "openmetrics").iterdir()}


# The exporter's own entry point, killed (as by SIGKILL or a power cut) when it writes its checkpoint
# for the second time: after day two's blocks are made (and its file deleted), before its checkpoint.
_DIES_AT_SECOND_CHECKPOINT = """
import os, sys
folder = os.path.realpath(sys.argv[1]) + os.sep
synced, count = os.fsync, [0]
def fsync(fd):
    path = os.readlink(f"/proc/self/fd/{fd}")
    if path.startswith(folder) and "state.json" in path:
        count[0] += 1
        if count[0] == 2:
            os._exit(137)
    return synced(fd)
os.fsync = fsync
from exporter.__main__ import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.integration
def test_a_run_that_dies_between_a_days_blocks_and_its_checkpoint_writes_that_day_once_on_rerun(
    history: History, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    args = history.args(out)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    environ.update({"SKILLABLE_API_URL": history.fake.url, "SKILLABLE_API_KEY": history.fake.state.api_key})
    died = subprocess.run([sys.executable, "-c", _DIES_AT_SECOND_CHECKPOINT, str(out / ".backfill"), "backfill",
                           *args], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)
    assert died.returncode == 137, died.stdout + died.stderr
    second = history.start + DAY
    left = samples_by_day(blocks(out / "blocks"))
    assert set(left) == {history.start, second}  # day two's blocks were made, its checkpoint was not
    assert read_state_file(str(out / ".backfill" / "state.json"))[""].last_success == second

    again = backfill(history.fake, *args)
    assert again.returncode == 0, again.stderr
    assert f"from {iso(second)}" in again.stdout
    resumed = blocks(out / "blocks")
    assert_no_overlap(resumed)
    assert samples_by_day(resumed) == samples_by_day(blocks(history.clean / "blocks"))
    assert not (out / "openmetrics").exists()  # every file made way for its blocks


# -- what a finished run leaves -------------------------------------------------------------


def demo_backfill(output: Path, start: int, end: int, *more: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("SKILLABLE_")}
    return subprocess.run([sys.executable, "-m", "exporter", "backfill", "--demo", f"--from={iso(start)}",
                           f"--to={iso(end)}", f"--output={output}", "--step=5m", *LABELS, *more],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


_SIZE = r"([\d.]+ [kMG]?B)"
_ESTIMATE = re.compile(rf"^disk: about {_SIZE} for (\d+) days of (\d+) series: OpenMetrics {_SIZE} .*"
                       rf"blocks {_SIZE}, checkpoint {_SIZE}, plus 25%, and {_SIZE} promtool preallocates", re.M)


def size(text: str) -> float:
    number, unit = text.split()
    return float(number) * {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]


@pytest.mark.integration
def test_a_demo_backfill_leaves_only_its_blocks_and_shows_day_n_of_m_with_the_time_left(tmp_path: Path) -> None:
    midnight = (int(time.time()) - 4 * 3600) // DAY * DAY  # at least 4 hours ago: past the head block
    start, end = midnight - 6 * 3600, midnight + 3600  # two days: the last 6 hours of one, the first of the next
    done = demo_backfill(tmp_path / "out", start, end)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert re.search(r"^day 1 of 2 \(\d{4}-\d\d-\d\d\): .*, about \d+s left\)$", done.stdout, re.M), done.stdout
    assert re.search(r"^day 2 of 2 \(\d{4}-\d\d-\d\d\): .* blocks, ", done.stdout, re.M), done.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [".backfill", "blocks"]  # no OpenMetrics left
    assert not list(out.rglob("*.om")) and not list(out.rglob("*.tmp"))
    made = blocks(out / "blocks")
    assert_no_overlap(made)
    assert set(samples_by_day(made)) == {midnight - DAY, midnight}

    kept = demo_backfill(tmp_path / "kept", start, end, "--keep-openmetrics")
    assert kept.returncode == 0, kept.stderr
    files = sorted((tmp_path / "kept" / "openmetrics").iterdir())
    assert [p.name for p in files] == [time.strftime("%Y-%m-%dT%H%M%SZ.om", time.gmtime(t)) for t in (start, midnight)]
    assert all(p.read_text().endswith("# EOF\n") for p in files)
    assert samples_by_day(blocks(tmp_path / "kept" / "blocks")) == samples_by_day(made)  # the same history

    # The estimate printed before the run, against what the run wrote: never less, not far more.
    estimate = _ESTIMATE.search(done.stdout)
    assert estimate, done.stdout
    total, days, series, openmetrics, block_bytes, checkpoint, promtool = estimate.groups()
    assert int(days) == 2 and int(series) > 1000
    largest = max(p.stat().st_size for p in files)
    assert largest <= size(openmetrics) <= 1.2 * largest  # one day's file at a time: the larger one
    written = sum(f.stat().st_size for f in (out / "blocks").rglob("*") if f.is_file())
    assert written <= size(block_bytes) <= 1.5 * written
    state = (out / ".backfill" / "state.json").stat().st_size
    assert 2 * state <= size(checkpoint) <= 3 * state
    assert largest + written + 2 * state + size(promtool) <= size(total) and size(promtool) >= 512 * 1024 * 1024 * 0.999
