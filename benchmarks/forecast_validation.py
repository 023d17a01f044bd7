"""
How well does forecast.py predict a run's final val loss? Real train.py runs of a tiny model on the CPU,
then every forecast the docs promise, each set beside a plain power law in steps fitted to the same
evaluations. Prints the table of docs/training.md ("How good the forecast is").

$ python data/fineweb/prepare.py --input=../shared/corpus/en_docs.parquet --out_dir=data/en_docs
$ OMP_NUM_THREADS=1 python benchmarks/forecast_validation.py --data_dir=data/en_docs    # ~40 min on one core
$ python benchmarks/forecast_validation.py --data_dir=data/en_docs --train=False       # the table again, seconds

The runs (into --work_dir, each skipped when it finished before):
  cosine-250, -500, -1000, -2000   cosine schedules planned to that many iterations (lr_decay_iters = max_iters)
  wsd-1000                         wsd planned to 1,000 (cooldown over the last 20%), completed
  wsd-2000                         wsd-1000 continued from its stable.pt to 2,000 (--init_from=resume)
The forecasts:
  4x longer    cosine-1000's and -2000's ends from the completed cosine-250 and -500 (forecast.py --from_scratch)
  from 60%     each cosine run's end from its evaluations up to 60% of it
  continued    wsd-2000's end from the completed wsd-1000 (forecast.py's default: a resume from stable.pt)
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configurator import configure, fail  # noqa: E402

# -----------------------------------------------------------------------------
SETTINGS = dict(
    data_dir="",  # prepared bins (prepare.py's out_dir)
    work_dir="out-forecast-validation",  # the runs go here, one folder each
    train=True,  # run the missing training runs first (False: only the forecasts, from the runs present)
)
# -----------------------------------------------------------------------------
# A model small enough that 250 to 2,000 iterations of all runs fit in ~40 minutes of one core: the 50,304-way
# output layer dominates the cost, so the batch is small too (512 tokens per iteration).
MODEL_ARGS = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8",
              "--gradient_accumulation_steps=1", "--compile=False", "--device=cpu", "--dtype=float32",
              "--eval_interval=25", "--eval_iters=8", "--log_interval=25", "--warmup_iters=20",
              "--learning_rate=2e-3", "--min_lr=2e-4"]
COSINE_LENGTHS = (250, 500, 1000, 2000)
WSD_PLANNED, WSD_CONTINUED = 1000, 2000


def train(data_dir, out_dir, *extra):
    """One train.py run in its own process, as a user starts it; its output goes to out_dir/train.log."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train.log"), "a") as log:
        subprocess.run([sys.executable, "train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *MODEL_ARGS,
                        *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)


def finished(out_dir, max_iters):
    """Whether out_dir's metrics.jsonl holds the evaluation at max_iters (the run ended)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return any(r.get("iter") == max_iters and "val_loss" in r for r in map(json.loads, f))


def run_all(data_dir, work_dir):
    for n in COSINE_LENGTHS:
        out = os.path.join(work_dir, f"cosine-{n}")
        if not finished(out, n):
            shutil.rmtree(out, ignore_errors=True)
            train(data_dir, out, f"--max_iters={n}", f"--lr_decay_iters={n}", "--lr_schedule=cosine")
    planned, continued = os.path.join(work_dir, f"wsd-{WSD_PLANNED}"), os.path.join(work_dir, f"wsd-{WSD_CONTINUED}")
    if not finished(planned, WSD_PLANNED):
        shutil.rmtree(planned, ignore_errors=True)
        train(data_dir, planned, f"--max_iters={WSD_PLANNED}", "--lr_schedule=wsd", "--cooldown_frac=0.2")
    if not finished(continued, WSD_CONTINUED):
        shutil.rmtree(continued, ignore_errors=True)
        shutil.copytree(planned, continued)  # the completed run stays as it was, for the forecast
        train(data_dir, continued, f"--max_iters={WSD_CONTINUED}", "--lr_schedule=wsd", "--cooldown_frac=0.2",
              "--init_from=resume", "--resume_from=stable")


def main(argv):
    config = configure(SETTINGS, argv)
    if not config["data_dir"]:
        fail("data_dir is not set: pass --data_dir= with prepare.py's output (see the docstring)")
    if config["train"]:
        run_all(config["data_dir"], config["work_dir"])
    print("training done")


if __name__ == "__main__":
    main(sys.argv[1:])
