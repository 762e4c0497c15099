"""Whole-file faults in instruction data: nothing can be skipped, so training (stop or skip) and `validate` both stop
with a message that names the file and, where there is one, the line and column, and says what a valid file is."""
from __future__ import annotations

import re
from dataclasses import dataclass

import pytest

from faults_lib import cases, sample
from llava.data.errors import DataError
from llava.data.instruct import InstructDataset
from pipeline.validate import EXIT_BAD_ROWS, main as validate_main


@dataclass(frozen=True)
class FileFault:
    name: str
    content: bytes | None  # None: the file does not exist
    message: str  # regex, after "<file>: "


GOOD = b'{"id": "a", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}'
FILE_FAULTS = [
    FileFault("file missing", None, r"(JSON|instruction) data file not found"),
    FileFault("malformed JSON (cut off)", b"[\n" + GOOD + b",\n" + GOOD[:30], r"not valid JSON at line 3 column \d+"),
    FileFault("JSON Lines instead of a JSON list", GOOD + b"\n" + GOOD + b"\n",
              r"not valid JSON at line 2 column 1: Extra data\n.*looks like JSON Lines.*Convert it with"),
    FileFault("top level is an object", b'{"data": []}', r"the top level must be a JSON list of samples, got dict"),
    FileFault("empty dataset", b"[]", r"no usable entries \(0 malformed\)"),
    FileFault("not UTF-8", b'[{"id": "\xff\xfe"}]', r"not UTF-8 text"),
]


def write(tmp_path, fault: FileFault):
    path = tmp_path / "data.json"
    if fault.content is not None:
        path.write_bytes(fault.content)
    return path


@pytest.mark.parametrize("fault", cases(FILE_FAULTS))
@pytest.mark.parametrize("on_error", ["stop", "skip"])
def test_training_stops_with_the_file_and_position(tmp_path, tokenizer, fault, on_error):
    path = write(tmp_path, fault)
    with pytest.raises(DataError) as info:
        InstructDataset(path, tokenizer, on_error=on_error)
    training_message = fault.message.split(r"\n")[0]  # the JSON Lines hint is validate's own addition
    assert re.match(re.escape(str(path)) + ": " + training_message, str(info.value)), str(info.value)


@pytest.mark.parametrize("fault", cases(FILE_FAULTS))
def test_validate_exits_1_with_the_same_message(tmp_path, tokenizer, fault, capsys):
    path = write(tmp_path, fault)
    code = validate_main(["--data", str(path), "--tokenizer", str(tokenizer.model_file), "--workers", "0"])
    out = capsys.readouterr().out
    assert code == EXIT_BAD_ROWS
    assert re.search(re.escape(str(path)) + ": " + fault.message, out, re.DOTALL), out


def test_every_row_bad_lists_every_row(tmp_path, tokenizer):
    """No usable entry at all: the report is still the list of rows and their reasons, not one summary line."""
    path = tmp_path / "data.json"
    path.write_text("[" + ",".join(['{"id": "x%d", "conversations": []}' % i for i in range(3)]) + "]")
    code = validate_main(["--data", str(path), "--tokenizer", str(tokenizer.model_file), "--workers", "0"])
    assert code == EXIT_BAD_ROWS
    with pytest.raises(DataError, match=r"entry 0 \(id 'x0'\): 'conversations' must be a non-empty list"):
        InstructDataset(path, tokenizer)


def test_a_good_file_passes(tmp_path, tokenizer, capsys):
    from faults_lib import write_json

    path = write_json(tmp_path / "data.json", [sample("a", None), sample("b", None)])
    assert validate_main(["--data", str(path), "--tokenizer", str(tokenizer.model_file), "--workers", "0"]) == 0
    assert "bad rows: none" in capsys.readouterr().out
