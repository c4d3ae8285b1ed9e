"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, keep_previous: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed onto `path`.

    With `keep_previous`, the file being replaced is first hard-linked there (atomically), so the last good
    version survives until the new one is complete, and `path` itself never goes missing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        if keep_previous is not None and path.is_file():
            _link_over(path, Path(keep_previous))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a part."""
    atomic_write_with(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_with(path: str | os.PathLike, writer: Callable[[Path], object]) -> None:
    """Call `writer(tmp_path)` and move the result onto `path` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def remove_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (`.NAME.*.tmp`) that interrupted atomic writes left anywhere under `folder`;
    returns them. Only for a folder no other process is writing in (see `io/lock.py`)."""
    removed = [path for path in Path(folder).rglob(".*.tmp") if path.is_file()]
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """Raise a clear OSError now, before any work, if `path` (a file, or with `folder` a folder) cannot be written:
    it is a folder where a file is wanted (or the reverse), lies under a regular file, or its folder is read-only.
    Nothing is created."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise OSError(errno.EISDIR if path.is_dir() else errno.ENOTDIR,
                      f"{what} {path} is {'a folder' if path.is_dir() else 'a file'}, expected "
                      f"{'a folder' if folder else 'a file'}")
    where = (path if folder else path.parent).absolute()  # the folder written in
    existing = next(p for p in (where, *where.parents) if p.exists())
    if not existing.is_dir():
        raise OSError(errno.ENOTDIR, f"{what} {path} lies under {existing}, which is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, f"{what} {path}: cannot write in {existing} (read-only)")


def _link_over(source: Path, target: Path) -> None:
    """Make `target` a hard link to `source`, replacing `target` atomically."""
    link = target.with_name(f".{target.name}.link.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(source, link)
    except OSError:  # a file system without hard links: copy instead
        import shutil
        shutil.copyfile(source, link)
    os.replace(link, target)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
