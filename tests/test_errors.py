"""Fail before work, clearly: each mistake below ends train.py / sample.py at start with one line on
stderr naming the bad value, exit status 2, and no checkpoint written."""
import json
import shutil

import numpy as np
import pytest
import torch

from kit import runtime
from conftest import make_token_dataset, run_script, train_args
from inprocess import run_inprocess
from kit.tokenizer import encode_prompt, get_encoding


def expect_error(script, *args):
    """The single error line of a run that must fail at start."""
    code, stdout, stderr = run_inprocess(script, *args)
    lines = stderr.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, stdout, stderr)
    return lines[0]


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
    """out_dir of a 2-iteration run: ckpt.pt at iteration 2."""
    out = tmp_path_factory.mktemp("run") / "out"
    code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, out, "--max_iters=2", "--eval_interval=2"))
    assert code == 0, stdout + stderr
    return out


def resume_in_copy(finished_run, data_dir, tmp_path, *extra):
    out = shutil.copytree(finished_run, tmp_path / "out")
    return expect_error("train.py", *train_args(data_dir, out, "--max_iters=4", "--init_from=resume", *extra))


# ---------------------------------------------------------------------------------------------
# train.py: configuration


@pytest.mark.parametrize("split", ["train", "val"])
def test_block_size_larger_than_the_data(tmp_path, split):
    data = make_token_dataset(tmp_path / "data", **{f"n_{split}": 16})
    line = expect_error("train.py", *train_args(data, tmp_path / "out", "--block_size=16"))
    assert f"{split}.bin has 16 tokens, fewer than block_size + 1 = 17" in line
    assert not (tmp_path / "out" / "ckpt.pt").exists()


def test_n_embd_not_divisible_by_n_head(data_dir, tmp_path):
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "out", "--n_embd=30", "--n_head=4"))
    assert line == "error: n_embd=30 must be divisible by n_head=4"


@pytest.mark.slow
def test_n_embd_not_divisible_by_n_head_in_a_real_process(data_dir, tmp_path):
    """The same as above through the interpreter: the exit status and stderr a user sees."""
    proc = run_script("train.py", *train_args(data_dir, tmp_path / "out", "--n_embd=30", "--n_head=4"), check=False)
    assert proc.returncode == 2 and proc.stderr == "error: n_embd=30 must be divisible by n_head=4\n"


