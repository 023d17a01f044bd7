"""
What more training buys, before paying for it: the val loss a run will reach under a longer (or another)
learning-rate plan, forecast from the evaluations it has logged.

$ python forecast.py --out_dir=out-fineweb --max_iters=12000
$ python forecast.py --out_dir=out-fineweb --max_iters=12000 --resume_from=stable      # a wsd run, extended
$ python forecast.py --out_dir=out-fineweb --max_iters=20000 --from_scratch=True --json=True

It fits the annealing law of Tissue et al. 2024 ("Scaling Law with Learning Rate Annealing") to the val
losses in out_dir/metrics.jsonl:

    L(s) = L0 + A * S1(s)^(-alpha) - C * S2(s)

where, with lr_k the learning rate of update k (exact, from kit/schedule.py and the checkpoint's config, in
units of the run's peak rate): S1(s) = lr_1 + ... + lr_s is the area under the schedule, and S2(s) =
m_1 + ... + m_s the annealing area, m_k = lam * m_(k-1) + (lr_(k-1) - lr_k): every drop of the rate, taking
effect with momentum lam (0.999, the paper's). The warmup's rise is no annealing (its drops count as 0).
The fitted law then gives the loss under the new plan: by default the run continued with
`train.py --init_from=resume` and the same settings (the rate follows the new schedule from the
checkpoint's iteration on), with --from_scratch=True a run planned that way from iteration 0.

The interval: at each forecast iteration t, low/high = the forecast -/+ the largest of (a) half the spread
(5th to 95th percentile) of the forecasts of 100 refits to the fitted curve plus resampled residuals (the
noise of the evaluations), (b) the back-test error: the law fitted to the evaluations up to T * T/t only
(T the last evaluated iteration), asked for the loss at T, which is known (the error of the same stretch of
extrapolation, made on this run's own past), and (c) the drift: how far the forecast moves when the fit
leaves out the last one, two or three evaluations (a fit that has not settled). A plain power law in
iterations, L0 + A * s^(-alpha), fitted to the same evaluations, is printed beside it for comparison. How
good both are on real runs: docs/forecast.md.
"""
import json
import math
import os
import sys

import numpy as np
import torch
from scipy.optimize import minimize_scalar
from scipy.signal import lfilter

from configurator import configure, fail, first_line, script_defaults
from kit.checkpoint import checkpoint_path
from kit.schedule import check_resume_lr, get_lr

SETTINGS = dict(
    out_dir="out",  # the run: its metrics.jsonl and its checkpoints
    resume_from="last",  # the checkpoint the plan resumes from, as train.py's: 'last', 'stable', 'best' or a path
    from_scratch=False,  # forecast a run planned with the new settings from iteration 0, not a resumed one
    allow_lr_increase=False,  # as train.py's: forecast a resume whose schedule raises the learning rate
    json=False,  # print the forecast at max_iters as one JSON object (max_iters, val_loss, low, high, warnings)
    plot="",  # the PNG drawn (observed, fitted, forecast, the schedule under it); '' = out_dir/forecast.png
)
# the new plan: train.py's schedule settings; any not given keeps the checkpoint's value
SCHEDULE_KEYS = ("max_iters", "lr_schedule", "learning_rate", "min_lr", "warmup_iters", "lr_decay_iters",
                 "cooldown_frac")
TRAIN_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")
SETTINGS_SOURCES = [__file__, TRAIN_PY, __file__]  # --help: ours, then train.py's schedule settings; usage: ours
LAM = 0.999  # the momentum of the annealing area (Tissue et al.'s choice)
MIN_EVALUATIONS = 5  # evaluations the fit needs (fit_points): the law has 4 parameters
BOOTSTRAP = 100  # refits on resampled residuals, for the noise part of the interval
ANNEALED = 0.9  # a run "has annealed" once its rate fell below this share of its peak


def learning_rate_at(it, config):
    """The learning rate of the update from iteration it to it + 1 under config's schedule, as train.py sets it."""
    return get_lr(it, config)


def schedule(config, start, stop):
    return np.array([learning_rate_at(it, config) for it in range(start, stop)], dtype=np.float64)


