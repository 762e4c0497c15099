"""LLaVA-Bench-style judging: the GPT judge through the openai client against a loopback OpenAI-compatible server,
and the offline token-F1 judge."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.evaluate import main
from pipeline.judge import OfflineJudge, OpenAIJudge, Review, parse_score_pair, relative_scores, token_f1


class FakeChatServer:
    """Answers /v1/chat/completions like an OpenAI endpoint: the reply's first line scores Assistant 1 with 8 and
    Assistant 2 with 6 when its answer contains the reference's first word, else 2; one question gets a reply that
    is not a score line. Requests are recorded."""

    def __init__(self):
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                prompt = body["messages"][1]["content"]
                reference = prompt.split("[Assistant 1]\n")[1].split("\n")[0]
                answer = prompt.split("[Assistant 2]\n")[1].split("\n")[0]
                if "UNREADABLE" in answer:
                    content = "I cannot decide."
                else:
                    score = 6 if reference.split()[0].lower() in answer.lower() else 2
                    content = f"8 {score}\nAssistant 2 is {'close' if score == 6 else 'off'}."
                reply = {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": content}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def chat_server():
    server = FakeChatServer()
    yield server
    server.close()


def test_parse_score_pair():
    assert parse_score_pair("8 6\nbecause") == (8.0, 6.0)
    assert parse_score_pair("8, 6.5") == (8.0, 6.5)
    assert parse_score_pair("(7, 3)\n") == (7.0, 3.0)
    assert parse_score_pair("Assistant 1: 8") is None
    assert parse_score_pair("8 6 4") is None
    assert parse_score_pair("80 6") is None
    assert parse_score_pair("") is None


def test_offline_judge_is_token_f1_mapped_to_1_10():
    judge = OfflineJudge()
    assert judge.score("", "q", "a red circle", "The red circle.").answer_score == 10.0
    assert judge.score("", "q", "red circle", "blue square").answer_score == 1.0
    partial = judge.score("", "q", "a large red circle", "a red square")
    assert partial.answer_score == pytest.approx(1 + 9 * token_f1("red square", "large red circle"))
    assert token_f1("red square", "large red circle") == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    assert partial.reference_score == 10.0


def test_relative_scores_leave_unreadable_reviews_out():
    table = relative_scores([("conv", Review(8, 6, "")), ("conv", Review(None, None, "?")),
                             ("detail", Review(10, 10, ""))])
    assert table["conv"] == {"count": 2, "unreadable": 1, "reference": 80.0, "answer": 60.0, "relative": 75.0}
    assert table["all"]["relative"] == pytest.approx(round(100 * 8 / 9, 1))


def test_openai_judge_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        OpenAIJudge(model="m")


def test_openai_judge_cli_against_a_loopback_server(tmp_path, monkeypatch, chat_server, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    questions, answers, context = tmp_path / "q.jsonl", tmp_path / "a.jsonl", tmp_path / "context.jsonl"
    qs = [{"question_id": 1, "image": "a.png", "text": "Describe it.", "category": "detail",
           "answer": "A red circle on gray."},
          {"question_id": 2, "image": "b.png", "text": "What is there?", "category": "conv", "answer": "Blue square."},
          {"question_id": 3, "image": "a.png", "text": "Why?", "category": "conv", "answer": "Red because."}]
    ans = ["A red circle is in the middle.", "A green triangle.", "UNREADABLE"]
    questions.write_text("".join(json.dumps(q) + "\n" for q in qs))
    answers.write_text("".join(json.dumps({"question_id": q["question_id"], "prompt": q["text"], "text": a,
                                           "answer_id": str(i), "model_id": "m", "metadata": {}}) + "\n"
                               for i, (q, a) in enumerate(zip(qs, ans))))
    context.write_text(json.dumps({"image": "a.png", "caption": ["A red circle.", "Gray background."]}) + "\n")
    code = main(["--question-file", str(questions), "--answers-file", str(answers), "--judge", "openai",
                 "--judge-model", "judge-model-x", "--judge-base-url", chat_server.url, "--context", str(context),
                 "--judge-workers", "2"])
    assert code == 0
    assert len(chat_server.requests) == 3
    first = next(r for r in chat_server.requests if "Describe it." in r["body"]["messages"][1]["content"])
    assert first["path"] == "/v1/chat/completions"
    assert first["auth"] == "Bearer sk-test-not-a-real-key"
    assert first["body"]["model"] == "judge-model-x"
    assert first["body"]["messages"][0]["role"] == "system"
    user = first["body"]["messages"][1]["content"]
    assert user.startswith("[Context]\nA red circle.\nGray background.\n\n[Question]\nDescribe it.")
    assert "[Assistant 1]\nA red circle on gray." in user and "[Assistant 2]\nA red circle is in the middle." in user
    reviews = [json.loads(line) for line in (tmp_path / "a.reviews.jsonl").read_text().splitlines()]
    assert [r["tuple"] for r in reviews] == [[8.0, 6.0], [8.0, 2.0], [None, None]]
    saved = json.loads((tmp_path / "a.scores.json").read_text())["judge"]["scores"]
    assert saved["detail"]["relative"] == 75.0
    assert saved["conv"]["relative"] == 25.0 and saved["conv"]["unreadable"] == 1
    assert saved["all"]["relative"] == 50.0
    out = capsys.readouterr().out
    assert "relative" in out and "judge-model-x" in out
    for path in tmp_path.iterdir():  # the key never lands in an output file
        assert "sk-test-not-a-real-key" not in path.read_text()


def test_offline_judge_cli(tmp_path):
    questions, answers = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "text": "q", "answer": "a red circle"}) + "\n")
    answers.write_text(json.dumps({"question_id": 1, "prompt": "q", "text": "red circle", "answer_id": "x",
                                   "model_id": "m", "metadata": {}}) + "\n")
    assert main(["--question-file", str(questions), "--answers-file", str(answers), "--judge", "offline"]) == 0
    saved = json.loads((tmp_path / "a.scores.json").read_text())
    assert saved["judge"]["scores"]["all"]["relative"] == 100.0
    assert saved["exact_match"]["overall"]["accuracy"] == 1.0
