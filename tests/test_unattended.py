"""A run left alone for days: a double launch or a requeue into the same out_dir, a kill between two
renames, a closed terminal, a full disk under metrics.jsonl, new bins published under a running trainer,
a launcher that dies, and a machine loaded by other jobs. Nothing is lost and every stop is one line."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from kit.checkpoint import load_checkpoint, saved_val_loss
from conftest import REPO_ROOT, DiskFullAfter, make_token_dataset, run_script, train_args
from inprocess import read_metrics, run_inprocess
from test_safety import one_error_line, sha

HOLD_LOCK = """
import sys
from kit.atomic import lock_folder
lock = lock_folder(sys.argv[1], "train.lock")
print("held", flush=True)
sys.stdin.read()  # until the test kills us
"""


def test_a_second_run_into_a_busy_out_dir_is_refused_and_readers_keep_working(cosine_run, data_dir, tmp_path):
    """A real process holds out_dir (as a running train.py does): a second train.py is refused in one line
    naming it and writes nothing; eval_only, sample.py, eval.py and export.py only read and work beside it.
    Once the holder is SIGKILLed the kernel has released the lock: a resume runs, and removes the temporary
    file a killed save left."""
    out = shutil.copytree(cosine_run, tmp_path / "out")
    (out / "ckpt.pt.tmp.99999").write_bytes(b"half a checkpoint")
    before = {name: sha(out / name) for name in ("ckpt.pt", "best.pt", "metrics.jsonl")}
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    resume = train_args(data_dir, out, "--max_iters=6", "--lr_decay_iters=6", "--eval_interval=2",
                        "--init_from=resume", "--allow_lr_increase=True")
    try:
        assert holder.stdout.readline() == "held\n"
        code, stdout, stderr = run_inprocess("train.py", *resume)
        line = one_error_line(code, stderr)
        assert line.startswith(f"error: out_dir={str(out)!r} is in use by another training run "
                               f"(-c, pid {holder.pid} on ")
        assert "model:" not in stdout and {name: sha(out / name) for name in before} == before
        assert (out / "ckpt.pt.tmp.99999").exists()  # not ours to remove while the holder may be writing it

        readers = {"train.py": [*resume, "--eval_only=True"],
                   "sample.py": [f"--out_dir={out}", "--device=cpu", "--num_samples=1", "--max_new_tokens=2"],
                   "eval.py": [f"--out_dir={out}", "--device=cpu", f"--data_dir={data_dir}", "--val_tokens=64",
                               "--eval_hellaswag=False"],
                   "export.py": [f"--out_dir={out}", f"--to={tmp_path / 'hf'}"]}
        for script, args in readers.items():
            code, _, stderr = run_inprocess(script, *args)
            assert code == 0, (script, stderr)
        assert sha(out / "ckpt.pt") == before["ckpt.pt"]
    finally:
        holder.kill()
        holder.wait(timeout=30)
    code, _, stderr = run_inprocess("train.py", *resume)
    assert code == 0, stderr
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 6 and not (out / "ckpt.pt.tmp.99999").exists()


def test_a_new_run_into_an_out_dir_holding_only_best_pt_needs_overwrite(cosine_run, data_dir, tmp_path):
    """Any checkpoint counts, not only ckpt.pt: best.pt alone (or stable.pt) would be replaced or mixed."""
    out = shutil.copytree(cosine_run, tmp_path / "out")
    (out / "ckpt.pt").unlink()
    before = sha(out / "best.pt")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    line = one_error_line(code, stderr)
    assert line.startswith(f"error: out_dir holds {out / 'best.pt'}: this run (init_from=scratch) would replace")
    assert sha(out / "best.pt") == before and "model:" not in stdout
    code, _, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=2", "--eval_interval=2",
                                                            "--overwrite=True"))
    assert code == 0, stderr


KILL_AFTER_FIRST_RENAME = """
import os, runpy, signal, sys
real_replace = os.replace

