"""KV-cache logits equal a full forward (sampled tokens: test_switches.py); sampling options; sample.py end to end."""

import pytest
import torch

from kit.checkpoint import save_checkpoint
from inprocess import run_inprocess
from model import PADDED_VOCAB_SIZE, GPT, GPTConfig, KVCache, sample_next_token
from kit.tokenizer import EOT_TOKEN

SWITCHES = [dict(), dict(rotary=True),
            dict(qk_norm=True, mlp="relu2", norm="rmsnorm", tie_embeddings=False, bias=False, rotary=True)]


def tiny_model(seed=0, **switches):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=96, n_layer=2, n_head=2, n_embd=16, **switches)).eval()


@pytest.mark.parametrize("switches", SWITCHES, ids=["gpt2", "rotary", "all-switches"])
def test_cached_logits_match_full_forward(switches):
    model = tiny_model(**switches)
    x = torch.randint(0, 96, (2, 16))
    cache = KVCache(model.config.n_layer, model.config.block_size)
    model(x[:, :5], kv_cache=cache)
    for t in range(5, 16):
        cached, _ = model(x[:, t:t + 1], kv_cache=cache)
        full, _ = model(x[:, :t + 1])
        torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    assert cache.length == 16
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(x[:, :1], kv_cache=cache)


def test_cache_runs_one_position_per_token_until_the_context_is_full():
    model = tiny_model()
    lengths = []
    model.transformer.wte.register_forward_hook(lambda m, inp, out: lengths.append(inp[0].size(1)))
    list(model.generate_tokens(torch.zeros(1, 4, dtype=torch.long), 20, use_cache=True))
    # prefill 4, then one position per token up to 16 in the cache, then the cropped window
    assert lengths == [4] + [1] * 12 + [16] * 7
    lengths.clear()
    list(model.generate_tokens(torch.zeros(1, 4, dtype=torch.long), 20, use_cache=False))
    assert lengths == [min(n, 16) for n in range(4, 24)]


def test_greedy_batch_rows_equal_single_generations_and_stop_pads():
    model = tiny_model(seed=3)
    prompts = torch.randint(0, 96, (3, 5))
    batch = model.generate(prompts, 12, temperature=0)
    for i in range(3):
        assert torch.equal(batch[i:i + 1], model.generate(prompts[i:i + 1], 12, temperature=0))
    stop = int(batch[0, 7])  # a token row 0 emits at its 3rd step
    stopped = model.generate(prompts, 12, temperature=0, stop_token=stop)
    first = (stopped[0, 5:] == stop).nonzero()[0].item() + 5
    assert (stopped[0, first:] == stop).all()
    assert torch.equal(stopped[0, :first], batch[0, :first])


def test_sample_next_token_options():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])) + 1.0  # the last is -inf
    logits[0, 4] = 100.0  # a padded id the tokenizer cannot produce: vocab_size must mask it
    before = logits.clone()
    draws = lambda **kw: torch.cat([sample_next_token(logits, vocab_size=4, **kw) for _ in range(400)]).flatten()
    torch.manual_seed(0)
    assert set(draws().tolist()) == {0, 1, 2, 3}
    assert set(draws(top_k=2).tolist()) == {0, 1}
    assert set(draws(top_p=0.7).tolist()) == {0, 1}  # 0.5 < 0.7 <= 0.8
    assert set(draws(top_p=0.85).tolist()) == {0, 1, 2}
    assert set(draws(top_p=0.01).tolist()) == {0}
    assert set(draws(temperature=0).tolist()) == {0}
    assert sample_next_token(logits).item() == 4  # without vocab_size nothing is masked
    low = draws(temperature=0.3)
    assert (low == 0).float().mean() > (draws() == 0).float().mean()  # colder = more of the likeliest
    assert torch.equal(logits, before)  # the caller's logits are not modified


# ------------------------------------------------------------------------------------------------
# sample.py, run in-process (runpy) so each run costs no interpreter and torch start-up

def save_tiny_checkpoint(path, seed, eot_bias=0.0, iter_num=10):
    """A 1-layer model over the full GPT-2 vocabulary; eot_bias > 0 makes <|endoftext|> likely."""
    torch.manual_seed(seed)
    args = dict(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=PADDED_VOCAB_SIZE, bias=True, tie_embeddings=False)
    model = GPT(GPTConfig(**args))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # peakier distributions than a fresh init, so samples differ by seed
        model.transformer.ln_f.bias.fill_(1.0)
        model.transformer.ln_f.weight.fill_(0.1)
        model.lm_head.weight[EOT_TOKEN] = eot_bias
    save_checkpoint({"model_args": args, "model": model.state_dict(), "iter_num": iter_num,
                     "best_val_loss": 1.0}, path)


