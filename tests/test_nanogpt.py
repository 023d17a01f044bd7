"""Checkpoints move between nanoGPT and this kit in both directions. nanoGPT itself is not a dependency:
below is a minimal re-implementation of what its sample.py and train.py do with a checkpoint (written for
these tests from how nanoGPT works, not copied): GPTConfig(**model_args), the state dict with the
'_orig_mod.' prefix stripped into a model whose modules are registered as nanoGPT registers them, and
optimizer.load_state_dict on AdamW groups built from that registration order."""
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn
from torch.nn import functional as F

from kit.checkpoint import build_checkpoint, load_checkpoint, model_from_checkpoint, restore_checkpoint, save_checkpoint
from conftest import all_logits, train_args
from inprocess import read_metrics, run_inprocess
from model import GPT, GPTConfig

# ---------------------------------------------------------------------------------------------
# nanoGPT's side, re-implemented


@dataclass
class NanoConfig:
    """nanoGPT's GPTConfig: these seven fields, no others (an unknown key is a TypeError)."""
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class NanoLayerNorm(nn.Module):
    def __init__(self, ndim, bias):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class NanoAttention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_attn = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.bias)
        self.n_head = c.n_head

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class NanoMLP(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c_fc = nn.Linear(c.n_embd, 4 * c.n_embd, bias=c.bias)
        self.c_proj = nn.Linear(4 * c.n_embd, c.n_embd, bias=c.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))  # nanoGPT's nn.GELU(): exact erf, we use tanh


class NanoBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.ln_1, self.attn = NanoLayerNorm(c.n_embd, c.bias), NanoAttention(c)
        self.ln_2, self.mlp = NanoLayerNorm(c.n_embd, c.bias), NanoMLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    """Modules registered in nanoGPT's order: transformer.wte, wpe, drop, h, ln_f, then lm_head tied to wte."""

    def __init__(self, c):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.n_embd), wpe=nn.Embedding(c.block_size, c.n_embd),
            drop=nn.Dropout(c.dropout), h=nn.ModuleList([NanoBlock(c) for _ in range(c.n_layer)]),
            ln_f=NanoLayerNorm(c.n_embd, c.bias)))
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight

    def forward(self, idx):
        x = self.transformer.wte(idx) + self.transformer.wpe(torch.arange(idx.size(1)))
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        groups = [{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def nanogpt_load(checkpoint):
    """nanoGPT's sample.py: the model from model_args and the state dict, '_orig_mod.' stripped."""
    model = NanoGPT(NanoConfig(**checkpoint["model_args"]))
    prefix = "_orig_mod."
    model.load_state_dict({k[len(prefix):] if k.startswith(prefix) else k: v for k, v in checkpoint["model"].items()})
    return model


def nanogpt_resume(checkpoint):
    """nanoGPT's train.py resume: its model, and its AdamW with the checkpoint's optimizer state."""
    model = nanogpt_load(checkpoint)
    optimizer = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95))
    optimizer.load_state_dict(checkpoint["optimizer"])
    return model, optimizer


def moments_by_name(model, optimizer):
    return {name: optimizer.state[p]["exp_avg"] for name, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# ours, read and resumed by nanoGPT


@pytest.fixture(scope="module")
def our_run(tmp_path_factory):
    """A few iterations of config/train_fineweb.py, shrunk to a tiny model."""
    from conftest import make_token_dataset
    tmp = tmp_path_factory.mktemp("ours")
    data = make_token_dataset(tmp / "data")
    code, stdout, stderr = run_inprocess("train.py", "config/train_fineweb.py", *train_args(
        data, tmp / "out", "--max_iters=3", "--eval_interval=3", "--lr_decay_iters=3", "--log_interval=1"))
    assert code == 0, stdout + stderr
    return tmp / "out" / "ckpt.pt"


def test_nanogpt_samples_from_our_checkpoint(our_run):
    checkpoint = torch.load(our_run, map_location="cpu", weights_only=True)
    assert set(checkpoint["model_args"]) == set(NanoConfig.__dataclass_fields__)
    assert checkpoint["model_switches"] == {}  # config/train_fineweb.py is GPT-2: no switch differs
    nano = nanogpt_load(checkpoint).eval()
    ours = model_from_checkpoint(checkpoint).eval()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        their_logits, our_logits = nano(idx), all_logits(ours, idx)
        # nanoGPT's sampling loop: the next token from the last position's logits
        tokens = idx[:, :4]
        for _ in range(8):
            probs = F.softmax(nano(tokens)[:, -1, :], dim=-1)
            tokens = torch.cat((tokens, torch.multinomial(probs, 1)), dim=1)
    assert tokens.shape == (2, 12)
    # the same model on both sides; only the GELU differs (nanoGPT's exact erf, our tanh approximation)
    assert torch.allclose(their_logits, our_logits, atol=1e-4)


def test_nanogpt_resumes_our_optimizer_state_in_its_parameter_order(our_run):
    checkpoint = torch.load(our_run, map_location="cpu", weights_only=True)
    nano, nano_optimizer = nanogpt_resume(checkpoint)
    # our own reading, position by position, names what each saved moment belongs to
    ours = model_from_checkpoint(checkpoint)
    our_optimizer = ours.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")["optimizer"]
    our_optimizer.load_state_dict(checkpoint["optimizer"])
    theirs, expected = moments_by_name(nano, nano_optimizer), moments_by_name(ours, our_optimizer)
    assert theirs.keys() == expected.keys()
    assert all(torch.equal(theirs[name], expected[name]) for name in expected)
    nano(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    nano_optimizer.step()  # a state in the wrong order would fail here on a shape mismatch


# ---------------------------------------------------------------------------------------------
# nanoGPT's, resumed here


TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False, vocab_size=50304, dropout=0.0)


def nanogpt_checkpoint(iter_num=3):
    """What nanoGPT's train.py saves after iter_num steps of a compiled tiny model."""
    torch.manual_seed(0)
    model = NanoGPT(NanoConfig(**TINY))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95))
    for _ in range(iter_num):
        idx = torch.randint(0, 50257, (2, 16))
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    nanogpt_config = dict(learning_rate=1e-3, max_iters=5000, lr_decay_iters=5000, decay_lr=True, min_lr=1e-4)
    checkpoint = {"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                  "optimizer": optimizer.state_dict(), "model_args": dict(TINY), "iter_num": iter_num,
                  "best_val_loss": torch.tensor(10.5), "config": nanogpt_config}
    return checkpoint, model, optimizer


