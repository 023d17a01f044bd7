"""The memory levers: the chunked loss (the default) and activation checkpointing change what is held in
memory, never what is computed. Each is checked against a reference written out here: the full
(B, T, vocab) logits, a log-softmax over the tokenizer's 50,257 ids (not the 47 padding rows), the mean
over the targets that are not -1. Plus the glibc allocator helper and bench.py's fit report."""
import subprocess
import sys

import pytest
import torch

import model as model_module
from kit import runtime
from bench import fit_report
from conftest import REPO_ROOT, all_logits, random_model, torchrun_train, train_args
from inprocess import read_metrics, run_inprocess
from kit.tokenizer import VOCAB_SIZE

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50304, bias=True)
EVERY_SWITCH = dict(rotary=True, qk_norm=True, mlp="relu2", norm="rmsnorm", tie_embeddings=False, zero_init_proj=True)


def reference_loss(model, x, y):
    """The mean cross-entropy from the full logits, by hand: log-softmax over the real ids only."""
    logits = all_logits(model, x)[..., :VOCAB_SIZE].double()
    logprobs = logits.log_softmax(-1).gather(-1, y.clamp(min=0)[..., None])[..., 0]
    counted = y != -1
    return -(logprobs * counted).sum() / counted.sum()


def loss_and_grads(model, batches, loss_fn, seed=0):
    """Loss of each micro-batch and the accumulated gradients, as train.py sums them (loss / micro-steps)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout masks for every path compared
    losses = []
    for x, y in batches:
        loss = loss_fn(model, x, y)
        (loss / len(batches)).backward()
        losses.append(loss.item())
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}


def batches_with_ignored_targets(n=2, rows=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randint(0, VOCAB_SIZE, (rows, 16), generator=g)
        y = torch.randint(0, VOCAB_SIZE, (rows, 16), generator=g)
        y[0, :5] = -1  # e.g. padding: not counted, not in the mean's denominator
        batches.append((x, y))
    return batches


def assert_same(losses, grads, ref_losses, ref_grads, loss_rel=1e-6, grad_rel=1e-5):
    assert losses == pytest.approx(ref_losses, rel=loss_rel)
    for name, grad in ref_grads.items():
        scale = grad.abs().max().item()
        assert (grads[name] - grad).abs().max().item() <= grad_rel * scale, name


SWITCH_SETS = {"gpt2": {}, "every-switch": EVERY_SWITCH, "dropout": dict(dropout=0.1),
               "softcap": dict(logit_softcap=1.0),  # logits of random_model are ~0.6: the cap bends them
               "untied-softcap": dict(tie_embeddings=False, logit_softcap=1.0),
               "zero-head": dict(tie_embeddings=False, zero_init_head=True)}


def switched_model(name, **extra):
    model = random_model(**TINY, **SWITCH_SETS[name], **extra).train()
    if model.config.zero_init_head:  # random_model perturbs every weight: put the zero head back
        with torch.no_grad():
            model.lm_head.weight.zero_()
    return model


@pytest.mark.parametrize("switches", list(SWITCH_SETS))
def test_chunked_loss_equals_the_full_logits(switches, monkeypatch):
    """7 rows a chunk: 48 rows per micro-batch end in a short chunk. Two micro-batches accumulated;
    the padding rows of the output layer are random (random_model), so they would show in the loss."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 7)
    model = switched_model(switches)
    batches = batches_with_ignored_targets()
    ref_losses, ref_grads = loss_and_grads(model, batches, lambda m, x, y: reference_loss(m, x, y).float())
    assert model.chunked_loss  # the default
    losses, grads = loss_and_grads(model, batches, lambda m, x, y: m(x, y)[1])
    assert_same(losses, grads, ref_losses, ref_grads)
    model.chunked_loss = False  # the plain path computes the same loss over the full logits
    assert_same(*loss_and_grads(model, batches, lambda m, x, y: m(x, y)[1]), ref_losses, ref_grads)


@pytest.mark.parametrize("switches", ["gpt2", "untied-softcap"])
def test_chunked_loss_in_bf16_is_within_bf16_noise(switches):
    model = switched_model(switches)
    batches = batches_with_ignored_targets(n=1)
    results = []
    for chunked in (True, False):
        model.chunked_loss = chunked
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(loss_and_grads(model, batches, lambda m, x, y: m(x, y)[1]))
    assert_same(*results[0], *results[1], loss_rel=1e-3, grad_rel=2e-2)


