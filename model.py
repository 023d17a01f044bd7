"""
The GPT-2 language model in one file, plus the one fact about its cost that everything else reuses:
the FLOPs per token (the device's peak FLOPs, and MFU, are in kit/runtime.py).

With every switch at its default this is GPT-2 exactly: learned token and position embeddings,
pre-LayerNorm blocks, causal self-attention, GELU MLP, final LayerNorm, lm_head tied to the token
embedding. The opt-in switches (rotary, qk_norm, mlp='relu2', norm='rmsnorm', tie_embeddings=False,
zero_init_proj, logit_softcap, zero_init_head) are the "modern recipe" ablation; each is one flag and
one small branch.
"""
import inspect
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

OPTIMIZERS = ("adamw", "muon")  # train.py's optimizer=; see GPT.configure_optimizers
# GPT-2's token ids (kit/tokenizer.py's encoding; tests/test_model.py checks the two agree): a literal here,
# so that the model needs torch alone
VOCAB_SIZE = 50257
PADDED_VOCAB_SIZE = 50304  # VOCAB_SIZE padded up to a multiple of 64: faster matmuls, rows never sampled
# positions per chunk of the chunked loss: the output layer holds one chunk's logits and their gradient at
# a time instead of the whole micro-batch's. On a CPU, 128 rows (26 MB of fp32 logits) stay under glibc's
# mmap threshold, so the memory is reused from chunk to chunk rather than mapped and page-faulted anew; on
# a GPU, fewer and larger kernels (512 rows: ~0.5 GB of logits, copies and gradients; not yet tuned there)
LOSS_CHUNK_ROWS = 128
LOSS_CHUNK_ROWS_GPU = 512


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, like GPT-2
    # opt-in architecture switches; defaults are GPT-2
    rotary: bool = False  # rotary position embeddings on q, k instead of the learned wpe table
    qk_norm: bool = False  # RMS-normalise q and k per head before attention
    mlp: str = "gelu"  # 'gelu' (GPT-2, tanh approximation) or 'relu2' (ReLU squared)
    norm: str = "layernorm"  # 'layernorm' or 'rmsnorm'
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix
    zero_init_proj: bool = False  # output projections start at zero, so each block starts as identity
    logit_softcap: float = 0.0  # > 0: logits = cap * tanh(logits / cap), bounded by the cap (0 = off)
    zero_init_head: bool = False  # lm_head starts at zero (uniform predictions); needs an untied head

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.mlp not in ("gelu", "relu2"):
            raise ValueError(f"mlp={self.mlp!r}: allowed are 'gelu' and 'relu2'")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm={self.norm!r}: allowed are 'layernorm' and 'rmsnorm'")
        if self.rotary and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"rotary needs an even head size, got {self.n_embd // self.n_head}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap={self.logit_softcap}: must be >= 0 (0 = off)")
        if self.zero_init_head and self.tie_embeddings:  # a zero tied head would zero the token embedding too
            raise ValueError("zero_init_head=True needs tie_embeddings=False: a tied lm_head is the token "
                             "embedding, which must not start at zero")

    @classmethod
    def from_dict(cls, d):
        """Build from a checkpoint's arguments (kit/checkpoint.py's model_args_of) or a training config,
        ignoring keys that are not fields (a training config has no vocab_size: it gets PADDED_VOCAB_SIZE)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def check_optimizer(optimizer):
    """ValueError in one line for an optimizer setting that cannot run; train.py calls it before any work."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: allowed are {', '.join(map(repr, OPTIMIZERS))}")
    if optimizer == "muon" and not hasattr(torch.optim, "Muon"):
        raise ValueError(f"optimizer='muon' needs torch >= 2.9 (torch.optim.Muon); this is torch {torch.__version__}")


class Norm(nn.Module):
    """LayerNorm with an optional bias, or RMSNorm; one class so the blocks need no branches."""

    def __init__(self, ndim, config):
        super().__init__()
        self.rms = config.norm == "rmsnorm"
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if config.bias and not self.rms else None

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


