"""``python -m dev.bench`` end to end on tiny disks: it runs, reports and cleans up.

No timing is asserted anywhere (the benchmark is a separate command, ``make bench``); this only
proves that every workload runs against the same snapshot and nothing is left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev import bench
from dev.devvm import MiB, poll
from tests.conftest import lazy_umount, mounts_below, processes_naming

pytestmark = [
    pytest.mark.qemu,
    pytest.mark.mount,
    pytest.mark.skipif(
        not shutil.which("nbdfuse") or not shutil.which("nbdcopy"),
        reason="needs libnbd-bin (nbdfuse, nbdcopy)",
    ),
]


def test_parse_size() -> None:
    assert bench.parse_size("2G") == 2 << 30
    assert bench.parse_size("512MiB") == 512 << 20
    assert bench.parse_size("65536") == 65536


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A work directory with a short path: QEMU's NBD socket goes below it (108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_bench_runs_every_workload_and_cleans_up(short_tmp: Path) -> None:
    tmp_path = short_tmp
    out = tmp_path / "bench.json"
    argv = [
        "--size",
        "4M",
        "--disks",
        "2",
        "--rounds",
        "2",
        "--dirty-regions",
        "8",
        "--scale-extents",
        "50",
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
        "--no-drop-caches",
        "--images",
        "memory",
    ]
    shm_before = set(Path("/dev/shm").glob("snapfs-bench-*"))
    order_before = _reporting_order()
    assert bench.main(argv) == 0
    assert _reporting_order() == order_before  # held while it ran, given back
    data = json.loads(out.read_text())
    summary = data["summary"]
    tools = {"snapfs", "nbdfuse", "nbdcopy"} | (
        set() if "qemu-fuse" in data["unavailable"] else {"qemu-fuse"}
    )
    assert set(summary["a-dd"]) == tools
    assert set(summary["b-cp"]) == tools - {"nbdcopy"}
    assert set(summary["c-parallel"]) == tools
    # The prototype of a compiled worker runs wherever there is a C compiler (make test
    # installs one); its bytes were compared with the view's before it was measured.
    has_cc = bool(shutil.which("cc") or shutil.which("gcc"))
    assert set(summary["d-incr"]) == {
        "snapfs-copy",
        "libnbd-16",
        "snapfs-pread",
        "snapfs-pread8",
        "nbdfuse-pread",
        "nbdfuse-pread8",
    } | ({"cworker-pread8"} if has_cc else set())
    assert ("cworker" in data["unavailable"]) is not has_cc
    for row in summary["d-incr"].values():  # every tool over the ceiling
        assert row["ref_ratio"] == pytest.approx(
            row["mib_s"] / summary["d-incr"]["libnbd-16"]["mib_s"]
        )
    # tar-image: tar of the raw image in memory (--images memory), tar's own speed.
    assert set(summary["j-small"]) == {"snapfs-dd1M", "snapfs-dd4K", "snapfs-tar", "tar-image"}
    # The thin disk (1 MiB of data and holes in turn on a 4 MiB disk), only in (j)'s view.
    assert set(summary["j-thin"]) == {"snapfs-dd1M", "snapfs-tar", "tar-image"}
    assert bench.thin_step(4 << 20) == 1 << 20
    assert bench.thin_step(2 << 30) == bench.THIN_STEP
    assert set(summary["k-full"]) == {"snapfs-copy", "cp+sync"}
    for row in summary["a-dd"].values():  # snapfs's speed over each tool's
        assert row["snapfs_ratio"] == pytest.approx(
            summary["a-dd"]["snapfs"]["mib_s"] / row["mib_s"]
        )
    assert (
        set(summary["h-a"])
        == set(summary["h-c"])
        == {
            "snapfs",
            "snapfs-confined",
            "snapfs-1M",
        }
    )
    assert set(summary["i-throttled"]) == {"snapfs", "snapfs-throttled"}
    confined_runs = [r for r in data["runs"] if r["tool"] == "snapfs-confined"]
    assert len(confined_runs) == 2 * 2  # (a) and (c) in each of 2 rounds
    assert data["dirty_regions"] == 8
    assert len(data["mount_s"]) == 2
    assert len(data["umount_s"]) == 2
    assert summary["peak_rss_mib"]["snapfs"] > 0
    assert set(data["pause_ms"]) == {"full", "incremental"}
    assert all(len(v) == 2 and all(ms > 0 for ms in v) for v in data["pause_ms"].values())
    assert "| (a) dd bs=1M iflag=direct | snapfs |" in data["markdown"]
    # The headline: every workload's row, the goals of issue 16 with their verdicts.
    measures = {h["measure"]: h for h in summary["headline"]}
    copy = measures["`snapfs copy` ÷ libnbd, 16 requests in flight (MiB/s)"]
    assert copy["values"] == [summary["d-incr"]["snapfs-copy"]["ref_ratio"]]
    assert copy["goal"] == "≥ 0.8"
    assert copy["met"] is (copy["values"][0] >= 0.8)
    pread8 = measures["8 pread threads through snapfs ÷ libnbd, 16 requests in flight (MiB/s)"]
    assert pread8["values"] == [summary["d-incr"]["snapfs-pread8"]["ref_ratio"]]
    if has_cc:
        proto = measures[
            "the same through a prototype of a compiled worker (`dev/cworker.c`) ÷ libnbd, "
            "16 requests in flight (MiB/s)"
        ]
        assert proto["values"] == [summary["d-incr"]["cworker-pread8"]["ref_ratio"]]
        assert proto["goal"] == ""
    small = summary["j-small"]
    assert measures["`dd bs=4K` ÷ `dd bs=1M` (MiB/s)"]["values"] == [
        small["snapfs-dd4K"]["mib_s"] / small["snapfs-dd1M"]["mib_s"]
    ]
    tar = measures["`tar --sparse -cf - \\| cat` ÷ `dd bs=1M` (time)"]
    assert tar["values"] == [
        pytest.approx(small["snapfs-dd1M"]["mib_s"] / small["snapfs-tar"]["mib_s"])
    ]
    own = measures["the same `tar` of the disk's image in memory, no FUSE ÷ `dd bs=1M` (time)"]
    assert own["values"] == [
        pytest.approx(small["snapfs-dd1M"]["mib_s"] / small["tar-image"]["mib_s"])
    ]
    thin = summary["j-thin"]
    tar_thin = measures[
        "the same of a thin disk (1 MiB of data and holes in turn: tar reads its data 512 bytes "
        "at a time) ÷ `dd bs=1M` of it (time)"
    ]
    assert tar_thin["values"] == [
        pytest.approx(thin["snapfs-dd1M"]["mib_s"] / thin["snapfs-tar"]["mib_s"])
    ]
    assert tar_thin["goal"] == "≤ 2"
    own_thin = measures[
        "the same `tar` of the thin disk's image in memory ÷ `dd bs=1M` of it (time)"
    ]
    assert own_thin["values"] == [
        pytest.approx(thin["snapfs-dd1M"]["mib_s"] / thin["tar-image"]["mib_s"])
    ]
    full = measures["`snapfs copy` ÷ `cp --sparse=always` + `sync` (time)"]
    assert full["values"] == [
        pytest.approx(
            summary["k-full"]["cp+sync"]["mib_s"] / summary["k-full"]["snapfs-copy"]["mib_s"]
        )
    ]
    assert full["goal"] == "≤ 1"
    assert measures["`snapfs mount`"]["goal"] == "< 3"
    assert measures["serving process's peak RSS"]["values"][0] > 0
    workloads = [h["workload"][:3] for h in summary["headline"] if h["workload"]]
    assert workloads == [f"({w})" for w in "abcdefghijkl"]
    # The headline table comes first, directly under the caption: the README's table.
    lines = data["markdown"].splitlines()
    assert lines[2:4] == ["| workload | measure | latest | goal |", "| --- | --- | ---: | --- |"]
    assert "| (l) 1 TiB disk with 50 dirty extents | `snapfs mount` |" in data["markdown"]
    assert summary["scale"]["extents"] == 50
    assert len(data["scale"]["mount_s"]) == len(data["scale"]["cat_s"]) == 2
    # Every run moved the bytes it claims: 2 disks of 4 MiB in (c), 8 regions of 64 KiB in (d),
    # a disk of 4 MiB in (j) and (k).
    assert {r["nbytes"] for r in data["runs"] if r["workload"] == "c-parallel"} == {8 << 20}
    assert {r["nbytes"] for r in data["runs"] if r["workload"] == "d-incr"} == {8 << 16}
    assert {
        r["nbytes"] for r in data["runs"] if r["workload"] in ("j-small", "j-thin", "k-full")
    } == {4 << 20}
    # Nothing left: no mount, no work directory (QEMU is stopped by Bench.close).
    assert mounts_below(tmp_path) == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith("snapfs-bench-")] == []
    assert "images in memory" in data["markdown"]
    # How much the hypervisor took, per run and over the run (a noisy machine says so).
    assert all(r["steal"] >= 0 for r in data["runs"])
    assert "of their time taken by the hypervisor during the runs kept" in data["markdown"]
    assert set(Path("/dev/shm").glob("snapfs-bench-*")) == shm_before  # images, copies removed


def _reporting_order() -> str | None:
    """The guest kernel's free page reporting order, if it has one."""
    try:
        return bench.PAGE_REPORTING_ORDER.read_text()
    except OSError:
        return None


