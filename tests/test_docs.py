"""The docs stay true: every command in README.md and docs/*.md that runs one of the project's scripts
parses with that script's own settings or options, and every link between the docs resolves.

Each command runs in this process up to the point where its script has read its arguments (the
configurator's configure(), or argparse's parse_args()) and is stopped there, so no work is done and the
settings come from the code itself: a setting added on a branch is known here as soon as it is merged."""
import argparse
import re
import runpy
import shlex
import subprocess
import sys

import pytest

import configurator
from conftest import REPO_ROOT

DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
PROJECT_SCRIPTS = {"train.py", "sample.py", "eval.py", "export.py", "bench.py", "plot.py", "forecast.py",
                   "data/fineweb/prepare.py"}


def is_project_script(path):
    return path in PROJECT_SCRIPTS or (path.startswith("benchmarks/") and path.endswith((".py", ".sh")))


def command_lines(text):
    """(command, the error it is documented to print or None) for every `python script ...` or
    `torchrun ... script` in a doc: lines of code blocks (fenced or indented) and inline code spans. A
    command shown as `$ command` followed by a line `error: ...` documents a mistake and that message."""
    lines = text.splitlines()
    found = {}
    for number, line in enumerate(lines):
        stripped = line.strip()
        candidates = re.findall(r"`([^`]+)`", line)
        if line.startswith(("    ", "\t")) or not line.startswith((" ", "|")):  # a code line, or one in a fence
            candidates.append(stripped)
        for candidate in candidates:
            prompt = candidate.startswith("$ ")
            candidate = candidate.removeprefix("$ ")
            if re.match(r"(python|torchrun|bash) \S", candidate):
                following = lines[number + 1].strip() if number + 1 < len(lines) else ""
                error = following if prompt and following.startswith("error: ") else None
                found.setdefault(candidate, error)
    return list(found.items())


def split_command(command):
    """(script, its arguments) of a command line, or None for one that runs no project script
    (python -c, python -m pytest, pip). The command ends at a pipe, `&&`, `;` or a redirection, and `...`
    stands for arguments the doc leaves out."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    words = []
    for word in lexer:
        if set(word) <= set("|&;<>"):
            break
        words += [word] if word != "..." else []
    launcher, rest = words[0], words[1:]
    if launcher == "torchrun":  # torchrun's own options come before the script
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
    if not rest or rest[0].startswith("-"):
        return None
    return rest[0], rest[1:]


def all_commands():
    found = []
    for doc in DOCS:
        for command, error in command_lines(doc.read_text()):
            parts = split_command(command)
            if parts is not None:
                found.append((doc.relative_to(REPO_ROOT).as_posix(), command, *parts, error))
    return found


class ArgumentsRead(Exception):
    """Raised where a script has read its arguments: what follows is the script's work."""


def read_arguments(script, args, monkeypatch, capsys):
    """Run `python script args` up to where it has read them. Returns (None, the settings) when they
    parse, else (the script's one-line complaint, as a user would see it on stderr, None)."""
    real_configure, real_parse_args = configurator.configure, argparse.ArgumentParser.parse_args

    def configure(defaults, argv):
        raise ArgumentsRead(real_configure(defaults, argv))

    def parse_args(parser, argv=None, namespace=None):
        raise ArgumentsRead(vars(real_parse_args(parser, argv, namespace)))

    monkeypatch.setattr(configurator, "configure", configure)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(sys, "argv", [str(REPO_ROOT / script), *args])
    monkeypatch.syspath_prepend(str((REPO_ROOT / script).parent))
    monkeypatch.chdir(REPO_ROOT)
    try:
        if script == "data/fineweb/prepare.py":  # its parse_args checks the options after argparse: all of it
            monkeypatch.setattr(argparse.ArgumentParser, "parse_args", real_parse_args)
            import prepare
            return None, vars(prepare.parse_args(args))
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    except ArgumentsRead as read:
        return None, read.args[0]
    except SystemExit as e:  # --help exits 0; a mistake exits 2 with one line on stderr
        if e.code in (0, None):
            return None, None
        return capsys.readouterr().err.strip() or f"exit status {e.code}", None
    return "the script ended without reading its arguments through configure() or argparse", None


COMMANDS = all_commands()


def test_the_docs_document_commands():
    scripts = {script for _, _, script, _, _ in COMMANDS}
    assert {"train.py", "sample.py", "eval.py", "export.py", "bench.py", "plot.py",
            "data/fineweb/prepare.py"} <= scripts


@pytest.mark.parametrize("doc, command, script, args, error", COMMANDS, ids=[f"{c[0]}: {c[1]}" for c in COMMANDS])
def test_every_documented_command_parses(doc, command, script, args, error, monkeypatch, capsys):
    """A command parses; one documented as a mistake fails with the message the doc shows."""
    assert is_project_script(script), f"{doc}: `{command}` runs {script}, which is not one of the project's scripts"
    assert (REPO_ROOT / script).is_file(), f"{doc}: `{command}`: {script} does not exist"
    for word in args:
        if re.fullmatch(r"(config|docs)/[\w./-]+\.(py|md)", word.split("=")[-1]):
            assert (REPO_ROOT / word.split("=")[-1]).is_file(), f"{doc}: `{command}`: {word} does not exist"
    if script.endswith(".sh"):
        return
    complaint, _ = read_arguments(script, args, monkeypatch, capsys)
    assert complaint == error, f"{doc}: `{command}`:\n{complaint}" + (f"\nthe doc says: {error}" if error else "")


