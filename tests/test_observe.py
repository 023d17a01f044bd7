"""Seeing a run: metrics.jsonl, wandb offline, the end-of-run summary, plot.py, the FLOPs formula,
the peak FLOPs lookup and MFU, and bench.py (timing on CPU, the micro-batch fit search with fake memory)."""
import json
import math

import numpy as np
import pytest
import torch

import bench
import plot
from conftest import REPO_ROOT, TINY_TOKENS_PER_ITER, TINY_TRAIN_ARGS, run_script
from model import GPT, GPTConfig
from kit.runtime import device_peak_flops, estimate_mfu



def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


# ---------------------------------------------------------------------------------------------
# train.py: metrics file, summary, MFU wiring


@pytest.mark.slow
def test_metrics_file_has_every_log_step_and_eval_and_resume_appends(token_dataset, tmp_path):
    out = tmp_path / "out"
    args = ["train.py", *TINY_TRAIN_ARGS, f"--data_dir={token_dataset}", f"--out_dir={out}", "--eval_interval=2"]
    first = run_script(*args, "--max_iters=3")
    records = read_jsonl(out / "metrics.jsonl")
    logs = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in logs] == [1, 2, 3]
    assert [r["iter"] for r in evals] == [0, 2, 3]  # every eval_interval, and at the end
    for r in logs:
        assert set(r) == {"iter", "tokens", "epoch", "loss", "lr", "grad_norm", "ms_per_iter", "tokens_per_sec",
                          "mfu", "peak_mem_gib", "elapsed_s", "eta_s"}
        assert r["tokens"] == r["iter"] * TINY_TOKENS_PER_ITER
        assert r["epoch"] == pytest.approx(r["tokens"] / 20_000)  # token_dataset's train.bin holds 20,000 tokens
        assert math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["lr"] > 0
        # ms/iter and tokens/s are two views of the same timing (log_interval=1)
        assert r["tokens_per_sec"] == pytest.approx(TINY_TOKENS_PER_ITER / (r["ms_per_iter"] / 1000), rel=1e-6)
        assert r["mfu"] is None  # a CPU has no known peak: no made-up percentage
        assert r["peak_mem_gib"] is None
    assert logs[0]["eta_s"] is None and logs[1]["eta_s"] > 0  # the first iteration (warm-up) is not timed
    assert [r["tokens"] for r in evals] == [0, 2 * TINY_TOKENS_PER_ITER, 3 * TINY_TOKENS_PER_ITER]
    # the untrained model at iteration 0 is never the best (it is not saved)
    assert evals[-1]["best_val_loss"] == min(r["val_loss"] for r in evals if r["iter"] > 0)
    assert "MFU" not in first.stdout and "no peak FLOP/s known" in first.stdout

    # the summary: tokens, wall time, tokens/s, best and final val loss, the checkpoints
    summary = first.stdout[first.stdout.index("done:"):]
    assert f"3 iterations, {3 * TINY_TOKENS_PER_ITER:,} tokens in" in summary
    assert "tok/s overall" in summary
    assert f"best val loss {evals[-1]['best_val_loss']:.4f}" in summary
    assert f"final val loss {evals[-1]['val_loss']:.4f}" in summary
    assert str(out / "ckpt.pt") in summary

    # resuming appends; a given peak makes MFU = FLOPs/token x tokens/s / peak
    run_script(*args, "--max_iters=5", "--init_from=resume", "--peak_flops=1e9")
    resumed = read_jsonl(out / "metrics.jsonl")
    assert resumed[:len(records)] == records
    new = resumed[len(records):]
    assert [(r["iter"], "val_loss" in r) for r in new] == [(4, False), (4, True), (5, False), (5, True)]
    flops = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False)).flops_per_token()
    for r in (new[0], new[2]):
        assert r["mfu"] == pytest.approx(flops * r["tokens_per_sec"] / 1e9, rel=1e-9)