def run_sample(*args):
    """(exit code, stdout, stderr) of sample.py with these --key=value arguments, run in-process."""
    return run_inprocess("sample.py", "--device=cpu", "--dtype=float32", *args)


@pytest.fixture
def checkpoints(tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt.pt", seed=1)
    save_tiny_checkpoint(tmp_path / "best.pt", seed=2)
    return tmp_path


def test_stream_prints_what_batch_sampling_prints_and_ckpt_best_file_prompt(checkpoints):
    prompt = checkpoints / "prompt.txt"
    prompt.write_text("The café opened at dawn;")
    common = ["--num_samples=1", "--max_new_tokens=20", "--top_p=0.9", "--seed=5"]
    code, streamed, err = run_sample(f"--out_dir={checkpoints}", "--ckpt=best", f"--start=FILE:{prompt}",
                                     "--stream=True", *common)
    assert code == 0, err
    assert "best.pt" in err
    code, batch, _ = run_sample(f"--ckpt={checkpoints / 'best.pt'}", "--start=The café opened at dawn;",
                                *common)
    assert code == 0
    assert batch == streamed + "---------------\n"
    assert streamed.startswith("The café opened at dawn;") and len(streamed) > len("The café opened at dawn;\n")
    _, last, _ = run_sample(f"--out_dir={checkpoints}", "--start=The café opened at dawn;", *common)
    assert last != batch  # --ckpt=last (the default) is another model
    _, other_seed, _ = run_sample(f"--ckpt={checkpoints / 'best.pt'}", "--start=The café opened at dawn;",
                                  *common[:-1], "--seed=6")
    assert other_seed != batch


def test_batch_of_samples_and_stop_at_eot(tmp_path):
    save_tiny_checkpoint(tmp_path / "ckpt.pt", seed=1, eot_bias=0.35)
    code, out, err = run_sample(f"--out_dir={tmp_path}", "--num_samples=4", "--max_new_tokens=30",
                                "--temperature=1.0")
    assert code == 0, err
    samples = out.split("---------------\n")[:-1]
    assert len(samples) == 4 and len(set(samples)) == 4
    assert "<|endoftext|>" not in out  # each sample ends where its document ends
    code, out, _ = run_sample(f"--out_dir={tmp_path}", "--num_samples=4", "--max_new_tokens=30",
                              "--temperature=1.0", "--stop_at_eot=False")
    full_samples = out.split("---------------\n")[:-1]
    # the same draws continue past the EOT: a stopped sample is the full one cut at its first EOT
    stopped_early = [s for s, full in zip(samples, full_samples) if s != full]
    assert stopped_early
    for stopped, full in zip(samples, full_samples):
        assert stopped == full or full.startswith(stopped.rstrip("\n") + "<|endoftext|>")


@pytest.mark.parametrize("args, message", [
    (["--ckpt=best"], "no checkpoint at"),
    (["--ckpt=model.bin"], "allowed are last, best, stable"),
    (["--stream=True", "--num_samples=2"], "num_samples=1"),
    (["--top_p=0"], "top_p=0.0"),
    (["--start=FILE:/nonexistent/prompt.txt"], "not found"),
])
def test_bad_options_fail_in_one_line(tmp_path, args, message):
    save_tiny_checkpoint(tmp_path / "ckpt.pt", seed=1)
    code, out, err = run_sample(f"--out_dir={tmp_path}", *args)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_corrupt_checkpoint_fails_in_one_line(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"not a checkpoint at all")
    code, _, err = run_sample(f"--out_dir={tmp_path}")
    assert code == 2 and "not a readable checkpoint" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_compiled_forward_samples_the_same_tokens(checkpoints):
    """--compile=True compiles the forward pass generate() calls (about a minute on a CPU): the
    greedy continuation must be the eager one."""
    args = [f"--out_dir={checkpoints}", "--start=The café", "--num_samples=2", "--max_new_tokens=6",
            "--temperature=0", "--stop_at_eot=False"]
    code, eager, err = run_sample(*args)
    assert code == 0, err
    code, compiled, err = run_sample(*args, "--compile=True")
    assert code == 0, err
    assert compiled == eager



def test_sample_without_out_dir_names_the_runs_beside_it(tmp_path, monkeypatch):
    (tmp_path / "out-mine").mkdir()
    save_tiny_checkpoint(tmp_path / "out-mine" / "ckpt.pt", seed=1)
    monkeypatch.chdir(tmp_path)
    code, _, err = run_sample("--num_samples=1", "--max_new_tokens=2")
    assert code == 2 and err == ("error: no checkpoint at out/ckpt.pt; --out_dir names a training run's folder, "
                                 "e.g. out-mine\n")
