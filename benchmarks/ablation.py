"""
The recipe ablation: GPT-2 + AdamW + cosine (the baseline) against Muon and the modern switches, every
arm at its own best learning rate, every run a real train.py run. Writes docs/ablation.md (tables) and
docs/ablation.png (val-loss curves).

$ python data/fineweb/prepare.py --input=../shared/corpus/en_docs.parquet --out_dir=data/en_docs
$ python benchmarks/ablation.py --data_dir=data/en_docs --jobs=2 --phases=12345 --removals=4
                                                           # the committed tables (~1 h on 2 shared cores)
$ python benchmarks/ablation.py --data_dir=data/en_docs --quick --phases=12345   # a smoke test, minutes

Five phases, each reading the earlier ones' results from disk:
  1. lr grid of the two AdamW arms (baseline, modern) at a quarter of the final horizon; a best value at
     an edge of the grid earns one more value beyond it
  2. muon_lr grid of the two Muon arms, their AdamW part at the tuned lr of the matching AdamW arm
  3. the four arms at their tuned lr, full horizon, seed 0
  4. seed 1, and each single switch removed from the best arm with switches (seed 0, at that arm's
     tuned lr), ordered by importance in case the time runs out; --removals limits their number
  5. (only with 5 in --phases) the long check: the baseline and the best arm at long_iters, seed 0
Runs go to --out_root/<run name>/; a run finished with the same settings is not run again, so an
interrupted ablation continues where it stopped. --report_only rewrites the tables and plot from the
runs present.

--study=token is the second study, "a better model per token" (writes docs/ablation.md and .png; the
first study above, --study=arch, writes docs/ablation-arch.md): GPT-2 + Muon against each of
data_order='document', logit_softcap, zero_init_head and muon_weight_decay alone and all four together,
at the quick-start shape (4 x 128, block 128), 1M tokens per run, bf16 on CPU:

$ python benchmarks/ablation.py --study=token --data_dir=data/en_docs --jobs=2       # ~1 h 40 min on 2 busy cores
$ python benchmarks/ablation.py --study=token --data_dir=data/en_docs --quick        # a smoke test, a minute

Its plan (token_plan): a learning-rate grid at a third of the horizon for the base and the all-switches
arm (muon_lr first, then AdamW's learning_rate at the best muon_lr), the two seed-0 finals, their seed-1
finals, then each switch alone at the base arm's tuned rates.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Model and budget. The 50,304-way output layer is ~90% of the FLOPs of a model this narrow, so the
# blocks are nearly free and the budget is set by tokens: 4 layers cost about what 2 do.
SCALES = {
    "quick": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4), final_iters=10,
                  grid_iters=4, long_iters=20, eval_iters=2),
    "cpu": dict(model=dict(n_layer=4, n_head=2, n_embd=64, block_size=128, batch_size=8), final_iters=120,
                grid_iters=30, long_iters=1465, eval_iters=5),
    # --study=token: the quick-start shape, 48 x 4,096 = 196,608 tokens per final run (1M was planned: at the
    # ~300 tokens/s per job measured on the shared machine, 8 runs of 1M would take 8 h); batch 32 makes the
    # matmuls big enough to run ~1.5x the tokens/s of batch 8 on this CPU (bf16, AMX)
    "token": dict(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128, batch_size=32), final_iters=48,
                  grid_iters=16, long_iters=0, eval_iters=4, evals=4),
    # --study=gpu: the 40M shape (config/train_fineweb.py), 500 x 65,536 = 32.8M tokens per arm, ~2 min each on
    # an H200 (bf16, compiled); gpu-tiny runs the same plan on a CPU in the test suite
    "gpu": dict(model=dict(n_layer=12, n_head=12, n_embd=384, block_size=1024, batch_size=64), final_iters=500,
                grid_iters=0, long_iters=0, eval_iters=20, evals=5),
    "gpu-tiny": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4), final_iters=6,
                     grid_iters=0, long_iters=0, eval_iters=2, evals=2),
    "token-quick": dict(model=dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4), final_iters=8,
                        grid_iters=4, long_iters=0, eval_iters=2, evals=2),
}

GPT2 = dict(rotary=False, qk_norm=False, norm="layernorm", mlp="gelu", tie_embeddings=True, zero_init_proj=False,
            lr_schedule="cosine")
MODERN = dict(rotary=True, qk_norm=True, norm="rmsnorm", mlp="relu2", tie_embeddings=False, zero_init_proj=True,
              lr_schedule="wsd")
ARMS = {  # name: (switches, optimizer, the AdamW arm whose tuned lr the Muon arm's AdamW part uses)
    "baseline": (GPT2, "adamw", None),
    "baseline+muon": (GPT2, "muon", "baseline"),
    "modern": (MODERN, "adamw", None),
    "modern+muon": (MODERN, "muon", "modern"),
}
# most doubtful first, in case the time runs out: untied embeddings cost 19M parameters at 40M
REMOVAL_ORDER = ("tie_embeddings", "lr_schedule", "zero_init_proj", "rotary", "mlp", "qk_norm", "norm")
ADAMW_GRID = (1.6e-3, 4e-3, 1e-2)  # learning_rate
MUON_GRID = (0.008, 0.02, 0.05)  # muon_lr
GRID_STEP = 2.5  # a best value at an edge of the grid earns one more value this factor further out
SEEDS = (0, 1)
DEVIATIONS = [
    "- **Tokens per run: 122,880, not ≥1.5M**, and so no baseline below 6.0 in tables 1-2. Measured before "
    "planning: a 4 x 64 model trained at ~200 tokens/s per process on the shared 2-core machine (two at a time, "
    "1-minute load average 9-10 from other jobs; up to ~1,200 tokens/s when it was quiet). 1.5M tokens would "
    "have been ~2 h per run; the whole study had ~65 min of machine time. Only the long check (table 3) runs "
    "1.5M tokens: the baseline and the best arm, one seed, at the lr tuned on the short runs.",
    "- **Width 64, not 128-256**: at these widths the 50,304-way output layer is most of the cost (19.3 of 20.9 "
    "MFLOPs/token at 64 wide, 38.6 of 44.9 at 128), so the narrowest sensible model buys the most tokens.",
    "- **Learning-rate grid: 3 values at a quarter of the horizon (30 iterations), seed 0 only.** Muon arms tune "
    "`muon_lr` only; their AdamW part (embeddings, norms, lm_head) uses the tuned lr of the matching AdamW arm. "
    "A short horizon favours higher rates. A best value at an edge of the grid earned one more value 2.5x "
    "further out; a best still at the edge is marked in table 1.",
    "- **Seeds: 2 for the four arms, 1 for the switch-removed arms**, which run at their base arm's tuned lr. "
    "The best arm had no switches to remove (a GPT-2 arm won), so they are removed from the best modern arm; "
    "the four most doubtful only (`--removals=4`), for time.",
    "- **Not tuned**: Muon's momentum (0.95) and weight decay (0.1, shared with AdamW); warmup, cooldown share.",
    "- **Not run**: the GPU comparison on the 40M config (no GPU was available to this work).",
]


def common_args(iters):
    """What every run shares: AdamW (0.9, 0.95), weight decay 0.1 (Muon's too), warmup 1/30 of the run,
    decay to lr/10, no biases, gradient clipping at 1."""
    return dict(max_iters=iters, lr_decay_iters=iters, warmup_iters=max(1, round(iters / 30)), cooldown_frac=0.2,
                weight_decay=0.1, beta1=0.9, beta2=0.95, bias=False, grad_clip=1.0, gradient_accumulation_steps=1)


def run_settings(switches, optimizer, lr, muon_lr, iters, seed, scale, args):
    settings = {**SCALES[scale]["model"], **common_args(iters), **switches, "optimizer": optimizer,
                "learning_rate": lr, "min_lr": lr / 10, "seed": seed, "data_dir": args.data_dir,
                "device": args.device, "dtype": args.dtype, "compile": args.compile, "log_interval": 1,
                "eval_iters": SCALES[scale]["eval_iters"]}
    if optimizer == "muon":
        settings["muon_lr"] = muon_lr
    grid = iters == SCALES[scale]["grid_iters"]
    # the grid needs its end only
    settings["eval_interval"] = iters if grid else max(1, iters // SCALES[scale].get("evals", 10))
    return settings


def read_metrics(path):
    """(evaluations, log lines) of one run's metrics.jsonl, each a list of dicts in file order."""
    evals, logs = [], []
    if path.exists():
        for line in path.read_text().splitlines():
            record = json.loads(line)
            (evals if "val_loss" in record else logs).append(record)
    return evals, logs


def finished_evals(out_dir, iters):
    """The run's evaluations if it finished, else None."""
    evals, _ = read_metrics(out_dir / "metrics.jsonl")
    return evals if evals and evals[-1]["iter"] == iters else None


def run_one(name, settings, args):
    out_dir = Path(args.out_root) / name
    settings = {**settings, "out_dir": str(out_dir)}
    if finished_evals(out_dir, settings["max_iters"]) and json.loads((out_dir / "settings.json").read_text()) == settings:
        return
    if out_dir.exists():  # an unfinished run: start it again from scratch
        for f in out_dir.iterdir():
            f.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "settings.json").write_text(json.dumps(settings))
    command = [sys.executable, str(REPO / "train.py")] + [f"--{k}={v}" for k, v in settings.items()]
    start, load_start = time.time(), os.getloadavg()[0]
    # glibc then keeps big freed tensors instead of returning them to the kernel each step (~2x faster on
    # CPU); one thread per job, as the jobs share the cores
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="4294967296",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(out_dir / "train.log", "w") as log:
        proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    timing = dict(start=start, end=time.time(), load_start=load_start, load_end=os.getloadavg()[0])
    (out_dir / "timing.json").write_text(json.dumps(timing))
    status = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode}, see {out_dir}/train.log)"
    print(f"[ablation] {name}: {status} in {timing['end'] - start:.0f}s, load {load_start:.1f}", flush=True)
    for f in out_dir.glob("*.pt"):  # the checkpoints are not needed for the table
        f.unlink()


