"""
How well does forecast.py predict a run's final val loss? Real train.py runs of a tiny model on the CPU,
then every forecast the docs promise, each set beside a plain power law in steps fitted to the same
evaluations. Prints the table of docs/forecast.md ("How good the forecast is").

$ python data/fineweb/prepare.py --input=../shared/corpus/en_docs.parquet --out_dir=data/en_docs
$ OMP_NUM_THREADS=1 python benchmarks/forecast_validation.py --data_dir=data/en_docs    # ~40 min on one core
$ python benchmarks/forecast_validation.py --train=False --llmc_log=main.log          # the table again, seconds

--llmc_log adds llm.c's GPT-2 124M run (8x H100, 2024-10-13) from its published log, main.log in modded-nanogpt's
records/track_1_short/2024-10-13_llmc/ (val losses every 250 steps, the rate of every step), fitted on its
first 12k and 15k steps.

The runs (into --work_dir, each skipped when it finished before):
  cosine-250, -500, -1000, -2000   cosine schedules planned to that many iterations (lr_decay_iters = max_iters)
  wsd-1000                         wsd planned to 1,000 (cooldown over the last 20%), completed
  wsd-2000                         wsd-1000 continued from its stable.pt to 2,000 (--init_from=resume)
The forecasts:
  4x longer    cosine-1000's and -2000's ends from the completed cosine-250 and -500 (forecast.py --from_scratch),
               and -2000's from -250 and -500 fitted together
  2x longer    cosine-2000's end from the completed cosine-1000, and from -250, -500 and -1000 together
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
import forecast  # noqa: E402
from configurator import configure, fail  # noqa: E402

# -----------------------------------------------------------------------------
SETTINGS = dict(
    data_dir="",  # prepared bins (prepare.py's out_dir)
    work_dir="out-forecast-validation",  # the runs go here, one folder each
    train=True,  # run the missing training runs first (False: only the forecasts, from the runs present)
    llmc_log="",  # llm.c's GPT-2 124M log: modded-nanogpt's records/track_1_short/2024-10-13_llmc/main.log
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


class Curve:
    """What a fit sees of a run: its evaluations (iteration, val loss) past the warmup, and the rate of each
    update (in units of the peak) with the warmup's length."""

    def __init__(self, points, lrs, warmup):
        self.points, self.lrs, self.warmup = points, np.asarray(lrs, dtype=np.float64), warmup

    def upto(self, last):
        return Curve([p for p in self.points if p[0] <= last], self.lrs[:last], self.warmup)


def read_run(out_dir):
    """A train.py run as a Curve, and its last val loss."""
    evaluations, _ = forecast.read_evaluations(os.path.join(out_dir, "metrics.jsonl"))
    config, _ = forecast.load_config(os.path.join(out_dir, "ckpt.pt"))
    lrs = forecast.schedule(config, 0, config["max_iters"]) / config["learning_rate"]
    return Curve(forecast.fit_points(evaluations, config["warmup_iters"]), lrs, config["warmup_iters"]), evaluations[-1]


def cases(work_dir):
    """(what, fitted on, the Curves fitted, the target's schedule Curve, the target iteration, the actual loss)."""
    runs = {n: read_run(os.path.join(work_dir, f"cosine-{n}")) for n in COSINE_LENGTHS}
    out = []
    for short, long in ((250, 1000), (500, 2000)):
        out.append(("4x longer", f"cosine-{short}, completed", [runs[short][0]], runs[long][0], long, runs[long][1][2]))
    out.append(("4x longer", "cosine-250 and -500", [runs[250][0], runs[500][0]], runs[2000][0], 2000,
                runs[2000][1][2]))
    out.append(("2x longer", "cosine-1000, completed", [runs[1000][0]], runs[2000][0], 2000, runs[2000][1][2]))
    out.append(("2x longer", "cosine-250, -500, -1000", [runs[n][0] for n in (250, 500, 1000)], runs[2000][0], 2000,
                runs[2000][1][2]))
    for n in COSINE_LENGTHS:
        first = int(0.6 * n)
        out.append(("from 60%", f"cosine-{n} up to {first}", [runs[n][0].upto(first)], runs[n][0], n, runs[n][1][2]))
    planned, _ = read_run(os.path.join(work_dir, f"wsd-{WSD_PLANNED}"))
    continued, last = read_run(os.path.join(work_dir, f"wsd-{WSD_CONTINUED}"))
    # the continuation: wsd-1000's rates up to stable.pt's iteration (its cooldown start), then the new plan's
    _, resume = forecast.load_config(os.path.join(work_dir, f"wsd-{WSD_PLANNED}", "stable.pt"))
    path = Curve([], np.concatenate([planned.lrs[:resume], continued.lrs[resume:]]), planned.warmup)
    out.append(("continued", f"wsd-{WSD_PLANNED}, completed", [planned], path, WSD_CONTINUED, last[2]))
    return out