def replace_then_die(src, dst):  # SIGKILL right after the first checkpoint of a save is in place
    real_replace(src, dst)
    if str(dst).endswith(".pt"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace_then_die
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""


@pytest.mark.slow
def test_sigkill_between_the_renames_of_a_save_never_leaves_a_stale_best(data_dir, tmp_path):
    """The evaluation at 4 is the best so far, so the save writes best.pt and ckpt.pt; a SIGKILL between
    the two renames once left ckpt.pt claiming a best val loss that best.pt did not hold. Now best.pt comes
    first, and the resumed run knows of it."""
    out = tmp_path / "out"
    run = ["--lr_decay_iters=4", "--eval_interval=2"]
    assert run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=2", *run))[0] == 0
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_RENAME,
                             *train_args(data_dir, out, "--max_iters=4", "--init_from=resume", *run)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL and "step 4:" in killed.stdout and "(best)" in killed.stdout
    best, last = load_checkpoint(out / "best.pt"), load_checkpoint(out / "ckpt.pt")
    assert best["val_loss"] <= last["best_val_loss"]  # best.pt holds the best that ckpt.pt knows of
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--init_from=resume",
                                                                 *run))
    assert code == 0, stderr
    assert f"resuming from {out / 'ckpt.pt'} at iteration 2, lr " in stdout
    assert f"best val loss {best['val_loss']:.4f}" in stdout  # the killed run's best, from best.pt
    evals = [r["val_loss"] for r in read_metrics(out)[1] if r["iter"] > 0]
    assert saved_val_loss(out / "best.pt") == min(evals)


def train_and_hang_up(data_dir, out, monkeypatch, handler, *args):
    """train.py in this process, with a real SIGHUP to this process at the first micro-batch of iteration 2
    (the 8th batch: open_dataset draws 1, the evaluation at 0 draws 4), handler installed at the start.
    (exit code, stdout, stderr, how many batches were drawn)."""
    from kit import loader
    real_next_batch, calls = loader.TokenBatches.next_batch, []

    def next_batch_then_hang_up(self):
        calls.append(1)
        if len(calls) == 8:
            os.kill(os.getpid(), signal.SIGHUP)
        return real_next_batch(self)

    monkeypatch.setattr(loader.TokenBatches, "next_batch", next_batch_then_hang_up)
    previous = signal.signal(signal.SIGHUP, handler)
    try:
        return (*run_inprocess("train.py", *train_args(data_dir, out, "--eval_interval=100", *args)), len(calls))
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_sighup_saves_and_exits_0_like_sigterm(data_dir, tmp_path, monkeypatch):
    """A closed terminal or a dropped ssh connection sends SIGHUP. (The handler installed first stands for
    the default action, which kills the process.)"""
    unhandled, out = [], tmp_path / "out"
    code, stdout, stderr, _ = train_and_hang_up(data_dir, out, monkeypatch, lambda *_: unhandled.append(True),
                                                "--max_iters=50")
    assert code == 0 and not unhandled, stderr
    assert "SIGHUP received: finishing this iteration, then saving" in stdout
    assert f"stopped at iteration 2; checkpoint saved to {out / 'ckpt.pt'}" in stdout
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 2


def test_under_nohup_a_closed_terminal_does_not_stop_the_run(data_dir, tmp_path, monkeypatch):
    """nohup ignores SIGHUP so that a run outlives its terminal: train.py leaves an ignored signal ignored."""
    code, stdout, stderr, batches = train_and_hang_up(data_dir, tmp_path / "out", monkeypatch, signal.SIG_IGN,
                                                      "--max_iters=4")
    assert code == 0 and batches > 8, stderr
    assert "SIGHUP" not in stdout and load_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 4


