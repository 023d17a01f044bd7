"""What an optimizer step computes, pinned down by a reference written out by hand (in the spirit of
llm.c's parity tests): train.py runs three iterations of a tiny fp32 model with gradient accumulation,
an active gradient clip and weight decay, and the weights it saves, the loss and the grad norm it logs
must equal a plain loop that does the same from first principles: the loader's batches, the mean of the
micro-batch losses, backward, clip by the global norm, AdamW written out with its two parameter groups,
and warmup + cosine learning rates computed from their formulas.

Three iterations, not one: Adam's update is invariant to the gradient's scale, so clipping shows in
the weights only through moments that mix steps with different clip factors; and the iterations cover
warmup (iteration 0) and cosine decay (iteration 2).

With optimizer='muon' the reference hands the transformer blocks' matrices to torch.optim.Muon (the
library's step, at Muon's own peak rate on the same schedule) and keeps the hand-written AdamW for the
rest: what is pinned down is which parameters go where, and with what learning rate and clipped gradient."""
import math

import pytest
import torch

from conftest import make_token_dataset
from inprocess import read_metrics, run_inprocess
from kit.loader import TokenBatches
from model import PADDED_VOCAB_SIZE, GPT, GPTConfig

SEED = 1337
SHAPE = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=True, dropout=0.0)
BATCH_SIZE, ACCUM, ITERS = 2, 2, 3
LR, MIN_LR, WARMUP, DECAY_ITERS = 1e-3, 1e-4, 1, 4
WEIGHT_DECAY, BETAS, EPS, GRAD_CLIP = 0.5, (0.9, 0.95), 1e-8, 0.05
MUON_LR, MUON_MOMENTUM = 0.03, 0.9


def reference_multiplier(it):
    """Linear warmup over WARMUP iterations, then cosine from 1 to MIN_LR / LR at DECAY_ITERS: the share of
    its peak each optimizer runs at."""
    if it < WARMUP:
        return (it + 1) / (WARMUP + 1)
    progress = (it - WARMUP) / (DECAY_ITERS - WARMUP)
    return MIN_LR / LR + 0.5 * (1 + math.cos(math.pi * progress)) * (1 - MIN_LR / LR)


def reference_lr(it):
    """AdamW's learning rate: LR x the multiplier."""
    return LR * reference_multiplier(it)


def reference_run(train_path, optimizer):
    """ITERS optimizer steps by hand. Returns (state dict, [mean loss per iter], [grad norm per iter])."""
    torch.manual_seed(SEED)  # train.py seeds torch with seed + rank before building the model
    model = GPT(GPTConfig(vocab_size=PADDED_VOCAB_SIZE, **SHAPE))
    batches = TokenBatches(str(train_path), SHAPE["block_size"], BATCH_SIZE, "random", SEED, 0, 1)
    params = dict(model.named_parameters())
    m = {name: torch.zeros_like(p) for name, p in params.items()}
    v = {name: torch.zeros_like(p) for name, p in params.items()}
    library = library_optimizers(params) if optimizer == "muon" else []
    losses, norms = [], []
    for it in range(ITERS):
        for p in params.values():
            p.grad = None
        micro_losses = []
        for _ in range(ACCUM):
            x, y = batches.next_batch()
            _, loss = model(x, y)
            (loss / ACCUM).backward()  # the gradient of the mean of the micro-batch losses
            micro_losses.append(loss.item())
        losses.append(sum(micro_losses) / ACCUM)
        # the global L2 norm over all gradients, in fp32 as training computes it (per tensor, then of those)
        norm = torch.stack([p.grad.norm() for p in params.values()]).norm()
        norms.append(norm.item())
        clip = (GRAD_CLIP / (norm + 1e-6)).clamp(max=1.0)  # an fp32 tensor, as training computes it
        lr, step = reference_lr(it), it + 1
        with torch.no_grad():
            for name, p in params.items():
                g = p.grad * clip
                if library:
                    p.grad = g  # the library's optimizers step below, on the clipped gradient
                    continue
                if p.dim() >= 2:  # weight decay on matrices and embeddings only, decoupled from the gradient
                    p.mul_(1 - lr * WEIGHT_DECAY)
                m[name].mul_(BETAS[0]).add_((1 - BETAS[0]) * g)
                v[name].mul_(BETAS[1]).add_((1 - BETAS[1]) * g * g)
                m_hat = m[name] / (1 - BETAS[0] ** step)
                v_hat = v[name] / (1 - BETAS[1] ** step)
                p.sub_(lr * m_hat / (v_hat.sqrt() + EPS))
        for opt, peak in library:
            for group in opt.param_groups:
                group["lr"] = peak * reference_multiplier(it)  # the same schedule, from each optimizer's own peak
            opt.step()
    return model.state_dict(), losses, norms


