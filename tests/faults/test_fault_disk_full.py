"""Disk full while writing: the write fails half way with ENOSPC (the writer is made to put half its bytes on disk and
then raise, as the kernel does; one test uses a real full tmpfs where mounting is allowed). Every time: the error
names the file, the previous version of the file is intact, no temporary is left, and a rerun completes the work
without redoing what was finished."""
from __future__ import annotations

import errno
import io
import json
import os
import pathlib
import subprocess
from pathlib import Path

import pytest
import torch

from faults_lib import TRAIN_RUN, digest, temp_leftovers, tree_digest

pytestmark = pytest.mark.timeout(300)


def enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def is_temp_of(path, name: str) -> bool:
    return Path(path).name.startswith(f".{name}.") and Path(path).name.endswith(".tmp")


def fail_text(monkeypatch, name: str) -> None:
    """Path.write_text of the temporary for `name` writes half, then the disk is full."""
    original = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        if is_temp_of(self, name):
            original(self, text[: len(text) // 2], *args, **kwargs)
            raise enospc(self)
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def fail_safetensors(monkeypatch, name: str) -> None:
    import safetensors.torch

    original = safetensors.torch.save_file

    def save_file(tensors, filename, metadata=None):
        if is_temp_of(filename, name):
            data = safetensors.torch.save(tensors, metadata=metadata)
            Path(filename).write_bytes(data[: len(data) // 2])
            raise enospc(filename)
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def fail_torch_save(monkeypatch, predicate) -> None:
    original = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and predicate(str(f)):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            Path(f).write_bytes(buffer.getvalue()[: buffer.tell() // 2])
            raise enospc(f)
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


# ---- single files: the atomic writers -------------------------------------------------------------------------------

def _write_json(path):
    from llava.io import atomic_write_json

    atomic_write_json(path, {"new": list(range(1000))})


def _write_safetensors(path):
    from llava.io import atomic_save_safetensors

    atomic_save_safetensors({"w": torch.ones(1000)}, path)


def _write_tokenizer(path):
    from faults_lib import make_tokenizer

    make_tokenizer(path)


def _fail_bytes(monkeypatch, name):
    original = pathlib.Path.write_bytes

    def write_bytes(self, data):
        if is_temp_of(self, name):
            original(self, data[: len(data) // 2])
            raise enospc(self)
        return original(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


WRITERS = [
    ("atomic_write_json", "report.json", _write_json, fail_text),
    ("atomic_save_safetensors", "weights.safetensors", _write_safetensors, fail_safetensors),
    ("Tokenizer.train", "tokenizer.model", _write_tokenizer, _fail_bytes),
]


@pytest.mark.parametrize("name, file, write, fail", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_full_disk_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch, name, file, write, fail):
    path = tmp_path / file
    path.write_bytes(b"previous version")
    fail(monkeypatch, file)
    with pytest.raises(OSError) as info:
        write(path)
    assert info.value.errno == errno.ENOSPC and file in str(info.value)
    assert path.read_bytes() == b"previous version" and not temp_leftovers(tmp_path)
    monkeypatch.undo()
    write(path)  # space again: the same call completes
    assert path.read_bytes() != b"previous version" and not temp_leftovers(tmp_path)


def can_mount_tmpfs(target: Path) -> bool:
    target.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(target)], capture_output=True,
                              timeout=10)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def test_a_really_full_tmpfs(tmp_path):
    """The kernel's own ENOSPC, on a 256 KiB tmpfs (skipped where mounting is not allowed)."""
    from llava.io import atomic_write_json

    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("mounting a tmpfs is not allowed here")
    try:
        path = disk / "out.json"
        atomic_write_json(path, {"version": 1})
        before = digest(path)
        with open(disk / "filler", "wb", buffering=0) as filler:  # fill the rest of the disk
            try:
                while True:
                    filler.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        with pytest.raises(OSError) as info:
            atomic_write_json(path, {"version": 2, "data": "x" * 300_000})
        assert info.value.errno == errno.ENOSPC
        assert digest(path) == before and not temp_leftovers(disk)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=10)


# ---- a model directory written over an older one ----------------------------------------------------------------

def test_a_failed_overwrite_of_a_model_does_not_load_as_a_mix(tmp_path, monkeypatch):
    from llava.model import Llama

    path = tmp_path / "llm"
    old, new = Llama.from_name("tiny").init_weights(seed=0), Llama.from_name("tiny").init_weights(seed=1)
    old.save_hf(path, max_shard_bytes=100_000)
    shards = sorted(path.glob("model-*.safetensors"))
    fail_safetensors(monkeypatch, shards[1].name)
    with pytest.raises(OSError):
        new.save_hf(path, max_shard_bytes=100_000)
    monkeypatch.undo()
    try:
        loaded = Llama.from_hf(path)
    except Exception:  # noqa: BLE001 - refusing to load is the right outcome
        return
    state, old_state = loaded.state_dict(), old.state_dict()
    assert all(torch.equal(state[k], old_state[k]) for k in old_state), "new and old weights mixed"


# ---- the training checkpoint ---------------------------------------------------------------------------------------

def test_disk_full_during_a_checkpoint_save(tmp_path, monkeypatch, reference_run):
    """The model-states file of the step-4 save runs out of space: the run stops with the file named, step 2 is
    intact, step 4 does not look complete, and the same command resumes from step 2 to the uninterrupted result."""
    import fault_task
    from stages import checkpoint as ckpt

    weights, rows, reference_dir = reference_run
    fail_torch_save(monkeypatch, lambda f: ckpt.tag_for(4) in f and f.endswith("model_states.pt"))
    with pytest.raises(OSError) as info:
        fault_task.train(tmp_path, **TRAIN_RUN)
    assert info.value.errno == errno.ENOSPC and "step_00000004" in str(info.value)
    root = tmp_path / "checkpoints"
    assert [p.name for p in ckpt.complete_checkpoints(root)] == ["step_00000002"]
    assert not (root / "step_00000004" / ckpt.MARKER).exists()
    saved = ckpt.consolidate_checkpoint(root / "step_00000002")
    expected = ckpt.consolidate_checkpoint(reference_dir / "checkpoints" / "step_00000002")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert not temp_leftovers(tmp_path)

    monkeypatch.undo()
    trainer, result = fault_task.train(tmp_path, **TRAIN_RUN)
    state = trainer.state_dict()
    assert result.step == 8 and max(float((state[k] - weights[k]).abs().max()) for k in weights) < 1e-6
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [r["step"] for r in rows]


# ---- data generation --------------------------------------------------------------------------------------------------

def test_disk_full_writing_the_generated_data(tmp_path, monkeypatch):
    """The output JSON cannot be written: the previous output stays, every finished item stays in the cache, and the
    rerun writes the output without generating anything again."""
    from data_gen.driver import generate
    from datagen_fixtures import photo_records, write_jsonl

    captions = write_jsonl(tmp_path / "captions.jsonl", photo_records(4))
    out = tmp_path / "out.json"
    first = generate(captions, out, backend="offline", types=["conversation"], progress=False, limit=2)
    previous = digest(out)
    cache_before = (tmp_path / "out.cache.jsonl").read_bytes()
    fail_text(monkeypatch, "out.json")
    with pytest.raises(OSError) as info:
        generate(captions, out, backend="offline", types=["conversation"], progress=False)
    assert info.value.errno == errno.ENOSPC and "out.json" in str(info.value)
    assert digest(out) == previous and not temp_leftovers(tmp_path)
    cache = (tmp_path / "out.cache.jsonl").read_bytes()
    assert cache.startswith(cache_before) and cache.count(b"\n") == 4  # the two new items were kept

    monkeypatch.undo()
    summary = generate(captions, out, backend="offline", types=["conversation"], progress=False)
    assert summary["already_done"] == 4 and summary["generated"] == 0 and summary["written"] == 4
    assert first["written"] == 2 and len(json.loads(out.read_text())) == 4
    assert tree_digest(tmp_path)  # readable, nothing torn
