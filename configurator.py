"""
Command-line configuration for train.py, sample.py and the other scripts:

    python train.py config/train_fineweb.py --batch_size=8 --compile=False --out_dir='out-x'

Each script keeps its defaults as plain globals; `configure(defaults, argv)` applies config files
(plain Python assignments, run in order) and then the `--key=value` overrides, wherever they stand
on the command line, and returns the result.
`--help` lists every setting with its value (the config files' where they set it) and its comment.
Values are Python literals checked against the default's type (an int is accepted for a float;
a bare word is taken as a string where the default is a string; a None default accepts any literal).
Every value is then checked against RULES, so a count of 0 or a negative learning rate stops the
script before it builds a model or reads data. Anything wrong ends the program with one line naming
the problem and exit status 2.
"""
import ast
import difflib
import io
import math
import os
import signal
import sys
import tokenize

# What a setting allows, for every script that has it (a name means the same thing in every script).
# A new setting with a limit is one line here. Choices among names (device, dtype, lr_schedule,
# data_order, mlp, norm, init_from, resume_from, ckpt) are checked by the module that owns the list,
# which each script calls at start.
AT_LEAST_1 = (lambda v: v >= 1, "must be at least 1")
AT_LEAST_0 = (lambda v: v >= 0, "must be >= 0")
BELOW_1 = (lambda v: 0 <= v < 1, "must be in [0, 1)")
UP_TO_1 = (lambda v: 0 < v <= 1, "must be in (0, 1]")
NOT_EMPTY = (lambda v: v.strip() != "", "must not be empty")
RATE = (lambda v: 0 <= v <= 1e30, "must be in [0, 1e30] (the optimizers' float32 steps overflow not far above)")
RULES = {
    "out_dir": NOT_EMPTY,
    "dataset": NOT_EMPTY,
    "batch_size": AT_LEAST_1,
    "gradient_accumulation_steps": AT_LEAST_1,
    "block_size": AT_LEAST_1,
    "n_layer": AT_LEAST_1,
    "n_head": AT_LEAST_1,
    "n_embd": AT_LEAST_1,
    "dropout": BELOW_1,
    "eval_interval": AT_LEAST_1,
    "log_interval": AT_LEAST_1,
    "eval_iters": AT_LEAST_1,
    "max_iters": AT_LEAST_0,
    "learning_rate": RATE,
    "min_lr": RATE,
    "weight_decay": AT_LEAST_0,
    "beta1": BELOW_1,
    "beta2": BELOW_1,
    "grad_clip": AT_LEAST_0,  # 0 disables clipping
    "warmup_iters": AT_LEAST_0,
    "lr_decay_iters": AT_LEAST_0,
    "peak_flops": AT_LEAST_0,  # 0 looks the device up
    "muon_lr": RATE,
    "muon_momentum": BELOW_1,
    "muon_weight_decay": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0,
                          "must be a number >= 0 (unset: weight_decay)"),
    # cap * tanh(logits / cap) in float32: a cap outside float32's comfortable range makes every loss NaN
    "logit_softcap": (lambda v: v == 0 or 1e-30 <= v <= 1e30, "must be 0 (off) or in [1e-30, 1e30]"),
    "seed": AT_LEAST_0,
    "hellaswag_interval": AT_LEAST_0,  # 0 = off
    "hellaswag_limit": AT_LEAST_0,  # 0 = every example
    "sample_tokens": AT_LEAST_0,  # 0 = off
    "max_hours": AT_LEAST_0,  # 0 = no time budget
    # eval.py
    "limit": AT_LEAST_0,  # 0 = every HellaSwag example
    "val_tokens": (lambda v: v == 0 or v >= 2, "must be 0 (all of val.bin) or at least 2 (a token and the one "
                                               "it predicts)"),
    # sample.py
    "num_samples": AT_LEAST_1,
    "max_new_tokens": AT_LEAST_1,
    "temperature": (lambda v: v >= 0, "must be >= 0 (0 = greedy)"),
    "top_k": (lambda v: v >= 0, "must be >= 0 (0 disables)"),
    "top_p": UP_TO_1,
    # export.py: an unset shell variable (--to=) must not name the current folder
    "to": NOT_EMPTY,
    # bench.py
    "bench_iters": AT_LEAST_1,
    "bench_warmup": AT_LEAST_0,
    "profile_file": NOT_EMPTY,
}