def test_our_restore_matches_nanogpt_moments_by_name():
    checkpoint, nano, nano_optimizer = nanogpt_checkpoint()
    model = GPT(GPTConfig(**TINY))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")["optimizer"]
    notes = restore_checkpoint(checkpoint, checkpoint["config"], model, {"optimizer": optimizer}, None, None, 0, 1)
    assert "nanoGPT does not save them" in "\n".join(notes)
    restored, expected = moments_by_name(model, optimizer), moments_by_name(nano, nano_optimizer)
    assert restored.keys() == expected.keys()
    assert all(torch.equal(restored[name], expected[name]) for name in expected)
    assert all(int(s["step"]) == 3 for s in optimizer.state.values())


def test_resume_a_nanogpt_checkpoint_in_train_py(token_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(nanogpt_checkpoint()[0], out / "ckpt.pt")
    code, stdout, stderr = run_inprocess("train.py", *train_args(token_dataset, out, "--max_iters=5",
                                                                 "--eval_interval=5", "--init_from=resume"))
    assert code == 0, stdout + stderr
    assert ("warning: the checkpoint holds no RNG or data loader state (nanoGPT does not save them): batches and "
            "dropout masks start afresh (not an exact resume)") in stdout.splitlines()
    assert f"resuming from {out / 'ckpt.pt'} at iteration 3, lr 0.001, best val loss 10.5000" in stdout
    assert [r["iter"] for r in read_metrics(out)[0]] == [4, 5]
    resumed = load_checkpoint(out / "ckpt.pt")
    assert resumed["iter_num"] == 5 and read_metrics(out)[1][-1]["val_loss"] > 10.5
    assert resumed["best_val_loss"] == 10.5  # nanoGPT's record stands: this run's val loss is worse
    assert {int(s["step"]) for s in resumed["optimizer"]["state"].values()} == {5}  # 3 of nanoGPT's + 2 here


def test_the_causal_masks_nanogpt_saves_without_flash_attention_are_dropped():
    checkpoint, nano, _ = nanogpt_checkpoint(iter_num=0)
    for i in range(TINY["n_layer"]):  # nanoGPT's non-flash path registers its mask as the buffer attn.bias
        mask = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        checkpoint["model"][f"_orig_mod.transformer.h.{i}.attn.bias"] = mask
    model = model_from_checkpoint(checkpoint)  # a strict load_state_dict
    assert torch.equal(model.transformer.wpe.weight, nano.transformer.wpe.weight)


def test_a_nanogpt_checkpoint_that_does_not_map_is_refused_in_one_line(token_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    checkpoint = nanogpt_checkpoint()[0]
    checkpoint["optimizer"]["param_groups"][1]["params"].pop()  # a no-decay parameter without a place
    save_checkpoint(checkpoint, out / "ckpt.pt")
    code, stdout, stderr = run_inprocess("train.py", *train_args(token_dataset, out, "--max_iters=5",
                                                                 "--init_from=resume"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith(f"error: cannot resume {out / 'ckpt.pt'}: its optimizer state holds groups of [10, 4] "
                             "parameters that do not map by name onto this model's groups of [10, 5]")


# ---------------------------------------------------------------------------------------------
# the format carries a second optimizer (e.g. Muon for the hidden matrices) the same way


def test_a_second_optimizer_state_comes_back_by_name(tmp_path):
    def tiny_run():
        model = GPT(GPTConfig(**TINY))
        hidden = [p for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
        rest = [p for p in model.parameters() if all(p is not h for h in hidden)]
        return model, torch.optim.AdamW(rest, lr=1e-3), hidden

    torch.manual_seed(0)
    model, adamw, hidden = tiny_run()
    second = torch.optim.SGD(hidden, lr=0.1, momentum=0.9)
    model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))[1].backward()
    adamw.step()
    second.step()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    checkpoint = build_checkpoint(model, {"optimizer": adamw, "muon": second}, scaler, [], iter_num=1, best_val_loss=9.0)
    save_checkpoint(checkpoint, tmp_path / "ckpt.pt")

    fresh, fresh_adamw, fresh_hidden = tiny_run()
    fresh_second = torch.optim.SGD(fresh_hidden[::-1], lr=0.1, momentum=0.9)  # another order: names decide
    restore_checkpoint(load_checkpoint(tmp_path / "ckpt.pt"), {}, fresh, {"optimizer": fresh_adamw, "muon": fresh_second},
                       scaler, None, 0, 1)
    names, fresh_names = {id(p): n for n, p in model.named_parameters()}, dict(fresh.named_parameters())
    for p in hidden:
        assert torch.equal(fresh_second.state[fresh_names[names[id(p)]]]["momentum_buffer"],
                           second.state[p]["momentum_buffer"])
    for p in adamw.param_groups[0]["params"]:
        assert torch.equal(fresh_adamw.state[fresh_names[names[id(p)]]]["exp_avg"], adamw.state[p]["exp_avg"])
