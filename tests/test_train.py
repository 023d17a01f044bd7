"""train.py end to end on CPU: a few iterations of a tiny model, checkpoints, resume, sampling, DDP."""
import pytest
import torch

from kit.checkpoint import load_checkpoint, load_weights, model_from_checkpoint
from conftest import TINY_TOKENS_PER_ITER, TINY_TRAIN_ARGS, run_script
from model import GPT, GPTConfig
from kit.runtime import compile_with_fallback

NANOGPT_KEYS = {"model_args", "model", "optimizer", "iter_num", "best_val_loss", "config"}


def train(data_dir, out_dir, *extra, **kwargs):
    return run_script("train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *TINY_TRAIN_ARGS, *extra, **kwargs)


@pytest.mark.slow
def test_train_checkpoint_resume_and_sample(token_dataset, tmp_path):
    out = tmp_path / "out"
    proc = train(token_dataset, out, "--max_iters=4", "--eval_interval=2", "--lr_decay_iters=8")
    assert f"tokens per iteration: {TINY_TOKENS_PER_ITER}" in proc.stdout and "epochs of train.bin" in proc.stdout
    assert "step 4: train loss" in proc.stdout

    ckpt = torch.load(out / "ckpt.pt", map_location="cpu", weights_only=True)  # safe to load
    assert NANOGPT_KEYS <= set(ckpt) and ckpt["iter_num"] == 4
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert ckpt["model_args"]["n_embd"] == 32 and ckpt["config"]["max_iters"] == 4
    model = model_from_checkpoint(ckpt)
    assert isinstance(model, GPT) and model.config.n_layer == 2

    proc = train(token_dataset, out, "--max_iters=6", "--eval_interval=2", "--lr_decay_iters=8", "--init_from=resume")
    assert "iter 5:" in proc.stdout and "iter 1:" not in proc.stdout  # continues, not restarts
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 6

    proc = run_script("sample.py", f"--out_dir={out}", "--device=cpu", "--num_samples=2", "--max_new_tokens=8",
                      "--start=Once upon a time", "--stop_at_eot=False")
    samples = proc.stdout.split("---------------")
    assert len(samples) == 3 and all(s.strip().startswith("Once upon a time") for s in samples[:2])
    assert "16 tokens" in proc.stderr


@pytest.mark.slow
def test_ddp_two_cpu_ranks_write_one_checkpoint(ddp_run):
    _, out, stdout = ddp_run
    # the 4 grad-accum steps are divided across ranks: 2 ranks x 2 micro-steps x 2 x 16 tokens
    assert "tokens per iteration: 128 (2 rank(s) x 2 micro-steps x 2 x 16)" in stdout
    assert stdout.count("step 2: train loss") == 1  # only rank 0 prints and writes
    written = {p.name for p in out.iterdir()}
    # no temporary files; train.lock is rank 0's out_dir lock
    assert "ckpt.pt" in written and written <= {"ckpt.pt", "best.pt", "stable.pt", "metrics.jsonl", "train.lock"}
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["iter_num"] == 5 and len(ckpt["ranks"]) == 2


def test_compile_failure_falls_back_to_eager(capsys):
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16))

    def failing_step(m):
        raise RuntimeError("no C++ compiler found")

    assert compile_with_fallback(model, failing_step) is model
    assert "torch.compile failed (RuntimeError: no C++ compiler found)" in capsys.readouterr().err


def test_compiled_state_dict_prefixes_are_stripped():
    model = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16))
    wrapped = torch.compile(model).state_dict()  # keys start with '_orig_mod.', as in nanoGPT's checkpoints
    assert all(k.startswith("_orig_mod.") for k in wrapped)
    fresh = GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16))
    load_weights(fresh, wrapped)  # strict: every key found once the prefix is gone
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