def run_all(jobs, args):
    """jobs: [(name, settings)], at most args.jobs at a time."""
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda job: run_one(*job, args), jobs))


# ----------------------------------------------------------------------------------------------
# the plan: which runs, from what the earlier phases found


def grid_name(arm, lr):
    return f"grid-{arm}-lr{lr:g}"


def final_name(arm, seed):
    return f"{arm}-s{seed}"


def base_grid(arm):
    return MUON_GRID if ARMS[arm][1] == "muon" else ADAMW_GRID


def grid_results(arm, args):
    """{grid value: final val loss at the grid horizon} of the arm's finished grid runs, the base grid
    and the values one step beyond either edge."""
    iters = SCALES[args.scale]["grid_iters"]
    grid = base_grid(arm)
    results = {}
    for value in (grid[0] / GRID_STEP, *grid, grid[-1] * GRID_STEP):
        evals = finished_evals(Path(args.out_root) / grid_name(arm, value), iters)
        if evals:
            results[value] = evals[-1]["val_loss"]
    return results


def tuned_lrs(arm, args):
    """(learning_rate, muon_lr) of the arm's best grid run; None until its base grid has finished. A
    Muon arm's AdamW part is at the learning_rate its grid ran with."""
    grid = grid_results(arm, args)
    if not all(value in grid for value in base_grid(arm)):
        return None
    best = min(grid, key=grid.get)
    settings = json.loads((Path(args.out_root) / grid_name(arm, best) / "settings.json").read_text())
    return settings["learning_rate"], settings.get("muon_lr")


