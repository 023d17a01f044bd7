"""The compiled training step is one graph: the chunked loss (model.ChunkedCrossEntropy) is plain tensor ops
with its gradient written out, so torch.compile traces its forward and backward instead of breaking the
graph around it. Checked with dynamo's own counters on a tiny model, for the default and each memory lever,
against the full-logits reference of tests/test_memory.py."""
import pytest
import torch

import model as model_module
from test_memory import assert_same, batches_with_ignored_targets, loss_and_grads, reference_loss, switched_model

LEVERS = {  # name: (chunked_loss, activation_checkpointing, autocast dtype)
    "default": (True, False, None),
    "full-logits": (False, False, None),
    "activation_checkpointing": (True, True, None),
    "default-bf16": (True, False, torch.bfloat16),
}


@pytest.mark.slow
@pytest.mark.parametrize("lever", list(LEVERS))
def test_the_compiled_training_step_is_one_graph(lever, monkeypatch):
    """Forward and backward of two accumulated micro-batches under torch.compile: dynamo makes one graph
    (a torch.compiler.disable, or anything else it cannot trace, splits it and counts a graph break),
    and the loss and gradients are those of the full logits. aot_eager: dynamo and AOT autograd (which
    traces the backward), without the C++ code generation that takes a minute on a CPU."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 7)  # several chunks and a short last one, traced
    chunked, recompute, dtype = LEVERS[lever]
    model = switched_model("untied-softcap", dropout=0.0)
    batches = batches_with_ignored_targets()
    ref = loss_and_grads(model, batches, lambda m, x, y: reference_loss(m, x, y).float())
    model.chunked_loss, model.activation_checkpointing = chunked, recompute
    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=backend)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        result = loss_and_grads(model, batches, lambda m, x, y: compiled(x, y)[1])
    assert backend.frame_count == 1 and not counters["graph_break"], dict(counters["graph_break"])
    if dtype is None:
        assert_same(*result, *ref)
    else:
        assert_same(*result, *ref, loss_rel=1e-2, grad_rel=5e-2)


def test_evaluation_takes_the_loss_without_gradients(monkeypatch):
    """Under no_grad (estimate_loss) the forward's loss is the same mean, and no gradient is made."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 7)
    model = switched_model("untied-softcap").eval()
    x, y = batches_with_ignored_targets(n=1)[0]
    calls = []
    forward = model_module.ChunkedCrossEntropy.forward
    monkeypatch.setattr(model_module.ChunkedCrossEntropy, "forward", staticmethod(lambda *a: calls.append(1) or forward(*a)))
    with torch.no_grad():
        loss = model(x, y)[1]
    assert not calls and not loss.requires_grad
    assert loss.item() == pytest.approx(reference_loss(model, x, y).item(), rel=1e-6)


def test_activation_checkpointing_with_the_chunked_loss_equals_the_full_logits(monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ROWS", 7)
    model = switched_model("untied-softcap", dropout=0.0)
    batches = batches_with_ignored_targets()
    ref = loss_and_grads(model, batches, lambda m, x, y: reference_loss(m, x, y).float())
    model.activation_checkpointing = True
    assert_same(*loss_and_grads(model, batches, lambda m, x, y: m(x, y)[1]), *ref)
