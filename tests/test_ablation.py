"""benchmarks/ablation.py's arithmetic: tokens to reach a target loss, and the learning-rate grid that
extends past an edge that won. Fake run folders stand in for finished train.py runs."""
import json
import sys
from types import SimpleNamespace

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import ablation  # noqa: E402


def test_tokens_to_reach_interpolates_between_evaluations():
    evals = [{"tokens": 0, "val_loss": 10.0}, {"tokens": 100, "val_loss": 8.0}, {"tokens": 200, "val_loss": 7.0}]
    assert ablation.tokens_to_reach(evals, 7.5) == 150  # halfway from 8.0 to 7.0
    assert ablation.tokens_to_reach(evals, 9.5) == 25
    assert ablation.tokens_to_reach(evals, 6.9) is None


def fake_grid_run(out_root, arm, value, val_loss, args):
    name, settings = ablation.grid_job(arm, value, args)
    run = out_root / name
    run.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({**settings, "out_dir": str(run)}))
    iters = settings["max_iters"]
    (run / "metrics.jsonl").write_text(json.dumps({"iter": iters, "tokens": iters * 1024, "val_loss": val_loss}) + "\n")


def test_a_best_lr_at_the_grid_edge_earns_one_more_value(tmp_path):
    args = SimpleNamespace(out_root=str(tmp_path), scale="cpu", data_dir="data", device="cpu", dtype="float32",
                           compile="False")
    for value, loss in zip(ablation.ADAMW_GRID, (9.0, 8.0, 7.5)):  # best at the top edge
        fake_grid_run(tmp_path, "baseline", value, loss, args)
    for value, loss in zip(ablation.ADAMW_GRID, (8.0, 7.0, 7.5)):  # best inside
        fake_grid_run(tmp_path, "modern", value, loss, args)
    jobs = ablation.edge_jobs(["baseline", "modern"], args)
    top = ablation.ADAMW_GRID[-1] * ablation.GRID_STEP
    assert [name for name, _ in jobs] == [f"grid-baseline-lr{top:g}"] and jobs[0][1]["learning_rate"] == top
    assert ablation.tuned_lrs("baseline", args) == (ablation.ADAMW_GRID[-1], None)
    fake_grid_run(tmp_path, "baseline", top, 7.4, args)
    assert ablation.tuned_lrs("baseline", args) == (top, None)
    # the Muon arm's grid runs its AdamW part at the matching AdamW arm's tuned lr
    name, settings = ablation.grid_job("baseline+muon", ablation.MUON_GRID[0], args)
    assert (settings["optimizer"], settings["learning_rate"], settings["muon_lr"]) == ("muon", top, ablation.MUON_GRID[0])
