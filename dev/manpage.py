"""Generates the man page and the bash completion from the CLI's argparse definitions, so they
never drift from ``snapfs --help``.

    python -m dev.manpage contrib          # writes snapfs.1 and snapfs.bash-completion
    python -m dev.manpage --check contrib  # exit 1 if they are out of date (a test checks)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from snapfs import __version__
from snapfs.cli import build_parser
from snapfs.errors import (
    FuseError,
    NBDError,
    QMPError,
    SetupError,
    SnapfsError,
    StateError,
    TeardownError,
    UsageError,
)

MAN = "snapfs.1"
COMPLETION = "snapfs.bash-completion"

# Options whose value is a directory, a file/socket, or a VMID/session (for completion).
DIR_METAVARS = {"DIR"}
FILE_METAVARS = {"SOCKET"}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _help_of(parser: argparse.ArgumentParser, name: str) -> str:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                if choice.dest == name:
                    return choice.help or ""
    return ""


def _options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        yield action


def _esc(text: str) -> str:
    """roff-escape running text."""
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        "\\&" + line if line.startswith((".", "'")) else line for line in out.split("\n")
    )


def _action_tag(action: argparse.Action) -> str:
    if not action.option_strings:
        name = str(action.metavar or action.dest)
        return _esc(name) if name.startswith("--") else f"\\fI{_esc(name).upper()}\\fR"
    names = ", ".join(f"\\fB{_esc(o)}\\fR" for o in action.option_strings)
    if action.nargs == 0:
        return names
    metavar = action.metavar or action.dest.upper()
    return f"{names} \\fI{_esc(str(metavar))}\\fR"


EXIT_CODES: list[tuple[int, str]] = [
    (0, "success (for \\fBrun\\fR: COMMAND succeeded and the backup was committed)"),
    (SnapfsError.exit_code, "an error without a more specific code"),
    (UsageError.exit_code, "bad input: a VMID, a path, an option; nothing was changed"),
    (
        StateError.exit_code,
        "the session is not in a state for this (already mounted, not "
        "mounted, serving process gone)",
    ),
    (QMPError.exit_code, "talking to QEMU failed or QEMU refused"),
    (SetupError.exit_code, "a set-up step failed; what was added is rolled back"),
    (TeardownError.exit_code, "teardown could not restore everything; run \\fBsnapfs cleanup\\fR"),
    (NBDError.exit_code, "the NBD connection to QEMU's export failed"),
    (FuseError.exit_code, "mounting or serving the FUSE file system failed"),
    (9, "\\fBcopy\\fR, \\fBpoints\\fR or \\fBrestore\\fR failed"),
    (10, "\\fBverify\\fR found a restore point that does not match its manifest"),
    (127, "\\fBrun\\fR: COMMAND not found"),
    (128, "+N: \\fBrun\\fR got signal N (or COMMAND died of it); the backup was aborted"),
]


def man_page(parser: argparse.ArgumentParser) -> str:
    lines = [
        f'.TH SNAPFS 1 "" "snapfs {__version__}" "User Commands"',
        ".SH NAME",
        "snapfs \\- " + _esc(parser.description or ""),
        ".SH SYNOPSIS",
    ]
    subs = subcommands(parser)
    for name, sub in subs.items():
        usage = " ".join(sub.format_usage().split())
        usage = usage.removeprefix("usage: ").replace(" [-h] [-v] [-q]", "")
        lines += [
            ".PP",
            f"\\fBsnapfs {name}\\fR " + _esc(usage.split(" ", 2)[2])
            if usage.count(" ") >= 2
            else f"\\fBsnapfs {name}\\fR",
        ]
    lines += [
        ".SH DESCRIPTION",
        _esc(
            "snapfs mounts a consistent point-in-time view of a running QEMU/KVM or Proxmox "
            "VE virtual machine's disks as plain files, for backups with rsync, cp, dd or "
            "borg. The guest keeps running; its writes first move the old data into a "
            "fleecing image until the view is unmounted. The tree holds <disk>.raw (the "
            "disk at the snapshot instant), <disk>.dirty (the readable regions, one "
            "'OFFSET LENGTH' per line), snapfs.json (facts), and on Proxmox "
            "qemu-server.conf and qemu-server.fw (the guest's configuration). A read outside "
            "the readable regions fails with ENODATA, never with zeros."
        ),
        ".SH GLOBAL OPTIONS",
    ]
    for action in _options(parser):
        lines += [".TP", _action_tag(action), _esc(action.help or "")]
    lines.append(".SH COMMANDS")
    for name, sub in subs.items():
        lines += [".SS " + name, _esc(sub.description or _help_of(parser, name))]
        for action in _options(sub):
            if action.dest in ("verbose", "quiet"):
                continue
            lines += [".TP", _action_tag(action), _esc(action.help or "")]
        if sub.epilog:
            lines += [".PP", _esc(sub.epilog)]
    lines += [".SH EXIT STATUS"]
    for code, text in EXIT_CODES:
        lines += [".TP", f"\\fB{code}\\fR", text]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBSNAPFS_MOUNT\\fR, \\fBSNAPFS_VMID\\fR",
        _esc("set for COMMAND by snapfs run: the mountpoint and the VMID."),
        ".TP",
        "\\fBSNAPFS_RUN_DIR\\fR",
        _esc("instead of /run/snapfs: default mountpoints and session state."),
        ".TP",
        "\\fBSNAPFS_PVE_DIR\\fR",
        _esc("instead of /etc/pve: where the Proxmox guest configuration is read."),
        ".TP",
        "\\fBSNAPFS_LOG_FILE\\fR",
        _esc("log to this file instead of stderr, the journal or syslog."),
        ".TP",
        "\\fBSNAPFS_COMPILED\\fR",
        _esc("0: serve every READ from Python, without the compiled READ path."),
        ".SH FILES",
        ".TP",
        _esc("/var/run/qemu-server/VMID.qmp, /var/run/qemu-server/VMID.qga"),
        _esc("the VM's QMP and guest agent sockets (Proxmox's layout)."),
        ".TP",
        _esc("/run/snapfs/VMID"),
        _esc("the default mountpoint."),
        ".TP",
        _esc("/run/snapfs/.state/VMID/state.json"),
        _esc("everything a teardown needs; snapfs cleanup uses it after a crash."),
        ".TP",
        _esc("/var/lib/snapfs/VMID"),
        _esc("fleecing images and the incremental bitmap record."),
        ".TP",
        _esc("/etc/default/snapfs"),
        _esc("settings of the snapfs-backup@VMID.service nightly backup."),
        ".SH EXAMPLES",
        ".nf",
        _esc("snapfs run 100 --incremental nightly -- snapfs copy {} /backup/100 --discard"),
        _esc("snapfs run 100 -- rsync -a --sparse {}/ /backup/100/"),
        _esc("snapfs run 100 --incremental nightly -- snapfs copy {} /backup/100 --keep 7"),
        _esc("snapfs restore /backup/100 --at 2026-11-24 scsi0 /var/tmp/scsi0-tuesday.raw"),
        _esc("systemctl enable --now snapfs-backup@100.timer"),
        _esc("snapfs status --json"),
        ".fi",
        ".SH SEE ALSO",
        "\\fBrsync\\fR(1), \\fBqemu-img\\fR(1), \\fBsystemd.timer\\fR(5), "
        "\\fBsnapfs-rsync-remote\\fR",
    ]
    return "\n".join(lines) + "\n"


def bash_completion(parser: argparse.ArgumentParser) -> str:
    subs = subcommands(parser)
    cases = []
    for name, sub in subs.items():
        opts = sorted(o for a in _options(sub) for o in a.option_strings)
        dir_opts = sorted(
            o for a in _options(sub) if a.metavar in DIR_METAVARS for o in a.option_strings
        )
        file_opts = sorted(
            o for a in _options(sub) if a.metavar in FILE_METAVARS for o in a.option_strings
        )
        value_opts = sorted(
            o for a in _options(sub) if a.option_strings and a.nargs != 0 for o in a.option_strings
        )
        if name in ("mount", "run", "cleanup"):
            first = "_snapfs_vmids"
        elif name in ("umount", "status"):
            first = "_snapfs_sessions"
        else:
            first = "_snapfs_dirs"
        cases.append(f"""        {name})
            opts="{" ".join(opts)}"
            dir_opts="{" ".join(dir_opts)}"
            file_opts="{" ".join(file_opts)}"
            value_opts="{" ".join(value_opts)}"
            first={first}
            ;;""")
    top = sorted(o for a in _options(parser) for o in a.option_strings)
    return f"""# bash completion for snapfs; generated by dev/manpage.py from the CLI definitions