def grid_job(arm, value, args):
    switches, optimizer, adamw_arm = ARMS[arm]
    lr, muon_lr = (tuned_lrs(adamw_arm, args)[0], value) if optimizer == "muon" else (value, None)
    return grid_name(arm, value), run_settings(switches, optimizer, lr, muon_lr, SCALES[args.scale]["grid_iters"], 0,
                                               args.scale, args)


def grid_jobs(arms, args):
    return [grid_job(arm, value, args) for arm in arms for value in base_grid(arm)]


def edge_jobs(arms, args):
    """One more grid value, GRID_STEP beyond the edge, for each arm whose best is at an edge of its
    base grid: a best at the edge may not be the best."""
    jobs = []
    for arm in arms:
        grid, results = base_grid(arm), grid_results(arm, args)
        best = min(results, key=results.get)
        if best == grid[-1]:
            jobs.append(grid_job(arm, grid[-1] * GRID_STEP, args))
        elif best == grid[0]:
            jobs.append(grid_job(arm, grid[0] / GRID_STEP, args))
    return jobs


def final_jobs(arms, seed, args):
    iters = SCALES[args.scale]["final_iters"]
    return [(final_name(arm, seed), run_settings(ARMS[arm][0], ARMS[arm][1], *tuned_lrs(arm, args), iters, seed,
                                                 args.scale, args)) for arm in arms]


def best_arm(args, arms=ARMS):
    """The arm (of arms) with the lowest seed-0 final val loss."""
    iters = SCALES[args.scale]["final_iters"]
    finals = {arm: finished_evals(Path(args.out_root) / final_name(arm, 0), iters) for arm in arms}
    finals = {arm: evals[-1]["val_loss"] for arm, evals in finals.items() if evals}
    return min(finals, key=finals.get) if finals else None


def removal_jobs(args):
    """Each switch of the best arm set back to GPT-2's, one at a time, at the best arm's tuned lr. If the
    best arm has no switches (a GPT-2 arm won), they are removed from the best modern arm instead: what
    each one costs or gains is still the question."""
    arm = best_arm(args, [a for a in ARMS if ARMS[a][0] != GPT2])
    if arm is None:
        return []
    switches, optimizer, _ = ARMS[arm]
    iters = SCALES[args.scale]["final_iters"]
    jobs = []
    for key in REMOVAL_ORDER:
        if switches[key] != GPT2[key]:
            changed = {**switches, key: GPT2[key]}
            jobs.append((f"{arm}-no-{key}-s0", run_settings(changed, optimizer, *tuned_lrs(arm, args), iters, 0,
                                                            args.scale, args)))
    return jobs  # "without Muon" is the matching AdamW arm itself, at the same AdamW lr


def long_jobs(args):
    """The baseline and the best arm at long_iters (seed 0, the same tuned lr): does the gap hold?"""
    iters = SCALES[args.scale]["long_iters"]
    return [(f"long-{arm}-s0", run_settings(ARMS[arm][0], ARMS[arm][1], *tuned_lrs(arm, args), iters, 0,
                                            args.scale, args)) for arm in dict.fromkeys(["baseline", best_arm(args)])]


def run_plan(args):
    adamw_arms = [a for a in ARMS if ARMS[a][1] == "adamw"]
    muon_arms = [a for a in ARMS if ARMS[a][1] == "muon"]
    if "1" in args.phases:
        run_all(grid_jobs(adamw_arms, args), args)
        run_all(edge_jobs(adamw_arms, args), args)
    if "2" in args.phases:
        run_all(grid_jobs(muon_arms, args), args)
        run_all(edge_jobs(muon_arms, args), args)
    if "3" in args.phases:
        run_all(final_jobs(ARMS, SEEDS[0], args), args)
    if "5" in args.phases:  # after the seed-0 finals, which pick the best arm
        run_all(long_jobs(args), args)
    if "4" not in args.phases:
        return
    # by importance, in case the time runs out: the second seed of the two arms the headline compares,
    # the two most doubtful switches, the other arms' second seed, the other switches
    best = best_arm(args)
    others = [arm for arm in ARMS if arm not in ("baseline", best)]
    removals = removal_jobs(args)[:args.removals]
    headline = list(dict.fromkeys(["baseline", best]))
    run_all(final_jobs(headline, SEEDS[1], args) + removals[:2] + final_jobs(others, SEEDS[1], args) + removals[2:],
            args)


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


def mean(xs):
    return sum(xs) / len(xs)


def seed_cells(runs, name, target, budget):
    """One arm's runs over SEEDS, their final val losses, and its table cells from "final val loss per seed"
    to "tokens to target per seed (ratio to budget)"; (None, None, None) when it has no run."""
    per_seed = [runs[f"{name}-s{s}"] for s in SEEDS if f"{name}-s{s}" in runs]
    if not per_seed:
        return None, None, None
    finals = [evals[-1]["val_loss"] for _, evals, _ in per_seed]
    reached = [tokens_to_reach(evals, target) for _, evals, _ in per_seed]
    cells = (f"{' / '.join(f'{v:.3f}' for v in finals)} | {mean(finals):.3f} | {mean(finals) - target:+.3f} | "
             + (f"{max(finals) - min(finals):.3f}" if len(finals) > 1 else "1 seed") + " | "
             + " / ".join("not reached" if r is None else f"{r:,.0f} ({r / budget:.2f})" for r in reached))
    return per_seed, finals, cells


