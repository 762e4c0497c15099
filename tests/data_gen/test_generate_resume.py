"""The driver: kill -9 and resume, torn cache lines, cache guards, LLaVA output format, the leak filter, the CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_gen.cli import generate_main
from data_gen.driver import CacheError, GenerationCache, generate, leak_reason, to_llava
from data_gen.openai_backend import OpenAIConfig
from data_gen.records import InputError
from data_gen.scenes import render_scenes
from datagen_fixtures import TEST_KEY, photo_records, write_jsonl
from fake_openai_server import FakeOpenAI

REPO = Path(__file__).resolve().parents[2]
TYPES = ["conversation", "detail", "reasoning"]
pytestmark = pytest.mark.timeout(180)


def cached_keys(path: Path) -> set[tuple[str, str]]:
    keys = set()
    for line in path.read_bytes().split(b"\n"):
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # the torn last line, if the kill hit a write
        keys.add((entry["id"], entry["type"]))
    return keys


def cli_command(server: FakeOpenAI, captions: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "generate", "--backend", "openai", "--model", "fake-model",
            "--base-url", server.base_url, "--input", str(captions), "--out", str(out), "--workers", "2",
            "--types", ",".join(TYPES), "--base-delay", "0.01", "--timeout", "5", "--no-progress", "--verbose"]


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    records = photo_records(12)
    captions = write_jsonl(tmp_path / "captions.jsonl", records)
    faults = {("img010", "conversation"): ["429", "ok"], ("img011", "detail"): ["500", "ok"]}
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)
    with FakeOpenAI(records, faults, retry_after="0.05") as server:
        generate(captions, tmp_path / "reference" / "out.json", backend="openai", types=TYPES, workers=2,
                 progress=False, openai_config=OpenAIConfig(model="fake-model", base_url=server.base_url,
                                                            base_delay=0.01))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "run" / "out.json"
    cache = tmp_path / "run" / "out.cache.jsonl"
    with FakeOpenAI(records, faults, retry_after="0.05", reply_delay=0.1) as server:
        victim = subprocess.Popen(cli_command(server, captions, out), cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (cache.exists() and len(cached_keys(cache)) >= 6):
            time.sleep(0.02)
        victim.send_signal(signal.SIGKILL)
        first_out, first_err = victim.communicate(timeout=30)
        assert victim.returncode == -signal.SIGKILL
        finished_at_kill = cached_keys(cache)
        requests_at_kill = dict(server.requests)
        assert 6 <= len(finished_at_kill) < 36 and not out.exists()

        resumed = subprocess.run(cli_command(server, captions, out), cwd=REPO, env=env, capture_output=True,
                                 timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()
    assert out.read_bytes() == (tmp_path / "reference" / "out.json").read_bytes()
    for key in finished_at_kill:  # never asked again
        assert server.requests[key] == requests_at_kill[key]
    summary = json.loads((tmp_path / "run" / "out.summary.json").read_text())
    assert summary["already_done"] == len(finished_at_kill) and summary["written"] == 36
    lines = cache.read_text().splitlines()
    assert len(lines) == len({(json.loads(x)["id"], json.loads(x)["type"]) for x in lines}) == 36
    logs = b"".join([first_out, first_err, resumed.stdout, resumed.stderr]).decode("utf-8", "replace")
    assert "retry 1 in" in logs  # --verbose logged the retries ...
    written = "".join(p.read_text(errors="replace") for p in tmp_path.rglob("*") if p.is_file())
    assert TEST_KEY not in logs and TEST_KEY not in written  # ... and the key is in neither logs nor files


@pytest.fixture
def scenes(tmp_path):
    render_scenes(tmp_path / "scenes", 20, seed=3, shards_per=10)
    return tmp_path / "scenes" / "captions.jsonl"


def test_torn_last_cache_line_is_dropped_counted_and_regenerated(tmp_path, scenes):
    types = ["conversation", "detail", "reasoning", "short_answer"]
    first = generate(scenes, tmp_path / "a" / "out.json", types=types, progress=False)
    reference = (tmp_path / "a" / "out.json").read_bytes()
    cache = tmp_path / "a" / "out.cache.jsonl"
    lines = cache.read_bytes().splitlines(keepends=True)
    cache.write_bytes(b"".join(lines[:-3]) + lines[-3][: len(lines[-3]) // 2])  # as if killed mid-write
    second = generate(scenes, tmp_path / "a" / "out.json", types=types, progress=False)
    assert first["written"] == second["written"] == 80
    assert second["torn_cache_lines_dropped"] == 1 and second["generated"] == 3 and second["already_done"] == 77
    assert (tmp_path / "a" / "out.json").read_bytes() == reference
    assert len(cache.read_bytes().splitlines()) == 80


def test_cache_guards(tmp_path, scenes):
    out = tmp_path / "out.json"
    generate(scenes, out, types=["detail"], progress=False)
    cache = tmp_path / "out.cache.jsonl"
    with GenerationCache(cache):
        with pytest.raises(CacheError, match="in use by another generate run"):
            GenerationCache(cache).__enter__()
    with FakeOpenAI([]) as server, pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", TEST_KEY)
        with pytest.raises(CacheError, match="made by 'offline'"):
            generate(scenes, out, backend="openai", types=["detail"], progress=False,
                     openai_config=OpenAIConfig(base_url=server.base_url))
    lines = cache.read_text().splitlines()
    cache.write_text("\n".join(lines[:3] + ["{not json"] + lines[3:]) + "\n")
    with pytest.raises(CacheError, match=r"out\.cache\.jsonl:4: not a cache entry"):
        generate(scenes, out, types=["detail"], progress=False)


def test_output_is_llava_format_with_one_image_tag(tmp_path, scenes):
    summary = generate(scenes, tmp_path / "out.json", types=["conversation", "short_answer"], progress=False)
    data = json.loads((tmp_path / "out.json").read_text())
    assert summary["written"] == len(data) == 40
    records = [json.loads(line) for line in scenes.read_text().splitlines()]
    assert [d["id"] for d in data] == [f"{r['id']}_{t}" for r in records for t in ("conversation", "short_answer")]
    for sample in data:
        conv = sample["conversations"]
        assert sample["image"].endswith(".png")
        assert [c["from"] for c in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert sum(c["value"].count("<image>") for c in conv) == 1
    sample = to_llava(photo_records(1)[0], "detail", [{"question": "Look <image> here", "answer": "ok"}])
    assert sample["conversations"][0]["value"] == "<image>\nLook  here"


def test_leak_filter():
    def turns(answer):
        return [{"question": "What is there?", "answer": answer}]
    assert leak_reason(turns("According to the caption, a dog sits.")) == "mentions captions"
    assert leak_reason(turns("The bounding box of the dog is large.")) == "mentions bounding boxes"
    assert leak_reason(turns("The dog is at [0.12, 0.4].")) is not None
    assert leak_reason(turns("It starts at 0.35, near the left.")) is not None
    assert leak_reason(turns("Its coordinates put it on the left.")) is not None
    assert leak_reason(turns("A dog sits on the left, next to 2 cats; it is 10.5 meters away.")) is None
    assert leak_reason([{"question": "Given the captions, what is it?", "answer": "A dog."}]) is not None


def test_bad_input_lines_name_file_line_and_key_or_are_skipped(tmp_path):
    good = photo_records(2)
    path = write_jsonl(tmp_path / "captions.jsonl", good)
    bad = {"id": "x", "image": "x.jpg", "captions": ["c"], "boxes": [{"label": "dog", "bbox": [0.5, 0.2, 0.3, 0.9]}]}
    with open(path, "a") as f:
        f.write(json.dumps(bad) + "\n{broken\n")
    with pytest.raises(InputError, match=r"captions\.jsonl:3: boxes\[0\]: key 'bbox' .* wrong order"):
        generate(path, tmp_path / "out.json", progress=False)
    summary = generate(path, tmp_path / "out.json", progress=False, skip_bad=True, types=["detail"])
    assert summary["bad_lines_skipped"] == 2 and summary["written"] == 2


def test_cli_generate_and_question_file(tmp_path, scenes, monkeypatch, capsys):
    out, questions = tmp_path / "data.json", tmp_path / "questions.jsonl"
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "--backend", "offline", "--input",
                             str(scenes), "--out", str(out), "--types", "detail,short_answer", "--questions-out",
                             str(questions), "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "wrote 40 samples" in result.stderr
    assert len(json.loads(out.read_text())) == 40
    lines = [json.loads(line) for line in questions.read_text().splitlines()]
    assert {"question_id", "image", "text", "category"} <= set(lines[0])
    with pytest.raises(SystemExit) as exit_:
        generate_main(["--input", str(scenes), "--out", str(out)])
    assert exit_.value.code == 2 and "--backend" in capsys.readouterr().err
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert generate_main(["--backend", "openai", "--input", str(scenes), "--out", str(tmp_path / "x.json")]) == 2
    assert "OPENAI_API_KEY is not set" in capsys.readouterr().err
