"""
The one way the kit replaces a file: write a temporary file beside it, flush and fsync it, then rename
it over the target. A reader (or the next run after a crash, a SIGKILL or a full disk) finds either the
old file or the whole new one, never a part. Used for checkpoints, meta.json and prepare.py's manifest,
the Hub listing cache, the HellaSwag download and each file of an export; check_writable, the one
test that a folder takes files, before long work; append_line, for metrics.jsonl; and lock_folder, the
one writer per folder (train.py's out_dir, prepare.py's). No torch here: prepare.py runs without it.
"""
import os
import socket
import sys
import tempfile
import time
from contextlib import contextmanager

from filelock import FileLock, Timeout


@contextmanager
def atomic_write(path, mode="wb", per_process=False):
    """with atomic_write(path) as f: f.write(...) -- path changes only if the block finishes.
    The temporary name is fixed (<path>.tmp), so repeated crashes cannot pile up half-written files;
    per_process=True adds the pid, for files several processes may write at once (DDP ranks), or where a
    process killed mid-write must not be confused with a live one (checkpoints: the next run into out_dir
    removes the leftovers once it holds the out_dir lock, kit/guard.py's check_out_dir)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp.{os.getpid()}" if per_process else f"{path}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable(folder):
    """Create folder if needed and prove a file can be written in it (OSError if not): before long work
    whose results would otherwise be lost at the end (train.py's out_dir, prepare.py's). One byte is
    written: a full disk still creates an empty file."""
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder) as f:
        f.write(b"\0")
        f.flush()


def append_line(path, line):
    """Append line (a str ending in a newline) to path whole or not at all: a failed write (a full disk)
    cuts the file back to where it was, so a reader never finds half a record. A last line that a crash
    cut short is closed first, so that the new record starts a line of its own. Raises the OSError."""
    data = line.encode()
    with open(path, "a+b", buffering=0) as f:  # unbuffered: close() has nothing left to write
        end = f.seek(0, os.SEEK_END)
        if end:
            f.seek(end - 1)
            data = data if f.read(1) == b"\n" else b"\n" + data
        try:
            written = 0
            while written < len(data):
                written += f.write(data[written:])
        except OSError:
            f.truncate(end)
            raise


class FolderInUse(Exception):
    """Another process holds the folder's lock; .holder says who ('train.py, pid 123 on host, since ...')."""

    def __init__(self, holder):
        super().__init__(holder)
        self.holder = holder


class _Unlinked(Exception):
    """The lock file was removed (by a holder releasing it) between our open and our lock."""


def lock_folder(folder, name):
    """Hold folder/name until unlock_folder or the end of this process: an OS lock (flock; msvcrt on
    Windows) that the kernel drops even on SIGKILL, so a stale lock never blocks a later run. One writer
    per folder: while it is held, lock_folder in any other process raises FolderInUse naming the holder,
    which writes who it is into the lock file."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    holder = (f"{os.path.basename(sys.argv[0]) or 'python'}, pid {os.getpid()} on {socket.gethostname()}, "
              f"since {time.strftime('%Y-%m-%d %H:%M:%S')}")

    def write_holder(fd):  # filelock calls this with the locked file's descriptor
        if not os.path.exists(path) or not os.path.samestat(os.fstat(fd), os.stat(path)):
            raise _Unlinked
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            os.write(fd, holder.encode())
        except OSError:  # a full disk: no empty lock left behind, removed while held as unlock_folder does
            os.remove(path)
            raise

    while True:
        lock = FileLock(path, timeout=0, on_acquired=write_holder)
        try:
            lock.acquire()
            return lock
        except _Unlinked:  # we locked a file its holder removed as it released it: lock the new one
            continue
        except Timeout:
            try:
                with open(path) as f:
                    raise FolderInUse(f.read().strip() or "another process") from None
            except OSError:  # Windows: the holder's lock keeps the file unreadable
                raise FolderInUse("another process") from None


def unlock_folder(lock):
    """Release a lock_folder lock and remove its file, so that a folder is left as it was. Removed while
    still held: a process that opened the old file meanwhile sees it gone (write_holder) and retries."""
    try:
        os.remove(lock.lock_file)
    except OSError:  # Windows does not remove an open file: it stays, harmless
        pass
    lock.release()
