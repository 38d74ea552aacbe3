"""Small file helpers shared by everything that keeps state in local files (policies, tunnels, certificates)."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

#: The largest policy, tunnel or list file read (10,000 sandboxes take about 5 MB); a larger one is refused
#: rather than read into memory.
MAX_FILE_BYTES = 64 * 1024 * 1024

#: What changes when a file is replaced or edited: inode (atomic replace), mtime and size (in-place edit).
Signature = tuple[int, int, int]


def file_signature(path: Path) -> Signature | None:
    """The file's identity for change polling; None when it does not exist (or cannot be read)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


class FileWatch:
    """The one "has this file changed?" check: every reloader (policy file, tunnel store, blocklists, certificates)
    asks `changed()` on its own schedule and reads the file again only when it says so. A missing file has the
    signature None, so a deletion and a re-creation are changes too."""

    __slots__ = ("_last", "paths")

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = tuple(paths)
        self._last: tuple[Signature | None, ...] | None = None

    def signature(self) -> tuple[Signature | None, ...]:
        return tuple(file_signature(path) for path in self.paths)

    def changed(self) -> bool:
        """True on the first call and whenever any watched file's signature differs from the last call's."""
        now = self.signature()
        if now == self._last:
            return False
        self._last = now
        return True

    def forget(self) -> None:
        """The next `changed()` answers True (after a failed reload, so a retry reads the file again)."""
        self._last = None


def read_regular_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The whole content of `path`, which must be a regular file of at most `max_bytes`. Raises OSError for
    anything else, with the reason in its message: missing, unreadable, a directory, a FIFO or device (opened
    without blocking, so a named pipe put in the file's place cannot stall the caller), or too large (a
    file filling the disk must not fill the memory too)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if st.st_size > max_bytes:
            raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > max_bytes:  # grew while being read
                raise OSError(errno.EFBIG, f"larger than {max_bytes} bytes", str(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` so that a reader sees the old or the new file, never a partial one, and a
    crash loses neither: temp file in the same folder, fsync, rename, fsync of the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is masked by the umask, and an old temp file may have other bits
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
