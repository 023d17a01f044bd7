"""Export to and import from Hugging Face GPT-2: same logits both ways, clear errors."""
import json

import pytest
import torch

from kit.checkpoint import save_checkpoint
from conftest import TINY_TRAIN_ARGS, all_logits, random_model, run_script
from kit.hf import load_gpt2
from inprocess import run_inprocess
from model import PADDED_VOCAB_SIZE, GPT, GPTConfig
from kit.tokenizer import VOCAB_SIZE

transformers = pytest.importorskip("transformers")


def run_export(*args):
    """(exit code, stdout, stderr) of export.py run in-process."""
    return run_inprocess("export.py", *args)


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=PADDED_VOCAB_SIZE)


@pytest.mark.parametrize("switches", [dict(bias=True), dict(bias=False, mlp="relu2", tie_embeddings=False)],
                         ids=["gpt2", "nobias-relu2-untied"])
def test_export_loads_in_transformers_with_the_same_logits(tmp_path, switches):
    args = dict(TINY, **switches)
    model = random_model(**args)
    save_checkpoint({"model_args": args, "model": model.state_dict(), "iter_num": 5}, tmp_path / "ckpt.pt")
    code, out, err = run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")
    assert code == 0, err
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values())  # no missing, unexpected or mismatched weights
    assert hf.config.vocab_size == VOCAB_SIZE and hf.config.n_positions == 32
    x = torch.randint(0, VOCAB_SIZE, (2, 32))
    with torch.no_grad():
        ours = all_logits(model, x)
        theirs = hf.eval()(x).logits
    assert (ours[..., :VOCAB_SIZE] - theirs).abs().max().item() <= 1e-4
    assert ours.abs().max() > 1  # the comparison is not between near-zero numbers


def test_exported_tokenizer_is_gpt2(tmp_path):
    import tiktoken
    save_checkpoint({"model_args": TINY, "model": random_model(**TINY).state_dict(), "iter_num": 1},
                    tmp_path / "ckpt.pt")
    assert run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")[0] == 0
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Hello world! Naïve café — 1234\n\n  <|endoftext|>The end"
    assert tok.encode(text) == tiktoken.get_encoding("gpt2").encode(text, allowed_special="all")
    assert tok.eos_token_id == 50256 and tok.model_max_length == 32


def test_export_refuses_what_gpt2_cannot_express(tmp_path):
    args = dict(TINY, rotary=True, qk_norm=True, norm="rmsnorm", logit_softcap=15.0)
    save_checkpoint({"model_args": args, "model": random_model(**args).state_dict(), "iter_num": 1},
                    tmp_path / "ckpt.pt")
    code, _, err = run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "rotary=True" in err and "qk_norm=True" in err and "norm='rmsnorm'" in err and "logit_softcap=15.0" in err
    assert not (tmp_path / "hf").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_export_bad_inputs_and_existing_folder(tmp_path):
    code, _, err = run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")
    assert code == 2 and "no checkpoint at" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "ckpt.pt").write_bytes(b"\x00" * 100)
    code, _, err = run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")
    assert code == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1

    save_checkpoint({"model_args": TINY, "model": random_model(**TINY).state_dict(), "iter_num": 1},
                    tmp_path / "ckpt.pt")
    assert run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")[0] == 0
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    code, _, err = run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")
    assert code == 2 and "--force=True" in err and len(err.strip().splitlines()) == 1
    save_checkpoint({"model_args": TINY, "model": random_model(seed=1, **TINY).state_dict(), "iter_num": 2},
                    tmp_path / "ckpt.pt")
    assert run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}", "--force=True")[0] == 0
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() != before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    code, _, err = run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'mine'}", "--force=True")
    assert code == 2 and "notes.txt" in err and (tmp_path / "mine" / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf", "mine"]  # no temporary left


def save_random_hf_model(folder, vocab_size=128, n_positions=64, tie=True, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2,
                                     n_head=4, tie_word_embeddings=tie)
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(folder)
    return hf.eval()


@pytest.mark.parametrize("tie", [True, False])
def test_import_local_folder_gives_the_same_logits(tmp_path, tie):
    hf = save_random_hf_model(tmp_path / "gpt2-tiny", tie=tie)
    model_args, state = load_gpt2(str(tmp_path / "gpt2-tiny"))
    assert model_args["n_layer"] == 2 and model_args["block_size"] == 64 and model_args["tie_embeddings"] == tie
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(state)
    x = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        ours = all_logits(model.eval(), x)
        theirs = hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4

    model_args, state = load_gpt2(str(tmp_path / "gpt2-tiny"), block_size=16)  # a shorter context
    model = GPT(GPTConfig(**model_args))
    model.load_state_dict(state)
    x = x[:, :16].contiguous()
    with torch.no_grad():
        assert (all_logits(model.eval(), x) - hf(x).logits).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="exceeds the 64 positions"):
        load_gpt2(str(tmp_path / "gpt2-tiny"), block_size=128)


