"""A small OpenAI-compatible chat-completions server for the data_gen tests (loopback only, port 0, one thread per
connection, every wait bounded). Each request is traced back to its item (image id, response type) through the
record's caption in the prompt and the system message, so faults can be scripted per item and requests counted."""
from __future__ import annotations

import json
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from data_gen.prompting import GPT_TYPES, system_message
from data_gen.records import CaptionRecord

# Faults a script may list, one per request, in order; after the script the item gets "ok".
FAULTS = ("ok", "429", "500", "slow", "malformed", "invalid", "leak", "400_echo_key", "401_echo_key")


def good_reply(record: CaptionRecord, response_type: str) -> dict:
    """A deterministic valid reply, so an interrupted-and-resumed run can be compared with an uninterrupted one."""
    labels = ", ".join(b.label for b in record.boxes) or "nothing in particular"
    if response_type == "conversation":
        return {"turns": [{"question": "What can you see?", "answer": f"I can see {labels}."},
                          {"question": "Is it a photo?", "answer": f"Yes, it is picture {record.id}."}]}
    return {"turns": [{"question": f"A {response_type} question about {record.id}?",
                       "answer": f"A {response_type} answer: {labels}."}]}


class FakeOpenAI:
    def __init__(self, records: list[CaptionRecord], scripts: dict[tuple[str, str], list[str]] | None = None,
                 retry_after: str = "0.2", slow_seconds: float = 1.5, reply_delay: float = 0.0,
                 reject_response_format: bool = False):
        self.records = list(records)
        self.scripts = {k: list(v) for k, v in (scripts or {}).items()}
        self.retry_after = retry_after
        self.slow_seconds = slow_seconds
        self.reply_delay = reply_delay
        self.reject_response_format = reject_response_format
        self.requests: Counter = Counter()  # (id, type) -> requests received
        self.arrivals: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)  # (time, fault)
        self.all_arrivals: list[float] = []
        self.with_response_format = 0
        self.tokens = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._systems = {system_message(t): t for t in GPT_TYPES}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> "FakeOpenAI":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def identify(self, body: dict) -> tuple[CaptionRecord, str]:
        messages = body["messages"]
        response_type = self._systems[messages[0]["content"]]
        user_text = "\n".join(m["content"] for m in messages if m["role"] == "user")
        matches = [r for r in self.records if f"- {r.captions[0]}\n" in user_text]
        assert len(matches) == 1, f"request matches {len(matches)} records"
        return matches[0], response_type

    def _next_fault(self, key: tuple[str, str], body: dict) -> str:
        with self._lock:
            now = time.monotonic()
            self.requests[key] += 1
            self.all_arrivals.append(now)
            if "response_format" in body:
                self.with_response_format += 1
            if self.reject_response_format and "response_format" in body:
                fault = "400_response_format"
            else:
                script = self.scripts.get(key, [])
                fault = script.pop(0) if script else "ok"
            self.arrivals[key].append((now, fault))
            return fault

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client timed out and hung up

            def _error(self, status: int, message: str, headers: dict | None = None, param: str | None = None):
                self._send(status, {"error": {"message": message, "type": "test_error", "param": param,
                                              "code": None}}, headers)

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self.path.endswith("/chat/completions"):
                    return self._error(404, f"no route {self.path}")
                record, response_type = fake.identify(body)
                key = (record.id, response_type)
                fault = fake._next_fault(key, body)
                auth = self.headers.get("Authorization", "")
                if fake.reply_delay:
                    fake._stop.wait(fake.reply_delay)
                if fault == "429":
                    return self._error(429, "Rate limit reached, slow down", {"Retry-After": fake.retry_after})
                if fault == "500":
                    return self._error(500, "The server had an error while processing your request")
                if fault == "400_response_format":
                    return self._error(400, "response_format is not supported by this model", param="response_format")
                if fault == "400_echo_key":
                    return self._error(400, f"Invalid request sent with header {auth}")
                if fault == "401_echo_key":
                    return self._error(401, f"Incorrect API key provided: {auth.removeprefix('Bearer ')}")
                if fault == "slow":  # answer nothing until well past the client's timeout, then hang up
                    fake._stop.wait(fake.slow_seconds)
                    self.close_connection = True
                    return
                if fault == "malformed":
                    content = 'Sure! Here is the conversation: {"turns": [{"question": "What'
                elif fault == "invalid":
                    content = json.dumps({"turns": [{"question": "Only a question"}]})
                elif fault == "leak":
                    content = json.dumps({"turns": [{"question": "What is shown?",
                                                     "answer": "According to the caption, a dog at [0.12, 0.40]."}]})
                else:
                    content = json.dumps(good_reply(record, response_type))
                prompt_tokens = sum(len(m["content"]) for m in body["messages"]) // 4
                completion_tokens = len(content) // 4
                with fake._lock:
                    fake.tokens["prompt"] += prompt_tokens
                    fake.tokens["completion"] += completion_tokens
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                    "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                              "total_tokens": prompt_tokens + completion_tokens},
                })

        return Handler
