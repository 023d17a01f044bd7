"""The GPT-2 model: shapes, initial loss, learning, tying, parameter counts."""
import math

import pytest
import torch

from model import PADDED_VOCAB_SIZE, GPT, GPTConfig

REFERENCE_40M = dict(n_layer=12, n_head=12, n_embd=384, block_size=1024, bias=False, vocab_size=PADDED_VOCAB_SIZE)


def tiny_config(**overrides):
    return GPTConfig(**{**dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, bias=False), **overrides})


def test_output_shapes_training_and_inference():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    idx = torch.randint(0, 64, (3, 16))
    logits, loss = model(idx, idx)  # the chunked loss: no logits
    assert logits is None and loss.shape == ()
    model.chunked_loss = False  # the plain loss, over the logits of every position
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 64) and loss.shape == ()
    logits, loss = model(idx)  # inference: last position only
    assert logits.shape == (3, 1, 64) and loss is None


def test_loss_at_init_is_uniform_for_the_40m_shape():
    """At GPT-2 initialisation the logits are near zero, so the loss on random next tokens is close
    to ln(vocab). (Targets equal to the inputs would score lower: tied embeddings favour them.)"""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**REFERENCE_40M))
    idx, targets = torch.randint(0, 50257, (2, 2, 128))
    with torch.no_grad():
        _, loss = model(idx, targets)
    assert abs(loss.item() - math.log(PADDED_VOCAB_SIZE)) < 0.15


def test_parameter_count_of_the_reference_config():
    """The reference user's model: ~40.6M parameters without position embeddings (not 124M)."""
    model = GPT(GPTConfig(**REFERENCE_40M))
    C, L, V = 384, 12, PADDED_VOCAB_SIZE
    per_layer = 12 * C * C + 2 * C  # attention 4C^2 + MLP 8C^2, two LayerNorm weights (no biases)
    expected = V * C + L * per_layer + C  # tied wte/lm_head, blocks, final LayerNorm
    assert model.get_num_params() == expected
    assert round(model.get_num_params() / 1e6, 1) == 40.6
    assert model.get_num_params(non_embedding=False) == expected + 1024 * C


def test_gpt2_small_has_124m_parameters():
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, bias=True, vocab_size=50257))
    assert round(model.get_num_params(non_embedding=False) / 1e6) == 124


def test_weight_tying():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    untied = GPT(tiny_config(tie_embeddings=False))
    assert untied.lm_head.weight is not untied.transformer.wte.weight


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_head=4, n_embd=256, block_size=16, vocab_size=64))
    std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * 8)) < 0.0005
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.001


@pytest.mark.parametrize("switches", [{}, dict(rotary=True, qk_norm=True, mlp="relu2", norm="rmsnorm",
                                               tie_embeddings=False)])
def test_tiny_model_overfits_one_batch(switches):
    torch.manual_seed(0)
    model = GPT(tiny_config(**switches))
    idx = torch.randint(0, 64, (4, 16))
    optimizer = model.configure_optimizers(0.0, 3e-3, (0.9, 0.95), "cpu")["optimizer"]
    for _ in range(200):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5


def test_weight_decay_only_on_matrices():
    model = GPT(tiny_config(bias=True))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")["optimizer"]
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])
    n_params = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in optimizer.param_groups for p in g["params"]) == n_params


def test_the_vocabulary_size_is_the_tokenizers():
    """model.py holds VOCAB_SIZE as a literal so that it needs torch alone; it must be the tokenizer's."""
    from kit import tokenizer
    import model
    assert model.VOCAB_SIZE == tokenizer.VOCAB_SIZE == tokenizer.get_encoding().n_vocab
    assert model.PADDED_VOCAB_SIZE >= model.VOCAB_SIZE and model.PADDED_VOCAB_SIZE % 64 == 0


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="n_embd=100 must be divisible by n_head=3"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="mlp='swiglu'"):
        GPTConfig(mlp="swiglu")
