"""Every refusal of `llava-pipeline serve`: its HTTP status and an OpenAI error body whose message says what to fix;
limits (queue, body, image bytes and pixels, context); a client that goes away frees its batch slot; the command
line warns before opening an unprotected port to the network."""
import base64
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from serve_helpers import data_url, png_bytes

from pipeline.serve_requests import ImageLimits

ROOT = Path(__file__).resolve().parents[2]
USER = [{"role": "user", "content": "hello"}]


def request(url, method="POST", path="/v1/chat/completions", body=None, headers=None):
    """(status, headers, parsed JSON body) for one raw HTTP request; `body` is bytes or an object sent as JSON."""
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    return response.status, dict(response.getheaders()), json.loads(response.read() or b"null")


def chat(**fields):
    return {"model": "tiny", "messages": USER, "max_tokens": 4, **fields}


def image_message(url):
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "What is it?"}]}]


def assert_error(reply, status, *words, param=None):
    got_status, _, body = reply
    assert got_status == status, body
    error = body["error"]
    assert set(error) == {"message", "type", "code", "param"}
    for word in words:
        assert word in error["message"], error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture(scope="module")
def server(serve, image_folder, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.png").write_bytes(png_bytes())
    (image_folder / "link.png").symlink_to(outside / "secret.png")
    limits = ImageLimits(max_bytes=4000, max_pixels=64 * 64, folder=image_folder)
    with serve(image_limits=limits, max_body_bytes=20000) as (url, _app):
        yield url, outside


@pytest.mark.parametrize("body, words, param", [
    (b"{not json", ["not valid JSON"], None),
    (b"[1, 2]", ["must be a JSON object"], None),
    ({"messages": USER}, ["'model' is required"], "model"),
    ({"model": "tiny"}, ["'messages' must be a non-empty list"], "messages"),
    (chat(temperature=3), ["temperature=3 must be in [0, 2]"], "temperature"),
    (chat(top_p=0), ["top_p=0 must be in (0, 1]"], "top_p"),
    (chat(max_tokens=0), ["max_tokens=0 must be >= 1"], "max_tokens"),
    (chat(max_tokens="5"), ["max_tokens must be an integer"], "max_tokens"),
    (chat(seed=1.5), ["seed must be an integer"], "seed"),
    (chat(seed=2**64), [f"seed={2**64} must be in [-{2**63}, {2**64 - 1}]"], "seed"),
    (chat(stream="yes"), ["stream must be true or false"], "stream"),
    (chat(n=2), ["n=2 is not supported; only 1"], "n"),
    (chat(tools=[]), ["unsupported parameter 'tools'"], "tools"),
    (chat(stop=["a", ""]), ["stop must be"], "stop"),
    (chat(messages=[{"role": "assistant", "content": "hi"}]), ["'user' was expected"], "messages[0].role"),
    (chat(messages=USER + [{"role": "system", "content": "late"}]), ["must come before"], "messages[1].role"),
    (chat(messages=[{"role": "tool", "content": "x"}]), ["'tool' is not supported"], "messages[0].role"),
    (chat(messages=USER + [{"role": "assistant", "content": "hi"}]), ["last message must be from the user"],
     "messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), ["must be {\"type\": \"text\""],
     "messages[0].content[0].type"),
    (chat(messages=[{"role": "user", "content": "  <image> "}]), ["messages[0].content is empty"],
     "messages[0].content"),
])
def test_malformed_requests_name_the_field(server, body, words, param):
    assert_error(request(server[0], body=body), 400, *words, param=param)


@pytest.mark.parametrize("url, status, words", [
    ("https://example.com/cat.png", 400, ["does not fetch images from the network", "data:image"]),
    ("http://127.0.0.1:1/cat.png", 400, ["does not fetch images from the network"]),
    ("ftp://host/cat.png", 400, ["unsupported URL scheme 'ftp'"]),
    ("../outside/secret.png", 400, ["is outside the server's image folder"]),
    ("link.png", 400, ["is outside the server's image folder"]),  # a symlink pointing out of the folder
    ("missing.png", 400, ["no such image"]),
    ("data:text/plain;base64,aGVsbG8=", 400, ["data:image/<type>;base64,<data>"]),
    ("data:image/png;base64,@@@@", 400, ["does not decode"]),
    ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), 400, ["cannot decode image"]),
    ("data:image/png;base64," + base64.b64encode(png_bytes((65, 64))).decode(), 400,
     ["65x64 = 4160 pixels is above max_pixels=4096"]),
    ("data:image/png;base64," + base64.b64encode(os.urandom(5000)).decode(), 413,
     ["above the server's limit of 4000 bytes", "--max-image-bytes"]),
])
def test_image_urls_are_checked(server, url, status, words):
    error = assert_error(request(server[0], body=chat(messages=image_message(url))), status, *words,
                         param="messages[0].content[0].image_url.url")
    assert "Traceback" not in error["message"]


def test_absolute_paths_outside_the_folder_are_refused(server):
    secret = server[1] / "secret.png"
    for url in (str(secret), secret.as_uri()):
        assert_error(request(server[0], body=chat(messages=image_message(url))), 400, "outside")


def test_a_second_image_is_refused(server, image_folder):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "red.png"}},
                                             {"type": "image_url", "image_url": {"url": "mixed.png"}}]}]
    assert_error(request(server[0], body=chat(messages=messages)), 400, "one image per conversation")


