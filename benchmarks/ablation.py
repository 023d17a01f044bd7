"""
The modern-recipe ablation: GPT-2 baseline, each change alone, and all of them together, each with
several seeds, every run a real train.py run. Writes docs/ablation.md (table) and docs/ablation.png
(val-loss curves).

$ python data/fineweb/prepare.py --input ../shared/corpus/en_docs.parquet --out_dir data/en_docs
$ python benchmarks/ablation.py --data_dir=data/en_docs            # the committed table (CPU, ~1 h)
$ python benchmarks/ablation.py --data_dir=data/en_docs --quick    # a smoke test of the script, minutes
$ python benchmarks/ablation.py --data_dir=data/en_docs --scale=gpu --device=cuda   # larger, on a GPU

Runs go to --out_root/<config>-s<seed>/; a finished run (its metrics.jsonl has the final evaluation)
is not run again, so an interrupted ablation continues where it stopped. --report_only rewrites the
table and plot from the runs present.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Model, batch and token budget of each scale. The 50,304-way output layer dominates the cost of
# these small models, so the budget is tokens, not iterations. max_iters * tokens_per_iter = budget.
SCALES = {
    "quick": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=4, gradient_accumulation_steps=1,
                  max_iters=12, eval_interval=4, eval_iters=2),
    "cpu": dict(n_layer=4, n_head=3, n_embd=96, block_size=128, batch_size=8, gradient_accumulation_steps=1,
                max_iters=64, eval_interval=16, eval_iters=4),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=512, batch_size=32, gradient_accumulation_steps=1,
                max_iters=3000, eval_interval=250, eval_iters=20),
}

BASE_LR = 5e-4  # the reference user's learning rate (config/train_fineweb.py)


def baseline_args(max_iters):
    """The reference recipe scaled down: cosine to lr/10, warmup 200/6000 of the run, AdamW
    (0.9, 0.95), weight decay 0.1, no biases, GPT-2 architecture."""
    return dict(learning_rate=BASE_LR, min_lr=BASE_LR / 10, lr_schedule="cosine", lr_decay_iters=max_iters,
                warmup_iters=max(1, round(max_iters * 200 / 6000)), weight_decay=0.1, beta1=0.9, beta2=0.95,
                bias=False, grad_clip=1.0)


# Each change alone (small ones grouped), then everything. Keys are train.py config keys.
CHANGES = {
    "rotary": dict(rotary=True),
    "qk_norm+rmsnorm": dict(qk_norm=True, norm="rmsnorm"),
    "relu2": dict(mlp="relu2"),
    "untied+zero_init": dict(tie_embeddings=False, zero_init_proj=True),
    "lr_x3": dict(learning_rate=1.5e-3, min_lr=1.5e-4),  # the baseline's cosine at 3x its lr
    "wsd+lr_x3": dict(lr_schedule="wsd", learning_rate=1.5e-3, min_lr=1.5e-4),  # 3x the baseline's lr
}
CONFIGS = {"baseline": {}, **CHANGES, "all": {k: v for change in CHANGES.values() for k, v in change.items()}}


def run_dir(out_root, name, seed):
    return Path(out_root) / f"{name}-s{seed}"


def read_metrics(path):
    """(evaluations, log lines) of one run's metrics.jsonl, each a list of dicts in file order."""
    evals, logs = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            (evals if "val_loss" in record else logs).append(record)
    return evals, logs


def is_finished(out_dir, max_iters):
    evals, _ = read_metrics(out_dir / "metrics.jsonl")
    return any(e["iter"] == max_iters for e in evals)


def train_command(name, seed, scale, args):
    settings = {**SCALES[scale], **baseline_args(SCALES[scale]["max_iters"]), **CONFIGS[name]}
    settings.update(seed=seed, out_dir=str(run_dir(args.out_root, name, seed)), data_dir=args.data_dir,
                    device=args.device, dtype=args.dtype, compile=args.compile, log_interval=1)
    return [sys.executable, str(REPO / "train.py")] + [f"--{k}={v}" for k, v in settings.items()]


