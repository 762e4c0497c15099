"""The GPT backend against a local fake OpenAI-compatible server that injects faults per item."""
from __future__ import annotations

import json

import pytest

from data_gen.driver import generate
from data_gen.openai_backend import BackendFatal, OpenAIBackend, OpenAIConfig, RequestRateLimiter
from data_gen.prompting import pick_detail_question
from datagen_fixtures import TEST_KEY, photo_records, write_jsonl
from fake_openai_server import FakeOpenAI, good_reply

pytestmark = pytest.mark.timeout(120)
TYPES = ("conversation", "detail", "reasoning")


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", TEST_KEY)


def fast_config(server: FakeOpenAI, **overrides) -> OpenAIConfig:
    options = dict(model="fake-model", base_url=server.base_url, timeout=1.0, max_retries=5, max_reasks=2,
                   base_delay=0.01, max_delay=0.05, price_in=2.0, price_out=8.0)
    options.update(overrides)
    return OpenAIConfig(**options)


def run(tmp_path, records, server, workers=4, **overrides) -> dict:
    path = write_jsonl(tmp_path / "captions.jsonl", records)
    return generate(path, tmp_path / "out.json", backend="openai", types=TYPES, workers=workers, progress=False,
                    openai_config=fast_config(server, **overrides))


def read_all_files(folder) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in folder.rglob("*") if p.is_file())


def test_every_fault_recovers_and_each_item_is_written_once(tmp_path):
    records = photo_records(6)
    scripts = {
        ("img000", "conversation"): ["429", "ok"],
        ("img001", "detail"): ["500", "500", "ok"],
        ("img002", "reasoning"): ["slow", "ok"],
        ("img003", "conversation"): ["malformed", "ok"],
        ("img004", "detail"): ["invalid", "ok"],
        ("img005", "conversation"): ["429", "500", "slow", "malformed", "invalid", "ok"],
    }
    with FakeOpenAI(records, scripts, retry_after="0.3", slow_seconds=2.5) as server:
        summary = run(tmp_path, records, server)
    assert summary["failed"] == 0 and summary["written"] == 18 and summary["filtered"] == 0
    data = json.loads((tmp_path / "out.json").read_text())
    ids = [sample["id"] for sample in data]
    assert len(ids) == len(set(ids)) == 18
    assert ids == [f"{r.id}_{t}" for r in records for t in TYPES]  # input order, not completion order
    for (record_id, response_type), script in scripts.items():
        assert server.requests[(record_id, response_type)] == len(script)
    assert all(server.requests[(r.id, t)] == 1 for r in records for t in TYPES if (r.id, t) not in scripts)
    # Retry-After is respected: the retry after the 429 came at least 0.3 s later
    (t429, fault), (t_retry, _) = server.arrivals[("img000", "conversation")]
    assert fault == "429" and t_retry - t429 >= 0.3
    # the reply content is what the server sent, and the detail question is the drawn one
    by_id = {sample["id"]: sample for sample in data}
    expected = good_reply(records[3], "conversation")["turns"]
    conv = by_id["img003_conversation"]["conversations"]
    assert [c["value"] for c in conv] == ["<image>\n" + expected[0]["question"], expected[0]["answer"],
                                          expected[1]["question"], expected[1]["answer"]]
    assert by_id["img001_detail"]["conversations"][0]["value"] == "<image>\n" + pick_detail_question(0, "img001")
    usage = summary["usage"]
    assert usage["requests"] == sum(server.requests.values())
    assert usage["input_tokens"] == server.tokens["prompt"] and usage["output_tokens"] == server.tokens["completion"]
    assert usage["cost_usd"] == pytest.approx(usage["input_tokens"] * 2e-6 + usage["output_tokens"] * 8e-6)
    assert usage["reasks"] == 4 and usage["retries"] >= 5