def library_optimizers(params):
    """[(optimizer, peak lr)] for optimizer='muon': torch.optim.Muon on the 2-D weights inside the blocks
    (q, k, v as one matrix), torch.optim.AdamW on the rest (embeddings, norms, biases) with weight decay
    on its matrices only. The hand-written AdamW is pinned down by the 'adamw' case; here it would differ
    from torch's in the last bit, and Muon's bf16 Newton-Schulz amplifies such a bit into ~1e-4 in the weights."""
    in_muon = {n for n, p in params.items() if n.startswith("transformer.h.") and p.dim() == 2}
    rest = [p for n, p in params.items() if n not in in_muon]
    muon = torch.optim.Muon([p for n, p in params.items() if n in in_muon], lr=MUON_LR, weight_decay=WEIGHT_DECAY,
                            momentum=MUON_MOMENTUM)
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=LR, betas=BETAS, eps=EPS)
    return [(muon, MUON_LR), (adamw, LR)]


@pytest.fixture(scope="module", params=["adamw", "muon"])
def reference_and_train_py(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("reference_step")
    data_dir = make_token_dataset(tmp / "data")
    out_dir = tmp / "out"
    code, out, err = run_inprocess(
        "train.py", f"--data_dir={data_dir}", f"--out_dir={out_dir}", "--device=cpu", "--dtype=float32",
        "--compile=False", f"--seed={SEED}", "--data_order=random",
        *(f"--{k}={v}" for k, v in SHAPE.items()),
        f"--batch_size={BATCH_SIZE}", f"--gradient_accumulation_steps={ACCUM}", f"--max_iters={ITERS}",
        f"--learning_rate={LR}", f"--min_lr={MIN_LR}", f"--warmup_iters={WARMUP}",
        f"--lr_decay_iters={DECAY_ITERS}", "--lr_schedule=cosine", f"--weight_decay={WEIGHT_DECAY}",
        f"--beta1={BETAS[0]}", f"--beta2={BETAS[1]}", f"--grad_clip={GRAD_CLIP}",
        f"--eval_interval={ITERS}", "--eval_iters=1", "--log_interval=1", f"--optimizer={request.param}",
        f"--muon_lr={MUON_LR}", f"--muon_momentum={MUON_MOMENTUM}")
    assert code == 0, err
    saved = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    logged, _ = read_metrics(out_dir)
    return reference_run(data_dir / "train.bin", request.param), saved, logged


def test_logged_learning_rates_follow_warmup_and_cosine(reference_and_train_py):
    _, _, logged = reference_and_train_py
    assert [r["iter"] for r in logged] == [1, 2, 3]
    assert [r["lr"] for r in logged] == pytest.approx([reference_lr(it) for it in range(ITERS)], rel=1e-12)


def test_logged_loss_and_grad_norm_equal_the_reference(reference_and_train_py):
    (_, losses, norms), _, logged = reference_and_train_py
    assert [r["loss"] for r in logged] == pytest.approx(losses, rel=1e-5)
    assert [r["grad_norm"] for r in logged] == pytest.approx(norms, rel=1e-5)
    assert min(norms) > 2 * GRAD_CLIP  # the clip is active at every step, else it would not be tested


def test_weights_after_three_steps_equal_the_reference(reference_and_train_py):
    (state, _, _), saved, _ = reference_and_train_py
    weights = saved["model"]
    assert weights.keys() == state.keys()
    for name, expected in state.items():
        torch.testing.assert_close(weights[name], expected, rtol=0, atol=1e-6, msg=name)
    # and the steps moved every weight measurably, so the comparison above has something to compare
    torch.manual_seed(SEED)
    initial = GPT(GPTConfig(vocab_size=PADDED_VOCAB_SIZE, **SHAPE)).state_dict()
    moved = [name for name in state if name.endswith("weight") and (state[name] - initial[name]).abs().max() > 1e-4]
    assert len(moved) == len([n for n in state if n.endswith("weight")])
