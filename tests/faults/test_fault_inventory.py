"""docs/reliability.md quotes the suite's figures; they must be the tables' sizes."""
from __future__ import annotations

import re
from pathlib import Path

from inventory import figures

DOC = Path(__file__).resolve().parents[2] / "docs" / "reliability.md"


def test_the_documented_figures_are_the_tables():
    text = DOC.read_text(encoding="utf-8")
    for name, value in figures().items():
        quoted = re.search(rf"(\d+) {re.escape(name)}", text)
        assert quoted, f"{DOC} does not state the number of {name}"
        assert int(quoted.group(1)) == value, f"{DOC} says {quoted.group(1)} {name}; the tables hold {value}"


def test_every_known_gap_is_listed_with_its_fix():
    from faults_lib import KNOWN_GAPS

    assert all(len(fix) > 40 for fix in KNOWN_GAPS.values())  # a reason and a fix, not a placeholder
