"""Configuration: config files and --key=value overrides, type-checked, with one-line errors."""
import pytest

from conftest import REPO_ROOT, run_script
from bench import train_defaults
from configurator import configure, script_defaults

DEFAULTS = dict(out_dir="out", batch_size=12, learning_rate=6e-4, compile=True, peak_flops=None, start="")


def expect_error(capsys, argv, *fragments):
    with pytest.raises(SystemExit) as exit_info:
        configure(DEFAULTS, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")  # exactly one line
    for fragment in fragments:
        assert fragment in err
    return err


def test_overrides_of_each_type():
    config = configure(DEFAULTS, ["--batch_size=32", "--learning_rate=1e-3", "--compile=False",
                                  "--out_dir=out-x", "--peak_flops=1.5e14"])
    assert config == dict(DEFAULTS, batch_size=32, learning_rate=1e-3, compile=False, out_dir="out-x",
                          peak_flops=1.5e14)


def test_int_is_accepted_for_a_float_and_becomes_a_float():
    config = configure(DEFAULTS, ["--learning_rate=1"])
    assert config["learning_rate"] == 1.0 and isinstance(config["learning_rate"], float)


def test_strings_quoted_or_bare_and_with_equals_signs():
    assert configure(DEFAULTS, ["--out_dir='my out'"])["out_dir"] == "my out"
    assert configure(DEFAULTS, ["--start=a=b=c"])["start"] == "a=b=c"
    assert configure(DEFAULTS, ["--start=x == y, said 2+2=4"])["start"] == "x == y, said 2+2=4"


def test_config_file_then_overrides_in_order(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 8\n_helper = 4\nlearning_rate = 3e-4 * _helper\n")
    config = configure(DEFAULTS, [str(cfg), "--batch_size=16"])
    assert config["batch_size"] == 16 and config["learning_rate"] == pytest.approx(1.2e-3)


def test_a_config_file_after_an_override_does_not_replace_it(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 8\nout_dir = 'out-cfg'\n")
    config = configure(DEFAULTS, ["--batch_size=16", str(cfg), "--learning_rate=1e-3"])
    assert (config["batch_size"], config["out_dir"], config["learning_rate"]) == (16, "out-cfg", 1e-3)


def test_a_type_error_names_the_value_in_force(capsys, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 8\n")
    err = expect_error(capsys, [str(cfg), "--batch_size=2.5"], "batch_size=2.5 is a float")
    assert "(now 8)" in err


def test_shell_spellings_of_booleans_and_integral_floats():
    assert configure(DEFAULTS, ["--compile=false"])["compile"] is False
    assert configure(DEFAULTS, ["--compile=TRUE"])["compile"] is True
    config = configure(DEFAULTS, ["--batch_size=1e3"])
    assert config["batch_size"] == 1000 and isinstance(config["batch_size"], int)


def test_the_shipped_configs_are_valid():
    defaults = train_defaults()
    assert "n_embd" in defaults and "learning_rate" in defaults and "VOCAB_SIZE" not in defaults
    for path in sorted((REPO_ROOT / "config").glob("train_*.py")):
        configure(defaults, [str(path)])  # exits on any unknown key or wrong type


def test_script_defaults_reads_the_settings_block_without_running_the_script(tmp_path):
    """bench.py takes train.py's settings this way: the first run of `name = literal` lines, nothing after."""
    script = tmp_path / "script.py"
    script.write_text('"""A script."""\nimport os\nos.environ.setdefault("X", "1")\n'
                      'batch_size = 12  # a comment\nname = "gpt"\nweight_decay = None\nLIMIT = 3\n'
                      'raise SystemExit("the script ran")\nlater = 5\n')
    assert script_defaults(script) == {"batch_size": 12, "name": "gpt", "weight_decay": None}
    settings = train_defaults()  # train.py's block, to its last setting and not a name of its body
    assert {"out_dir", "muon_weight_decay", "seed"} <= set(settings)
    assert not {"config", "master_process", "iter_num", "lr", "names"} & set(settings)


def test_unknown_key(capsys):
    expect_error(capsys, ["--batch_szie=8"], "unknown config key 'batch_szie'", "did you mean 'batch_size'")
    expect_error(capsys, ["--zzz=8"], "unknown config key 'zzz'", "known keys: batch_size, compile, learning_rate")


def test_wrong_type(capsys):
    expect_error(capsys, ["--batch_size=1.5"], "batch_size=1.5", "int")
    expect_error(capsys, ["--compile=1"], "compile=1", "bool")
    expect_error(capsys, ["--out_dir=3"], "out_dir=3", "str")


def test_malformed_arguments(capsys):
    expect_error(capsys, ["--batch_size"], "expected --key=value")
    expect_error(capsys, ["batch_size=3"], "expected a config file")
    expect_error(capsys, ["--batch_size=[1,"], "not a Python literal")


def test_missing_config_file(capsys, tmp_path):
    expect_error(capsys, [str(tmp_path / "nope.py")], "nope.py", "not found")


def test_config_file_with_unknown_key_or_error(capsys, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("n_embd_typo = 3\n")
    expect_error(capsys, [str(bad)], "unknown key 'n_embd_typo'")
    broken = tmp_path / "broken.py"
    broken.write_text("batch_size = 1 / 0\n")
    expect_error(capsys, [str(broken)], "ZeroDivisionError")


@pytest.mark.slow
def test_train_py_reports_a_bad_key_and_exits_2():
    proc = run_script("train.py", "--no_such_key=1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "unknown config key 'no_such_key'" in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize("arg, message", [
    ("--muon_weight_decay=-0.1", "muon_weight_decay=-0.1: must be a number >= 0 (unset: weight_decay)"),
    ("--muon_weight_decay=True", "muon_weight_decay=True: must be a number >= 0 (unset: weight_decay)"),
    ("--muon_weight_decay='x'", "muon_weight_decay='x': must be a number >= 0 (unset: weight_decay)"),
    ("--logit_softcap=-1", "logit_softcap=-1.0: must be 0 (off) or in [1e-30, 1e30]"),
    ("--logit_softcap=1e39", "logit_softcap=1e+39: must be 0 (off) or in [1e-30, 1e30]"),
    ("--logit_softcap=1e-50", "logit_softcap=1e-50: must be 0 (off) or in [1e-30, 1e30]"),
])
def test_the_per_token_switches_are_checked(capsys, arg, message):
    defaults = train_defaults()
    with pytest.raises(SystemExit) as exit_info:
        configure(defaults, [arg])
    assert exit_info.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
    assert configure(defaults, ["--muon_weight_decay=0.4"])["muon_weight_decay"] == 0.4
    assert configure(defaults, [])["muon_weight_decay"] is None  # unset: Muon decays by weight_decay


@pytest.mark.parametrize("cap", [1e-30, 1e30])
def test_the_soft_cap_at_the_edges_of_its_range_trains_with_finite_losses(cap):
    import torch
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, logit_softcap=cap))
    x = torch.randint(0, 50257, (2, 8))
    _, loss = model(x, x)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
