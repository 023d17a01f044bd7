"""
Our GPT <-> Hugging Face GPT2LMHeadModel, both directions, in one place. Only safetensors and
huggingface_hub (runtime requirements) are needed; transformers is not imported here at all, so a
user who only trains never needs it (the tests use it to check that the export loads and agrees).

Export (export.py): config.json + model.safetensors + GPT-2 tokenizer files that
transformers.GPT2LMHeadModel / AutoTokenizer.from_pretrained(dir) load as they are.
Import (train.py --init_from=gpt2|gpt2-medium|gpt2-large|gpt2-xl|<dir>): GPT-2 weights as our
model_args and state dict.

The mapping:
- HF's Conv1D stores weights as (in, out), our nn.Linear as (out, in): those four matrices per
  layer are transposed.
- GPT-2 always has biases: a bias=False model is exported with zero biases (exact), and an
  imported model is bias=True.
- Vocabulary: we pad the output layer to PADDED_VOCAB_SIZE (50304) rows for faster matmuls; rows 50257.. are ids the
  tokenizer never produces (never inputs, never targets, masked by sample.py). The export drops
  them, so the result is a plain 50257-token GPT-2 whose logits equal ours on every real token
  and whose generate() cannot emit an id the tokenizer cannot decode. The import keeps GPT-2's 50257:
  padding would need made-up rows whose logits would join every softmax.
- Our GELU is the tanh approximation, HF's "gelu_new"; mlp='relu2' is HF's "relu2". Norm epsilon
  1e-5, attention scaled by 1/sqrt(head size), n_positions = block_size.
"""
import json
import os

import torch

from configurator import first_line
from model import PADDED_VOCAB_SIZE
from kit.tokenizer import ENCODING_NAME, EOT_TOKEN, VOCAB_SIZE

HUB_MODELS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
              "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS = {"gelu": "gelu_new", "relu2": "relu2"}  # our mlp -> HF activation_function, same maths
# the files tiktoken builds its "gpt2" encoding from; they are GPT-2's vocab.json and merges.txt
GPT2_BPE_FILES = {
    "vocab.json": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
                   "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "merges.txt": ("https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
                   "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
EXPORT_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer_config.json",
                "special_tokens_map.json", *GPT2_BPE_FILES)


# ----------------------------------------------------------------------------------------------
# export: our checkpoint -> a Hugging Face GPT-2 folder

def hf_config(model_args):
    """config.json for GPT2LMHeadModel, or ValueError naming every switch GPT-2 cannot express."""
    a = model_args
    unsupported = [f"{k}={a.get(k)!r}" for k, ok in (("rotary", False), ("qk_norm", False), ("norm", "layernorm"),
                                                    ("logit_softcap", 0.0)) if a.get(k, ok) != ok]
    if a.get("vocab_size", PADDED_VOCAB_SIZE) < VOCAB_SIZE:
        unsupported.append(f"vocab_size={a['vocab_size']} (the GPT-2 tokenizer needs {VOCAB_SIZE})")
    if unsupported:
        raise ValueError(f"GPT-2 in transformers cannot express {', '.join(unsupported)}; "
                         "only checkpoints without these switches can be exported")
    dropout = a.get("dropout", 0.0)
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": VOCAB_SIZE, "n_positions": a["block_size"], "n_embd": a["n_embd"], "n_layer": a["n_layer"],
        "n_head": a["n_head"], "n_inner": None, "activation_function": ACTIVATIONS[a.get("mlp", "gelu")],
        "layer_norm_epsilon": 1e-5, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False, "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
        "initializer_range": 0.02, "tie_word_embeddings": a.get("tie_embeddings", True),
        "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN, "use_cache": True, "dtype": "float32",
    }


