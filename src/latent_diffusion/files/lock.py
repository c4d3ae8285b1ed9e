"""One process at a time in a run folder: an advisory file lock that dies with its process."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from latent_diffusion.files.atomic import check_writable, remove_temporaries

LOCK_FILE = ".lock"


class RunFolderBusy(RuntimeError):
    """Another live process holds the run folder."""


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike, enabled: bool = True) -> Iterator[Path]:
    """Hold `folder`'s lock for the block; a second process is refused with a message naming the holder.

    The lock is `flock` on `folder/.lock`: the kernel releases it when its process ends, so a run killed with
    `kill -9` leaves no stale lock. Holding it, the temporary files of writes that a crash interrupted are removed
    (no other process can be writing them). A folder it created and nothing else wrote in is removed again, so
    input refused at start-up leaves nothing behind. `enabled=False` (the other ranks of a torchrun job) does
    nothing.
    """
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    check_writable(folder, "--out", folder=True)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK_FILE, "a+")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunFolderBusy(f"--out {folder} is in use by another run ({_holder(handle)}); wait for it to "
                                "finish or stop it, or use another --out folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime(
            "%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}) + "\n")
        handle.flush()
        remove_temporaries(folder)
        try:
            yield folder
        finally:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                (folder / LOCK_FILE).unlink()
                folder.rmdir()
            fcntl.flock(handle, fcntl.LOCK_UN)


def _holder(handle) -> str:
    """Who holds the lock, as its file says."""
    handle.seek(0)
    try:
        holder = json.loads(handle.read() or "{}")
    except json.JSONDecodeError:
        return "holder unknown"
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}: "
            f"{holder.get('command', '?')}")
