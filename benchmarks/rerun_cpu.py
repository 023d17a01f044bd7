"""
Are two runs of the same train.py command on a CPU identical, bit for bit? Runs one tiny config
`runs` times with 1 thread and as often with `threads` (interleaved, so that both see the same machine
load) and prints, for each rerun, the first iteration whose loss or gradient norm differs from the first
run with the same thread count, or 'same'.

$ python benchmarks/rerun_cpu.py                        # 8 runs each with OMP_NUM_THREADS=1 and 2
$ python benchmarks/rerun_cpu.py --runs=10 --threads=4  # 1 and 4 threads
$ python benchmarks/rerun_cpu.py --dtype=bfloat16       # bf16 autocast
"""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tests"))
from configurator import config_globals, configure  # noqa: E402
from conftest import make_token_dataset  # noqa: E402

# -----------------------------------------------------------------------------
runs = 8  # runs per thread count
threads = 2  # OMP_NUM_THREADS compared with 1
max_iters = 20
dtype = "float32"  # or 'bfloat16' (what dtype='auto' picks on a CPU with AVX512-BF16 or AMX)
# -----------------------------------------------------------------------------
config = configure(config_globals(globals()), sys.argv[1:])
globals().update(config)

TRAIN_ARGS = ["--n_layer=2", "--n_head=4", "--n_embd=64", "--block_size=32", "--batch_size=4",
              "--gradient_accumulation_steps=2", "--compile=False", "--device=cpu", f"--dtype={dtype}",
              "--eval_iters=1", "--eval_interval=1000", f"--max_iters={max_iters}", f"--lr_decay_iters={max_iters}",
              "--warmup_iters=5", "--learning_rate=1e-3", "--min_lr=1e-4", "--dropout=0.1"]


def train_once(data_dir, n_threads):
    """[(loss, grad_norm)] per iteration of one train.py run in a fresh process."""
    with tempfile.TemporaryDirectory() as out_dir:
        subprocess.run([sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TRAIN_ARGS],
                       cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS=str(n_threads)), check=True,
                       capture_output=True)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            return [(r["loss"], r["grad_norm"]) for r in map(json.loads, f) if "loss" in r]


def main():
    thread_counts = [1, threads]
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = make_token_dataset(os.path.join(tmp, "data"), n_train=100_000)
        first, reports = {}, {t: [] for t in thread_counts}
        for run in range(runs):
            for t in thread_counts:
                logged = train_once(data_dir, t)
                if t not in first:
                    first[t] = logged
                    continue
                differ = [i + 1 for i, (a, b) in enumerate(zip(first[t], logged)) if a != b]
                reports[t].append(f"from iter {differ[0]}" if differ else "same")
                print(f"run {run + 1}, {t} thread(s): {reports[t][-1]}", flush=True)
    for t in thread_counts:
        same = reports[t].count("same")
        print(f"OMP_NUM_THREADS={t}: {same} of {len(reports[t])} reruns identical to the first run")


if __name__ == "__main__":
    main()