# What each script writes inside the project, from its settings: (setting, a file it puts there or "").
OUTPUTS = {"train.py": [("out_dir", "ckpt.pt")], "eval.py": [("out_dir", "evals.jsonl")],
           "export.py": [("to", "config.json")], "plot.py": [("out", "")], "bench.py": [("profile_file", "")],
           "data/fineweb/prepare.py": [("out_dir", name) for name in ("train.bin", "val.bin", "meta.json",
                                                                     "prepare.lock", "prepare.work/manifest.json")],
           "benchmarks/ablation.py": [("out_root", "baseline/train.log")],
           "benchmarks/muon_qkv.py": [("out_root", "whole/ckpt.pt")]}


def written_paths(script, settings):
    """The project-relative paths a command with these settings writes (outside the project: none)."""
    paths = []
    for key, name in OUTPUTS.get(script, []):
        if settings.get(key) and (key != "profile_file" or settings.get("profile")):
            path = (REPO_ROOT / str(settings[key]) / name).resolve()
            if path.is_relative_to(REPO_ROOT) and not path.is_relative_to(REPO_ROOT / "docs"):  # docs/: figures
                paths.append(path.relative_to(REPO_ROOT).as_posix())
    return paths


def test_what_the_documented_commands_write_is_git_ignored(monkeypatch, capsys):
    """Following the docs leaves nothing for `git status` to show (and nothing a test could trip on)."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    written = {}
    for doc, command, script, args, error in COMMANDS:
        if error is not None or script not in OUTPUTS:
            continue
        _, settings = read_arguments(script, args, monkeypatch, capsys)
        for path in written_paths(script, settings or {}):
            written.setdefault(path, f"{doc}: `{command}`")
    assert "hf_model/config.json" in written and "out-fineweb-cpu/ckpt.pt" in written
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], input="\n".join(written), text=True,
                             capture_output=True, cwd=REPO_ROOT).stdout.split()
    assert {path: source for path, source in written.items() if path not in ignored} == {}


def github_anchor(heading):
    """The #fragment GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path):
    return {github_anchor(line.lstrip("#")) for line in path.read_text().splitlines() if line.startswith("#")}


LINKS = [(doc, target) for doc in DOCS for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
         if not re.match(r"[a-z]+://|mailto:", target)]


def link_problem(doc, target):
    """None if a relative link of doc resolves (file, and heading if it names one), else what is wrong."""
    path_part, _, fragment = target.partition("#")
    path = (doc.parent / path_part).resolve() if path_part else doc
    if not path.exists():
        return f"{doc.name}: link {target!r}: {path_part} does not exist"
    if fragment and (path.suffix != ".md" or fragment not in anchors(path)):
        return f"{doc.name}: link {target!r}: no heading #{fragment} in {path.name}"
    return None


@pytest.mark.parametrize("doc, target", LINKS, ids=[f"{d.name} -> {t}" for d, t in LINKS])
def test_every_link_between_the_docs_resolves(doc, target):
    assert link_problem(doc, target) is None


# The checks themselves, on broken docs: each must be caught.
@pytest.mark.parametrize("line, complaint", [
    ("    python train.py config/train_fineweb_cpu.py --batch_szie=8", "unknown config key 'batch_szie'"),
    ("    python train.py config/train_fineweb_cpu.py --batch_size=1.5", "batch_size=1.5 is a float"),
    ("    python train.py config/train_fineweb_tiny.py", "config file 'config/train_fineweb_tiny.py' not found"),
    ("The curve: `python plot.py out-fineweb-cpu --outfile=loss.png`.", "unknown config key 'outfile'"),
    ("    torchrun --standalone --nproc_per_node=2 train.py --dtpye=float16", "did you mean 'dtype'"),
    ("    python data/fineweb/prepare.py --max_tokenz 40000000", "unrecognized arguments: --max_tokenz"),
    ("    python data/fineweb/prepare.py --max_tokens forty", "invalid int value: 'forty'"),
    ("    python benchmarks/ablation.py --workers=2", "unrecognized arguments: --workers=2"),
    ("Stop it early: `python train.py ... --max_iter=5 | head -3`.", "did you mean 'max_iters'"),
])
def test_a_broken_command_in_a_doc_is_caught(line, complaint, monkeypatch, capsys):
    [(command, _)] = command_lines(line)
    script, args = split_command(command)
    assert complaint in (read_arguments(script, args, monkeypatch, capsys)[0] or "")


def test_a_documented_error_must_be_the_one_the_script_prints():
    text = "    $ python train.py --batch_size=0\n    error: batch_size=0: must be at least 1\n"
    assert command_lines(text) == [("python train.py --batch_size=0", "error: batch_size=0: must be at least 1")]


def test_a_broken_link_is_caught(tmp_path):
    (tmp_path / "a.md").write_text("# A guide\n## Its first part\n")
    doc = tmp_path / "b.md"
    assert link_problem(doc, "a.md#its-first-part") is None
    assert "no heading #its-second-part" in link_problem(doc, "a.md#its-second-part")
    assert "does not exist" in link_problem(doc, "c.md")