def to_hf_state_dict(state_dict, model_args):
    """Our (clean) state dict -> GPT2LMHeadModel's: transposed Conv1D weights, zero biases where we
    have none, vocabulary trimmed to the tokenizer's. A tied lm_head is left out (HF re-ties it)."""
    out = {}
    for k, v in state_dict.items():
        if k == "lm_head.weight" and model_args.get("tie_embeddings", True):
            continue
        v = v.detach().float()
        if k.endswith(CONV1D_WEIGHTS):
            v = v.t()
        if k in ("transformer.wte.weight", "lm_head.weight"):
            v = v[:VOCAB_SIZE]
        out[k] = v.contiguous().clone()  # safetensors wants contiguous tensors that share no memory
    for k in list(out):  # GPT-2 has a bias wherever it has a weight, except the embeddings and lm_head
        name = k[:-len(".weight")]
        if k.endswith(".weight") and name + ".bias" not in out and not name.endswith(("wte", "wpe", "lm_head")):
            out[name + ".bias"] = torch.zeros(out[k].shape[-1] if k.endswith(CONV1D_WEIGHTS) else out[k].shape[0])
    return out


def tokenizer_files(block_size):
    """{file name: bytes} of a GPT-2 tokenizer as transformers reads it, from tiktoken's own files."""
    from tiktoken.load import read_file_cached  # tiktoken's cache: offline where it has the files
    if ENCODING_NAME != "gpt2":
        raise ValueError(f"export knows the GPT-2 tokenizer only, the project uses {ENCODING_NAME!r}")
    files = {name: read_file_cached(url, sha) for name, (url, sha) in GPT2_BPE_FILES.items()}
    eot = "<|endoftext|>"
    files["tokenizer_config.json"] = json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size, "add_prefix_space": False,
        "add_bos_token": False, "bos_token": eot, "eos_token": eot, "unk_token": eot}, indent=2).encode()
    files["special_tokens_map.json"] = json.dumps({"bos_token": eot, "eos_token": eot, "unk_token": eot}).encode()
    return files


def export_files(model_args, state_dict):
    """{file name: bytes} of the whole export folder."""
    from safetensors.torch import save
    config = hf_config(model_args)
    files = {"config.json": json.dumps(config, indent=2).encode(),
             "model.safetensors": save(to_hf_state_dict(state_dict, model_args), metadata={"format": "pt"}),
             # generation stops at the model's n_positions (transformers' pipeline would otherwise run past
             # it, to 256 new tokens, into an IndexError in the position table)
             "generation_config.json": json.dumps({"bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN,
                                                   "max_length": model_args["block_size"]}).encode()}
    files.update(tokenizer_files(model_args["block_size"]))
    return files


# ----------------------------------------------------------------------------------------------
# import: a Hugging Face GPT-2 (hub name or local folder) -> our model_args and state dict

def read_hf_folder(folder):
    """(config dict, state dict) from a save_pretrained folder: config.json + model.safetensors
    (or pytorch_model.bin, read with weights_only=True)."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds a JSON {type(config).__name__}, not an object of settings")
    weights = os.path.join(folder, "model.safetensors")
    if os.path.isfile(weights):
        from safetensors.torch import load_file
        try:
            return config, load_file(weights)
        except Exception as e:
            raise ValueError(f"{weights} is not readable: {type(e).__name__}: {first_line(e)}") from None
    weights = os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(weights):
        return config, torch.load(weights, map_location="cpu", weights_only=True)
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin (sharded models are not supported)")


def download_hf_model(name):
    """The hub model's folder in the local Hugging Face cache (downloaded when not there yet)."""
    from huggingface_hub import hf_hub_download
    try:
        for filename in ("config.json", "model.safetensors"):
            path = hf_hub_download(HUB_MODELS[name], filename)
    except Exception as e:  # offline, no network, hub error: all mean "use a local folder"
        raise ValueError(f"cannot get {name} from the Hugging Face hub ({type(e).__name__}: {first_line(e, 150)}); "
                         f"without network, pass --init_from=<folder> holding config.json and model.safetensors "
                         f"(e.g. from GPT2LMHeadModel.save_pretrained)") from None
    return os.path.dirname(path)


