"""Run a repo script (train.py, sample.py) inside the test process, as `python script args` would,
without paying a fresh interpreter and torch import (~3-5 s) per run. For checks that end early or
train a few iterations; the exact-resume tests use real subprocesses instead."""
import contextlib
import gc
import io
import runpy
import signal
import sys

from conftest import REPO_ROOT
from configurator import STOP_SIGNALS


def run_inprocess(script, *args):
    """(exit status, stdout, stderr) of `python script *args`, run with runpy in this process."""
    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_handlers = sys.argv, {s: signal.getsignal(s) for s in STOP_SIGNALS}
    sys.argv = [str(REPO_ROOT / script), *map(str, args)]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
        for s, handler in saved_handlers.items():  # train.py installs its Ctrl-C handler
            signal.signal(s, handler)
        gc.collect()  # the script's globals (train.py's out_dir lock) are gone, as at the end of a process
    return code, out.getvalue(), err.getvalue()


def read_metrics(out_dir):
    """(training records, evaluation records) from out_dir/metrics.jsonl, in file order."""
    import json
    from pathlib import Path
    records = [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "val_loss" in r]