def check_rules(config):
    """Exit with one line at the first value its RULES entry does not allow."""
    for key, value in config.items():
        if key in RULES and value is not None:
            allowed, description = RULES[key]
            if not allowed(value):
                fail(f"{key}={value!r}: {description}")


# Ctrl-C, a scheduler's SIGTERM, and SIGHUP: a closed terminal or a dropped ssh connection (not on Windows)
STOP_SIGNALS = [signal.SIGINT, signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])


def handle_signals(signals, handler):
    """signal.signal(s, handler) for each of signals, except those ignored when the process started: under
    nohup a closed terminal's SIGHUP must not stop a run. The previous handlers, to restore."""
    return {s: signal.signal(s, handler) for s in signals if signal.getsignal(s) is not signal.SIG_IGN}


def fail(message, status=2):
    """The one way every script ends on a problem the user can fix: one line on stderr, exit status 2
    (1 for a run that went wrong after it started). Under torchrun every rank calls it and only rank 0
    prints; an open DDP process group is closed first so that no rank is left waiting."""
    print_error(message)
    dist = sys.modules.get("torch.distributed")  # looked up, not imported: prepare.py runs without torch
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(status)


def print_error(message):
    """fail's one line: on stderr, from rank 0 only under torchrun; stdout flushed first, so that the lines
    before it are not lost when the process ends at once (os._exit) behind a pipe."""
    if int(os.environ.get("RANK", "0")) == 0:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe or stream: the line below is what matters
                pass
        print(f"error: {message}", file=sys.stderr, flush=True)


def first_line(error, limit=200):
    """An exception's first line, for the one-line messages: library errors can run to pages."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def unknown_key_hint(key, config):
    """'did you mean ...' for a typo, else the full list of keys."""
    close = difflib.get_close_matches(key, config, n=3)
    if close:
        return "did you mean " + " or ".join(map(repr, close)) + "?"
    return "known keys: " + ", ".join(sorted(config))


def check_type(key, value, default, current=None):
    """The value to store for key, or exit with a message when its type does not fit the default's.
    current: the value in force (a config file's), named in the message."""
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            value = int(value)  # --max_iters=1e3
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            value = float(value) if ok else value
        except OverflowError:  # an int beyond any float: refused below, as inf is
            value = math.inf if value > 0 else -math.inf
    else:
        ok = isinstance(value, type(default))
    if not ok:
        current = default if current is None else current
        fail(f"{key}={value!r} is a {type(value).__name__}, but {key} takes a {type(default).__name__} "
             f"(now {current!r})")
    # what torch takes, for every setting: a 64-bit integer (sizes, counts, seeds), a finite float (1e999 is inf)
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        fail(f"{key}={value}: out of range, integers must be in [-2**63, 2**63) (torch's int64)")
    if isinstance(value, float) and not math.isfinite(value):
        fail(f"{key}={value}: must be a finite number")
    return value


def parse_value(key, text, default):
    if isinstance(default, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"  # --compile=false, as a shell user writes it
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if isinstance(default, str) or default is None:
            return text  # --init_from=resume: a bare word is a string
        fail(f"--{key}={text}: not a Python literal (e.g. 12, 3e-4, True, 'text')")


def apply_config_file(config, path):
    if not os.path.isfile(path):
        fail(f"config file {path!r} not found")
    namespace = dict(config)
    try:
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), namespace)
    except Exception as e:  # a config file is user code: report its error in one line
        fail(f"config file {path!r} failed: {type(e).__name__}: {e}")
    for key, value in namespace.items():
        if key.startswith("_") or callable(value) or type(value).__name__ == "module":
            continue
        if key not in config:
            fail(f"config file {path!r} sets unknown key {key!r}; {unknown_key_hint(key, config)}")
        config[key] = check_type(key, value, config[key], config[key])