def describe(settings):
    """The settings that tell arms apart, as a short text."""
    switches = [k if v is True else f"{k}={v}" for k, v in settings.items() if k in GPT2 and v != GPT2[k]
                and k != "lr_schedule"]
    optimizer = (f"Muon {settings['muon_lr']:g} + AdamW {settings['learning_rate']:g}" if settings["optimizer"] == "muon"
                 else f"AdamW {settings['learning_rate']:g}")
    return f"{optimizer}, {settings['lr_schedule']}", ", ".join(switches) or "GPT-2"


def finished_runs(args):
    """{run name: (settings, evaluations, timing)} of every finished run under out_root."""
    runs = {}
    for out_dir in sorted(Path(args.out_root).glob("*")):
        if not (out_dir / "timing.json").exists():
            continue
        settings = json.loads((out_dir / "settings.json").read_text())
        evals = finished_evals(out_dir, settings["max_iters"])
        if evals:
            runs[out_dir.name] = (settings, evals, json.loads((out_dir / "timing.json").read_text()))
    return runs


def write_report(args, command_wall):
    runs = finished_runs(args)
    scale = SCALES[args.scale]
    tokens_per_iter = scale["model"]["batch_size"] * scale["model"]["block_size"]
    budget = scale["final_iters"] * tokens_per_iter
    baseline = [runs[final_name("baseline", s)][1][-1]["val_loss"] for s in SEEDS if final_name("baseline", s) in runs]
    if not baseline:
        print("[ablation] no finished baseline run: nothing to report")
        return
    target = mean(baseline)
    m = scale["model"]
    lines = ["# The recipe ablation: Muon and the modern switches, each arm at its own learning rate", "",
             "Written by `benchmarks/ablation.py`; reproduce (after `python data/fineweb/prepare.py "
             "--input=../shared/corpus/en_docs.parquet --out_dir=data/en_docs`) with:", "",
             f"    python benchmarks/ablation.py --data_dir=data/en_docs --jobs={args.jobs} --phases={args.phases} "
             f"--removals={args.removals}", "",
             f"Model: {m['n_layer']} layers x {m['n_embd']} wide ({m['n_head']} heads), block {m['block_size']}, "
             f"batch {m['batch_size']} ({tokens_per_iter:,} tokens/iteration), fp32 on CPU. Final runs: "
             f"{scale['final_iters']} iterations = {budget:,} tokens, val loss every {scale['final_iters'] // 10} "
             f"iterations (10% of the run) on {scale['eval_iters'] * tokens_per_iter:,} fixed held-out tokens. "
             f"Learning-rate grid: {scale['grid_iters']} iterations (a quarter of the horizon), seed 0. Shared by "
             "all: AdamW (0.9, 0.95), weight decay 0.1 (Muon's too), warmup 1/30 of the run, decay to lr/10 (cosine, "
             "or WSD's linear cooldown over the last 20%), grad clip 1, no biases.", "",
             "## 1. Learning-rate grid (val loss at the grid horizon; best in bold)", "",
             "| arm | grid | val loss per value |", "|---|---|---|"]
    for arm, (switches, optimizer, adamw_arm) in ARMS.items():
        grid = grid_results(arm, args)
        if not grid:
            continue
        best = min(grid, key=grid.get)
        label = "muon_lr" if optimizer == "muon" else "learning_rate"
        extra = f" (AdamW part at {tuned_lrs(arm, args)[0]:g})" if optimizer == "muon" and tuned_lrs(arm, args) else ""
        cells = " / ".join((f"**{v:g}: {loss:.3f}**" if v == best else f"{v:g}: {loss:.3f}") for v, loss in grid.items())
        edge = " (best at the grid's edge)" if best in (min(grid), max(grid)) else ""
        lines.append(f"| {arm} | {label}{extra} | {cells}{edge} |")
    lines += ["", f"## 2. Final runs ({budget:,} tokens, tuned lr)", "",
              f"Target: the tuned baseline's mean final val loss, {target:.3f}. \"tokens to target\" is read off each "
              "run's own val curve, linearly between evaluations; a ratio below 1 means the arm gets there sooner. "
              "A row `<arm>-no-<switch>` is `<arm>` with that one switch back at GPT-2's (`no-lr_schedule`: cosine "
              "instead of WSD), seed 0, at `<arm>`'s tuned lr.", "",
              "| run | optimizer, schedule | switches | final val loss per seed | mean | vs baseline | seed spread "
              "(max-min) | tokens to target per seed (ratio to budget) |", "|---|---|---|---|---|---|---|---|"]
    names = [arm for arm in ARMS] + sorted({n[:-3] for n in runs if "-no-" in n})
    for name in names:
        per_seed, _, cells = seed_cells(runs, name, target, budget)
        if not per_seed:
            continue
        optimizer, switches = describe(per_seed[0][0])
        lines.append(f"| {name} | {optimizer} | {switches} | {cells} |")
    missing = [name for name, _ in removal_jobs(args) if name not in runs]
    if missing:
        lines += ["", "Planned but not run (out of time): " + ", ".join(missing) + "."]
    lines += long_check_lines(args, scale, tokens_per_iter)
    lines += ["", "## Deviations from the planned design, and why", "", *DEVIATIONS]
    timings = [t for _, _, t in runs.values()]
    run_seconds = sum(t["end"] - t["start"] for t in timings)
    span = max(t["end"] for t in timings) - min(t["start"] for t in timings)
    loads = [t[k] for t in timings for k in ("load_start", "load_end")]
    lines += ["", "## Cost and machine load", "",
              f"{len(runs)} runs, {run_seconds / 60:.0f} min of run time, {span / 60:.0f} min from the first start "
              f"to the last end with {args.jobs} at a time" + (f" (this invocation: {command_wall / 60:.0f} min)"
                                                                if command_wall else "") + ". 1-minute load "
              f"average at the runs' starts and ends: mean {mean(loads):.1f}, max {max(loads):.1f} on 2 cores "
              "(other work shared the machine; tokens/s per run are in each run's train.log)."]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot_curves(runs, names, target, long_evals(args), args.plot)
    print(f"[ablation] wrote {args.table} and {args.plot}")