def test_free_page_reporting_is_held_while_measuring_and_given_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake of the kernel's parameter (a plain file): raised for the run, restored after;
    left alone where it is already that high, or missing."""
    knob = tmp_path / "page_reporting_order"
    record = tmp_path / "record.json"
    monkeypatch.setattr(bench, "PAGE_REPORTING_ORDER", knob)
    monkeypatch.setattr(bench, "PAGE_REPORTING_RECORD", record)
    touched: list[int] = []

    def touch(nbytes: int) -> int:  # a fake: records what it was asked to write
        touched.append(nbytes)
        return nbytes

    monkeypatch.setattr(bench, "touch_free_memory", touch)
    assert bench.hold_page_reporting(touch=1 << 30) is None  # no such parameter: nothing held
    knob.write_text("5\n")
    held = bench.hold_page_reporting(touch=1 << 30)
    assert held == ("5", "11")
    assert knob.read_text() == "11\n"
    assert touched == [1 << 30]  # the free memory is written once it is held
    assert record.exists()
    bench.release_page_reporting(held)
    assert knob.read_text() == "5\n"
    assert not record.exists()
    # A bench killed while it held the order (no release): the next one gives back the order
    # the killed one found, not the one it finds.
    assert bench.hold_page_reporting(touch=1 << 30) == ("5", "11")
    assert bench.hold_page_reporting(touch=1 << 30) == ("5", "11")
    bench.release_page_reporting(("5", "11"))
    assert (knob.read_text(), record.exists()) == ("5\n", False)
    # Where the record cannot be written, the order is held and given back all the same.
    monkeypatch.setattr(bench, "PAGE_REPORTING_RECORD", tmp_path / "missing" / "record.json")
    assert bench.hold_page_reporting(touch=1 << 30) == ("5", "11")
    bench.release_page_reporting(("5", "11"))
    assert knob.read_text() == "5\n"
    monkeypatch.setattr(bench, "PAGE_REPORTING_RECORD", record)
    touched.clear()
    record.write_text('{"found": "3", "held": "10"}')  # not what the knob holds: stale
    knob.write_text("11\n")
    assert bench.hold_page_reporting(touch=1 << 30) is None
    assert knob.read_text() == "11\n"
    assert not record.exists()
    assert touched == []
    knob.write_text("five\n")  # not a number: left alone
    assert bench.hold_page_reporting(touch=1 << 30) is None
    assert knob.read_text() == "five\n"

    def stopped(nbytes: int) -> int:  # a fake: Ctrl-C while the memory is being written
        raise KeyboardInterrupt

    knob.write_text("5\n")
    monkeypatch.setattr(bench, "touch_free_memory", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench.hold_page_reporting(touch=1 << 30)
    assert knob.read_text() == "5\n"  # given back before the stop goes on
    res = bench.Results(args=vars(bench.build_parser().parse_args([])) | {"no_drop_caches": False})
    res.page_reporting = ["5", "11"]
    assert "free page reporting held at order 11 (from 5)." in bench.caption(res)


def test_free_memory_is_written_in_a_child_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    assert bench.touch_free_memory(64 * MiB + 123) == 64 * MiB  # what the child wrote
    monkeypatch.setattr(bench, "TOUCHED_MEMORY", 32 * MiB)
    assert bench.touch_free_memory(1 << 50) == 32 * MiB  # bounded, whatever asked
    monkeypatch.setattr(bench, "mem_available", lambda: bench.TOUCH_MARGIN + 16 * MiB)
    assert bench.touch_free_memory(1 << 50) == 16 * MiB  # the margin stays unwritten
    monkeypatch.setattr(bench, "mem_available", lambda: bench.TOUCH_MARGIN // 2)
    assert bench.touch_free_memory(1 << 50) == 0


def test_images_go_to_memory_only_if_asked_or_there_is_room() -> None:
    assert bench.images_in_memory("memory", 1 << 50)
    assert not bench.images_in_memory("disk", 1)
    assert not bench.images_in_memory("auto", 1 << 50)  # a PiB fits nowhere


def test_headline_goals_and_text() -> None:
    ratio = bench.Headline("(d)", "x ÷ y", [0.79], goal="≥ 0.8")
    assert ratio.met is False
    assert (ratio.text(), ratio.goal_text()) == ("0.79", "≥ 0.8 (missed)")
    seconds = bench.Headline("(l)", "mount", [2.5], unit="s", goal="< 3")
    assert seconds.met is True
    assert (seconds.text(), seconds.goal_text()) == ("2.50 s", "< 3 s (met)")
    assert bench.Headline("(e)", "mount, umount", [0.4, 0.3], unit="s").text() == "0.40 s, 0.30 s"
    assert bench.Headline("(e)", "m", [0.4]).goal_text() == ""
    assert bench.Headline("(k)", "t", [1.0], goal="≤ 1").met is True


def test_scale_sidecar_check() -> None:
    good = b"".join(b"%d 65536\n" % (i << 20) for i in range(3))
    bench._check_extents(good, 3)
    with pytest.raises(RuntimeError, match="2 lines, not 3"):
        bench._check_extents(good[: good.rindex(b"2097152")], 3)
    with pytest.raises(RuntimeError, match="line 2"):
        bench._check_extents(good.replace(b"1048576 65536", b"1048576 131072"), 3)


def test_only_runs_the_workloads_asked_for(short_tmp: Path) -> None:
    """``--only dk``: (d) and (k) and nothing else, in the data and in the headline; letters
    that name no workload are refused before a VM starts."""
    out = short_tmp / "bench.json"
    common = ["--size", "4M", "--disks", "1", "--rounds", "1", "--dirty-regions", "4"]
    common += ["--workdir", str(short_tmp), "--no-drop-caches", "--images", "memory"]
    assert bench.main([*common, "--only", "dk", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {r["workload"] for r in data["runs"]} == {"d-incr", "k-full"}
    workloads = [h["workload"][:3] for h in data["summary"]["headline"] if h["workload"]]
    assert workloads == ["(d)", "(k)"]
    assert data["mount_s"] == []
    assert data["pause_ms"] == {}
    for bad in ["dz", ""]:
        with pytest.raises(SystemExit, match="--only takes letters of abcdefghijkl"):
            bench.main([*common, "--only", bad])
    with pytest.raises(SystemExit, match="--steal-limit must be between 0 and 1"):
        bench.main([*common, "--steal-limit", "-0.5"])
    assert [p for p in short_tmp.iterdir() if p.name.startswith("snapfs-bench-")] == []


def test_runs_the_hypervisor_slowed_are_measured_again(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fake hypervisor that takes all the CPUs during every run: each run is measured three
    times, the last one is kept and the other two are reported apart."""
    clock = [0.0]

    def fake_steal() -> float:  # a fake: /proc/stat's steal, rising by 1,000 s per look
        clock[0] += 1000.0
        return clock[0]

    monkeypatch.setattr(bench, "steal_seconds", fake_steal)
    out = short_tmp / "bench.json"
    argv = ["--size", "4M", "--disks", "1", "--rounds", "1", "--only", "k"]
    argv += ["--workdir", str(short_tmp), "--no-drop-caches", "--images", "memory"]
    assert bench.main([*argv, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    kept = [(r["tool"], r["round"]) for r in data["runs"]]
    assert sorted(kept) == [("cp+sync", 0), ("snapfs-copy", 0)]
    assert sorted((r["tool"], r["round"]) for r in data["repeated"]) == sorted(kept * 2)
    assert "4 run(s) measured again because it took more than 10%" in data["markdown"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_bench_leaves_nothing(short_tmp: Path, signum: int) -> None:
    """Ctrl-C, SIGTERM or SIGHUP in the middle of (d), with snapfs mounted and nbdfuse serving,
    stops the bench with one line: its VM, mounts, nbdfuse processes and directories are gone."""
    argv = [sys.executable, "-m", "dev.bench", "--only", "d", "--size", "4M", "--disks", "1"]
    argv += ["--rounds", "1000", "--dirty-regions", "4", "--no-drop-caches", "--images"]
    argv += ["memory", "--workdir", str(short_tmp), "--json", str(short_tmp / "bench.json")]
    shm_before = set(Path("/dev/shm").glob("snapfs-bench-*"))
    order_before = _reporting_order()
    log = short_tmp / "bench.log"  # a file: a pipe would stay open in whatever it left behind
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=bench.SOURCE_ROOT, stdout=out, stderr=subprocess.STDOUT)
    try:
        poll(lambda: b"round 0 d-incr" in log.read_bytes() or proc.poll() is not None, 300)
        assert proc.poll() is None, log.read_text()
        assert mounts_below(short_tmp) != []  # snapfs's view and nbdfuse's mounts
        assert processes_naming(short_tmp) != {}  # QEMU and nbdfuse
        proc.send_signal(signum)
        assert proc.wait(timeout=120) == 128 + signum
        text = log.read_text()
        assert f"bench: stopped by {signal.Signals(signum).name}" in text
        assert "Traceback" not in text
        assert mounts_below(short_tmp) == []
        assert processes_naming(short_tmp) == {}
        assert [p for p in short_tmp.iterdir() if p.name.startswith("snapfs-bench-")] == []
        assert set(Path("/dev/shm").glob("snapfs-bench-*")) == shm_before
        assert not (short_tmp / "bench.json").exists()
        assert _reporting_order() == order_before
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # its own cleanup first
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for pid in processes_naming(short_tmp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for mp in reversed(mounts_below(short_tmp)):
            lazy_umount(mp)
        for leftover in set(Path("/dev/shm").glob("snapfs-bench-*")) - shm_before:
            shutil.rmtree(leftover, ignore_errors=True)
