"""
The one way the kit replaces a file: write a temporary file beside it, flush and fsync it, then rename
it over the target. A reader (or the next run after a crash, a SIGKILL or a full disk) finds either the
old file or the whole new one, never a part. Used for checkpoints, meta.json and prepare.py's manifest,
the Hub listing cache, the HellaSwag download and each file of an export; and check_writable, the one
test that a folder takes files, before long work. No torch here: prepare.py runs without it.
"""
import os
import tempfile
from contextlib import contextmanager


@contextmanager
def atomic_write(path, mode="wb", per_process=False):
    """with atomic_write(path) as f: f.write(...) -- path changes only if the block finishes.
    The temporary name is fixed (<path>.tmp), so repeated crashes cannot pile up half-written files;
    per_process=True adds the pid, for files several processes may write at once (DDP ranks)."""
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
    whose results would otherwise be lost at the end (train.py's out_dir, prepare.py's)."""
    os.makedirs(folder, exist_ok=True)
    tempfile.TemporaryFile(dir=folder).close()