def rotary_tables(head_size, length, base=10000.0):
    """cos and sin of shape (length, head_size // 2) for positions 0..length-1."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2, dtype=torch.float32) / head_size))
    angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """Rotate pairs (first half, second half) of the head dimension of x (B, nh, T, hs)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class KVCache:
    """Keys and values of every layer for positions generated so far, so that each new token
    costs one position of compute instead of the whole context. Used by generate() only."""

    def __init__(self, n_layer, max_len):
        self.layers = [None] * n_layer
        self.max_len = max_len
        self.length = 0  # positions stored; advanced by GPT.forward once all layers have written

    def update(self, layer, k, v):
        if self.layers[layer] is None:
            B, nh, _, hs = k.shape
            shape = (B, nh, self.max_len, hs)
            self.layers[layer] = (k.new_zeros(shape), v.new_zeros(shape))
        K, V = self.layers[layer]
        end = self.length + k.size(2)
        K[:, :, self.length:end] = k
        V[:, :, self.length:end] = v
        return K[:, :, :end], V[:, :, :end]


class CausalSelfAttention(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head, self.n_embd, self.dropout = config.n_head, config.n_embd, config.dropout
        self.qk_norm, self.layer_idx = config.qk_norm, layer_idx

    def forward(self, x, rotary=None, kv_cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:
            if T > 1 and kv_cache.length > 0:  # is_causal below would misalign a block of new queries
                raise ValueError("a KV cache takes a prompt only when empty, then one token at a time")
            k, v = kv_cache.update(self.layer_idx, k, v)
        # With a cache, a single new query may look at every stored position: no mask needed.
        # Prefill (and training) is an ordinary causal square. Flash attention when available.
        is_causal = T > 1
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.relu2 = config.mlp == "relu2"

    def forward(self, x):
        x = self.c_fc(x)
        # GPT-2 used the tanh approximation of GELU; matching it keeps HF export exact
        x = F.relu(x).square() if self.relu2 else F.gelu(x, approximate="tanh")
        return self.dropout(self.c_proj(x))


class Block(nn.Module):

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = Norm(config.n_embd, config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = Norm(config.n_embd, config)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rotary, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        # registered in nanoGPT's order (wte, wpe, drop, h, ln_f): the optimizer holds its state in
        # this order, so nanoGPT can resume our checkpoints and we can resume its
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not config.rotary:
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        layers.update(drop=nn.Dropout(config.dropout),
                      h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
                      ln_f=Norm(config.n_embd, config))
        self.transformer = nn.ModuleDict(layers)
        if config.rotary:
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size)
            self.register_buffer("rotary_cos", cos, persistent=False)  # derived, so not saved
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # training settings (train.py's chunked_loss, activation_checkpointing), not the model's shape:
        # they change what is held in memory, not what is computed
        self.chunked_loss = True
        self.activation_checkpointing = False
        if config.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer), as each layer adds two of them
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                if config.zero_init_proj:
                    torch.nn.init.zeros_(p)
                else:
                    torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.zero_init_head:
            torch.nn.init.zeros_(self.lm_head.weight)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding=True):
        """Parameter count. non_embedding leaves out the position table (a lookup, and the number
        people quote); the token embedding stays in because, tied, it is also the output layer."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding and not self.config.rotary:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(self, idx, targets=None, kv_cache=None):
        """(logits, loss). Inference (no targets): the last position's logits. Training: the mean
        cross-entropy over the targets that are not -1, and with chunked_loss no logits (None): they
        exist a chunk of positions at a time only (chunked_cross_entropy)."""
        h = self.hidden_states(idx, kv_cache)
        if targets is None:
            return self.output_logits(h[:, [-1], :]), None
        if self.chunked_loss:
            return None, chunked_cross_entropy(h, self.lm_head.weight, targets, self.config.logit_softcap,
                                               self.scored_outputs())
        logits = self.output_logits(h)
        return logits, target_losses(logits.flatten(0, 1), targets.flatten(), self.scored_outputs(), "mean")

    def hidden_states(self, idx, kv_cache=None):
        """The final norm's output (B, T, n_embd): what the output layer reads."""
        B, T = idx.size()
        start = kv_cache.length if kv_cache is not None else 0
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block_size {self.config.block_size}")
        x = self.transformer.wte(idx)
        rotary = None
        if self.config.rotary:
            rotary = (self.rotary_cos[start:start + T], self.rotary_sin[start:start + T])
        else:
            x = x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device))
        x = self.transformer.drop(x)
        # recompute each block in the backward instead of keeping its activations; non-reentrant
        # checkpoint restores the RNG for the recompute, so dropout draws the same masks
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.transformer.h:
            x = checkpoint(block, x, rotary, kv_cache, use_reentrant=False) if recompute else block(x, rotary, kv_cache)
        if kv_cache is not None:
            kv_cache.length += T
        return self.transformer.ln_f(x)

    def scored_outputs(self):
        """How many of the output layer's rows are real ids: the padding rows (50257..50303) are ids the
        tokenizer never produces, so they enter neither the loss nor the evaluation."""
        return min(self.config.vocab_size, VOCAB_SIZE)

    @torch.no_grad()
    def target_logprobs(self, idx, targets):
        """log p(targets[b, t] | idx[b, :t+1]) over the scored outputs, (B, T); 0 where a target is -1.
        Chunk by chunk: an evaluation never holds the (B, T, vocab) logits either."""
        h = self.hidden_states(idx)
        return -chunked_target_losses(self.output_logits, h, targets, self.scored_outputs()).view(targets.shape)

    def output_logits(self, h):
        """Logits of the final hidden states h (..., n_embd): lm_head, then the soft cap if on. Every path
        that makes logits goes through here, so training, evaluation and sampling see the same model; the
        chunked loss applies the same cap with its derivative written out (chunked_loss_and_grads)."""
        logits = self.lm_head(h)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def muon_params(self):
        """The 2-D weight matrices inside the transformer blocks: the hidden layers Muon is made for.
        Embeddings, lm_head, norms and biases are not, and stay with AdamW. c_attn (q, k, v fused) is
        orthogonalised whole; docs/recipe.md, 'Muon', has the measurement behind that choice."""
        return [p for p in self.transformer.h.parameters() if p.dim() == 2]

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type, optimizer="adamw",
                             muon_lr=0.02, muon_momentum=0.95, muon_weight_decay=None):
        """{checkpoint key: optimizer}, each param group with its peak rate as 'initial_lr'. 'adamw':
        {'optimizer': AdamW} over every parameter.
        'muon': torch.optim.Muon over muon_params() under key 'muon', AdamW over the rest; Muon decays
        by muon_weight_decay (None: weight_decay, as AdamW). AdamW decays matrices only (not biases,
        norms) and is fused on CUDA."""
        check_optimizer(optimizer)
        muon_params = self.muon_params() if optimizer == "muon" else []
        in_muon = {id(p) for p in muon_params}
        params = [p for p in self.parameters() if p.requires_grad and id(p) not in in_muon]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        extra = dict(fused=True) if fused else dict()
        optimizers = {"optimizer": torch.optim.AdamW(groups, lr=learning_rate, betas=betas, **extra)}
        if muon_params:
            muon_decay = weight_decay if muon_weight_decay is None else muon_weight_decay
            optimizers["muon"] = torch.optim.Muon(muon_params, lr=muon_lr, momentum=muon_momentum,
                                                  weight_decay=muon_decay)
        for group in (g for opt in optimizers.values() for g in opt.param_groups):
            group["initial_lr"] = group["lr"]  # each group's peak: the schedule scales it (kit/schedule.py)
        return optimizers

    def flops_per_token(self):
        """Training FLOPs per token (forward + backward), see flops_per_token() below."""
        cfg = self.config
        matmul_params = sum(m.weight.numel() for m in self.modules() if isinstance(m, nn.Linear))
        return flops_per_token(matmul_params, cfg.n_layer, cfg.n_embd, cfg.block_size)

    @torch.no_grad()
    def generate_tokens(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, vocab_size=None,
                        use_cache=True, generator=None):
        """Yield the next token of every row, (B, 1), max_new_tokens times. With use_cache, keys and
        values are kept so each step costs one position; once the context passes block_size, learned
        positions shift, so each step re-runs the cropped window exactly as the cache-free path does.
        vocab_size keeps the padded rows of the output layer out of the draw; generator (a torch.Generator)
        makes the draws without touching the global RNG (train.py's samples)."""
        kv_cache = None
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            if use_cache and idx.size(1) <= self.config.block_size:
                if kv_cache is None:  # prefill with the whole prompt
                    kv_cache = KVCache(self.config.n_layer, self.config.block_size)
                else:
                    context = idx[:, -1:]
                logits, _ = self(context, kv_cache=kv_cache)
            else:
                logits, _ = self(context)
            idx_next = sample_next_token(logits[:, -1, :], temperature, top_k, top_p, vocab_size, generator)
            yield idx_next
            idx = torch.cat((idx, idx_next), dim=1)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, vocab_size=None,
                 stop_token=None, use_cache=True, generator=None):
        """idx (B, T) followed by up to max_new_tokens sampled tokens. A row that produced stop_token
        is padded with stop_token; generation ends early once every row has stopped."""
        stopped = torch.zeros(idx.size(0), 1, dtype=torch.bool, device=idx.device)
        for idx_next in self.generate_tokens(idx, max_new_tokens, temperature, top_k, top_p, vocab_size, use_cache,
                                             generator):
            if stop_token is not None:
                idx_next = torch.where(stopped, stop_token, idx_next)
                stopped |= idx_next == stop_token
            idx = torch.cat((idx, idx_next), dim=1)
            if stop_token is not None and bool(stopped.all()):
                break
        return idx