def test_grad_accum_not_divisible_by_world_size(data_dir, tmp_path, monkeypatch):
    """As torchrun starts rank 0 of 2; the check comes before the process group would wait for rank 1."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "out", "--gradient_accumulation_steps=3"))
    assert line == "error: gradient_accumulation_steps=3 is not divisible by the 2 DDP ranks; use a multiple of 2"


def test_bf16_on_a_gpu_without_it_suggests_fp16(data_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    assert runtime.pick_dtype("auto", "cuda") == "float16"
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "out", "--device=cuda", "--dtype=bfloat16"))
    assert line == ("error: dtype='bfloat16' is not supported by Tesla T4; use --dtype=float16 "
                    "(mixed precision with a GradScaler)")


def test_out_dir_not_writable(data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "file" / "out"))
    assert line.startswith(f"error: out_dir='{tmp_path / 'file' / 'out'}' is not writable")


def test_bad_schedule_and_data_order_values(data_dir, tmp_path):
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "o1", "--lr_schedule=wsd", "--cooldown_frac=1.5"))
    assert "cooldown_frac=1.5: must be between 0 and 1" in line
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "o2", "--data_order=sequential"))
    assert "data_order='sequential': allowed are 'random', 'shuffle', 'document'" in line


# ---------------------------------------------------------------------------------------------
# train.py: the data disagreeing with meta.json or the model


def rewrite_meta(data, **changes):
    meta = json.loads((data / "meta.json").read_text())
    meta.update(changes)
    (data / "meta.json").write_text(json.dumps(meta))


def test_meta_json_dtype_other_than_uint16(tmp_path):
    data = make_token_dataset(tmp_path / "data")
    rewrite_meta(data, dtype="uint32")
    line = expect_error("train.py", *train_args(data, tmp_path / "out"))
    assert "meta.json: dtype is 'uint32' but kit/tokenizer.py says 'uint16'" in line


def test_meta_json_vocab_larger_than_the_model(tmp_path):
    data = make_token_dataset(tmp_path / "data")
    rewrite_meta(data, vocab_size=100277)
    line = expect_error("train.py", *train_args(data, tmp_path / "out"))
    assert "meta.json: vocab_size is 100277 but kit/tokenizer.py says 50257" in line


def test_token_ids_beyond_the_vocab(tmp_path):
    data = make_token_dataset(tmp_path / "data")
    tokens = np.fromfile(data / "train.bin", dtype=np.uint16)
    tokens[100] = 60000  # e.g. a bigger tokenizer's ids, or bytes that are not uint16 tokens
    tokens.tofile(data / "train.bin")
    line = expect_error("train.py", *train_args(data, tmp_path / "out"))
    assert "train.bin holds token id 60000, not below vocab_size 50257" in line


def test_bin_size_disagreeing_with_meta_json(tmp_path):
    data = make_token_dataset(tmp_path / "data")
    with open(data / "val.bin", "ab") as f:
        f.write(b"\0\0")
    line = expect_error("train.py", *train_args(data, tmp_path / "out"))
    assert "val.bin holds 8002 bytes but meta.json says 4000 tokens (8000 bytes)" in line


# ---------------------------------------------------------------------------------------------
# train.py: resume


def test_resume_without_a_checkpoint(data_dir, tmp_path):
    line = expect_error("train.py", *train_args(data_dir, tmp_path / "out", "--init_from=resume"))
    assert line == f"error: cannot resume: no checkpoint at {tmp_path / 'out' / 'ckpt.pt'}"


def test_resume_from_a_truncated_checkpoint(finished_run, data_dir, tmp_path):
    out = shutil.copytree(finished_run, tmp_path / "out")
    data = (out / "ckpt.pt").read_bytes()
    (out / "ckpt.pt").write_bytes(data[: len(data) // 2])
    line = expect_error("train.py", *train_args(data_dir, out, "--max_iters=4", "--init_from=resume"))
    assert line.startswith(f"error: cannot resume: {out / 'ckpt.pt'} is not a readable checkpoint (truncated or corrupt?)")


def test_resume_with_a_changed_model_shape_lists_the_fields(finished_run, data_dir, tmp_path):
    line = resume_in_copy(finished_run, data_dir, tmp_path, "--n_layer=3", "--n_embd=48", "--dropout=0.1")
    assert line.endswith("the model shape changed: n_layer (checkpoint 2, config 3); n_embd (checkpoint 32, config 48)")


def test_resume_with_a_changed_data_order(finished_run, data_dir, tmp_path):
    line = resume_in_copy(finished_run, data_dir, tmp_path, "--data_order=shuffle")
    assert "data loader state has order='random' but this run has 'shuffle'" in line


def test_resume_with_nothing_left_to_train(finished_run, data_dir, tmp_path):
    line = resume_in_copy(finished_run, data_dir, tmp_path, "--max_iters=2")
    assert "is at iteration 2 and max_iters=2: nothing to train; pass a larger --max_iters" in line


# ---------------------------------------------------------------------------------------------
# sample.py


def test_sample_without_a_checkpoint(tmp_path):
    line = expect_error("sample.py", f"--out_dir={tmp_path}", "--device=cpu")
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'ckpt.pt'}; --out_dir names a training run's folder")
    line = expect_error("sample.py", f"--out_dir={tmp_path}", "--device=cpu", "--ckpt=best")
    assert line.startswith(f"error: no checkpoint at {tmp_path / 'best.pt'};")


def test_sample_with_a_missing_prompt_file(finished_run, tmp_path):
    line = expect_error("sample.py", f"--out_dir={finished_run}", "--device=cpu", f"--start=FILE:{tmp_path / 'no.txt'}")
    assert line == f"error: prompt file '{tmp_path / 'no.txt'}' not found"


def test_sample_max_new_tokens_below_one(finished_run):
    line = expect_error("sample.py", f"--out_dir={finished_run}", "--device=cpu", "--max_new_tokens=0")
    assert line == "error: max_new_tokens=0: must be at least 1"


def test_sample_prompt_longer_than_block_size_is_cropped_with_a_warning(finished_run):
    """Not an error: generation slides a block_size window, so any prompt or length works."""
    prompt = "one two three " * 10
    n_tokens = len(encode_prompt(get_encoding(), prompt))
    code, stdout, stderr = run_inprocess("sample.py", f"--out_dir={finished_run}", "--device=cpu", "--num_samples=1",
                                         "--max_new_tokens=20", f"--start={prompt}")
    assert code == 0, stderr
    assert f"warning: the prompt is {n_tokens} tokens but the model sees at most block_size=16" in stderr