def test_exhausted_retries_and_reasks_fail_with_reasons_and_a_rerun_retries_only_them(tmp_path):
    records = photo_records(3)
    scripts = {("img000", "conversation"): ["500"] * 3, ("img001", "reasoning"): ["invalid"] * 2}
    with FakeOpenAI(records, scripts) as server:
        summary = run(tmp_path, records, server, max_retries=2, max_reasks=1)
    assert summary["failed"] == 2 and summary["written"] == 7
    failures = [json.loads(line) for line in (tmp_path / "out.failures.jsonl").read_text().splitlines()]
    reasons = {(f["id"], f["type"]): f["reason"] for f in failures}
    assert reasons[("img000", "conversation")].startswith("gave up after 3 tries: HTTP 500")
    assert reasons[("img001", "reasoning")].startswith("invalid reply after 2 asks")
    before = dict(server.requests)
    with FakeOpenAI(records) as healthy:
        summary = run(tmp_path, records, healthy)
    assert summary["failed"] == 0 and summary["written"] == 9 and summary["already_done"] == 7
    assert dict(healthy.requests) == {("img000", "conversation"): 1, ("img001", "reasoning"): 1}
    assert before[("img000", "conversation")] == 3
    assert (tmp_path / "out.failures.jsonl").read_text() == ""


def test_endpoint_without_json_mode_falls_back_once(tmp_path):
    records = photo_records(4)
    with FakeOpenAI(records, reject_response_format=True) as server:
        summary = run(tmp_path, records, server, workers=1)
    assert summary["failed"] == 0 and summary["written"] == 12
    assert server.with_response_format == 1  # rejected once, then never sent again
    assert sum(server.requests.values()) == 13


def test_leaking_reply_is_filtered_counted_and_not_asked_again(tmp_path):
    records = photo_records(2)
    with FakeOpenAI(records, {("img001", "detail"): ["leak"]}) as server:
        summary = run(tmp_path, records, server)
    assert summary["filtered"] == 1 and summary["written"] == 5
    assert "img001_detail" not in {s["id"] for s in json.loads((tmp_path / "out.json").read_text())}
    with FakeOpenAI(records) as again:
        summary = run(tmp_path, records, again)
    assert sum(again.requests.values()) == 0 and summary["filtered"] == 1


def test_key_is_never_written_even_when_the_server_echoes_it(tmp_path, caplog):
    records = photo_records(2)
    caplog.set_level("DEBUG")
    with FakeOpenAI(records, {("img000", "detail"): ["400_echo_key"] * 2}) as server:
        summary = run(tmp_path, records, server)
    assert summary["failed"] == 1
    failures = (tmp_path / "out.failures.jsonl").read_text()
    assert "400" in failures and "***" in failures
    assert TEST_KEY not in read_all_files(tmp_path) and TEST_KEY not in caplog.text


def test_rejected_key_stops_the_run_with_a_redacted_message(tmp_path):
    records = photo_records(2)
    with FakeOpenAI(records, {(r.id, t): ["401_echo_key"] for r in records for t in TYPES}) as server:
        with pytest.raises(BackendFatal) as error:
            run(tmp_path, records, server, workers=1)
    assert "401" in str(error.value) and "OPENAI_API_KEY" in str(error.value)
    assert TEST_KEY not in str(error.value) and "DO-NOT-LEAK" not in str(error.value)


def test_missing_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    with pytest.raises(BackendFatal, match="OPENAI_API_KEY is not set"):
        OpenAIBackend(OpenAIConfig())


def test_request_rate_limit_spaces_requests(tmp_path):
    records = photo_records(2)
    with FakeOpenAI(records) as server:
        summary = run(tmp_path, records, server, workers=3, rpm=600)  # one request per 0.1 s
    assert summary["written"] == 6
    arrivals = sorted(server.all_arrivals)
    assert len(arrivals) == 6
    assert arrivals[-1] - arrivals[0] >= 0.4  # five intervals of 0.1 s, less network jitter
    assert min(b - a for a, b in zip(arrivals, arrivals[1:])) >= 0.05


def test_rate_limiter_without_limit_does_not_wait():
    limiter = RequestRateLimiter(0)
    assert limiter.interval == 0
    limiter.wait()