# ----------------------------------------------------------------------------------------------
# The loss over the output layer, a chunk of positions at a time

def target_losses(logits, targets, n_outputs, reduction):
    """Cross-entropy of rows of logits (N, V) against targets (N,) over the first n_outputs columns,
    in fp32; targets of -1 are not counted ('mean' divides by the counted ones)."""
    return F.cross_entropy(logits[:, :n_outputs].float(), targets, ignore_index=-1, reduction=reduction)


def chunk_rows(h):
    return LOSS_CHUNK_ROWS if h.device.type == "cpu" else LOSS_CHUNK_ROWS_GPU


def chunked_target_losses(output_logits, h, targets, n_outputs):
    """(N,) per-target losses of hidden states h (..., C), one chunk of positions' logits at a time."""
    h, targets, rows = h.reshape(-1, h.size(-1)), targets.reshape(-1), chunk_rows(h)
    return torch.cat([target_losses(output_logits(h[i:i + rows]), targets[i:i + rows], n_outputs, "none")
                      for i in range(0, len(targets), rows)])


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of the output layer over hidden states h and its gradients, with one
    chunk of positions' logits in memory at a time. The forward writes out each chunk's gradient as soon
    as its loss is known (softmax minus one-hot, through the soft cap's derivative) and keeps only the
    gradients of h and of the weight, which are small; the backward scales them. So the logits are
    computed once, as in the plain path, and neither they, their fp32 copy nor their gradient ever exist
    for the whole batch. Plain tensor ops only: torch.compile traces the forward and the backward, so
    the compiled training step stays one graph."""

    @staticmethod
    def forward(ctx, h, weight, targets, cap, n_outputs):
        loss, grad_h, grad_weight = chunked_loss_and_grads(h, weight, targets, cap, n_outputs,
                                                           ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.save_for_backward(grad_h, grad_weight)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_weight = ctx.saved_tensors
        return (grad_h * grad_loss if ctx.needs_input_grad[0] else None,
                grad_weight * grad_loss if ctx.needs_input_grad[1] else None, None, None, None)


def chunked_loss_and_grads(h, weight, targets, cap, n_outputs, need_grad_h=False, need_grad_weight=False):
    """(summed loss in fp32, its gradient for h, for weight) of the logits h weightᵀ, soft-capped if
    cap > 0 (as GPT.output_logits), over the first n_outputs rows of weight, targets of -1 not counted.
    A gradient not asked for is an empty tensor. Per chunk: z = h Wᵀ, log-softmax in fp32, and
    g = softmax - one-hot (times 1 - tanh² under the cap), then grad_h = g W and grad_W += gᵀ h."""
    rows, targets, size = h.reshape(-1, h.size(-1)), targets.reshape(-1), chunk_rows(h)
    scored = weight[:n_outputs]  # the padding rows never enter the softmax, so their gradient stays 0
    # under autocast the matmuls run in its dtype and gᵀ h is added into an fp32 gradient; otherwise the
    # accumulation is fused into the matmul (addmm_), saving a pass over the (vocab, n_embd) gradient
    device_type = h.device.type
    fused_add = not torch.is_autocast_enabled(device_type)
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_rows = []
    grad_weight = torch.zeros_like(weight) if need_grad_weight else weight.new_empty(0)
    for i in range(0, rows.size(0), size):
        x, t = rows[i:i + size], targets[i:i + size]
        z = (x @ scored.t()).float()
        if cap > 0:
            capped = torch.tanh(z / cap)
            z = cap * capped
        logprobs = torch.log_softmax(z, dim=1)
        counted = (t != -1)[:, None]
        t = t.clamp(min=0)[:, None]
        total = total - (logprobs.gather(1, t) * counted).sum()
        if not (need_grad_h or need_grad_weight):
            continue
        g = logprobs.exp_().scatter_add_(1, t, torch.full_like(t, -1, dtype=z.dtype))  # softmax - one-hot
        if cap > 0:
            g = g * (1 - capped * capped)  # d(cap tanh(z / cap)) / dz
        g = g.to(weight.dtype if fused_add else torch.get_autocast_dtype(device_type))
        # the rows of uncounted targets (-1) are zeroed in x and in g W, (chunk, n_embd), not in g itself
        if need_grad_h:
            grad_rows.append((g @ scored) * counted)
        if need_grad_weight:
            if fused_add:
                grad_weight[:n_outputs].addmm_(g.t(), x.to(g.dtype) * counted)
            else:
                grad_weight[:n_outputs] += g.t() @ (x * counted)
    grad_h = torch.cat(grad_rows).to(h.dtype).view_as(h) if need_grad_h else h.new_empty(0)
    return total, grad_h, grad_weight


def chunked_cross_entropy(h, weight, targets, cap, n_outputs):
    """The mean cross-entropy of the output layer (weight, soft cap) over hidden states h against targets
    (-1 not counted) over the first n_outputs outputs: the same value and gradients as the full logits."""
    count = (targets != -1).sum()  # the mean is over counted targets, as F.cross_entropy's
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return ChunkedCrossEntropy.apply(h, weight, targets, cap, n_outputs) / count
    return chunked_loss_and_grads(h, weight, targets, cap, n_outputs)[0] / count  # evaluation: no gradients


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, vocab_size=None, generator=None):
    """One token per row from logits (B, V): temperature 0 is greedy; top_k keeps the k most likely;
    top_p keeps the smallest set whose probability reaches p (always at least one token)."""
    logits = logits.float().clone()  # masked in place below; the caller's tensor stays as it was
    if vocab_size is not None:
        logits[:, vocab_size:] = -float("inf")
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    # shifted so that the top logit is 0 and the temperature kept within float32: a tiny one then gives the top
    # token probability 1 (greedy, the limit) and a huge one equal odds, instead of 0/0 or inf/inf = nan
    finfo = torch.finfo(logits.dtype)
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / min(max(temperature, finfo.tiny), finfo.max)
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits[logits < v[:, [-1]]] = -float("inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # mass before this token already reaches p
        drop[:, 0] = False  # the most likely token stays, even for a top_p that is 0 in float32 (1e-300)
        sorted_logits[drop] = -float("inf")
        logits = torch.full_like(logits, -float("inf")).scatter(1, sorted_idx, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


# ----------------------------------------------------------------------------------------------
# Cost: the one FLOPs formula, used by train.py, bench.py and the MFU figures (the peaks are in kit/runtime.py).

def flops_per_token(matmul_params, n_layer, n_embd, seq_len):
    """Training FLOPs per token, forward + backward: 6 per weight of every matmul (2 forward, 4
    backward; lm_head included, embedding lookups excluded) plus attention's QK^T and AV products,
    2 * 2 * seq_len * n_embd per layer forward, times 3 for the backward. As in the PaLM paper,
    attention is counted over the full square although causal kernels skip half of it."""
    return 6 * matmul_params + 12 * n_layer * n_embd * seq_len