def test_a_full_disk_under_metrics_jsonl_saves_and_stops_in_one_line(data_dir, tmp_path, monkeypatch):
    """The disk fills in the middle of iteration 3's record: metrics.jsonl keeps only whole records, the
    run saves at the next iteration and stops with one line, exit 1, as for a full disk during a save."""
    import builtins
    real_open, appends = builtins.open, []

    def open_with_a_disk_filling_at_the_fifth_append(path, mode="r", **kw):
        f = real_open(path, mode, **kw)
        if str(path).endswith("metrics.jsonl"):
            appends.append(path)
            return DiskFullAfter(f, 10) if len(appends) >= 5 else f
        return f

    monkeypatch.setattr(builtins, "open", open_with_a_disk_filling_at_the_fifth_append)
    out = tmp_path / "out"
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=20", "--lr_decay_iters=20",
                                                                 "--eval_interval=2"))
    # appends: step 0, iter 1, iter 2, step 2, iter 3 (the disk fills), iter 4 (fails again), stop
    assert one_error_line(code, stderr, status=1) == (
        f"error: cannot append to {out / 'metrics.jsonl'}: No space left on device; stopped at iteration 4, "
        f"checkpoint saved to {out / 'ckpt.pt'}; fix that, then continue with: python {REPO_ROOT / 'train.py'} "
        + " ".join(train_args(data_dir, out, "--max_iters=20", "--lr_decay_iters=20", "--eval_interval=2"))
        + " --init_from=resume")
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [0, 1, 2, 2]


def write_texts(path, texts):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": texts}), path)
    return path


def test_bins_published_under_a_running_trainer_stop_it_after_saving(tmp_path, monkeypatch):
    """A real prepare.py into the data_dir of a running train.py, at iteration 1's first micro-batch (the 6th
    batch: open_dataset draws 1, the evaluation at 0 draws 4):
    the run finishes that iteration on the bins it opened, saves and stops in one line naming the bins,
    instead of a traceback or a silent switch to other data."""
    from kit import loader
    prepare = REPO_ROOT / "data" / "fineweb" / "prepare.py"
    data = make_token_dataset(tmp_path / "data")
    second = write_texts(tmp_path / "second.parquet", [f"another text number {i} " * 40 for i in range(12)])
    real_next_batch, calls = loader.TokenBatches.next_batch, []

    def next_batch_while_prepare_runs(self):
        calls.append(1)
        if len(calls) == 6:
            run_script(prepare, "--input", second, "--out_dir", data, "--workers", 1, "--val_fraction", 0.25)
        return real_next_batch(self)

    monkeypatch.setattr(loader.TokenBatches, "next_batch", next_batch_while_prepare_runs)
    out = tmp_path / "out"
    code, stdout, stderr = run_inprocess("train.py", *train_args(data, out, "--max_iters=50", "--eval_interval=100"))
    line = one_error_line(code, stderr, status=1)
    assert line.startswith(f"error: {data / 'train.bin'} and {data / 'val.bin'} changed on disk during training")
    assert f"stopped at iteration 1, checkpoint saved to {out / 'ckpt.pt'}; fix that, then continue with: " in line
    assert line.endswith("--max_iters=50 --eval_interval=100 --init_from=resume")
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] == 1


# ---------------------------------------------------------------------------------------------
# torchrun: two gloo ranks on the CPU


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py", *args]