def run_one(name, seed, args):
    out_dir = run_dir(args.out_root, name, seed)
    if is_finished(out_dir, SCALES[args.scale]["max_iters"]):
        print(f"[ablation] {name} seed {seed}: already finished", flush=True)
        return
    if out_dir.exists():  # an unfinished run: start it again from scratch
        for f in out_dir.iterdir():
            f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(out_dir / "train.log", "w") as log:
        proc = subprocess.run(train_command(name, seed, args.scale, args), cwd=REPO, stdout=log,
                              stderr=subprocess.STDOUT)
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out_dir}/train.log)"
    print(f"[ablation] {name} seed {seed}: {status} in {time.time() - t0:.0f}s", flush=True)
    for f in out_dir.glob("*.pt"):  # the checkpoints are not needed for the table
        f.unlink()


# ----------------------------------------------------------------------------------------------
# report

def tokens_to_reach(evals, target):
    """Tokens at which the val-loss curve first reaches target, linearly interpolated between
    evaluations; None if it never does."""
    for a, b in zip(evals, evals[1:]):
        if b["val_loss"] <= target:
            if a["val_loss"] <= target:
                return a["tokens"]
            frac = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a["tokens"] + frac * (b["tokens"] - a["tokens"])
    return None


def running_mean_curve(logs, window):
    """(tokens, mean training loss of the last `window` iterations) at each iteration from window on."""
    return [(logs[i]["tokens"], mean([r["loss"] for r in logs[i + 1 - window:i + 1]]))
            for i in range(window - 1, len(logs))]


def mean(xs):
    return sum(xs) / len(xs)


def collect(args):
    """{config: {seed: evaluations}} for the finished runs."""
    max_iters = SCALES[args.scale]["max_iters"]
    results = {}
    for name in CONFIGS:
        for seed in args.seeds:
            evals, _ = read_metrics(run_dir(args.out_root, name, seed) / "metrics.jsonl")
            if evals and evals[-1]["iter"] == max_iters:
                results.setdefault(name, {})[seed] = evals
    return results


