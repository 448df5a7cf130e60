"""The README's examples run as written (issue 13): every ```python block is executed, and every
command of its "Command line" section parses; the ones on ``table.npy`` run on a tiny table.

A block that cannot run here says why on its first line (``# not run: <reason>``); such blocks are
only compiled, so they still have to be valid Python.
"""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

from embcompress import cli

README = Path(__file__).resolve().parent.parent / "README.md"
NOT_RUN = "# not run:"


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    text = README.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start()) + 2, match.group(1))
            for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M)]


def command_lines() -> list[str]:
    """The commands of the "Command line" section's code block, comments stripped."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Command line\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"^```\w*\n(.*?)^```", section, flags=re.S | re.M)
    assert block, "README's Command line section has no code block"
    commands = [shlex.split(line, comments=True) for line in block.group(1).splitlines()]
    return [" ".join(shlex.quote(word) for word in words) for words in commands if words]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    return tmp_path


def test_readme_has_examples():
    assert len(python_blocks()) >= 3
    assert {words.split()[1] for words in command_lines()} >= {"methods", "compress", "evaluate", "inspect", "demo"}


@pytest.mark.parametrize("line, code", [pytest.param(line, code, id=f"line{line}") for line, code in python_blocks()])
def test_python_block_runs(line, code, in_tmp, capsys):
    compiled = compile(code, f"README.md:{line}", "exec")
    if code.startswith(NOT_RUN):
        reason = code.splitlines()[0][len(NOT_RUN):].strip()
        assert reason, f"README.md:{line}: '{NOT_RUN}' needs a reason"
        pytest.skip(f"README.md:{line}: {reason}")
    exec(compiled, {"__name__": f"readme_line{line}"})
    assert capsys.readouterr().out.strip(), f"README.md:{line}: the example printed nothing"


@pytest.mark.parametrize("command", command_lines())
def test_command_parses(command):
    words = shlex.split(command)
    assert words[0] == "embcompress"
    args = cli.build_parser().parse_args(words[1:])
    assert args.command == words[1]


def test_table_commands_run(in_tmp, capsys):
    """The commands that read ``table.npy`` run as written on a tiny one, then ``inspect`` shows the header."""
    np.save("table.npy", np.random.default_rng(0).standard_normal((300, 16), dtype=np.float32))
    commands = [shlex.split(c)[1:] for c in command_lines() if "table.npy" in c]
    assert commands, "README's Command line section shows no command on table.npy"
    for number, words in enumerate(commands):
        if number and "--force" not in words:
            Path("table.emb").unlink()  # each command writes table.emb; only --force may replace it
        assert cli.main(["-q", *words]) == 0, words
        assert cli.main(["inspect", "table.emb"]) == 0
        shown = capsys.readouterr().out
        assert "spec" in shown and "fit" in shown, shown
    assert cli.main(["methods", "-v"]) == 0
