"""Runs that meet an unusual case end truthfully: an eval_only run leaves the run's history alone, plot.py says
what it drew, changed optimizer settings on resume are applied, another dataset on resume is refused unless
asked, Ctrl-C while compiling, out of memory and a closed stdout end in one line, and boundary values of
every setting work or end in one line."""
import hashlib
import json
import shutil

import pytest

import plot
from conftest import train_args
from inprocess import run_inprocess


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def one_error_line(code, stderr, status=2):
    assert code == status, stderr
    assert stderr.count("\n") == 1 and stderr.startswith("error: "), stderr
    return stderr.strip()


# ---------------------------------------------------------------------------------------------
# eval_only is a look, not part of the run's history; plot.py says what it drew


def test_eval_only_leaves_the_runs_metrics_alone(cosine_run, data_dir, tmp_path):
    out = shutil.copytree(cosine_run, tmp_path / "out")
    before = sha(out / "metrics.jsonl")
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=4", "--lr_decay_iters=4",
                                                                 "--init_from=resume", "--eval_only=True"))
    assert code == 0, stderr
    assert "step 4: train loss" in stdout  # the result is printed
    assert sha(out / "metrics.jsonl") == before
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / "fresh", "--eval_only=True"))
    assert code == 0 and "step 0: train loss" in stdout, stderr
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()


def test_plot_says_when_a_resume_replaces_records(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    records = [{"iter": i, "tokens": 100 * i, "loss": 5.0} for i in range(1, 13)]  # stopped at 12
    records += [{"iter": i, "tokens": 100 * i, "loss": 4.0} for i in range(9, 15)]  # resumed from 8
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    train, _ = plot.read_metrics(path)
    assert train == [(100 * i, 5.0) for i in range(1, 9)] + [(100 * i, 4.0) for i in range(9, 15)]
    assert capsys.readouterr().out == (
        f"note: {path}: the iteration goes back (12 -> 9: a resume from an older checkpoint, or a new run); "
        "drawn: the later run, in place of the earlier run's 4 record(s) from there on\n")
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:12]))
    plot.read_metrics(path)
    assert capsys.readouterr().out == ""  # nothing replaced, nothing said