def write_report(args):
    results = collect(args)
    if "baseline" not in results:
        print("[ablation] no finished baseline run: nothing to report")
        return
    scale = SCALES[args.scale]
    tokens = scale["max_iters"] * scale["batch_size"] * scale["block_size"] * scale["gradient_accumulation_steps"]
    final = {name: {s: ev[-1]["val_loss"] for s, ev in runs.items()} for name, runs in results.items()}
    base = mean(list(final["baseline"].values()))
    command = "python benchmarks/ablation.py --data_dir=data/en_docs" + ("" if args.scale == "cpu" else f" --scale={args.scale}")
    lines = ["# The modern-recipe ablation", "",
             "Written by `benchmarks/ablation.py`; reproduce (after `python data/fineweb/prepare.py --input "
             f"../shared/corpus/en_docs.parquet --out_dir data/en_docs`) with:", "", f"    {command}", "",
             "Baseline: the reference recipe (config/train_fineweb.py) scaled down: GPT-2 architecture, AdamW "
             "(0.9, 0.95), weight decay 0.1, cosine to lr/10, warmup 1/30 of the run, lr 5e-4. Each other row "
             "changes only what its `changes` column says; `all` is every change at once. Seeds change the "
             "initialisation and the order of the training windows; every run is evaluated on the same windows.",
             "", f"Scale `{args.scale}`: {scale['n_layer']} layers x {scale['n_embd']} wide, block "
             f"{scale['block_size']}, {tokens:,} training tokens per run, val loss on "
             f"{scale['eval_iters'] * scale['batch_size'] * scale['block_size']:,} fixed held-out tokens.", "",
             "| config | changes | final val loss per seed | mean | delta vs baseline | seed spread (max-min) |",
             "|---|---|---|---|---|---|"]
    for name, per_seed in final.items():
        values = [per_seed[s] for s in sorted(per_seed)]
        changes = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in CONFIGS[name].items()) or "GPT-2, cosine, lr 5e-4"
        lines.append(f"| {name} | {changes} | {' / '.join(f'{v:.3f}' for v in values)} | {mean(values):.3f} | "
                     f"{mean(values) - base:+.3f} | {max(values) - min(values):.3f} |")
    if "all" in results:
        lines += ["", f"Tokens the combination needs to reach the baseline's mean final val loss ({base:.3f}), "
                  "read off its own val curve (linear between evaluations):", ""]
        for seed, evals in sorted(results["all"].items()):
            reached = tokens_to_reach(evals, base)
            lines.append(f"- seed {seed}: " + (f"{reached:,.0f} tokens = {reached / tokens:.0%} of the baseline's "
                                              f"{tokens:,}" if reached else "not reached"))
        # cross-check at every iteration: a run this short sees each training window once, so its
        # training loss is measured on unseen text too
        window = max(2, SCALES[args.scale]["max_iters"] // 8)
        base_train = mean([running_mean_curve(read_metrics(run_dir(args.out_root, "baseline", s) / "metrics.jsonl")[1],
                                              window)[-1][1] for s in results["baseline"]])
        lines += ["", f"Cross-check on the training loss ({window}-iteration running mean; every window is "
                  f"unseen in a run this short): baseline final {base_train:.3f}, reached by `all` at:", ""]
        for seed in sorted(results["all"]):
            curve = running_mean_curve(read_metrics(run_dir(args.out_root, "all", seed) / "metrics.jsonl")[1], window)
            reached = next((t for t, loss in curve if loss <= base_train), None)
            lines.append(f"- seed {seed}: " + (f"{reached:,} tokens = {reached / tokens:.0%}" if reached
                                              else "not reached"))
        lines += ["", "The curve is of a run whose schedule ends at the full budget; a run planned for fewer "
                  "tokens would cool down earlier and get there sooner, so this ratio is an upper bound."]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_curves(results, base, args.plot)
    print(f"[ablation] wrote {args.table} and {args.plot}")


def plot_curves(results, baseline_final, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, (name, runs) in enumerate(results.items()):
        color = f"C{i}"
        for j, (seed, evals) in enumerate(sorted(runs.items())):
            points = [e for e in evals if e["iter"] > 0]  # the loss at init (~10.8) squashes the plot
            ax.plot([e["tokens"] for e in points], [e["val_loss"] for e in points], color=color, marker=".",
                    alpha=0.8, label=name if j == 0 else None)
    ax.axhline(baseline_final, color="gray", linestyle=":", label="baseline final (mean)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss")
    ax.set_title("modern-recipe ablation (one line per seed)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO / "data" / "fineweb"), help="folder with train.bin, val.bin")
    p.add_argument("--scale", choices=SCALES, default="cpu")
    p.add_argument("--quick", action="store_true", help="same as --scale=quick: checks the script, measures nothing")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (one per core is sensible on a CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", default="False")
    p.add_argument("--out_root", default=None, help="default: out-ablation-<scale>")
    p.add_argument("--table", default=None, help="default: docs/ablation.md (docs/ablation-<scale>.md if not cpu)")
    p.add_argument("--plot", default=None, help="default: next to the table, .png")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.scale = "quick"
    suffix = "" if args.scale == "cpu" else f"-{args.scale}"
    args.out_root = args.out_root or str(REPO / f"out-ablation-{args.scale}")
    args.table = args.table or str(REPO / "docs" / f"ablation{suffix}.md")
    args.plot = args.plot or str(Path(args.table).with_suffix(".png"))
    if not args.report_only:
        # seed-major order: if the time runs out, every config has at least its first seed
        jobs = [(name, seed) for seed in args.seeds for name in args.configs]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda job: run_one(*job, args), jobs))
    write_report(args)


if __name__ == "__main__":
    main()