def llmc_cases(path):
    """llm.c's GPT-2 124M run (8x H100, 2024-10-13), from its log: 'tel' lines are val losses after that many
    steps, 'trl' lines the rate of each step (logged to 6 decimals), warmup 700 steps."""
    val, lrs = [], {}
    with open(path) as f:
        for line in f:
            fields = dict(field.split(":", 1) for field in line.split())
            if "tel" in fields:
                val.append((int(fields["s"]), float(fields["tel"])))
            if "lr" in fields:
                lrs[int(fields["s"])] = float(fields["lr"])
    steps = max(lrs) + 1
    rates = np.array([lrs[k] for k in range(steps)])
    warmup = 700
    full = Curve(forecast.fit_points([(step, None, loss) for step, loss in val], warmup), rates / rates.max(), warmup)
    end, actual = val[-1]
    return [("llm.c 124M", f"its first {k // 1000}k steps", [full.upto(k)], full, end, actual) for k in (12000, 15000)]


def evaluate(what, fitted_on, curves, target, target_iter, actual):
    """One row: the law's forecast (and its interval, for one fitted run), the power law's, the actual loss."""
    if len(curves) == 1:
        c = curves[0]
        value, low, high, _, _ = forecast.forecast(c.lrs, c.warmup, c.points, target.lrs, target.warmup, [target_iter])
        value, interval = value[0], (low[0], high[0])
    else:  # several runs: the law's areas of each run's own schedule, one set of parameters
        s1, s2, loss = [], [], []
        for c in curves:
            a1, a2 = forecast.areas(c.lrs, c.warmup)
            its = np.array([p[0] for p in c.points])
            s1, s2, loss = s1 + list(a1[its]), s2 + list(a2[its]), loss + [p[1] for p in c.points]
        params = forecast.fit(np.array(s1), np.array(s2), np.array(loss))
        t1, t2 = forecast.areas(target.lrs, target.warmup)
        value, interval = forecast.law(params, t1[target_iter], t2[target_iter]), None
    points = [p for c in curves for p in c.points]
    power = forecast.power_law_forecast(points, [target_iter])[0]
    return dict(what=what, fitted_on=fitted_on, target=target_iter, actual=actual, law=float(value),
                interval=interval, power=float(power))


TARGETS = {"4x longer": 0.05, "from 60%": 0.03, "continued": 0.05}  # issue 31's, in nats


def print_table(rows):
    print("| forecast | fitted on | iteration | actual | annealing law (interval) | error | power law | error | "
          "target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        law_error, power_error = r["law"] - r["actual"], r["power"] - r["actual"]
        interval = (f" ({r['interval'][0]:.3f}-{r['interval'][1]:.3f}"
                    f"{', holds it' if r['interval'][0] <= r['actual'] <= r['interval'][1] else ', misses it'})"
                    if r["interval"] else "")
        goal = TARGETS.get(r["what"])
        met = ("" if goal is None else
               f"{goal} {'met' if abs(law_error) <= goal and abs(law_error) < abs(power_error) else 'not met'}")
        print(f"| {r['what']} | {r['fitted_on']} | {r['target']:,} | {r['actual']:.4f} | {r['law']:.4f}{interval} | "
              f"{law_error:+.4f} | {r['power']:.4f} | {power_error:+.4f} | {met} |")


def main(argv):
    config = configure(SETTINGS, argv)
    if config["train"] and not config["data_dir"]:
        fail("data_dir is not set: pass --data_dir= with prepare.py's output (see the docstring), or --train=False")
    if config["train"]:
        run_all(config["data_dir"], config["work_dir"])
    rows = [evaluate(*case) for case in cases(config["work_dir"])] if os.path.isdir(config["work_dir"]) else []
    if config["llmc_log"]:
        rows += [evaluate(*case) for case in llmc_cases(config["llmc_log"])]
    print_table(rows)


if __name__ == "__main__":
    main(sys.argv[1:])