def model_args_from_hf(config):
    """Our model_args for a GPT-2 config.json, or ValueError when our model cannot express it."""
    problems = [f"{key}={config.get(key)!r} (a positive integer)"
                for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")
                if type(config.get(key)) is not int or config[key] < 1]
    if type(config.get("tie_word_embeddings", True)) is not bool:
        problems.append(f"tie_word_embeddings={config['tie_word_embeddings']!r} (true or false)")
    if config.get("model_type") != "gpt2":
        problems.append(f"model_type={config.get('model_type')!r} (only 'gpt2')")
    activation = config.get("activation_function", "gelu_new")
    mlp = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "relu2": "relu2"}.get(activation)
    if mlp is None:
        problems.append(f"activation_function={activation!r} (allowed: gelu_new, gelu_pytorch_tanh, relu2)")
    for key, ours in (("layer_norm_epsilon", 1e-5), ("scale_attn_weights", True),
                      ("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False)):
        if config.get(key, ours) != ours:
            problems.append(f"{key}={config[key]!r} (ours: {ours!r})")
    if config.get("n_inner") not in (None, 4 * config.get("n_embd", 0)):
        problems.append(f"n_inner={config['n_inner']} (ours: 4 * n_embd)")
    if problems:
        raise ValueError(f"cannot import this model: {'; '.join(problems)}")
    return dict(n_layer=config["n_layer"], n_head=config["n_head"], n_embd=config["n_embd"],
                block_size=config["n_positions"], vocab_size=config["vocab_size"], bias=True, rotary=False,
                qk_norm=False, mlp=mlp, norm="layernorm", tie_embeddings=config.get("tie_word_embeddings", True))


def from_hf_state_dict(hf_state, model_args):
    """GPT2LMHeadModel's state dict (with or without the 'transformer.' prefix, as the original
    gpt2 files have it) -> ours."""
    out = {}
    for k, v in hf_state.items():
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        if not k.startswith(("transformer.", "lm_head.")):
            k = "transformer." + k
        out[k] = v.t().contiguous() if k.endswith(CONV1D_WEIGHTS) else v
    if model_args["tie_embeddings"]:
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def check_init_from(init_from):
    """ValueError in one line unless init_from is one train.py knows: scratch, resume, a hub name or a folder."""
    if init_from not in ("scratch", "resume", *HUB_MODELS) and not os.path.isdir(init_from):
        raise ValueError(f"init_from={init_from!r}: allowed are scratch, resume, {', '.join(HUB_MODELS)} or a folder "
                         "holding a Hugging Face GPT-2 (config.json, model.safetensors)")


def load_gpt2(name_or_folder, block_size=None):
    """(model_args, state dict) of GPT-2 weights from the hub ('gpt2', 'gpt2-medium', 'gpt2-large',
    'gpt2-xl') or a local folder; block_size crops the position table. ValueError: one line."""
    if name_or_folder in HUB_MODELS:
        folder = download_hf_model(name_or_folder)
    elif os.path.isdir(name_or_folder):
        folder = name_or_folder
    else:
        raise ValueError(f"init_from={name_or_folder!r}: allowed are scratch, resume, {', '.join(HUB_MODELS)} "
                         "or a folder holding a Hugging Face GPT-2 (config.json, model.safetensors)")
    config, hf_state = read_hf_folder(folder)
    model_args = model_args_from_hf(config)
    state = from_hf_state_dict(hf_state, model_args)
    if block_size is not None and block_size != model_args["block_size"]:
        if block_size > model_args["block_size"]:
            raise ValueError(f"block_size={block_size} exceeds the {model_args['block_size']} positions of "
                             f"{name_or_folder}; use --block_size={model_args['block_size']} or less")
        state["transformer.wpe.weight"] = state["transformer.wpe.weight"][:block_size].clone()
        model_args["block_size"] = block_size
    from model import GPT, GPTConfig  # check every weight fits before anyone trains on it
    try:
        with torch.device("meta"):  # shapes only: no memory, no random init
            GPT(GPTConfig(**model_args)).load_state_dict(state, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{name_or_folder}: weights do not match its config.json: "
                         f"{' '.join(str(e).split())[:300]}") from None
    return model_args, state
