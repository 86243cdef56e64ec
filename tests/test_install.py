"""`make install PREFIX=...`: the command, man page, bash completion and systemd units land where
they belong and work; the units pass `systemd-analyze verify` (or, without it, are parsed)."""

from __future__ import annotations

import configparser
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from dev import manpage
from snapfs import cli
from snapfs.records import DiskFacts, Facts

ROOT = Path(__file__).resolve().parents[1]
UNITS = ["snapfs-backup@.service", "snapfs-backup@.timer"]


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pfx = tmp_path_factory.mktemp("prefix")
    proc = subprocess.run(
        ["make", "-C", str(ROOT), "install", f"PREFIX={pfx}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return pfx


def test_generated_man_page_and_completion_are_current() -> None:
    assert manpage.main(["--check", str(ROOT / "contrib")]) == 0


def test_everything_is_installed(prefix: Path) -> None:
    for rel in [
        "bin/snapfs",
        "bin/snapfs-rsync-remote",
        "share/man/man1/snapfs.1",
        "share/bash-completion/completions/snapfs",
        "share/doc/snapfs/snapfs.default",
        *(f"lib/systemd/system/{u}" for u in UNITS),
    ]:
        assert (prefix / rel).is_file(), rel
    assert os.access(prefix / "bin/snapfs-rsync-remote", os.X_OK)
    version = subprocess.run(
        [str(prefix / "bin/snapfs"), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip().startswith("snapfs ")
    # The installed command is the installed package, not the work tree.
    where = subprocess.run(
        [str(prefix / "lib/snapfs/bin/python"), "-c", "import snapfs; print(snapfs.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert where.stdout.startswith(str(prefix))
    # With its compiled READ path (make deps installs the compiler and Python's headers).
    subprocess.run(
        [str(prefix / "lib/snapfs/bin/python"), "-c", "import snapfs._fastpath"],
        check=True,
        cwd="/",
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )


def test_man_page_renders_every_command(prefix: Path) -> None:
    if not shutil.which("man"):
        pytest.skip("no man(1) to render with")
    out = subprocess.run(
        ["man", "-l", str(prefix / "share/man/man1/snapfs.1")],
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, MANWIDTH="200"),
    ).stdout
    out = re.sub(".\b", "", out)  # overstrike bold and underline
    for name in manpage.subcommands(cli.build_parser()):
        assert f"snapfs {name}" in out, name
    for words in ["--incremental ID", "--no-freeze", "EXIT STATUS", "SNAPFS_MOUNT"]:
        assert words in out, words


def instance_units(prefix: Path, dest: Path, vmid: str = "100") -> list[Path]:
    """The installed templates as instance units (what `systemctl enable ...@100.timer` loads)."""
    dest.mkdir()
    out = []
    for unit in UNITS:
        path = dest / unit.replace("@.", f"@{vmid}.")
        path.write_text((prefix / "lib/systemd/system" / unit).read_text())
        out.append(path)
    return out


def test_units_verify(prefix: Path, tmp_path: Path) -> None:
    units = instance_units(prefix, tmp_path / "units")
    analyze = shutil.which("systemd-analyze")
    if analyze:
        proc = subprocess.run(
            [analyze, "verify", *map(str, units)],
            capture_output=True,
            text=True,
            env=dict(os.environ, MANPATH=str(prefix / "share/man")),
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == "", proc.stderr
    # Parsed as well (the only check without systemd-analyze).
    service = parse_unit(units[0])
    timer = parse_unit(units[1])
    assert service["Service"]["Type"] == "oneshot"
    assert service["Service"]["KillMode"] == "mixed"
    assert timer["Timer"]["OnCalendar"]
    assert timer["Install"]["WantedBy"] == "timers.target"


def parse_unit(path: Path) -> configparser.RawConfigParser:
    cp = configparser.RawConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string(path.read_text())
    return cp


def systemd_expand(line: str, env: dict[str, str], instance: str) -> list[str]:
    """ExecStart= as systemd runs it: %i, then ${VAR} (one word) and $VAR (split)."""
    words = []
    for word in shlex.split(line.replace("%i", instance)):
        if word.startswith("$") and not word.startswith("${"):
            words += env.get(word[1:], "").split()
            continue
        for key, value in env.items():
            word = word.replace("${" + key + "}", value)
        words.append(word)
    return words


def test_service_runs_snapfs_run_with_the_provider(prefix: Path) -> None:
    service = parse_unit(prefix / "lib/systemd/system/snapfs-backup@.service")
    env: dict[str, str] = {}
    # configparser keeps only the last Environment=: read them from the file.
    for raw in (prefix / "lib/systemd/system/snapfs-backup@.service").read_text().splitlines():
        if raw.startswith("Environment="):
            key, _, value = shlex.split(raw.removeprefix("Environment="))[0].partition("=")
            env[key] = value
    argv = systemd_expand(service["Service"]["ExecStart"], env, "100")
    assert argv[0] == str(prefix / "bin/snapfs")
    args = cli.parse_args(argv[1:])
    assert (args.command, args.vmid, args.incremental) == ("run", "100", "nightly")
    assert args.argv == [
        str(prefix / "bin/snapfs"),
        "copy",
        "--discard",
        "{}",
        "/var/backups/snapfs/100",
    ]
    assert (
        cli.build_parser().parse_args(cli.command_line(args.argv, Path("/m"))[1:]).dest
        == "/var/backups/snapfs/100"
    )


def test_bash_completion(prefix: Path, tmp_path: Path) -> None:
    if not shutil.which("bash"):
        pytest.skip("no bash")
    (tmp_path / "run/.state/4711").mkdir(parents=True)

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        script = (
            f"source {prefix}/share/bash-completion/completions/snapfs\n"
            f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)})\n"
            f"COMP_CWORD={len(words) - 1}\n"
            "_snapfs\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n"
        )
        out = subprocess.run(
            ["bash", "--norc", "-c", script],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, SNAPFS_RUN_DIR=str(tmp_path / "run")),
        )
        return sorted(filter(None, out.stdout.splitlines()))

    assert complete("snapfs ") == sorted(
        [*manpage.subcommands(cli.build_parser()), "--quiet", "--verbose", "--version", "-q", "-v"]
    )
    assert complete("snapfs run --inc") == ["--incremental"]
    assert complete("snapfs mount 100 --no") == ["--no-freeze", "--no-tune"]
    assert complete("snapfs umount ") == ["4711"]
    assert complete("snapfs status --j") == ["--json"]
    assert "--commit" in complete("snapfs umount 4711 --")


def test_the_readme_explains_every_field_of_snapfs_json() -> None:
    """The README's table of snapfs.json follows the record that writes it."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| field | meaning |") :]
    table = table[: table.index("\n\n")]
    names = {f.name for cls in (Facts, DiskFacts) for f in dataclasses.fields(cls)}
    missing = [n for n in sorted(names) if f"`{n}`" not in table]
    assert not missing, f"README's snapfs.json table lacks {missing}"