def long_evals(args):
    """{run name: evaluations so far} of the long runs (phase 5), finished or not."""
    return {d.name: evals for d in sorted(Path(args.out_root).glob("long-*"))
            if len(evals := read_metrics(d / "metrics.jsonl")[0]) > 1}


def long_check_lines(args, scale, tokens_per_iter):
    """Table 3: the long runs compared at the last evaluation all of them reached (their end, once done)."""
    runs = long_evals(args)
    if "long-baseline-s0" not in runs:
        return []
    budget = scale["long_iters"] * tokens_per_iter
    common = min(evals[-1]["tokens"] for evals in runs.values())
    at_common = {name: [e for e in evals if e["tokens"] <= common] for name, evals in runs.items()}
    target = at_common["long-baseline-s0"][-1]["val_loss"]
    state = ("their end" if common == budget else f"{common:,} tokens of {budget:,}, mid-schedule (the runs stopped there: "
             "out of time)")
    lines = ["", f"## 3. Long check: {budget:,} tokens planned, seed 0, the lr tuned above", "",
             f"Compared at {state}. Target: the baseline's val loss there, {target:.3f}.", "",
             "| run | val loss | vs baseline | tokens to target (ratio) |", "|---|---|---|---|"]
    for name, evals in at_common.items():
        reached = tokens_to_reach(evals, target)
        lines.append(f"| {name[5:-3]} | {evals[-1]['val_loss']:.3f} | {evals[-1]['val_loss'] - target:+.3f} | "
                     + (f"{reached:,.0f} ({reached / common:.2f})" if reached is not None else "not reached") + " |")
    return lines