def areas(lrs, warmup_iters, lam=LAM):
    """(S1, S2) after 0, 1, ..., len(lrs) updates; lrs[k] drives update k + 1, in units of the peak rate."""
    drops = np.zeros_like(lrs)
    drops[1:] = lrs[:-1] - lrs[1:]
    drops[:warmup_iters + 1] = 0.0  # the warmup's rise: no annealing (a later rise, a re-warm, counts negative)
    momentum = lfilter([1.0], [1.0, -lam], drops)  # m_k = lam * m_(k-1) + drop_k
    return np.concatenate([[0.0], np.cumsum(lrs)]), np.concatenate([[0.0], np.cumsum(momentum)])


# --- the fit: for a fixed alpha the law is linear in (L0, A, C), solved with A, C >= 0; alpha by a 1-D search


def solve_linear(x, s2, loss, alpha):
    """(L0, A, C) and the squared error of the best fit for this alpha with L0, A, C >= 0 (a loss is never
    negative, nor is the law's gain from training or from annealing); s2=None: the power law (C = 0). The
    bounded optimum is the best feasible one of the unbounded fits with each unknown free or held at 0 (a face
    of the box), so at most eight small least-squares solves find it."""
    columns = {"l0": np.ones_like(x), "a": x ** -alpha, "c": -s2 if s2 is not None and np.ptp(s2) > 0 else None}
    names = [k for k, v in columns.items() if v is not None]
    best = ((0.0, 0.0, 0.0), float(np.sum(loss ** 2)))  # everything held at 0
    for mask in range(1, 2 ** len(names)):
        free = [k for i, k in enumerate(names) if mask >> i & 1]
        design = np.column_stack([columns[k] for k in free])
        solution = np.linalg.lstsq(design, loss, rcond=None)[0]
        if (solution < 0).any():
            continue
        error = float(np.sum((design @ solution - loss) ** 2))
        if error < best[1]:
            values = dict(zip(free, solution))
            best = ((values.get("l0", 0.0), values.get("a", 0.0), values.get("c", 0.0)), error)
    return best


def fit(x, s2, loss, near=None):
    """Least-squares fit of L0 + A * x^(-alpha) - C * s2 (s2=None: no annealing term); returns
    (L0, A, alpha, C). alpha: the best of a grid, refined by a bounded search around it (near: a fit's alpha
    to search around instead, for the refits of the interval)."""
    if near is None:
        grid = np.geomspace(0.02, 3.0, 30)
        i = int(np.argmin([solve_linear(x, s2, loss, alpha)[1] for alpha in grid]))
        lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    else:
        lo, hi = near / 2, near * 2
    alpha = minimize_scalar(lambda a: solve_linear(x, s2, loss, a)[1], bounds=(lo, hi), method="bounded",
                            options={"xatol": 1e-4}).x
    (l0, a, c), _ = solve_linear(x, s2, loss, alpha)
    return l0, a, float(alpha), c


def law(params, x, s2):
    l0, a, alpha, c = params
    return l0 + a * x ** -alpha - (c * s2 if s2 is not None else 0.0)


# --- the run: its evaluations and its schedule


