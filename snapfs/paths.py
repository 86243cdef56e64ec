"""Paths root can trust: where snapfs looks, creates, replaces and removes anything.

snapfs runs as root on paths that people and timers give it: mountpoints, the fleecing
directory, the session state, the QMP and guest agent sockets. A path is *trusted* when no user
but root can change what it leads to, like sshd's StrictModes. Walked from ``/``, one component
at a time, without letting the kernel follow anything:

- every component (directory, symlink, the final socket) is owned by root;
- every directory is not writable by group or others (an ACL that grants write access shows in
  the group bits, so it is refused too), except a root-owned sticky directory such as /tmp or
  /dev/shm: there nobody but root can rename or remove root's entries, which is why the entry
  below it must be root's as well;
- a symlink is followed only when it passes those rules itself (``/var/run -> /run``): its
  target is walked the same way.

Anything else is refused with a one-line ``UsageError`` naming the path given and the component
that is not safe ("fleecing directory /tmp/fl is unsafe: /tmp/fl is owned by uid 1000, not root").

Inside a trusted directory no other user can create, rename or remove a name, so what was
checked stays what is used. On top of that, snapfs never hands such a name to a path lookup
again where it can avoid it: files are created (``O_EXCL``), read, replaced (rename) and removed
relative to a descriptor of the walked directory, always with ``O_NOFOLLOW``; a missing
directory is made by ``mkdirat`` in its trusted parent and then checked like any other (in a
sticky directory someone may have made it first).

Relative paths are resolved against the working directory first (``absolute``), before the
serving process forks. '..' is refused in paths people give; root's own symlinks may use it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from snapfs.errors import UsageError

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's own limit
# Directories that snapfs makes on the way to one it was asked to make (e.g. /var/lib/snapfs).
PARENT_MODE = 0o755


def absolute(text: str | os.PathLike[str], what: str) -> Path:
    """``text`` as an absolute path: a relative one is taken from the working directory.

    Lexical only (nothing is resolved here); newlines, NULs and '..' are refused."""
    s = os.fspath(text)
    if "\n" in s or "\0" in s:
        raise UsageError(f"{what} {s!r} contains a newline or NUL")
    path = Path(s)
    if ".." in path.parts:
        raise UsageError(f"{what} {s!r} contains '..'")
    if not path.is_absolute():
        try:
            path = Path(os.getcwd()) / path
        except FileNotFoundError:
            raise UsageError(
                f"{what} {s!r} is relative and the working directory is gone"
            ) from None
    return path


def _unsafe(what: str, shown: Path, comp: str, st: os.stat_result) -> UsageError | None:
    """Why ``comp`` makes the path unsafe, or None."""
    if st.st_uid != 0:
        return UsageError(f"{what} {shown} is unsafe: {comp} is owned by uid {st.st_uid}, not root")
    if (
        stat.S_ISDIR(st.st_mode)
        and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        and not st.st_mode & stat.S_ISVTX
    ):
        return UsageError(
            f"{what} {shown} is unsafe: {comp} is writable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o})"
        )
    return None


class Walk:
    """A path walked through trusted directories: ``dirs`` holds a descriptor (``O_PATH``) of
    each directory from ``/`` down, ``rest`` the components not walked: empty when the whole
    path is a directory (the last of ``dirs``); one name for a final component that is not a
    directory (``st`` is its lstat) or a dead mount (``st`` None, ``dead``); or the missing
    components, the first of which does not exist (``st`` None).
    """

    def __init__(self) -> None:
        self.dirs: list[tuple[str, int]] = []
        self.rest: list[str] = []
        self.st: os.stat_result | None = None
        self.dead = False
        self.created = False  # the final directory was made by this walk

    @property
    def path(self) -> Path:
        """The canonical path: no symlinks, no '.' or '..'."""
        return Path("/", *[name for name, _ in self.dirs[1:]], *self.rest)

    @property
    def fd(self) -> int:
        """The last directory walked."""
        return self.dirs[-1][1]

    def close(self) -> None:
        while self.dirs:
            os.close(self.dirs.pop()[1])

    def __enter__(self) -> Walk:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def walk(path: Path, what: str, *, create: int | None = None, shown: Path | None = None) -> Walk:
    """Walk the absolute ``path`` from ``/`` through trusted directories (see the module).

    With ``create`` (a mode), missing directories are made: the last with that mode, those on
    the way with ``PARENT_MODE``. Raises UsageError naming ``what`` and ``shown`` (default:
    ``path``). The caller closes the result.
    """
    shown = shown or path
    if not path.is_absolute():
        raise UsageError(f"{what} {shown} is not an absolute path")
    w = Walk()
    try:
        fd = os.open("/", _DIR_FLAGS)
        w.dirs.append(("", fd))
        err = _unsafe(what, shown, "/", os.fstat(fd))
        if err:
            raise err
        todo = list(reversed(path.parts[1:]))
        links = 0
        while todo:
            name = todo.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(w.dirs) > 1:
                    os.close(w.dirs.pop()[1])
                continue
            last = not any(n not in ("", ".") for n in todo)
            comp = str(w.path / name)
            try:
                try:
                    st = os.stat(name, dir_fd=w.fd, follow_symlinks=False)
                except FileNotFoundError:
                    if create is None:
                        w.rest = [name, *reversed(todo)]
                        return w
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, create if last else PARENT_MODE, dir_fd=w.fd)
                        w.created = last
                    st = os.stat(name, dir_fd=w.fd, follow_symlinks=False)
                except OSError as e:
                    if last and e.errno == errno.ENOTCONN:  # a FUSE mount whose server is gone
                        w.rest, w.dead = [name], True
                        return w
                    raise
                err = _unsafe(what, shown, comp, st)
                if err:
                    raise err
                if stat.S_ISLNK(st.st_mode):
                    links += 1
                    if links > _MAX_SYMLINKS:
                        raise UsageError(f"{what} {shown}: too many symbolic links")
                    target = os.readlink(name, dir_fd=w.fd)
                    if target.startswith("/"):
                        while len(w.dirs) > 1:
                            os.close(w.dirs.pop()[1])
                    todo.extend(reversed(target.split("/")))
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    if not last:
                        raise UsageError(f"{what} {shown}: {comp} is not a directory")
                    w.rest, w.st = [name], st
                    return w
                fd = os.open(name, _DIR_FLAGS, dir_fd=w.fd)
                w.dirs.append((name, fd))
                # The directory as opened (the one checked: only root can change its parent).
                err = _unsafe(what, shown, comp, os.fstat(fd))
                if err:
                    raise err
            except OSError as e:
                raise UsageError(f"{what} {shown}: {comp}: {e.strerror}") from e
        return w
    except BaseException:
        w.close()
        raise


def resolve(path: Path, what: str) -> Path:
    """The canonical form of ``path`` once checked as far as it exists (the rest may be made
    later by ``open_dir(create=...)``, which checks again)."""
    with walk(path, what) as w:
        return w.path


class Dir:
    """A trusted directory, open as an ``O_PATH`` descriptor; every name below it is used
    relative to that descriptor, without following symlinks."""

    def __init__(self, w: Walk) -> None:
        self._walk = w
        self.path = w.path
        self.name = w.dirs[-1][0]  # in its parent ("" for /)
        self.fd = w.fd
        self.created = w.created

    @property
    def parent_fd(self) -> int | None:
        """The directory it is in (None for ``/``)."""
        return self._walk.dirs[-2][1] if len(self._walk.dirs) > 1 else None

    def close(self) -> None:
        self._walk.close()

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.fd)

    def create(self, name: str, mode: int = 0o600) -> int:
        """A new file ``name`` (never an existing one), open read-write."""
        return self.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)

    def read_text(self, name: str) -> str:
        fd = self.open(name, os.O_RDONLY)
        with os.fdopen(fd) as f:
            return f.read()

    def write_atomic(self, name: str, data: str, mode: int = 0o600) -> None:
        """Replace ``name`` with a new file (rename), so a reader sees the old or the new one."""
        tmp = f".{name}.tmp"
        self.unlink(tmp)
        fd = self.create(tmp, mode)
        with os.fdopen(fd, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)

    def unlink(self, name: str) -> bool:
        """Remove ``name`` (a symlink itself, never what it points to); False if it is gone."""
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            return False
        return True

    def mkdir(self, name: str, mode: int = 0o700) -> None:
        os.mkdir(name, mode, dir_fd=self.fd)

    def rmdir(self, name: str) -> None:
        os.rmdir(name, dir_fd=self.fd)

    def listdir(self) -> list[str]:
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def open_dir(
    path: Path, what: str, *, create: int | None = None, shown: Path | None = None
) -> Iterator[Dir]:
    """The trusted directory ``path``; with ``create`` (a mode) made if missing."""
    w = walk(path, what, create=create, shown=shown)
    d = Dir(w)
    try:
        shown = shown or path
        if w.dead:
            raise UsageError(f"{what} {shown} is a dead mount (transport endpoint not connected)")
        if w.rest and w.st is None:
            raise UsageError(f"{what} {shown} does not exist")
        if w.rest:
            raise UsageError(f"{what} {shown} is not a directory")
        yield d
    finally:
        d.close()


def exists(path: Path, what: str) -> bool:
    """Whether the path ``path``, checked as far as it exists, leads to something (a UsageError
    if it is not trusted). What it leads to is for the caller to check."""
    with walk(path, what) as w:
        return w.dead or not w.rest or w.st is not None


# Files by path: the directory is walked, the file used relative to it.


def read_text(path: Path, what: str) -> str:
    """The text of ``path``; FileNotFoundError if it (or its directory) is missing, OSError
    (ELOOP) for a symlink."""
    with walk(path.parent, what) as w:
        if w.rest and w.st is None and not w.dead:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))
        if w.rest:
            raise UsageError(f"{what} {path.parent} is not a directory")
        return Dir(w).read_text(path.name)


def write_atomic(path: Path, data: str, what: str, mode: int = 0o600) -> None:
    with open_dir(path.parent, what) as d:
        d.write_atomic(path.name, data, mode)


def unlink(path: Path, what: str) -> bool:
    """Remove ``path`` if it exists (False if not, or if its directory is gone)."""
    with walk(path.parent, what) as w:
        if w.rest and w.st is None and not w.dead:
            return False
        if w.rest:
            raise UsageError(f"{what} {path.parent} is not a directory")
        return Dir(w).unlink(path.name)
