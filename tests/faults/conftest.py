"""The fault suite imports its helpers from this folder, and the fake OpenAI server from tests/data_gen."""
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "data_gen"))


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from faults_lib import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """(final weights, metrics rows, output dir) of an uninterrupted run with TRAIN_RUN."""
    import json

    import fault_task
    from faults_lib import TRAIN_RUN

    out = tmp_path_factory.mktemp("reference")
    trainer, _ = fault_task.train(out, **TRAIN_RUN)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return trainer.state_dict(), rows, out