@pytest.mark.slow
def test_wandb_offline_run_gets_the_metrics(token_dataset, tmp_path):
    wandb_dir = tmp_path / "wandb_home"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": str(wandb_dir),
           "WANDB_CACHE_DIR": str(wandb_dir), "WANDB_CONFIG_DIR": str(wandb_dir)}
    run_script("train.py", *TINY_TRAIN_ARGS, f"--data_dir={token_dataset}", f"--out_dir={tmp_path / 'out'}",
               "--max_iters=2", "--eval_interval=2", "--wandb_log=True", "--wandb_project=obs-test",
               "--wandb_run_name=tiny-run-xyz", env=env, timeout=180)
    runs = list((wandb_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    data = runs[0].read_bytes()  # protobuf records: the keys and names appear as plain bytes
    for text in (b"obs-test", b"tiny-run-xyz", b"val_loss", b"tokens_per_sec", b"grad_norm"):
        assert text in data, text


# ---------------------------------------------------------------------------------------------
# plot.py


def write_metrics(path, loss_at, last_iter, first_iter=0, tokens_per_iter=1000, eval_every=5):
    """Append records the way train.py writes them: a log line after each iteration, an evaluation
    every eval_every iterations; a resumed run (first_iter > 0) does not redo first_iter's evaluation."""
    with open(path, "a") as f:
        for i in range(first_iter, last_iter + 1):
            if i > first_iter:
                f.write(json.dumps({"iter": i, "tokens": i * tokens_per_iter, "loss": loss_at(i)}) + "\n")
            if i % eval_every == 0 and (i > first_iter or first_iter == 0):
                f.write(json.dumps({"iter": i, "tokens": i * tokens_per_iter, "train_loss": loss_at(i),
                                    "val_loss": loss_at(i) + 0.1}) + "\n")


def test_read_metrics_replaces_what_a_resume_redoes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, lambda i: 10 - 0.1 * i, last_iter=12)  # stopped at 12, last checkpoint at 10
    write_metrics(path, lambda i: 5.0, last_iter=19, first_iter=10)  # resumed: 11 and 12 again
    with open(path, "a") as f:
        f.write('{"iter": 20, "tok')  # a line cut short by a crash
    train, val = plot.read_metrics(path)
    assert [t for t, _ in train] == [i * 1000 for i in range(1, 20)]
    assert [loss for _, loss in train][10:] == [5.0] * 9  # 11..19 from the resumed run only
    assert [t for t, _ in val] == [0, 5000, 10000, 15000]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def colour_pixels(image, hex_colour):
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]) / 255
    return int((np.abs(image[..., :3] - rgb).max(axis=-1) < 0.02).sum())


def test_plot_writes_a_png_with_one_colour_per_run(tmp_path, capsys):
    import matplotlib.image
    for name, scale in (("run-a", 1.0), ("run-b", 0.8)):
        (tmp_path / name).mkdir()
        write_metrics(tmp_path / name / "metrics.jsonl", lambda i: 3 + 8 * scale * math.exp(-i / 10), last_iter=60)
    png = tmp_path / "cmp.png"
    plot.main([str(tmp_path / "run-a"), str(tmp_path / "run-b" / "metrics.jsonl"), f"--out={png}", "--logx=True"])
    assert f"wrote {png}" in capsys.readouterr().out
    data = png.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (1080, 660)
    image = matplotlib.image.imread(png)
    blue, orange, green = (colour_pixels(image, c) for c in ("#1f77b4", "#ff7f0e", "#2ca02c"))
    assert blue > 500 and orange > 500 and green == 0  # two runs, two colours, no third


def test_plot_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "nope")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope/metrics.jsonl not found" in err
    (tmp_path / "run").mkdir()
    write_metrics(tmp_path / "run" / "metrics.jsonl", lambda i: 5.0, last_iter=6)
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path / "run"), "--out=loss.jpg"])
    assert "give a path ending in .png" in capsys.readouterr().err
    assert not (tmp_path / "loss.jpg").exists()


# ---------------------------------------------------------------------------------------------
# FLOPs, peak FLOPs, MFU


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_matches_a_hand_count(tie):
    L, C, T, V = 3, 16, 8, 64
    config = GPTConfig(n_layer=L, n_head=2, n_embd=C, block_size=T, vocab_size=V, bias=True, tie_embeddings=tie)
    per_layer = 3 * C * C + C * C + 4 * C * C + 4 * C * C  # c_attn, attn c_proj, c_fc, mlp c_proj (biases: no)
    matmul_weights = L * per_layer + V * C  # plus lm_head; the embedding lookups cost no matmul
    attention = 12 * L * C * T  # QK^T and AV: 2 x 2 x T x C per layer forward, x3 with backward
    assert GPT(config).flops_per_token() == 6 * matmul_weights + attention


def test_device_peak_flops_picks_the_dtype_column_or_says_unknown(monkeypatch):
    assert device_peak_flops("cpu", "float32")[0] is None
    assert device_peak_flops("cpu", "float32", 2e12)[0] == 2e12  # a given peak_flops wins everywhere
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 4070")
    assert device_peak_flops("cuda", "bfloat16")[0] == pytest.approx(58.3e12)
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32  # a property: monkeypatch cannot undo it
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py sets it: fp32 matmuls run as tf32
        peak, description = device_peak_flops("cuda", "float32")
        assert peak == pytest.approx(29.1e12) and "tf32" in description
        torch.backends.cuda.matmul.allow_tf32 = False
        assert device_peak_flops("cuda", "float32")[0] == pytest.approx(29.1e12)  # GeForce: fp32 = tf32 rate
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    peak, description = device_peak_flops("cuda", "bfloat16")
    assert peak is None and "Some Future GPU" in description and "tokens/s only" in description


