"""
Loss curves of one or more training runs in one PNG, from each run's out_dir/metrics.jsonl:
train loss (thin line) and val loss (thick, with markers) against tokens seen, one colour per run,
the best val loss of each run marked and labelled. --metric=hellaswag draws HellaSwag accuracy
instead (train.py's hellaswag_interval): acc (thin) and acc_norm (thick), the best acc_norm marked.

$ python plot.py out-fineweb
$ python plot.py out-fineweb out-fineweb-124m --out=compare.png --logx=True --ymax=6
$ python plot.py out-fineweb --metric=hellaswag --out=hellaswag.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # headless: no display needed, e.g. over ssh
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from configurator import configure, fail  # noqa: E402

# -----------------------------------------------------------------------------
out = "loss.png"  # where the PNG goes
logx = False  # log-scale tokens axis (early training gets room)
ymax = 0.0  # upper limit of the loss axis; 0 = automatic (the first losses, ~11, squash the rest)
title = ""
metric = "loss"  # 'loss' or 'hellaswag'
# -----------------------------------------------------------------------------
# per metric: (thin line's key, its label), (thick line's key, its label), y axis label, whether higher is better
METRICS = {"loss": (("loss", "train"), ("val_loss", "val"), "loss (nats/token)", False),
           "hellaswag": (("hellaswag_acc", "acc"), ("hellaswag_acc_norm", "acc_norm"), "HellaSwag accuracy", True)}


def read_metrics(path, metric="loss"):
    """(thin, thick) lists of (tokens, value) from a metrics.jsonl: (train, val) loss, or HellaSwag's
    (acc, acc_norm). A resumed run starts again from its checkpoint's iteration, so when the iteration
    goes back, the earlier records from that iteration on (the part of the first run the checkpoint
    did not keep) are replaced by the new ones, and one line says how many."""
    records, skipped, replaced, resumes = [], 0, 0, []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
                it = int(record["iter"])
            except (ValueError, KeyError, TypeError):  # e.g. a line cut short by a crash
                skipped += 1
                continue
            if records and it < records[-1]["iter"]:
                resumes.append(f"{records[-1]['iter']} -> {it}")
                kept = [r for r in records if r["iter"] < it]
                replaced, records = replaced + len(records) - len(kept), kept
            records.append(record)
    if skipped:
        print(f"warning: {path}: skipped {skipped} unreadable line(s)")
    if resumes:
        print(f"note: {path}: the iteration goes back ({', '.join(resumes)}: a resume from an older checkpoint, "
              f"or a new run); drawn: the later run, in place of the earlier run's {replaced} record(s) from there on")
    (thin_key, _), (thick_key, _), _, _ = METRICS[metric]
    train = [(r["tokens"], r[thin_key]) for r in records if r.get(thin_key) is not None]
    val = [(r["tokens"], r[thick_key]) for r in records if r.get(thick_key) is not None]
    if not train and metric == "loss":
        # no log records (log_interval beyond the run): the evaluations' train loss still tells something
        train = [(r["tokens"], r["train_loss"]) for r in records if r.get("train_loss") is not None]
    return train, val


def metrics_path(run):
    """A run is given as its out_dir or as the metrics.jsonl itself."""
    return run if run.endswith(".jsonl") else os.path.join(run, "metrics.jsonl")


def human_tokens(x, _pos=None):
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:g}"


def plot_runs(runs, out, logx=False, ymax=0.0, title="", metric="loss"):
    """Draw every run into one figure and save it as a PNG at out. runs: {label: (thin, thick)}."""
    (_, thin_label), (_, thick_label), ylabel, higher_is_better = METRICS[metric]
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, (train, val)) in enumerate(runs.items()):
        colour = colours[i % len(colours)]
        if logx:  # tokens = 0 (the evaluation before training) has no place on a log axis
            train, val = [p for p in train if p[0] > 0], [p for p in val if p[0] > 0]
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=0.8, alpha=0.6, label=f"{label} {thin_label}")
        if val:
            best_tokens, best = (max if higher_is_better else min)(val, key=lambda p: p[1])
            ax.plot(*zip(*val), color=colour, linewidth=2.2, marker="o", markersize=4,
                    label=f"{label} {thick_label} (best {best:.4f} at {human_tokens(best_tokens)} tokens: \u2605)")
            ax.plot([best_tokens], [best], marker="*", markersize=16, color=colour, markeredgecolor="black",
                    linestyle="none")
    if logx:
        ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(human_tokens))
    if ymax:
        ax.set_ylim(top=ymax)
    ax.set_xlabel("tokens seen")
    ax.set_ylabel(ylabel)
    ax.set_title(title or f"{metric}: " + ", ".join(runs))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, format="png")
    plt.close(fig)


def main(argv):
    paths = [a for a in argv if not a.startswith("--")]
    config = configure({"out": out, "logx": logx, "ymax": ymax, "title": title, "metric": metric},
                       [a for a in argv if a.startswith("--")])
    if config["metric"] not in METRICS:
        fail(f"metric={config['metric']!r}: allowed are {', '.join(METRICS)}")
    if not paths:
        fail("no runs given: python plot.py OUT_DIR [OUT_DIR ...] [--out=loss.png] [--logx=True] [--ymax=6]")
    runs = {}
    for run in paths:
        path = metrics_path(run)
        if not os.path.isfile(path):
            fail(f"{path} not found: give train.py out_dirs (or their metrics.jsonl files)")
        train, val = read_metrics(path, config["metric"])
        if not train and not val:
            fail(f"{path} holds no {config['metric']} records yet"
                 + (" (train with --hellaswag_interval=N)" if config["metric"] == "hellaswag" else ""))
        runs[run.rstrip("/")] = (train, val)
    if not config["out"].lower().endswith(".png"):
        fail(f"out={config['out']!r}: the plot is a PNG, give a path ending in .png")
    if not os.path.isdir(os.path.dirname(os.path.abspath(config["out"]))):
        fail(f"out={config['out']!r}: its folder does not exist")
    plot_runs(runs, config["out"], config["logx"], config["ymax"], config["title"], config["metric"])
    print(f"wrote {config['out']}")


if __name__ == "__main__":
    main(sys.argv[1:])