def plot_curves(runs, names, target, long_runs, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2 if long_runs else 1, figsize=(16 if long_runs else 9, 5.5), squeeze=False)
    ax = axes[0][0]
    for i, name in enumerate(names):
        for j, seed in enumerate(SEEDS):
            if f"{name}-s{seed}" not in runs:
                continue
            points = [e for e in runs[f"{name}-s{seed}"][1] if e["iter"] > 0]  # the loss at init squashes the plot
            ax.plot([e["tokens"] for e in points], [e["val_loss"] for e in points], color=f"C{i % 10}",
                    linestyle="-" if name in ARMS else "--", marker=".", alpha=0.8, label=name if j == 0 else None)
    ax.axhline(target, color="gray", linestyle=":", label="tuned baseline final (mean)")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("val loss")
    ax.set_title("recipe ablation (one line per seed; dashed: a switch removed)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for i, name in enumerate(long_runs):
        points = [e for e in long_runs[name] if e["iter"] > 0]
        axes[0][1].plot([e["tokens"] for e in points], [e["val_loss"] for e in points], marker=".", label=name[5:-3],
                        color=f"C{names.index(name[5:-3]) % 10}" if name[5:-3] in names else None)
    if long_runs:
        axes[0][1].set(xlabel="training tokens", ylabel="val loss", title="long check (seed 0)")
        axes[0][1].legend(fontsize=8)
        axes[0][1].grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------------------------
# --study=token: a better model per token. GPT-2 + Muon (the first study's best arm) against four
# switches measured to help at 40M-124M elsewhere, each alone and all together.

SOFTCAP = 15.0  # modded-nanogpt's cap (its 2025-01-04 record)
MUON_WD = 0.4  # nanochat's best Muon decay at 512 wide (0.22 at 768); it falls with width, so 0.4 is the nearest
NEW_SWITCHES = {
    "document": dict(data_order="document"),
    "softcap": dict(logit_softcap=SOFTCAP),
    "zero_head": dict(tie_embeddings=False, zero_init_head=True),  # a zero head needs an untied one
    "muon_wd": dict(muon_weight_decay=MUON_WD),
}
TOKEN_ARMS = {"muon": {}, **{f"muon+{name}": switches for name, switches in NEW_SWITCHES.items()},
              "muon+all": {k: v for switches in NEW_SWITCHES.values() for k, v in switches.items()}}
TUNED_ARMS = ("muon", "muon+all")  # the arms with their own learning-rate grid; the single switches use muon's
TOKEN_MUON_GRID = (0.025, 0.05, 0.1)  # muon_lr, at AdamW's TOKEN_ADAMW_LR
TOKEN_ADAMW_LR = 0.025  # the first study's tuned AdamW lr of the GPT-2 arms
# then one AdamW lr per arm at its best muon_lr: higher for the tied head (the first study's best was at the top
# of its grid), lower for the untied zero head (the first study's untied arms preferred 0.004)
TOKEN_ADAMW_STEP = {"muon": 2.5, "muon+all": 1 / 2.5}


TOKEN_NOTES = [
    "## Deviations from the plan, and why", "",
    "- **Tokens per run: 196,608 (48 iterations), not ≥1M.** Measured at launch: this shape trained at 200-350 "
    "tokens/s per job, two jobs at a time, on a 2-core machine at a 1-minute load average of 14-18 from other work, "
    "so 8 runs of 1M tokens would have taken ~7 h of the ~2 h there was; 64 iterations were planned at launch and "
    "cut to 48 when the grid ran slower than planned.",
    "- **bf16 on the CPU (AMX) and batch 32**, for every arm: measured one after the other (not alternated) before "
    "launching, bf16 ran 816 tokens/s against fp32's 360 (batch 8, load 5.6-7.5), and batch 32 1,503 against batch "
    "8's 999 (bf16, load 7-10, last logged iteration).",
    "- **Learning rates**: `muon_lr` over 0.025 / 0.05 / 0.1 at AdamW 0.025 (the first study's tuned value), then "
    "one AdamW value at the best `muon_lr` (2.5x up for the tied head, 2.5x down for the all-switches arm's untied "
    "zero head), 16 iterations (a third of the horizon), seed 0, for the base and the all-switches arm only; "
    "the single-switch arms run at the base's rates.",
    "- **Not tuned**: the cap (15, modded-nanogpt's) and Muon's decay (0.4, nanochat's at 512 wide).",
    "- **`muon+zero_head` also unties the head** (a zero head must be untied), so it measures the two together.",
    "- **Memory**: a run of this shape holds ~4-6 GB (the 32 x 128 x 50,304 logits and their copies, kept by "
    "glibc under the malloc thresholds that buy the speed); three at a time next to other work ran the 23 GB "
    "machine out of memory and the kernel killed two runs, which were re-run two at a time.",
    "", "## What this scale can and cannot tell", "",
    "- It can tell whether a switch costs or gains more than the seed noise for a small model trained briefly "
    "(48 optimizer steps), and that each code path trains end to end.",
    "- It cannot tell what the switches do at 40M-124M, where they were measured to help: those gains (1-7% fewer "
    "steps) are of the order of the seed spread here, and a 4 x 128 model spends most of its FLOPs in the output "
    "layer (88%). The GPU command below asks the question at 40M.",
    "- Document rows are a different training distribution at this block size: the corpus's documents average "
    "~1,280 tokens, so 128-token rows from document starts show the first tenth of each document, while the val "
    "loss is measured on random windows (as for every arm, so the numbers compare). At block 1024 most of each "
    "document is in its row.",
    "", "## The same question on a GPU", "",
    "AdamW vs Muon vs Muon + all four switches at the 40M shape (12 x 384, block 1024), 32.8M tokens each, one "
    "command (~7 min on an H200, estimated, not yet run):", "",
    "    RECIPE=only DATA_DIR=data/fineweb bash benchmarks/gpu_proof.sh",
]


def token_settings(arm, lr, muon_lr, iters, seed, args):
    return run_settings({**GPT2, **TOKEN_ARMS[arm]}, "muon", lr, muon_lr, iters, seed, args.scale, args)


def token_grid_job(arm, lr, muon_lr, args):
    return (f"tgrid-{arm}-lr{lr:g}-mlr{muon_lr:g}",
            token_settings(arm, lr, muon_lr, SCALES[args.scale]["grid_iters"], 0, args))


def token_grid_results(arm, args):
    """{(learning_rate, muon_lr): val loss at the grid horizon} of the arm's finished grid runs."""
    iters = SCALES[args.scale]["grid_iters"]
    results = {}
    for out_dir in sorted(Path(args.out_root).glob(f"tgrid-{arm}-lr*")):
        evals = finished_evals(out_dir, iters)
        if evals:
            settings = json.loads((out_dir / "settings.json").read_text())
            results[(settings["learning_rate"], settings["muon_lr"])] = evals[-1]["val_loss"]
    return results


def token_tuned(arm, args):
    """(learning_rate, muon_lr) of the arm's best grid run (muon's for a single-switch arm), None before any."""
    results = token_grid_results(arm if arm in TUNED_ARMS else "muon", args)
    return min(results, key=results.get) if results else None


def token_final_job(arm, seed, args):
    return f"{arm}-s{seed}", token_settings(arm, *token_tuned(arm, args), SCALES[args.scale]["final_iters"], seed, args)


def token_plan(args):
    """By importance, in case the time runs out: the grid, the two tuned arms' seeds, then each switch alone."""
    run_all([token_grid_job(arm, TOKEN_ADAMW_LR, muon_lr, args) for arm in TUNED_ARMS for muon_lr in TOKEN_MUON_GRID],
            args)
    run_all([token_grid_job(arm, TOKEN_ADAMW_LR * TOKEN_ADAMW_STEP[arm], token_tuned(arm, args)[1], args)
             for arm in TUNED_ARMS], args)
    singles = [arm for arm in TOKEN_ARMS if arm not in TUNED_ARMS]
    run_all([token_final_job(arm, seed, args) for seed in SEEDS for arm in TUNED_ARMS]
            + [token_final_job(arm, SEEDS[0], args) for arm in singles], args)


def token_switches(settings):
    changed = [k if v is True else f"{k}={v}" for k, v in settings.items()
               if k in TOKEN_ARMS["muon+all"] and v != {**GPT2, "data_order": "random", "logit_softcap": 0.0,
                                                        "zero_init_head": False}.get(k)]
    return ", ".join(changed) or "GPT-2"


def token_verdict(finals, base_finals):
    """What a difference of means says, against the larger seed spread of the two (the noise we measured)."""
    spread = max([max(f) - min(f) for f in (finals, base_finals) if len(f) > 1], default=None)
    diff = mean(finals) - mean(base_finals)
    if spread is None:
        return "no seed spread measured"
    if abs(diff) <= spread:
        return "within the seed spread"
    return "better by more than the seed spread" if diff < 0 else "worse by more than the seed spread"


def token_report(args, command_wall):
    runs = finished_runs(args)
    scale = SCALES[args.scale]
    m = scale["model"]
    tokens_per_iter = m["batch_size"] * m["block_size"]
    budget = scale["final_iters"] * tokens_per_iter
    base = [runs[f"muon-s{s}"][1][-1]["val_loss"] for s in SEEDS if f"muon-s{s}" in runs]
    if not base:
        print("[ablation] no finished muon run: nothing to report")
        return
    target = mean(base)
    quick = " --quick" if args.scale == "token-quick" else ""
    lines = ["# Ablation: a better model per token", "",
             "GPT-2 + Muon (the best arm of the [first study](ablation-arch.md)) against four switches that others "
             "measured to help at 40M-124M: rows that start at a document's start (`data_order='document'`), logit "
             f"soft-capping (`logit_softcap={SOFTCAP:g}`), a zero-initialised untied head (`tie_embeddings=False "
             f"zero_init_head=True`), Muon's own weight decay (`muon_weight_decay={MUON_WD:g}`; the others keep 0.1); "
             "each alone and all four together. Written by `benchmarks/ablation.py`; reproduce (after `python "
             "data/fineweb/prepare.py --input=../shared/corpus/en_docs.parquet --out_dir=data/en_docs`) with:", "",
             f"    python benchmarks/ablation.py --study=token --data_dir=data/en_docs --jobs={args.jobs}{quick}", "",
             f"Model: {m['n_layer']} layers x {m['n_embd']} wide ({m['n_head']} heads), block {m['block_size']}, batch "
             f"{m['batch_size']} ({tokens_per_iter:,} tokens/iteration), {args.dtype} on CPU. Final runs: "
             f"{scale['final_iters']} iterations = {budget:,} tokens, val loss {scale.get('evals', 10)} times per run "
             f"on {scale['eval_iters'] * tokens_per_iter:,} fixed held-out tokens (random windows for every data "
             "order, so the losses compare). Shared: AdamW (0.9, 0.95) for embeddings, head and norms, weight decay "
             "0.1, cosine schedule, warmup 1/30 of the run, decay to lr/10, grad clip 1, no biases.", "",
             f"## 1. Learning rates (val loss after {scale['grid_iters']} iterations, a third of the horizon, "
             "seed 0; best in bold)", "",
             "| arm | (learning_rate, muon_lr): val loss |", "|---|---|"]
    for arm in TUNED_ARMS:
        grid = token_grid_results(arm, args)
        if grid:
            best = min(grid, key=grid.get)
            edges = [name for i, name in enumerate(("learning_rate", "muon_lr"))  # a best at an edge may not be best
                     if len({key[i] for key in grid}) > 1 and best[i] in (min(k[i] for k in grid), max(k[i] for k in grid))]
            lines.append(f"| {arm} | " + " / ".join((f"**({lr:g}, {mlr:g}): {v:.3f}**" if (lr, mlr) == best else
                                                    f"({lr:g}, {mlr:g}): {v:.3f}") for (lr, mlr), v in grid.items())
                         + (f" (best at the edge of the grid in {' and '.join(edges)})" if edges else "") + " |")
    lines += ["", f"## 2. Final runs ({budget:,} tokens)", "", f"![val loss curves]({Path(args.plot).name})", "",
              f"Target: the base arm's (`muon`) mean final val loss, {target:.3f}. \"tokens to target\" is read off "
              "each run's val curve, linearly between evaluations. The single-switch arms run at `muon`'s tuned "
              "rates, one seed; the verdict compares the difference of means with the larger seed spread of the two "
              "arms compared (the base's for a one-seed arm).", "",
              "| arm | switches | (lr, muon_lr) | final val loss per seed | mean | vs muon | seed spread (max-min) "
              "| tokens to target per seed | verdict | tokens/s (mean of its iterations; the load varied) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for arm in TOKEN_ARMS:
        per_seed, finals, cells = seed_cells(runs, arm, target, budget)
        if not per_seed:
            continue
        settings = per_seed[0][0]
        logs = [r for s in SEEDS if f"{arm}-s{s}" in runs
                for r in read_metrics(Path(args.out_root) / f"{arm}-s{s}" / "metrics.jsonl")[1]]
        speed = mean([r["tokens_per_sec"] for r in logs]) if logs else float("nan")
        lines.append(f"| {arm} | {token_switches(settings)} | ({settings['learning_rate']:g}, {settings['muon_lr']:g}) "
                     f"| {cells} | {'base' if arm == 'muon' else token_verdict(finals, base)} | {speed:,.0f} |")
    missing = [name for name in [f"{a}-s{s}" for s in SEEDS for a in TUNED_ARMS] + [f"{a}-s0" for a in TOKEN_ARMS]
               if name not in runs]
    if missing:
        lines += ["", "Planned but not finished (out of time): " + ", ".join(dict.fromkeys(missing)) + "."]
    if args.scale == "token":
        lines += ["", *TOKEN_NOTES]
    timings = [t for _, _, t in runs.values()]
    loads = [t[k] for t in timings for k in ("load_start", "load_end")]
    lines += ["", "## Cost and machine load", "",
              f"{len(runs)} runs, {sum(t['end'] - t['start'] for t in timings) / 60:.0f} min of run time, "
              f"{(max(t['end'] for t in timings) - min(t['start'] for t in timings)) / 60:.0f} min from the first start "
              f"to the last end with {args.jobs} at a time" + (f" (this invocation: {command_wall / 60:.0f} min)"
                                                                if command_wall else "") + ", finished "
              + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(max(t["end"] for t in timings))) + ". 1-minute load "
              f"average at the runs' starts and ends: mean {mean(loads):.1f}, max {max(loads):.1f} on "
              f"{os.cpu_count()} cores (other work shared the machine)."]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    token_plot(runs, target, args.plot)
    print(f"[ablation] wrote {args.table} and {args.plot}")


# ----------------------------------------------------------------------------------------------
# --study=gpu: the same question at 40M on one GPU, no grid (the rates are config/train_fineweb_modern.py's)

GPU_LR, GPU_MUON_LR = 1.5e-3, 0.02  # config/train_fineweb_modern.py's; AdamW alone at the same peak
GPU_ARMS = {"adamw": ({}, "adamw"), "muon": ({}, "muon"), "muon+all": (TOKEN_ARMS["muon+all"], "muon")}


def gpu_plan(args):
    iters = SCALES[args.scale]["final_iters"]
    run_all([(f"{arm}-s0", run_settings({**GPT2, **switches}, optimizer, GPU_LR, GPU_MUON_LR, iters, 0, args.scale,
                                        args)) for arm, (switches, optimizer) in GPU_ARMS.items()], args)


def gpu_report(args, command_wall):
    runs = finished_runs(args)
    if "adamw-s0" not in runs:
        print("[ablation] no finished adamw run: nothing to report")
        return
    scale, m = SCALES[args.scale], SCALES[args.scale]["model"]
    budget = scale["final_iters"] * m["batch_size"] * m["block_size"]
    target = runs["adamw-s0"][1][-1]["val_loss"]
    lines = ["# AdamW vs Muon vs Muon + the per-token switches, same token budget", "",
             f"    python benchmarks/ablation.py --study=gpu --data_dir={args.data_dir} --device={args.device} "
             f"--dtype={args.dtype} --compile={args.compile} --jobs=1", "",
             f"Model: {m['n_layer']} layers x {m['n_embd']} wide, block {m['block_size']}, batch {m['batch_size']}; "
             f"{scale['final_iters']} iterations = {budget:,} tokens per arm, seed 0; AdamW {GPU_LR:g}, Muon "
             f"{GPU_MUON_LR:g}, cosine to lr/10, warmup 1/30. Switches of muon+all: "
             f"{token_switches({**GPT2, **TOKEN_ARMS['muon+all']})}.", "",
             "| arm | final val loss | vs adamw | tokens to adamw's final (ratio) | tokens/s | minutes |",
             "|---|---|---|---|---|---|"]
    for arm in GPU_ARMS:
        if f"{arm}-s0" in runs:
            _, evals, timing = runs[f"{arm}-s0"]
            reached = tokens_to_reach(evals, target)
            minutes = (timing["end"] - timing["start"]) / 60
            lines.append(f"| {arm} | {evals[-1]['val_loss']:.3f} | {evals[-1]['val_loss'] - target:+.3f} | "
                         + ("not reached" if reached is None else f"{reached:,.0f} ({reached / budget:.2f})")
                         + f" | {budget / (minutes * 60):,.0f} | {minutes:.1f} |")
    lines += ["", time.strftime("Finished %Y-%m-%d %H:%M UTC", time.gmtime(max(t["end"] for _, _, t in runs.values())))
              + (f"; this invocation {command_wall / 60:.1f} min" if command_wall else "") + "."]
    Path(args.table).parent.mkdir(parents=True, exist_ok=True)
    Path(args.table).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    token_plot(runs, target, args.plot, GPU_ARMS, "40M: AdamW vs Muon vs Muon + the per-token switches")
    print(f"[ablation] wrote {args.table} and {args.plot}")


def token_plot(runs, target, path, arms=TOKEN_ARMS, title="a better model per token (solid: seed 0, dashed: seed 1)"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for i, arm in enumerate(arms):
        for j, seed in enumerate(SEEDS):
            if f"{arm}-s{seed}" in runs:
                points = [e for e in runs[f"{arm}-s{seed}"][1] if e["iter"] > 0]  # the loss at init squashes the plot
                ax.plot([e["tokens"] for e in points], [e["val_loss"] for e in points], color=f"C{i}", marker=".",
                        linestyle="-" if seed == SEEDS[0] else "--", alpha=0.8, label=arm if j == 0 else None)
    ax.axhline(target, color="gray", linestyle=":", label=f"{next(iter(arms))} final" + (" (mean)" if arms is TOKEN_ARMS else ""))
    ax.set(xlabel="training tokens", ylabel="val loss", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default=str(REPO / "data" / "fineweb"), help="folder with train.bin, val.bin")
    p.add_argument("--study", choices=("arch", "token", "gpu"), default="arch",
                   help="arch: Muon and the modern switches; token: a better model per token; gpu: token's question "
                   "at 40M on a GPU (see above)")
    p.add_argument("--scale", choices=SCALES, default=None, help="default: cpu (arch), token (token), gpu (gpu)")
    p.add_argument("--quick", action="store_true", help="same as --scale=quick: checks the script, measures nothing")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time (one per core is sensible on a CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 (arch), bfloat16 (token)")
    p.add_argument("--compile", default="False")
    p.add_argument("--out_root", default=None, help="default: out-ablation-<scale>")
    p.add_argument("--table", default=None, help="default: docs/ablation.md (token), docs/ablation-arch.md "
                   "(arch); docs/ablation-<scale>.md at another scale")
    p.add_argument("--plot", default=None, help="default: next to the table, .png")
    p.add_argument("--phases", default="1234", help="which phases to run (5: the long check, see long_jobs)")
    p.add_argument("--removals", type=int, default=len(REMOVAL_ORDER),
                   help="remove only this many of the best arm's switches (most doubtful first)")
    p.add_argument("--report_only", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.scale = {"arch": "quick", "token": "token-quick", "gpu": "gpu-tiny"}[args.study]
    args.scale = args.scale or {"arch": "cpu", "token": "token", "gpu": "gpu"}[args.study]
    args.dtype = args.dtype or ("float32" if args.study == "arch" else "bfloat16")
    suffix = {"cpu": "-arch", "token": ""}.get(args.scale, f"-{args.scale}")
    args.out_root = args.out_root or str(REPO / f"out-ablation-{args.scale}")
    args.table = args.table or str(REPO / "docs" / f"ablation{suffix}.md")
    args.plot = args.plot or str(Path(args.table).with_suffix(".png"))
    start = time.time()
    plan, report = {"arch": (run_plan, write_report), "token": (token_plan, token_report),
                    "gpu": (gpu_plan, gpu_report)}[args.study]
    if not args.report_only:
        plan(args)
    report(args, None if args.report_only else time.time() - start)


if __name__ == "__main__":
    main()
