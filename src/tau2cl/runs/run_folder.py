"""A run's log_dir: one live run at a time, and never two runs' files mixed.

A run holds an exclusive `flock` on `log_dir/.tau2cl.lock` while it lives; the kernel drops it when
the process ends, however it ends, so a lock file left by a dead run is simply taken over (the file
names the pid and host of its holder, for the message). A folder that already holds a run's files
is refused unless the run resumes from a checkpoint inside it (`--resume_from`) or the user asks for
the old files to be cleared (`--overwrite_log_dir`). Checkpoint temporaries left by a killed save
are tidied on every start.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from pathlib import Path

from tau2cl.errors import UserError
from tau2cl.runs.files import CHECKPOINT_PREFIX, LOCK_FILE, RUN_FILES

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the folder check still applies
    fcntl = None  # type: ignore[assignment]


class RunLock:
    """An exclusive lock on a log_dir, held until `release()` or the end of the process."""

    def __init__(self, log_dir: str | Path):
        self.path = Path(log_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by a live process (any other error: a file system without locks)
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
                os.close(fd)
                raise UserError(
                    f"log_dir '{self.path.parent}' is in use by a live run ({holder}); wait for it to "
                    "end or choose another --log_dir."
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def unwritable(log_dir: str | Path, reason: str) -> str:
    """The refusal of a log_dir that cannot be created or written, with the system's reason."""
    return f"cannot write to log_dir '{log_dir}' ({reason}); choose another --log_dir."


def write_refusal(log_dir: str | Path) -> str | None:
    """Why log_dir could not be created or written, as far as a look tells without creating it
    (its nearest existing folder is a file, or not writable), or None; changes nothing."""
    path = Path(log_dir).absolute()
    nearest = next(p for p in (path, *path.parents) if p.exists())
    if not nearest.is_dir():
        return unwritable(log_dir, os.strerror(errno.ENOTDIR))
    if not os.access(nearest, os.W_OK | os.X_OK):
        return unwritable(log_dir, os.strerror(errno.EACCES))
    return None


def check_writable(log_dir: str | Path) -> None:
    """Create log_dir and write a file in it, or refuse it (a UserError with the system's reason)."""
    path = Path(log_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(unwritable(log_dir, exc.strerror)) from None


def run_files(log_dir: str | Path) -> list[Path]:
    """The files and folders of a run already in log_dir (empty for a new or empty folder)."""
    folder = Path(log_dir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name in RUN_FILES or p.name.startswith(CHECKPOINT_PREFIX))


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` is `folder` or lies within it."""
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def log_dir_refusal(log_dir: str, resume_from: str | None, overwrite: bool) -> str | None:
    """Why log_dir cannot take this run (it holds another run's files), or None; changes nothing."""
    existing = run_files(log_dir)
    resuming_here = resume_from is not None and inside(resume_from, log_dir)
    if overwrite and resuming_here:
        return "--overwrite_log_dir would delete the checkpoint that --resume_from names; drop one of the two."
    if not existing or resuming_here or overwrite:
        return None
    names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
    return (
        f"log_dir '{log_dir}' already holds a run ({names}); continue it with --resume_from {log_dir}, "
        "clear it with --overwrite_log_dir, or choose another --log_dir."
    )


def guard_log_dir(log_dir: str, resume_from: str | None, overwrite: bool) -> None:
    """Refuse a log_dir holding another run's files; clear them first with `overwrite`."""
    problem = log_dir_refusal(log_dir, resume_from, overwrite)
    if problem:
        raise UserError(problem)
    if overwrite:
        for path in run_files(log_dir):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def tidy_checkpoint_temporaries(log_dir: str | Path) -> list[str]:
    """Finish or remove what a killed checkpoint save left behind; returns what was done.

    A save writes `X.tmp`, moves the old `X` to `X.old`, renames `X.tmp` to `X` and deletes `X.old`.
    Killed between the two renames, `X` is missing and `X.old` is the last complete copy: it is put
    back. Every other `.tmp` or `.old` folder is an unfinished or superseded copy and is deleted.
    """
    done: list[str] = []
    for path in sorted(Path(log_dir).glob(f"{CHECKPOINT_PREFIX}*")):
        if path.suffix not in (".tmp", ".old") or not path.is_dir():
            continue
        final = path.with_suffix("")
        if path.suffix == ".old" and not final.exists():
            os.replace(path, final)
            done.append(f"restored {final.name} from {path.name}")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path.name}")
    return done
