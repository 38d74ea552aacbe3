"""Small file helpers shared by everything that keeps state in local files (policies, tunnels, certificates)."""

from __future__ import annotations

import os
from pathlib import Path

#: What changes when a file is replaced or edited: inode (atomic replace), mtime and size (in-place edit).
Signature = tuple[int, int, int]


def file_signature(path: Path) -> Signature | None:
    """The file's identity for change polling; None when it does not exist (or cannot be read)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


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
