"""benchmarks/ablation.py's arithmetic: tokens to reach a target loss, and the learning-rate grid that
extends past an edge that won. Fake run folders stand in for finished train.py runs."""
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import REPO_ROOT, make_token_dataset
from inprocess import run_inprocess

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


def test_a_switch_is_judged_against_the_measured_seed_spread():
    base = [7.00, 7.10]  # spread 0.10
    assert ablation.token_verdict([6.85], base) == "better by more than the seed spread"
    assert ablation.token_verdict([7.00], base) == "within the seed spread"
    assert ablation.token_verdict([7.30, 7.25], base) == "worse by more than the seed spread"
    assert ablation.token_verdict([6.80, 7.20], base) == "within the seed spread"  # its own spread is 0.40
    assert ablation.token_verdict([6.0], [7.0]) == "no seed spread measured"


@pytest.mark.slow
def test_the_gpu_comparison_runs_at_a_tiny_size_on_cpu(tmp_path):
    """benchmarks/gpu_proof.sh's recipe comparison, --study=gpu, with the tiny model: three real train.py runs."""
    data = make_token_dataset(tmp_path / "data", n_train=6_000, n_val=2_000)
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    tokens[::50] = 50256  # documents of 50 tokens, for data_order='document'
    tokens.tofile(data / "train.bin")
    table = tmp_path / "gpu.md"
    code, stdout, stderr = run_inprocess("benchmarks/ablation.py", "--study=gpu", "--quick", f"--data_dir={data}",
                                         "--device=cpu", "--dtype=float32", f"--out_root={tmp_path / 'runs'}",
                                         f"--table={table}", "--jobs=1")
    assert code == 0 and "FAILED" not in stdout, stdout + stderr
    rows = {line.split(" | ")[0][2:]: line for line in table.read_text().splitlines() if line.startswith("| ")}
    assert list(rows)[1:] == ["adamw", "muon", "muon+all"]  # after the header
    assert "| +0.000 |" in rows["adamw"]
    settings = {arm: json.loads((tmp_path / "runs" / f"{arm}-s0" / "settings.json").read_text())
                for arm in ("adamw", "muon", "muon+all")}
    assert [s["optimizer"] for s in settings.values()] == ["adamw", "muon", "muon"]
    assert len({(s["max_iters"], s["batch_size"], s["block_size"]) for s in settings.values()}) == 1  # same tokens
    assert settings["muon+all"]["data_order"] == "document" and settings["muon+all"]["logit_softcap"] == 15.0
    assert (tmp_path / "gpu.png").stat().st_size > 0
