"""SIGTERM and SIGHUP to a running pytest: the test in progress and its fixtures clean up, and
no later test starts (tests/stopsignals.py). A real pytest in a process of its own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dev.devvm import poll

ROOT = Path(__file__).resolve().parents[1]

SUITE = """
import os
import threading
from pathlib import Path

import pytest

MARKS = Path(os.environ["STOP_MARKS"])


@pytest.fixture
def resource():
    try:
        yield
    finally:
        (MARKS / "fixture torn down").touch()


def test_first(resource):
    try:
        (MARKS / "ready").touch()
        if os.environ["STOP_SWALLOW"] == "1":
            try:
                threading.Event().wait(60)
            except KeyboardInterrupt:
                (MARKS / "swallowed").touch()
        else:
            threading.Event().wait(60)
    finally:
        (MARKS / "finally ran").touch()


def test_second():
    (MARKS / "second test ran").touch()
"""


@pytest.mark.parametrize("swallow", [False, True], ids=["raised", "caught by the test"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_stops_the_run_through_its_cleanup(
    tmp_path: Path, signum: signal.Signals, swallow: bool
) -> None:
    (tmp_path / "test_suite.py").write_text(SUITE)
    marks = tmp_path / "marks"
    marks.mkdir()
    env = dict(os.environ, STOP_MARKS=str(marks), STOP_SWALLOW=str(int(swallow)))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.stopsignals",
            "-p",
            "no:cacheprovider",
            "-c",
            "/dev/null",
            "--rootdir",
            str(tmp_path),
            "-q",
            str(tmp_path / "test_suite.py"),
        ],
        cwd=ROOT,  # python -m puts it on sys.path: tests.stopsignals imports
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        poll(lambda: (marks / "ready").exists() or proc.poll() is not None, 60, "the test")
        assert proc.poll() is None, proc.communicate()[0].decode()
        proc.send_signal(signum)
        out = proc.communicate(timeout=60)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert f"got {signum.name}" in out, out
    done = {p.name for p in marks.iterdir()}
    expected = {"ready", "finally ran", "fixture torn down"} | ({"swallowed"} if swallow else set())
    assert done == expected, out  # and not "second test ran"
