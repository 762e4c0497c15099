"""Every `llava-pipeline` command shown in README.md and docs/*.md parses: the subcommand exists and its parser accepts
the flags and values as written. The parsers are the real ones: each subcommand's handler is called with the
documented arguments, and its `parse_args` is stopped right after parsing, before anything runs.

The command-line help is checked too: `llava-pipeline --help` lists every subcommand with one line, and each
subcommand's help says what it reads and what it writes.
"""
from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

from pipeline.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PROGRAM = re.compile(r"^(?:\S*/)?llava-pipeline$")  # llava-pipeline, .venv/bin/llava-pipeline


class Parsed(Exception):
    """Raised by the patched parse_args: the arguments parsed, stop before the handler runs anything."""


def fenced_commands(page: Path) -> list[tuple[str, list[str]]]:
    """(page:line, argv after `llava-pipeline`) of each command in the page's fenced code blocks."""
    commands, in_code, pending, start = [], False, "", 0
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), start=1):
        if line.lstrip().startswith("```"):
            in_code, pending = not in_code, ""
            continue
        if not in_code:
            continue
        if not pending:
            start = number
        pending += line.rstrip().removesuffix("\\") + " "
        if line.rstrip().endswith("\\"):
            continue
        text, pending = pending, ""
        try:
            words = shlex.split(text, comments=True)
        except ValueError:  # not shell (JSON, Python): nothing to check
            continue
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):  # VAR=value before the program
            words = words[1:]
        if words and PROGRAM.match(words[0]):
            argv = words[1:]
            for separator in ("|", "&&", ";", ">", "2>", "&"):
                if separator in argv:
                    argv = argv[:argv.index(separator)]
            commands.append((f"{page.relative_to(REPO)}:{start}", argv))
    return commands


DOCUMENTED = [case for page in PAGES for case in fenced_commands(page)]


def test_the_docs_show_commands_for_every_stage():
    shown = {argv[0] for _, argv in DOCUMENTED if argv}
    missing = [name for name in SUBCOMMANDS if name not in shown]
    assert not missing, f"subcommands never shown in README.md or docs/: {missing}"


@pytest.mark.parametrize("where,argv", DOCUMENTED, ids=[w for w, _ in DOCUMENTED])
def test_documented_command_parses(where, argv, monkeypatch, capsys):
    assert argv, f"{where}: `llava-pipeline` with no subcommand"
    if argv[0] in ("-h", "--help"):
        return
    assert argv[0] in SUBCOMMANDS, f"{where}: unknown subcommand {argv[0]!r}"
    for method in ("parse_args", "parse_intermixed_args"):
        def parse_only(self, args=None, namespace=None, _original=getattr(argparse.ArgumentParser, method)):
            namespace = _original(self, args, namespace)  # exits 2 with the parser's message on a wrong flag or value
            raise Parsed(namespace)

        monkeypatch.setattr(argparse.ArgumentParser, method, parse_only)
    module_name, func_name = SUBCOMMANDS[argv[0]][0].split(":")
    handler = getattr(importlib.import_module(module_name), func_name)
    try:
        handler(argv[1:])
    except Parsed:
        return
    except SystemExit as e:
        pytest.fail(f"{where}: `llava-pipeline {shlex.join(argv)}` does not parse (exit {e.code}):\n"
                    f"{capsys.readouterr().err[-1500:]}")
    pytest.fail(f"{where}: the {argv[0]} handler returned without parsing its arguments")


def test_top_level_help_lists_every_subcommand_in_one_line_each(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(SUBCOMMANDS)


@pytest.mark.parametrize("name", list(SUBCOMMANDS))
def test_each_subcommand_help_says_what_it_reads_and_writes(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert re.search(r"\bReads:", text) and re.search(r"\bWrites:", text), f"{name} --help:\n{text}"