def test_activation_checkpointing_recomputes_the_same_dropout_masks():
    """With dropout the recompute must draw the masks of the forward, and leave the RNG where the plain
    step leaves it (so a resumed run draws what an uninterrupted one does)."""
    model = random_model(**TINY, dropout=0.2).train()
    batches = batches_with_ignored_targets()
    plain = loss_and_grads(model, batches, lambda m, x, y: m(x, y)[1])
    rng_after_plain = torch.get_rng_state()
    model.activation_checkpointing = True
    recomputed = loss_and_grads(model, batches, lambda m, x, y: m(x, y)[1])
    assert torch.equal(torch.get_rng_state(), rng_after_plain)
    assert_same(*recomputed, *plain, loss_rel=0, grad_rel=1e-6)


def test_evaluation_reads_each_position_once_a_chunk_at_a_time(monkeypatch):
    """target_logprobs (val loss, bits per byte, HellaSwag) equals the full logits' log-softmax over the
    real ids, and runs the output layer over every position exactly once, never more than a chunk."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 20)
    model = random_model(**TINY)
    x, y = batches_with_ignored_targets(n=1)[0]
    calls = []
    output_logits = model.output_logits
    monkeypatch.setattr(model, "output_logits", lambda h: calls.append(h.shape[0]) or output_logits(h))
    logprobs = model.target_logprobs(x, y)
    assert sum(calls) == y.numel() and max(calls) <= 20
    full = output_logits(model.hidden_states(x))[..., :VOCAB_SIZE].double().log_softmax(-1)
    expected = full.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -1)
    assert torch.allclose(logprobs.double(), expected, rtol=0, atol=1e-5) and (logprobs[0, :5] == 0).all()


def test_train_py_passes_both_settings_to_the_model(data_dir, tmp_path, monkeypatch):
    """The same run with the levers on and off (dropout on): the same losses; checkpointing was used."""
    calls = []
    checkpoint = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))
    runs = {}
    for name, levers in (("plain", ["--chunked_loss=False"]), ("levers", ["--activation_checkpointing=True"])):
        code, stdout, stderr = run_inprocess("train.py", *train_args(data_dir, tmp_path / name, "--max_iters=2",
                                                                     "--eval_interval=2", "--dropout=0.1", *levers))
        assert code == 0, stderr
        runs[name] = [(r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / name)[0]]
        assert (len(calls) > 0) == (name == "levers")
    assert [pytest.approx(pair, rel=1e-5) for pair in runs["levers"]] == runs["plain"]


def test_importing_the_model_does_not_load_torch_dynamo():
    """torch._dynamo costs every script ~1.5 s at start; only a compiled run needs it."""
    code = "import sys, model, kit.checkpoint, kit.loader, kit.runtime; print('torch._dynamo' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "False", proc.stdout + proc.stderr


@pytest.mark.slow
def test_ddp_with_both_levers_equals_the_plain_step(ddp_run, tmp_path):
    """torchrun with 2 gloo ranks: the gradients of the chunked loss (on in the reference run) and of the
    recomputed blocks (on here, with the full logits) reach DDP's all-reduce like any others (the grad
    norm is taken after it), and the per-rank dropout masks are the same in the recompute. The chunked
    loss equals the full logits to float rounding (~1e-7), not bit for bit, and Muon's steps amplify that
    from step to step: the first step, where a missed all-reduce would show, is held to 1e-5, the later
    ones to 1e-3."""
    data_dir, reference, _ = ddp_run
    torchrun_train(data_dir, tmp_path / "levers", "--chunked_loss=False", "--activation_checkpointing=True")
    runs = [[(r["loss"], r["grad_norm"]) for r in read_metrics(out)[0]] for out in (reference, tmp_path / "levers")]
    assert len(runs[1]) == 5 and runs[1][0] == pytest.approx(runs[0][0], rel=1e-5)
    assert [pytest.approx(pair, rel=1e-3) for pair in runs[1]] == runs[0]


def test_glibc_allocator_thresholds_only_where_they_apply(monkeypatch):
    if not sys.platform.startswith("linux") or not hasattr(__import__("ctypes").CDLL(None), "gnu_get_libc_version"):
        pytest.skip("not glibc")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert runtime.keep_freed_memory().startswith("glibc malloc: freed blocks up to 32 MiB are reused")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own choice stands
    assert runtime.keep_freed_memory() == ""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.keep_freed_memory() == ""
    monkeypatch.setattr(runtime.sys, "platform", "linux")

    class Musl:  # a C library without glibc's gnu_get_libc_version
        pass
    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: Musl())
    assert runtime.keep_freed_memory() == ""


def test_fit_report_names_the_levers_it_measured():
    lines = fit_report(32, 1024, 524_288, " --activation_checkpointing=True")
    assert lines[-1] == "use: --batch_size=32 --gradient_accumulation_steps=16 --activation_checkpointing=True"