def test_estimate_mfu():
    assert estimate_mfu(6e8, 1e5, 1e14) == pytest.approx(0.6)
    assert estimate_mfu(6e8, 1e5, None) is None


# ---------------------------------------------------------------------------------------------
# bench.py


def fake_memory(base, per_sequence, oom_above):
    """Peak bytes of a micro-batch in a pretend GPU; None (out of memory) above oom_above."""
    calls = []

    def measure(b):
        calls.append(b)
        return None if b > oom_above else base + per_sequence * b
    return measure, calls


def test_fit_search_finds_the_largest_batch_under_the_budget():
    measure, calls = fake_memory(1e9, 0.7e9, oom_above=1000)
    fitted, trials = bench.largest_fitting_batch(measure, 12e9, max_batch=512)
    assert fitted == 15  # 1 GB + 15 x 0.7 GB = 11.5 GB <= 12 GB < 12.2 GB
    assert calls[:5] == [1, 2, 4, 8, 16]  # doubling until it no longer fits, then bisection
    assert len(calls) <= 10 and [b for b, _ in trials] == calls
    # an out-of-memory error counts as not fitting, whatever the budget
    measure, _ = fake_memory(1e9, 0.1e9, oom_above=9)
    assert bench.largest_fitting_batch(measure, 100e9, max_batch=512)[0] == 9
    # never beyond the sequences of one iteration, and 0 when nothing fits
    measure, _ = fake_memory(0, 1, oom_above=10**9)
    assert bench.largest_fitting_batch(measure, 1e12, max_batch=24)[0] == 24
    measure, _ = fake_memory(13e9, 1e9, oom_above=10**9)
    assert bench.largest_fitting_batch(measure, 12e9, max_batch=512) == (0, [(1, 14e9)])


def test_fit_report_keeps_tokens_per_iter():
    exact = bench.fit_report(16, 1024, 524_288)
    assert exact[-1] == "use: --batch_size=16 --gradient_accumulation_steps=32"
    inexact = bench.fit_report(15, 1024, 524_288)
    assert "34.1333 accumulation steps" in inexact[0]
    assert "not a whole number" in inexact[1]
    assert inexact[-1] == "use: --batch_size=8 --gradient_accumulation_steps=64"
    assert bench.accumulation_plan(480, 23) == (20, 24)
    assert "not even batch_size=1 fits" in bench.fit_report(0, 1024, 524_288)[0]


def test_parse_memory():
    assert bench.parse_memory("12GB") == 12e9
    assert bench.parse_memory("11.5GiB") == 11.5 * 2**30
    assert bench.parse_memory("12000 MB") == 12e9
    with pytest.raises(ValueError, match="fit_memory='12 apples'"):
        bench.parse_memory("12 apples")


def test_bench_reads_train_configs():
    defaults = bench.train_defaults()
    assert defaults["n_layer"] == 12 and defaults["batch_size"] == 12 and "config" not in defaults
    assert "stop_requested" not in defaults and "ddp" not in defaults  # computed, not configuration
    config = bench.configure({**defaults, **bench.BENCH_DEFAULTS},
                             [str(REPO_ROOT / "config" / "train_fineweb.py"), "--batch_size=2", "--bench_iters=1"])
    assert (config["n_embd"], config["batch_size"], config["bench_iters"]) == (384, 2, 1)


BENCH_TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--compile=False",
              "--device=cpu", "--dtype=float32", "--bench_iters=2", "--bench_warmup=1"]


def test_bench_prints_throughput_and_writes_a_profile(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    bench.main([*BENCH_TINY, "--profile=True", f"--profile_file={trace}"])
    out = capsys.readouterr().out
    assert "ms/iter" in out and "tokens/s" in out and "MFU" not in out
    assert "peak RSS" in out and "CPU stand-in" in out
    assert "traceEvents" in json.loads(trace.read_text())
    bench.main([*BENCH_TINY, "--peak_flops=1e9"])
    assert "MFU" in capsys.readouterr().out


def test_bench_fit_memory_needs_cuda(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([*BENCH_TINY, "--fit_memory=12GB"])
    assert e.value.code == 2 and "needs CUDA" in capsys.readouterr().err
