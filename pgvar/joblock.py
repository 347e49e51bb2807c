"""One process at a time in a job folder: an OS lock that a killed process cannot leave behind.

Two sweeps started into the same ``hydra.sweep.dir`` (or a sweep re-run while the first
is still going) reach the same job folders. Before a run reads or writes anything there,
``claim_job`` takes an exclusive ``flock`` on ``JOB/.pgvar.lock``; a process that cannot
get it leaves the folder alone (its job is ``skipped``, with the holder's pid in the log).
The lock belongs to the open file: the OS drops it when the holder exits, however it
exits (``kill -9`` included), so a killed run never blocks a re-run, and the lock file
itself, left behind, means nothing.

What this guarantees: ``metrics.csv`` and ``run.json`` of a job are written by one
process at a time, so ``complete`` in a run.json is said only by the process that wrote
every row of that metrics.csv. What it does not cover: Hydra's own files in the folder
(``.hydra/*.yaml``, the job's ``.log``) are written by Hydra before pgvar's code runs, so
the second sweep rewrites them (same content) or appends its lines. ``flock`` works on
local file systems and on NFS v4 (as a POSIX lock); file systems without locking make
``claim_job`` raise ``OSError``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".pgvar.lock"


@dataclass(frozen=True)
class Claim:
    """The outcome of ``claim_job``: ``held`` when this process owns the folder now;
    otherwise ``holder`` says who does (as the holder wrote it: pid and host)."""

    held: bool
    holder: str = ""


def read_holder(fd: int) -> str:
    """What the current holder wrote into the lock file (pid and host), if anything."""
    try:
        return os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown process"
    except OSError:
        return "unknown process"


def write_holder(fd: int) -> None:
    """Put this process' pid and host into the lock file (for the other process' message)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)


@contextmanager
def claim_job(job_dir: Path) -> Iterator[Claim]:
    """Hold ``job_dir``'s lock for the ``with`` block, or yield ``Claim(False, holder)``
    at once when another process holds it (this call never waits)."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            yield Claim(False, read_holder(fd))
            return
        write_holder(fd)
        yield Claim(True)
    finally:
        os.close(fd)  # closing the file releases the lock