# (python -m dev.manpage contrib). Do not edit.

_snapfs_vmids() {{
    local f ids=""
    for f in /etc/pve/qemu-server/*.conf /var/run/qemu-server/*.qmp; do
        [ -e "$f" ] || continue
        f=${{f##*/}}
        ids="$ids ${{f%.*}}"
    done
    COMPREPLY=($(compgen -W "$ids" -- "$cur"))
}}

_snapfs_sessions() {{
    local d ids=""
    for d in "${{SNAPFS_RUN_DIR:-/run/snapfs}}"/.state/*; do
        [ -e "$d" ] && ids="$ids ${{d##*/}}"
    done
    COMPREPLY=($(compgen -W "$ids" -- "$cur"))
}}

_snapfs_dirs() {{
    COMPREPLY=($(compgen -d -- "$cur"))
}}

_snapfs() {{
    local cur prev words cword
    _init_completion 2>/dev/null || {{
        cur=${{COMP_WORDS[COMP_CWORD]}}
        prev=${{COMP_WORDS[COMP_CWORD-1]}}
        words=("${{COMP_WORDS[@]}}")
        cword=$COMP_CWORD
    }}
    local i cmd="" dashdash=0 nargs=0
    for ((i = 1; i < cword; i++)); do
        if [ "${{words[i]}}" = "--" ]; then
            dashdash=$i
            break
        fi
        if [ -z "$cmd" ] && [[ ${{words[i]}} != -* ]]; then
            cmd=${{words[i]}}
        elif [ -n "$cmd" ] && [[ ${{words[i]}} != -* ]] && [[ ${{words[i-1]}} != -* ]]; then
            nargs=$((nargs + 1))
        fi
    done
    if [ "$dashdash" -gt 0 ]; then
        # After 'snapfs run ... --': complete the backup command like any command line.
        if [ "$((dashdash + 1))" -eq "$cword" ]; then
            COMPREPLY=($(compgen -c -- "$cur"))
        else
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return
    fi
    if [ -z "$cmd" ]; then
        COMPREPLY=($(compgen -W "{" ".join(subs)} {" ".join(top)}" -- "$cur"))
        return
    fi
    local opts dir_opts file_opts value_opts first
    case $cmd in
{chr(10).join(cases)}
        *) return ;;
    esac
    if [[ " $dir_opts " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -d -- "$cur"))
        return
    fi
    if [[ " $file_opts " == *" $prev "* ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
        return
    fi
    if [[ " $value_opts " == *" $prev "* ]]; then
        return
    fi
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
    elif [ "$nargs" -eq 0 ]; then
        $first
    else
        _snapfs_dirs
    fi
}}
complete -F _snapfs snapfs
"""


def generated() -> dict[str, str]:
    parser = build_parser()
    return {MAN: man_page(parser), COMPLETION: bash_completion(parser)}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="only check that they are current")
    ap.add_argument("dir", type=Path, help="where they go (contrib/)")
    args = ap.parse_args(argv)
    stale = []
    for name, text in generated().items():
        path = args.dir / name
        if path.exists() and path.read_text() == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        print(
            f"out of date (run python -m dev.manpage {args.dir}): {', '.join(stale)}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