def configure(defaults, argv):
    """defaults: {name: default value}; argv: sys.argv[1:]. Returns the final config dict. Config files
    apply first, in their order, and --key=value overrides after them wherever they stand: an override
    always wins. --help prints the settings with the values so far, commented as in the script's
    source (help_sources)."""
    config = dict(defaults)
    files = [arg for arg in argv if not arg.startswith("-")]
    for arg in files:
        if not arg.endswith(".py"):
            fail(f"argument {arg!r}: expected a config file (*.py) or --key=value")
        apply_config_file(config, arg)
    for arg in argv:
        if arg in ("--help", "-h"):
            print(settings_help(config, help_sources()))
            sys.exit(0)
        if arg in files:
            continue
        if "=" not in arg or not arg.startswith("--"):
            fail(f"argument {arg!r}: expected --key=value")
        key, text = arg[2:].split("=", 1)  # only the first '=': values may contain '='
        if key not in config:
            fail(f"unknown config key {key!r}; {unknown_key_hint(key, config)}")
        config[key] = check_type(key, parse_value(key, text, defaults[key]), defaults[key], config[key])
    check_rules(config)
    return config


def config_globals(namespace):
    """The configurable names of a script: its public globals of plain value types, except
    UPPER_CASE constants (imported facts such as VOCAB_SIZE are not settings)."""
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, type(None)))}


def script_defaults(path):
    """A script's settings and their defaults, read from its source without running it: the first run of
    `name = literal` lines at its top level (train.py's settings block, for bench.py)."""
    with open(path, encoding="utf-8") as f:
        statements = ast.parse(f.read(), path).body
    defaults = {}
    for statement in statements:
        try:
            name, = (target.id for target in statement.targets)
            value = ast.literal_eval(statement.value)
        except (AttributeError, ValueError, TypeError, SyntaxError):  # not a literal assignment to one name
            if defaults:
                break
            continue
        defaults[name] = value
    return config_globals(defaults)


def help_sources():
    """The files whose comments describe the running script's settings: its own, or the list it names in
    SETTINGS_SOURCES (bench.py: train.py's, then its own)."""
    script = sys.modules["__main__"]
    return getattr(script, "SETTINGS_SOURCES", None) or [script.__file__]


def setting_lines(path):
    """[(comment lines above, name, trailing comment)] for each `name = value  # comment` line of a
    script (or `name=value,  # comment` in a dict of defaults), in order: the settings block as written."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {t.start[0]: t.string.lstrip("#").strip() for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    found, above = [], []
    for number, line in enumerate(source.splitlines(), start=1):
        code = line.split("#", 1)[0].strip() if number in comments else line.strip()
        if not code:  # a comment line (separators of dashes aside) or a blank one
            text = comments.get(number, "")
            above = above + [text] if text.strip("-") else []
            continue
        name = code.split("=", 1)[0].strip() if "=" in code else ""
        found.append((above, name, comments.get(number, "")))
        above = []
    return found


def settings_help(config, sources):
    """Every key of config as --key=value with its comment, grouped under the comment lines above it,
    as the settings appear in the sources; keys no source comments on come last."""
    lines = [f"usage: python {os.path.basename(sources[-1])} [config.py ...] [--key=value ...]",
             "(values as set by the config files given)"]
    listed = set()
    width = min(max(len(f"--{k}={v!r}") for k, v in config.items()) + 2, 40)
    for path in sources:
        for above, name, comment in setting_lines(path):
            if name not in config or name in listed:
                continue
            lines += [""] + above if above else []
            lines.append(f"  {f'--{name}={config[name]!r}':<{width}}  {comment}".rstrip())
            listed.add(name)
    rest = [f"  --{k}={v!r}" for k, v in config.items() if k not in listed]
    return "\n".join(lines + ([""] + rest if rest else []))