def read_evaluations(path):
    """[(iter, tokens, val_loss)] and [(iter, lr)] of a metrics.jsonl. Where the iteration goes back (a
    resume from an older checkpoint) the later records replace the earlier ones from there on, as in plot.py."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                it = int(record["iter"])
            except (ValueError, KeyError, TypeError):  # a line cut short by a crash
                continue
            records = [r for r in records if r["iter"] < it] + [record]
    evaluations = [(r["iter"], r.get("tokens"), float(r["val_loss"])) for r in records
                   if r.get("val_loss") is not None]
    logged_lrs = [(r["iter"], float(r["lr"])) for r in records if r.get("lr") is not None]
    return evaluations, logged_lrs


def load_config(path):
    """The training config and iteration of a checkpoint, without reading its tensors (memory-mapped)."""
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}: forecast.py reads the run's schedule from it (out_dir, resume_from)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return dict(ckpt["config"]), int(ckpt["iter_num"])
    except Exception as e:
        fail(f"{path}: cannot read its config and iteration ({type(e).__name__}: {first_line(e)})")


def check_run(evaluations, logged_lrs, config, path):
    """One-line warnings on what the fit cannot know; fail on what it cannot use."""
    if len(evaluations) < 2:
        fail(f"{path} holds {len(evaluations)} evaluation(s): a forecast needs a curve (train past a few "
             f"eval_interval steps)")
    for it, _, loss in evaluations:
        if not math.isfinite(loss):
            fail(f"{path}: val_loss at iteration {it} is {loss}: the run diverged there; forecast a run with "
                 "finite losses (resume it from a checkpoint before that)")
    warnings = []
    rates = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(evaluations, evaluations[1:])
             if a[1] is not None and b[1] is not None and b[0] > a[0]]
    for (it, _, _), before, after in zip(evaluations[1:], rates, rates[1:]):
        if abs(after - before) > 0.01 * before:
            warnings.append(f"the tokens per iteration changed near iteration {it:,} ({before:,.0f} -> {after:,.0f}): "
                            "the law counts iterations of one batch size, so the fit mixes two runs")
            break
    if config.get("allow_new_data"):
        warnings.append("the last launch passed allow_new_data=True: if the data changed, the curve before "
                        "it does not describe the run after it")
    for it, lr in logged_lrs:
        expected = learning_rate_at(it - 1, config)  # the record at iteration it logs update it's rate
        if abs(lr - expected) > 1e-6 * max(expected, 1e-12) + 1e-12:
            warnings.append(f"the lr logged at iteration {it} ({lr:.3g}) is not the checkpoint's schedule's "
                            f"({expected:.3g}): the schedule changed on a resume; the fit assumes the checkpoint's")
            break
    return warnings


def fit_points(evaluations, warmup_iters):
    """The evaluations the law is fitted to: those past twice the warmup. Right after the warmup the loss still
    falls by the fast first phase of training, which the law does not describe (on the validation runs of
    docs/forecast.md the fits from there missed by more)."""
    return [(it, loss) for it, _, loss in evaluations if it > 2 * warmup_iters]


# --- the forecast


def forecast(observed_lrs, observed_warmup, points, path_lrs, path_warmup, targets):
    """Forecast (value, low, high) at each of targets (iterations of the path) and the fitted parameters.
    observed_lrs: the rate of each update the run made (the evaluations in points follow it); path_lrs: the
    rate of each update of the forecast plan. Rates in units of the observed run's peak."""
    its = np.array([p[0] for p in points])
    loss = np.array([p[1] for p in points])
    s1, s2 = areas(observed_lrs, observed_warmup)
    params = fit(s1[its], s2[its], loss)
    p1, p2 = areas(path_lrs, path_warmup)
    targets = np.asarray(targets)
    values = law(params, p1[targets], p2[targets])
    residuals = loss - law(params, s1[its], s2[its])
    rng = np.random.default_rng(0)
    fitted = law(params, s1[its], s2[its])
    refits = np.array([law(fit(s1[its], s2[its], fitted + rng.choice(residuals, len(its)), near=params[2]),
                           p1[targets], p2[targets]) for _ in range(BOOTSTRAP)])
    noise = (np.percentile(refits, 95, axis=0) - np.percentile(refits, 5, axis=0)) / 2
    backtest = np.array([backtest_error(its, loss, s1, s2, t) for t in targets])
    half = np.maximum(np.maximum(noise, backtest), drift(its, loss, s1, s2, p1[targets], p2[targets], values))
    return values, values - half, values + half, params, residuals


def backtest_error(its, loss, s1, s2, target):
    """|error| of the law fitted to the evaluations up to T * T/target, forecasting the last one at T: the
    same stretch of extrapolation as T -> target, on the run's own past. 0 for a target within the evaluations."""
    last = its[-1]
    if target <= last:
        return 0.0
    keep = its <= last * last / target
    keep[:MIN_EVALUATIONS] = True  # the fewest the fit needs, even when that extrapolates less far
    if keep.all():
        return 0.0
    params = fit(s1[its[keep]], s2[its[keep]], loss[keep])
    return float(abs(law(params, s1[last], s2[last]) - loss[-1]))


def drift(its, loss, s1, s2, target_s1, target_s2, values, leave_out=3):
    """How far the forecasts move when the fit leaves out the last 1..leave_out evaluations (as far as the
    fit keeps enough): a fit that has not settled yet moves with each new evaluation."""
    moved = np.zeros_like(values)
    for k in range(1, leave_out + 1):
        if len(its) - k < MIN_EVALUATIONS:
            break
        params = fit(s1[its[:-k]], s2[its[:-k]], loss[:-k])
        moved = np.maximum(moved, np.abs(law(params, target_s1, target_s2) - values))
    return moved


