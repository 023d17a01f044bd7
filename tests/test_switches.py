"""The opt-in architecture switches: each alone and all together, shapes, loss at init, what each
one changes, KV-cache sampling equality; one train.py run + resume with all of them on; the modern configs."""
import math

import pytest
import torch
import torch.nn.functional as F

from kit.checkpoint import load_checkpoint, model_args_of, model_from_checkpoint
from conftest import TINY_TRAIN_ARGS, all_logits, run_script, train_args
from inprocess import run_inprocess
from model import PADDED_VOCAB_SIZE, GPT, GPTConfig, Norm, apply_rotary, rotary_tables

SWITCHES = {
    "rotary": dict(rotary=True),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(mlp="relu2"),
    "rmsnorm": dict(norm="rmsnorm"),
    "untied": dict(tie_embeddings=False),
    "zero_init_proj": dict(zero_init_proj=True),
    "softcap": dict(logit_softcap=15.0),
    "zero_head": dict(tie_embeddings=False, zero_init_head=True),  # a zero head must be untied
}
SWITCHES["all"] = {k: v for s in SWITCHES.values() for k, v in s.items()}
ALL_SWITCH_ARGS = ["--rotary=True", "--qk_norm=True", "--mlp=relu2", "--norm=rmsnorm", "--tie_embeddings=False",
                   "--zero_init_proj=True", "--logit_softcap=15.0", "--zero_init_head=True"]


def tiny(switches, vocab_size=64, **overrides):
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=vocab_size,
                                   bias=False), **switches, **overrides}))


@pytest.mark.parametrize("name", SWITCHES)
def test_shapes(name):
    model = tiny(SWITCHES[name])
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, idx)  # the chunked loss: no logits
    assert logits is None and loss.shape == () and math.isfinite(loss.item())
    assert all_logits(model, idx).shape == (3, 16, 64)
    logits, loss = model(idx)
    assert logits.shape == (3, 1, 64) and loss is None


@pytest.mark.parametrize("name", SWITCHES)
def test_loss_at_init_is_near_uniform(name):
    """Near-zero logits at init: loss on next tokens independent of the inputs is ~ln(vocab)."""
    model = tiny(SWITCHES[name], vocab_size=PADDED_VOCAB_SIZE, n_embd=128, n_head=4, block_size=64)
    torch.manual_seed(1)
    idx, targets = torch.randint(0, 50257, (2, 2, 64))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(PADDED_VOCAB_SIZE)) < 0.1


def test_rotary_replaces_the_position_table_and_is_relative():
    model = tiny(dict(rotary=True))
    assert "wpe" in tiny({}).transformer and "wpe" not in model.transformer
    assert "transformer.wpe.weight" not in model.state_dict() and "rotary_cos" not in model.state_dict()
    # <R_m q, R_n k> depends on m - n only: the point of rotary embeddings
    cos, sin = rotary_tables(8, 12)
    q, k = torch.randn(2, 1, 1, 8).unbind(0)

    def score(m, n):
        return (apply_rotary(q, cos[m:m + 1], sin[m:m + 1]) * apply_rotary(k, cos[n:n + 1], sin[n:n + 1])).sum()

    assert torch.allclose(score(5, 2), score(10, 7), atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 3), atol=1e-3)
    assert torch.allclose(apply_rotary(q, cos[7:8], sin[7:8]).norm(), q.norm(), atol=1e-5)  # a rotation


def test_qk_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    idx = torch.randint(0, 64, (2, 16))
    for qk_norm, should_match in ((True, True), (False, False)):
        model = tiny(dict(qk_norm=qk_norm))
        with torch.no_grad():
            before = all_logits(model, idx)
            for block in model.transformer.h:
                block.attn.c_attn.weight[:2 * 32] *= 10.0  # the q and k rows
            after = all_logits(model, idx)
        assert torch.allclose(before, after, atol=1e-4) == should_match