def test_import_errors_are_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="without network, pass --init_from=<folder>") as e:
        load_gpt2("gpt2-medium")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="allowed are scratch, resume, gpt2"):
        load_gpt2(str(tmp_path / "no-such-folder"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_gpt2(str(tmp_path / "empty"))
    save_random_hf_model(tmp_path / "odd")
    config = json.loads((tmp_path / "odd" / "config.json").read_text())
    config.update(activation_function="gelu", layer_norm_epsilon=1e-6)
    (tmp_path / "odd" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="activation_function='gelu'.*layer_norm_epsilon=1e-06"):
        load_gpt2(str(tmp_path / "odd"))


def test_export_then_import_round_trip(tmp_path):
    args = dict(TINY, bias=False)
    model = random_model(**args)
    save_checkpoint({"model_args": args, "model": model.state_dict(), "iter_num": 1}, tmp_path / "ckpt.pt")
    assert run_export(f"--out_dir={tmp_path}", f"--to={tmp_path / 'hf'}")[0] == 0
    model_args, state = load_gpt2(str(tmp_path / "hf"))
    assert model_args["vocab_size"] == VOCAB_SIZE and model_args["bias"]
    back = GPT(GPTConfig(**model_args))
    back.load_state_dict(state)
    x = torch.randint(0, VOCAB_SIZE, (1, 32))
    with torch.no_grad():
        assert torch.allclose(all_logits(back.eval(), x), all_logits(model, x)[..., :VOCAB_SIZE], atol=1e-5)


@pytest.mark.slow
def test_train_init_from_local_folder_then_resume(tmp_path, token_dataset):
    """train.py evaluates the imported weights first (loss as transformers computes it on the same
    windows), takes the model's shape from them, and a run so started can be resumed."""
    from kit.loader import eval_batches
    hf = save_random_hf_model(tmp_path / "gpt2-tiny", vocab_size=VOCAB_SIZE, n_positions=64)
    out_dir = tmp_path / "out"
    run = run_script("train.py", *TINY_TRAIN_ARGS, f"--data_dir={token_dataset}", f"--out_dir={out_dir}",
                     f"--init_from={tmp_path / 'gpt2-tiny'}", "--max_iters=2", "--eval_interval=2", "--warmup_iters=0")
    assert "overriding the config: --n_head=4 --bias=True" in run.stdout
    step0 = float(run.stdout.split("step 0: train loss ")[1].split("val loss ")[1].split()[0].rstrip(","))
    losses = []
    with torch.no_grad():  # the same eval windows train.py used (block_size 16 of the 64 positions)
        for x, y in eval_batches(str(token_dataset / "val.bin"), 16, 2, 2):
            losses.append(hf(x, labels=None).logits.float().log_softmax(-1).gather(-1, y[..., None]).mean().neg())
    assert step0 == pytest.approx(torch.stack(losses).mean().item(), abs=1e-3)
    ckpt = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert ckpt["model_args"]["vocab_size"] == VOCAB_SIZE and ckpt["model_args"]["block_size"] == 16
    run_script("train.py", *TINY_TRAIN_ARGS, f"--data_dir={token_dataset}", f"--out_dir={out_dir}",
               "--init_from=resume", "--n_head=4", "--bias=True", "--max_iters=3", "--eval_interval=2",
               "--warmup_iters=0")
    assert torch.load(out_dir / "ckpt.pt", weights_only=True)["iter_num"] == 3
    bad = run_script("train.py", *TINY_TRAIN_ARGS, f"--data_dir={token_dataset}", f"--out_dir={out_dir}",
                     "--init_from=gpt3", check=False)
    assert bad.returncode == 2 and "init_from='gpt3'" in bad.stderr


def export_killed_at_step(step, *args):
    """export.py in a forked child that dies (os._exit, no clean-up: as under SIGKILL) just before its
    step-th rename or removal of a whole folder. Returns whether it died there (False: it has fewer steps)."""
    import os
    import shutil
    pid = os.fork()
    if pid == 0:
        steps = []

        def die_at_step(real):
            def step_or_die(path, *more, **options):
                steps.append(os.path.basename(path).startswith("hf"))  # the export folder, aside or temporary
                if sum(steps) == step and steps[-1]:
                    os._exit(9)
                return real(path, *more, **options)
            return step_or_die
        os.replace, shutil.rmtree = die_at_step(os.replace), die_at_step(shutil.rmtree)
        try:
            os._exit(run_export(*args)[0])
        finally:
            os._exit(1)  # never back into pytest from the child
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 9


def test_export_force_killed_at_any_step_leaves_one_whole_export_and_the_next_run_cleans_up(tmp_path):
    """The old export is renamed aside, the new one renamed in, then the old one deleted: killed before any of
    these steps, one whole export is there (under its name, or aside until the next export.py puts it back),
    and the next run replaces it and leaves no `.tmp.<pid>` or `.old.<pid>` folder behind."""
    import shutil
    from kit.hf import EXPORT_FILES
    hf, saved_old = tmp_path / "hf", tmp_path / "saved_old"
    for seed, out in ((0, tmp_path / "a"), (1, tmp_path / "b")):
        out.mkdir()
        save_checkpoint({"model_args": TINY, "model": random_model(seed, **TINY).state_dict(), "iter_num": seed},
                        out / "ckpt.pt")
    assert run_export(f"--out_dir={tmp_path / 'a'}", f"--to={saved_old}")[0] == 0
    old_weights = (saved_old / "model.safetensors").read_bytes()
    step = 0
    while True:
        step += 1
        shutil.rmtree(hf, ignore_errors=True)
        shutil.copytree(saved_old, hf)
        if not export_killed_at_step(step, f"--out_dir={tmp_path / 'b'}", f"--to={hf}", "--force=True"):
            break
        whole = [folder for folder in tmp_path.glob("hf*") if not folder.name.startswith("hf.tmp.")
                 and sorted(p.name for p in folder.iterdir()) == sorted(EXPORT_FILES)]
        assert whole, f"killed at step {step}: no whole export left"
        assert run_export(f"--out_dir={tmp_path / 'a'}", f"--to={hf}")[0] == 2  # refused without --force ...
        assert sorted(p.name for p in hf.iterdir()) == sorted(EXPORT_FILES)  # ... and an export is under its name
        assert run_export(f"--out_dir={tmp_path / 'b'}", f"--to={hf}", "--force=True")[0] == 0
        assert (hf / "model.safetensors").read_bytes() != old_weights
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "hf", "saved_old"], f"step {step}"
    assert step == 4  # killed before each of the three steps, then a run that finishes
