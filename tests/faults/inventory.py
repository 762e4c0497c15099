"""The suite's figures, counted from its tables (docs/reliability.md quotes them; test_fault_inventory checks that
the document and the tables agree). `python tests/faults/inventory.py` prints them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "data_gen"))

BAD_INPUT_TABLES = {  # module: table names; each row is one bad input, checked in every mode that applies
    "test_fault_instruct_rows": ["ROW_FAULTS"],
    "test_fault_instruct_files": ["FILE_FAULTS"],
    "test_fault_shards": ["SHARD_FAULTS", "WRITER_FAULTS"],
    "test_fault_line_files": ["CAPTION_FAULTS", "QUESTION_FAULTS", "MODE_CASES"],
    "test_fault_config": ["CONFIG_FAULTS"],
    "test_fault_checkpoints": ["SHAPE_FAULTS"],
    "test_fault_security": ["EVAL_IMAGE_FAULTS"],
}
KILL_TABLES = {"test_fault_kill": ["TRAIN_KILLS", "GENERATE_KILLS", "RUNNER_KILLS"]}
DISK_FULL_TABLES = {"test_fault_disk_full": ["WRITERS"]}
DISK_FULL_SINGLE_TESTS = 4  # real tmpfs, model overwrite, checkpoint save, generated data
PICKLE_TABLES = {"test_fault_security": ["PICKLE_LOADERS"]}


def _count(tables: dict) -> int:
    import importlib

    return sum(len(getattr(importlib.import_module(module), name)) for module, names in tables.items()
               for name in names)


def figures() -> dict[str, int]:
    return {"bad-input cases": _count(BAD_INPUT_TABLES), "kill points": _count(KILL_TABLES),
            "disk-full cases": _count(DISK_FULL_TABLES) + DISK_FULL_SINGLE_TESTS,
            "pickle loaders": _count(PICKLE_TABLES)}


if __name__ == "__main__":
    for name, value in figures().items():
        print(f"{value} {name}")