def test_image_paths_need_an_image_folder(serve, image_folder):
    with serve() as (url, _app):
        assert_error(request(url, body=chat(messages=image_message(str(image_folder / "red.png")))), 400,
                     "--image-folder")


def test_body_limit(server):
    body = json.dumps(chat(messages=[{"role": "user", "content": "x" * 30000}])).encode()
    assert_error(request(server[0], body=body), 413, "larger than the server's limit of 20000 bytes",
                 "--max-body-bytes")
    # without a Content-Length (chunked upload) the limit holds while reading
    connection = http.client.HTTPConnection(urlsplit(server[0]).netloc, timeout=60)
    connection.request("POST", "/v1/chat/completions", (body[i:i + 4096] for i in range(0, len(body), 4096)),
                       {"Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and "20000 bytes" in json.loads(response.read())["error"]["message"]


def test_context_limits_name_the_numbers(server):
    long_text = " ".join(["red circle blue square"] * 200)
    assert_error(request(server[0], body=chat(messages=[{"role": "user", "content": long_text[:15000]}])), 400,
                 "but this model's context is 512 tokens", param="messages")
    error = assert_error(request(server[0], body=chat(max_tokens=600)), 400, "this model's context is 512 tokens",
                         "600 for the completion", param="max_tokens")
    assert error["code"] == "context_length_exceeded"


def test_unknown_model_and_route(server):
    error = assert_error(request(server[0], body=chat(model="gpt-4o")), 404, "'gpt-4o' does not exist", "'tiny'")
    assert error["code"] == "model_not_found"
    assert_error(request(server[0], "GET", "/v1/nothing"), 404, "Not Found")


def test_api_key(serve):
    with serve(api_key="s3cret") as (url, _app):
        for headers, words in (({}, "no API key was given"), ({"Authorization": "Bearer wrong"}, "not correct")):
            status, response_headers, body = request(url, body=chat(), headers=headers)
            assert_error((status, response_headers, body), 401, words, "--api-key")
            assert body["error"]["code"] == "invalid_api_key"
        assert_error(request(url, "GET", "/v1/models"), 401, "no API key")
        assert request(url, "GET", "/health")[0] == 200  # for load balancers; tells nothing about the model
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert client.chat.completions.create(model="tiny", messages=USER, max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()


def _wait_for(url, predicate, what):
    deadline = time.monotonic() + 60
    while True:
        health = request(url, "GET", "/health")[2]
        if predicate(health):
            return health
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {health}"
        time.sleep(0.05)


LONG = 300  # greedy "hello" on the test model runs this long without an end of sequence (checked below)


def _open_stream(url):
    """Start a long streaming request and read up to its first text; return the open connection and response."""
    connection = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(chat(stream=True, max_tokens=LONG,
                                                                       temperature=0)),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    while True:  # until the first piece of text: the request is generating in the batch now
        line = response.readline()
        assert line.startswith(b"data: {"), line
        if json.loads(line[6:])["choices"][0]["delta"].get("content"):
            return connection, response
        response.readline()  # the blank line after each event


def test_disconnecting_mid_stream_frees_the_batch_slot(serve):
    with serve(max_batch=2) as (url, _app):
        whole = request(url, body=chat(max_tokens=LONG, temperature=0))[2]
        assert whole["choices"][0]["finish_reason"] == "length", "the test needs an answer that runs to max_tokens"
        connection, response = _open_stream(url)
        response.close()
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        health = _wait_for(url, lambda h: h["running"] == 0, "the abandoned row to leave the batch")
        assert health["abandoned"] == 1  # it left because its client went away, not because it finished


def test_full_queue_answers_429_with_retry_after(serve):
    with serve(max_batch=1, max_queue=1) as (url, _app):
        running = _open_stream(url)  # takes the one batch slot
        _wait_for(url, lambda h: h["running"] == 1, "the first request to run")
        waiting = http.client.HTTPConnection(urlsplit(url).netloc, timeout=60)
        waiting.request("POST", "/v1/chat/completions", json.dumps(chat(max_tokens=2)),
                        {"Content-Type": "application/json"})
        _wait_for(url, lambda h: h["queued"] == 1, "the second request to queue")
        status, headers, body = request(url, body=chat())
        error = assert_error((status, headers, body), 429, "1 requests are already waiting", "--max-queue")
        assert error["type"] == "rate_limit_error" and headers["retry-after"] == "1"
        running[1].close()
        running[0].close()
        assert waiting.getresponse().status == 200  # the queued one is served once the slot frees


def test_command_line_warns_for_an_open_port_without_a_key(model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("LLAVA_PIPELINE_API_KEY", None)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", str(model_dir),
                                "--host", "0.0.0.0", "--port", str(port), "--device", "cpu"],
                               stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        lines = []
        for line in process.stderr:
            lines.append(line)
            if "Uvicorn running" in line:  # listening now
                break
        output = "".join(lines)
        assert "warning: --host 0.0.0.0 accepts connections from other machines and no --api-key is set" in output
        status, _, health = request(f"http://127.0.0.1:{port}", "GET", "/health")
        assert status == 200 and health["model"] == "model"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    assert process.returncode == 0


def test_a_failed_step_answers_500_and_the_server_goes_on(serve):
    with serve() as (url, app):
        def broken_step():
            raise RuntimeError("boom")

        app.state.engine.decoder.step = broken_step  # the engine starts a fresh decoder after a failure
        error = assert_error(request(url, body=chat()), 500, "generation failed: RuntimeError: boom")
        assert error["type"] == "server_error"
        status, _, body = request(url, body=chat())
        assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