@pytest.mark.slow
def test_torchrun_into_a_busy_out_dir_every_rank_exits_2_after_our_one_line(token_dataset, tmp_path):
    """Only rank 0 takes the out_dir lock; its refusal must stop rank 1 too, with the same status, or rank 1
    waits for rank 0 in its first collective. The user sees our line, then torchrun's report."""
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=REPO_ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        proc = subprocess.run(torchrun(*train_args(token_dataset, out, "--max_iters=2")), cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        holder.kill()
        holder.wait(timeout=30)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "is in use by another training run" in ours[0], proc.stderr
    assert proc.stderr.index(ours[0]) < proc.stderr.index("train.py FAILED")
    assert proc.returncode == 1 and proc.stderr.count("exitcode  : 2 ") == 2, proc.stderr  # both ranks
    assert not (out / "ckpt.pt").exists()


@pytest.mark.slow
def test_ranks_stop_after_saving_when_torchrun_is_sigkilled(token_dataset, tmp_path):
    """A SIGKILLed torchrun cannot stop its ranks: they once trained on to the end. Now each notices its
    parent is gone, they save together and stop within seconds, leaving a whole ckpt.pt."""
    import psutil
    out, log, ranks = tmp_path / "out", tmp_path / "log.txt", []
    with open(log, "w") as f:
        launcher = subprocess.Popen(torchrun(*train_args(token_dataset, out, "--max_iters=100000",
                                                         "--eval_interval=100000")),
                                    cwd=REPO_ROOT, stdout=f, stderr=subprocess.STDOUT,
                                    env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1"))
    try:
        deadline = time.time() + 120
        while "iter 3:" not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "train.py" in " ".join(p.cmdline())]
        assert len(ranks) == 2, log.read_text()
        launcher.kill()
        launcher.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=20)
    finally:
        launcher.kill()
        for rank in ranks:
            try:
                rank.kill()
            except psutil.NoSuchProcess:
                pass
    output = log.read_text()
    assert not alive, output
    assert "error: the launcher (torchrun, pid" in output and "checkpoint saved to" in output, output
    assert load_checkpoint(out / "ckpt.pt")["iter_num"] >= 3


# ---------------------------------------------------------------------------------------------
# exact resume on a loaded machine, with the default threads


REPORT_THREADING_AT_TORCH_IMPORT = """
import os, runpy, sys

class ReportAtTorchImport:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            print("at torch import:", os.environ.get("MKL_DYNAMIC"), os.environ.get("OMP_DYNAMIC"), flush=True)
            sys.meta_path.remove(self)
        return None

sys.meta_path.insert(0, ReportAtTorchImport())
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path("train.py", run_name="__main__")
"""

BUSY = "while True: pass"


@pytest.mark.slow
def test_resume_matches_with_the_default_threads_on_a_loaded_machine(token_dataset, tmp_path):
    """MKL's dynamic threading may use fewer threads when the cores are busy, which changes how a matmul's
    sums are split: 2 of 5 resumed runs once differed from the iteration after the stop on. train.py switches
    it off before torch loads (unless the user set it). With the default threads on a loaded machine the
    last bit is still not promised: about 1 in 10 reruns of the same command, without any resume, ended
    with weights ~1e-7 apart (docs/training.md), so the resumed run is compared to float rounding here;
    the tests with OMP_NUM_THREADS=1 compare bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_DYNAMIC", "OMP_DYNAMIC")}
    run = ["--lr_decay_iters=4", "--eval_interval=100"]
    busy = [subprocess.Popen([sys.executable, "-c", BUSY])]  # with train.py's 2 threads: a load of ~3 on 2 cores
    try:
        for out, stops in ((tmp_path / "full", [4]), (tmp_path / "part", [2, 4])):
            for i, max_iters in enumerate(stops):
                resume = ["--init_from=resume"] if i else []
                args = train_args(token_dataset, out, *run, f"--max_iters={max_iters}", *resume)
                proc = subprocess.run([sys.executable, "-c", REPORT_THREADING_AT_TORCH_IMPORT, *args], cwd=REPO_ROOT,
                                      env=env, capture_output=True, text=True, timeout=300)
                assert proc.returncode == 0, proc.stderr
                assert "at torch import: FALSE FALSE" in proc.stdout  # set before torch loaded its libraries
    finally:
        for p in busy:
            p.kill()
    full, part = (read_metrics(tmp_path / name)[0] for name in ("full", "part"))
    assert [r["iter"] for r in part] == list(range(1, 5))
    assert [r["loss"] for r in part] == pytest.approx([r["loss"] for r in full], rel=1e-6)
    weights = [load_checkpoint(tmp_path / name / "ckpt.pt")["model"] for name in ("full", "part")]
    assert all(torch.allclose(weights[0][k], weights[1][k], rtol=0, atol=1e-5) for k in weights[0])
