"""``python -m dev.bench`` end to end on tiny disks: it runs, reports and cleans up.

No timing is asserted anywhere (the benchmark is a separate command, ``make bench``); this only
proves that every workload runs against the same snapshot and nothing is left behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dev import bench
from tests.conftest import mounts_below

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
        "--workdir",
        str(tmp_path),
        "--json",
        str(out),
        "--no-drop-caches",
        "--images",
        "memory",
    ]
    shm_before = set(Path("/dev/shm").glob("snapfs-bench-*"))
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    summary = data["summary"]
    tools = {"snapfs", "nbdfuse", "nbdcopy"} | ({"qemu-fuse"} if not data["unavailable"] else set())
    assert set(summary["a-dd"]) == tools
    assert set(summary["b-cp"]) == tools - {"nbdcopy"}
    assert set(summary["c-parallel"]) == tools
    assert set(summary["d-incr"]) == {"snapfs-copy", "snapfs-pread", "nbdfuse-pread"}
    for row in summary["a-dd"].values():  # snapfs's speed over each tool's
        assert row["snapfs_ratio"] == pytest.approx(
            summary["a-dd"]["snapfs"]["mib_s"] / row["mib_s"]
        )
    assert set(summary["h-a"]) == set(summary["h-c"]) == {"snapfs", "snapfs-confined"}
    assert set(summary["i-throttled"]) == {"snapfs", "snapfs-throttled"}
    confined_runs = [r for r in data["runs"] if r["tool"] == "snapfs-confined"]
    assert len(confined_runs) == 2 * 2  # (a) and (c) in each of 2 rounds
    assert data["dirty_regions"] == 8
    assert len(data["mount_s"]) == 2
    assert len(data["umount_s"]) == 2
    assert summary["peak_rss_mib"]["snapfs"] > 0
    assert set(data["pause_ms"]) == {"full", "incremental"}
    assert all(len(v) == 2 and all(ms > 0 for ms in v) for v in data["pause_ms"].values())
    assert "(g) a running guest is paused" in data["markdown"]
    assert "| (a) dd bs=1M iflag=direct | snapfs |" in data["markdown"]
    # Every run moved the bytes it claims: 2 disks of 4 MiB in (c), 8 regions of 64 KiB in (d).
    assert {r["nbytes"] for r in data["runs"] if r["workload"] == "c-parallel"} == {8 << 20}
    assert {r["nbytes"] for r in data["runs"] if r["workload"] == "d-incr"} == {8 << 16}
    # Nothing left: no mount, no work directory (QEMU is stopped by Bench.close).
    assert mounts_below(tmp_path) == []
    assert [p for p in tmp_path.iterdir() if p.name.startswith("snapfs-bench-")] == []
    assert "images in memory" in data["markdown"]
    assert set(Path("/dev/shm").glob("snapfs-bench-*")) == shm_before  # images removed


def test_images_go_to_memory_only_if_asked_or_there_is_room() -> None:
    assert bench.images_in_memory("memory", 1 << 50)
    assert not bench.images_in_memory("disk", 1)
    assert not bench.images_in_memory("auto", 1 << 50)  # a PiB fits nowhere