def power_law_forecast(points, targets):
    """The plain power law in iterations, fitted to the same evaluations, at targets."""
    its = np.array([p[0] for p in points], dtype=np.float64)
    params = fit(its, None, np.array([p[1] for p in points]))
    return law(params, np.asarray(targets, dtype=np.float64), None)


def report_iterations(start, stop, n=5):
    """A few round iterations from start (exclusive) to stop (inclusive), stop always among them."""
    step = (stop - start) / n
    return sorted({int(round(start + step * k)) for k in range(1, n)} | {stop})


def read_run(argv):
    """The settings, the new plan, and the run as forecast.py needs it: its evaluations, its training config,
    the checkpoint the plan resumes from and its iteration, and one-line warnings. Fails on what it cannot use."""
    defaults = {**SETTINGS, **{k: v for k, v in script_defaults(TRAIN_PY).items() if k in SCHEDULE_KEYS}}
    config = configure(defaults, argv)  # checks every value given; the plan's defaults come from the checkpoint
    out_dir = config["out_dir"]
    try:
        resume_path = checkpoint_path(out_dir, config["resume_from"], key="resume_from")
    except ValueError as e:
        fail(str(e))
    png = config["plot"] or os.path.join(out_dir, "forecast.png")
    if not png.lower().endswith(".png") or not os.path.isdir(os.path.dirname(os.path.abspath(png))):
        fail(f"plot={png!r}: give a path ending in .png in a folder that exists")
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        fail(f"{metrics} not found: give the out_dir of a train.py run (--out_dir=)")
    evaluations, logged_lrs = read_evaluations(metrics)
    run_config, last_iter = load_config(checkpoint_path(out_dir, "last"))
    # nanoGPT's checkpoints have no lr_schedule or cooldown_frac: their schedule is the cosine, train.py's default
    run_config = {**{k: defaults[k] for k in SCHEDULE_KEYS}, **run_config}
    resume_iter = load_config(resume_path)[1] if resume_path != checkpoint_path(out_dir, "last") else last_iter
    plan = configure({**defaults, **{k: run_config[k] for k in SCHEDULE_KEYS}}, argv)
    try:
        learning_rate_at(0, plan)
    except ValueError as e:
        fail(str(e))
    warnings = check_run(evaluations, logged_lrs, run_config, metrics)
    if run_config["learning_rate"] <= 0:
        fail(f"the run's learning_rate is {run_config['learning_rate']}: nothing was learned, nothing to forecast")
    start = 0 if config["from_scratch"] else resume_iter
    if plan["max_iters"] <= start:
        fail(f"max_iters={plan['max_iters']}: the forecast needs a plan past iteration {start} "
             f"({'--from_scratch' if config['from_scratch'] else resume_path})")
    if not config["from_scratch"]:
        try:
            check_resume_lr(run_config, resume_iter, {**plan, "allow_lr_increase": config["allow_lr_increase"]})
        except ValueError as e:
            fail(str(e))
    if len(fit_points(evaluations, run_config["warmup_iters"])) < MIN_EVALUATIONS:
        fail(f"{metrics}: {len(fit_points(evaluations, run_config['warmup_iters']))} evaluation(s) past twice the "
             f"warmup, the fit needs at least {MIN_EVALUATIONS} (lower eval_interval, or train longer first)")
    return config, plan, run_config, evaluations, warnings, resume_path, start, png