def test_rmsnorm_has_no_bias_and_unit_rms():
    norm = Norm(32, GPTConfig(n_layer=1, n_head=1, n_embd=32, norm="rmsnorm", bias=True))
    assert norm.bias is None
    y = norm(torch.randn(4, 32) * 5 + 3)
    assert torch.allclose(y.pow(2).mean(-1), torch.ones(4), atol=1e-3)


def test_relu2_mlp_is_relu_squared():
    mlp = tiny(dict(mlp="relu2")).transformer.h[0].mlp
    x = torch.randn(3, 32)
    expected = mlp.c_proj(torch.relu(mlp.c_fc(x)) ** 2)
    assert torch.allclose(mlp(x), expected, atol=1e-6)


def test_untied_head_has_its_own_matrix():
    tied, untied = tiny({}), tiny(dict(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight
    assert untied.get_num_params() - tied.get_num_params() == 64 * 32


def test_zero_init_makes_every_block_the_identity():
    model = tiny(dict(zero_init_proj=True))
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        full = all_logits(model, idx)
        model.transformer.h = torch.nn.ModuleList()  # no blocks at all
        skipped = all_logits(model, idx)
    assert torch.equal(full, skipped)


def test_softcap_bounds_every_logit_and_is_cap_tanh():
    capped, plain = tiny(dict(logit_softcap=2.0)), tiny({})
    plain.load_state_dict(capped.state_dict())  # the same weights, without the cap
    with torch.no_grad():
        for model in (capped, plain):
            model.lm_head.weight.mul_(200.0)  # logits far beyond the cap (tanh saturates to exactly 1 in fp32)
        idx = torch.randint(0, 64, (2, 16))
        uncapped = all_logits(plain, idx)
        for logits in (all_logits(capped, idx), capped(idx)[0]):  # every position, and the sampling path
            assert logits.abs().max() <= 2.0
        assert uncapped.abs().max() > 10.0
        assert torch.allclose(all_logits(capped, idx), 2.0 * torch.tanh(uncapped / 2.0), atol=1e-5)
        # the training loss (a chunk of logits at a time) is the cross-entropy of the capped logits
        expected = F.cross_entropy(all_logits(capped, idx).flatten(0, 1), idx.flatten())
        assert torch.allclose(capped(idx, idx)[1], expected, rtol=1e-6)
        assert torch.allclose(capped.output_logits(torch.zeros(1, 32)), torch.zeros(1, 64))


def test_zero_init_head_starts_at_zero_and_needs_an_untied_head():
    model = tiny(dict(tie_embeddings=False, zero_init_head=True))
    assert not model.lm_head.weight.any() and model.transformer.wte.weight.std() > 0.01
    assert tiny(dict(tie_embeddings=False)).lm_head.weight.std() > 0.01  # off: the usual init
    with pytest.raises(ValueError, match="zero_init_head=True needs tie_embeddings=False"):
        tiny(dict(zero_init_head=True))
    with pytest.raises(ValueError, match=r"logit_softcap=-1.0: must be >= 0 \(0 = off\)"):
        tiny(dict(logit_softcap=-1.0))


def test_train_py_refuses_a_zero_tied_head_in_one_line(token_dataset, tmp_path):
    code, stdout, stderr = run_inprocess("train.py", *train_args(token_dataset, tmp_path / "out", "--max_iters=1",
                                                                 "--zero_init_head=True"))
    assert code == 2 and stderr.strip().splitlines() == [
        "error: zero_init_head=True needs tie_embeddings=False: a tied lm_head is the token embedding, which must "
        "not start at zero"]
    assert not (tmp_path / "out" / "ckpt.pt").exists()


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("prompt_len", [3, 16, 20])  # shorter than, equal to and longer than block_size 16
def test_kv_cache_sampling_matches_full_recompute(name, prompt_len):
    model = tiny(SWITCHES[name]).eval()
    # zero-init blocks would make the cache trivially right: give them weights first
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompt = torch.randint(0, 64, (2, prompt_len))
    for temperature, top_k, vocab_size in ((0.0, None, None), (1.0, 20, 60)):  # greedy; sampled from 60 ids
        outs = []
        for use_cache in (True, False):
            torch.manual_seed(7)
            outs.append(model.generate(prompt, 20, temperature=temperature, top_k=top_k, vocab_size=vocab_size,
                                       use_cache=use_cache))
        assert outs[0].shape == (2, prompt_len + 20)
        assert torch.equal(outs[0], outs[1])


@pytest.mark.slow
def test_train_resume_and_sample_with_every_switch(token_dataset, tmp_path):
    out = tmp_path / "out"
    common = [f"--data_dir={token_dataset}", f"--out_dir={out}", *TINY_TRAIN_ARGS, *ALL_SWITCH_ARGS,
              "--lr_schedule=wsd", "--eval_interval=2", "--lr_decay_iters=6"]
    run_script("train.py", *common, "--max_iters=4")
    ckpt = load_checkpoint(str(out / "ckpt.pt"))
    assert ckpt["model_switches"] == SWITCHES["all"]  # every switch differs from GPT-2 here
    assert {k: model_args_of(ckpt)[k] for k in SWITCHES["all"]} == SWITCHES["all"]
    model = model_from_checkpoint(ckpt)
    assert model.config.rotary and model.lm_head.weight is not model.transformer.wte.weight

    proc = run_script("train.py", *common, "--max_iters=6", "--init_from=resume")
    assert "iter 5:" in proc.stdout and "iter 1:" not in proc.stdout
    assert load_checkpoint(str(out / "ckpt.pt"))["iter_num"] == 6
    # resuming without the switches is a different model: refused in one line
    proc = run_script("train.py", f"--data_dir={token_dataset}", f"--out_dir={out}", *TINY_TRAIN_ARGS,
                      "--max_iters=8", "--init_from=resume", check=False)
    assert proc.returncode == 2 and "rotary" in proc.stderr

    # the resumed model samples past its block_size (32), with and without the cache alike
    model = model_from_checkpoint(load_checkpoint(str(out / "ckpt.pt"))).eval()
    prompt = torch.tensor([[50256, 464, 2068]])
    samples = []
    for use_cache in (True, False):
        torch.manual_seed(3)
        samples.append(model.generate(prompt, 40, top_k=50, vocab_size=50257, use_cache=use_cache))
    assert samples[0].shape == (1, 43) and torch.equal(samples[0], samples[1])


RECIPE_KEYS = {"rotary", "qk_norm", "mlp", "norm", "tie_embeddings", "zero_init_proj", "learning_rate", "min_lr",
               "lr_schedule", "lr_decay_iters", "cooldown_frac", "beta1", "beta2", "out_dir", "wandb_run_name",
               "optimizer", "muon_lr", "muon_momentum"}


@pytest.mark.parametrize("reference, modern", [("train_fineweb.py", "train_fineweb_modern.py"),
                                               ("train_fineweb_124m.py", "train_fineweb_modern_124m.py")])
def test_modern_configs_change_only_the_recipe(reference, modern):
    """The modern twins keep the reference run's data, shape, batch and length: only the recipe moves."""
    from pathlib import Path
    configs = []
    for name in (reference, modern):
        namespace = {}
        exec((Path(__file__).parent.parent / "config" / name).read_text(), namespace)
        configs.append({k: v for k, v in namespace.items() if not k.startswith("__")})
    ref, new = configs
    changed = {k for k in ref.keys() | new.keys() if ref.get(k) != new.get(k)}
    assert changed <= RECIPE_KEYS and {"optimizer", "muon_lr", "learning_rate"} <= changed
    GPTConfig(**{k: v for k, v in new.items() if k in GPTConfig.__dataclass_fields__})  # a valid model