def main(argv):
    config, plan, run_config, evaluations, warnings, resume_path, start, png = read_run(argv)
    peak, warmup = run_config["learning_rate"], run_config["warmup_iters"]
    points = fit_points(evaluations, warmup)
    observed_lrs = schedule(run_config, 0, max(evaluations[-1][0], start)) / peak
    if config["from_scratch"]:
        path_lrs, path_warmup = schedule(plan, 0, plan["max_iters"]) / peak, plan["warmup_iters"]
    else:  # the iterations the checkpoint holds keep their rates; the rest follow the new schedule
        path_lrs = np.concatenate([observed_lrs[:start], schedule(plan, start, plan["max_iters"]) / peak])
        path_warmup = warmup
    if observed_lrs[warmup:].min() > ANNEALED and path_lrs[-1] <= ANNEALED:
        warnings.append("no annealing seen yet (the rate never fell below its peak): the decay term is not "
                        "pinned down, so the forecast of the decayed end is a guess within a wide band")
    targets = report_iterations(start, plan["max_iters"])
    values, low, high, params, residuals = forecast(observed_lrs, warmup, points, path_lrs, path_warmup, targets)
    power = power_law_forecast(points, targets)
    draw(png, evaluations, points, params, observed_lrs, warmup, path_lrs, path_warmup, targets, values, low, high,
         peak, start)
    if config["json"]:
        print(json.dumps({"max_iters": plan["max_iters"], "val_loss": round(float(values[-1]), 4),
                          "low": round(float(low[-1]), 4), "high": round(float(high[-1]), 4), "warnings": warnings}))
        return
    how = ("planned so from iteration 0" if config["from_scratch"] else
           f"resumed from {resume_path} at iteration {start:,}")
    print(f"forecast for {config['out_dir']}: {plan['lr_schedule']} to max_iters={plan['max_iters']:,}, {how}")
    l0, a, alpha, c = params
    print(f"fit: {len(points)} evaluations (iterations {points[0][0]:,} to {points[-1][0]:,}), "
          f"L = {l0:.3f} + {a:.3f} * S1^-{alpha:.3f} - {c:.4f} * S2, "
          f"rms residual {np.sqrt(np.mean(residuals ** 2)):.4f}")
    print(f"{'iteration':>10}  {'lr':>9}  {'val loss':>8}  {'interval':>15}  {'power law':>9}")
    # the evaluation the plan starts from (the resumed checkpoint's), or the run's last
    seen_it, _, seen_loss = ([e for e in evaluations if e[0] == start and not config["from_scratch"]]
                             or evaluations)[-1]
    print(f"{seen_it:>10,}  {'':>9}  {seen_loss:>8.4f}  {'(observed)':>15}")
    for t, v, lo, hi, p in zip(targets, values, low, high, power):
        print(f"{t:>10,}  {path_lrs[t - 1] * peak:>9.3g}  {v:>8.4f}  {lo:>7.4f}-{hi:<7.4f}  {p:>9.4f}")
    for warning in warnings:
        print(f"warning: {warning}")
    print(f"wrote {png}")


def draw(png, evaluations, points, params, observed_lrs, observed_warmup, path_lrs, path_warmup, targets, values,
         low, high, peak, start):
    import matplotlib
    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    s1, s2 = areas(observed_lrs, observed_warmup)
    p1, p2 = areas(path_lrs, path_warmup)
    first = points[0][0]
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(9, 6.5), dpi=110, sharex=True, height_ratios=(3, 1))
    ax.plot([e[0] for e in evaluations if e[0] >= first], [e[2] for e in evaluations if e[0] >= first], "o",
            color="black", markersize=3.5, label="observed val loss")
    fitted = np.arange(first, len(observed_lrs) + 1)
    ax.plot(fitted, law(params, s1[fitted], s2[fitted]), color="tab:blue", label="fitted law")
    ahead = np.arange(max(start, first), len(path_lrs) + 1)
    ax.plot(ahead, law(params, p1[ahead], p2[ahead]), color="tab:orange", linestyle="--", label="forecast")
    begin = law(params, p1[ahead[0]], p2[ahead[0]])  # the band opens from the forecast's start
    ax.fill_between([ahead[0], *targets], [begin, *low], [begin, *high], color="tab:orange", alpha=0.2,
                    label="interval")
    ax.plot([targets[-1]], [values[-1]], "*", color="tab:orange", markersize=14, markeredgecolor="black")
    ax.set_ylabel("val loss")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax_lr.plot(np.arange(1, len(observed_lrs) + 1), observed_lrs * peak, color="tab:blue", label="run")
    ax_lr.plot(np.arange(start + 1, len(path_lrs) + 1), path_lrs[start:] * peak, color="tab:orange", linestyle="--",
               label="plan")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("iteration")
    ax_lr.grid(True, alpha=0.3)
    ax_lr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, format="png")
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
