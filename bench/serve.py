"""Throughput and time to first token of `llava-pipeline serve` with 1, 4 and 16 concurrent clients, against
one-at-a-time serving of the same requests, in one run.

Two servers of the same model run side by side as real `llava-pipeline serve` processes: one with `--max-batch 1`
(one request at a time, as LLaVA's model worker serves) and one with continuous batching (`--max-batch 16`). The
same greedy requests (an image and a question each) go to them as streaming requests:
- one-at-a-time: one client sends the requests one after another to the `--max-batch 1` server (the baseline);
- queued: 16 clients at once on the `--max-batch 1` server (what users of a batch-1 worker see: same throughput,
  a long wait for the first token);
- batched: 1, 4 and 16 clients at once on the batching server.
"vs queued" compares with the batch-1 server kept busy by 16 clients: the server-side gain alone, without the
client round trips that leave a one-client server idle between requests.
Arms alternate within every round, so load from other processes hits them alike. Aggregate tokens/s counts
completion tokens (from `usage`) over an arm's wall time; TTFT is the time from sending a request to its first text. Every
arm's answers are compared with the one-at-a-time answers (batching must not change greedy outputs). Reported:
each arm's median tokens/s over the rounds (a shared machine makes single rounds vary) and TTFT over all requests.

    python bench/serve.py --model runs/demo/instruct/final --image-folder runs/demo/scenes/heldout/images
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

QUESTIONS = ["Describe the image in detail.", "What shapes are in the image?", "What color is the largest shape?",
             "How many shapes are there?", "Where is the circle?", "What is in the image?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, image_folder: Path, max_batch: int, threads: int | None):
    port = free_port()
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    process = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", "--model", model, "--port", str(port),
                                "--max-batch", str(max_batch), "--max-queue", "256", "--device", "cpu",
                                "--image-folder", str(image_folder)],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                return process, url, json.loads(response.read())["model"]
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server with --max-batch {max_batch} did not start") from None
            time.sleep(0.5)


async def one_request(url: str, model: str, message: dict, max_tokens: int):
    """One streaming request over a raw HTTP/1.1 connection: (answer, completion tokens, seconds to first text).

    A few lines of asyncio instead of the `openai` client, whose per-chunk parsing (pydantic models) costs more CPU
    than the tiny demo model's decode step: with it, 16 clients measured the client, not the server.
    """
    host, port = urlsplit(url).hostname, urlsplit(url).port
    body = json.dumps({"model": model, "messages": [message], "temperature": 0, "max_tokens": max_tokens,
                       "stream": True, "stream_options": {"include_usage": True}}).encode()
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{url}: {head.decode(errors='replace')} {await reader.read()}")
    first, pieces, usage, buffer = None, [], None, b""
    while True:  # chunked transfer encoding: a hex size line, that many bytes, CRLF; size 0 ends the body
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        buffer += (await reader.readexactly(size + 2))[:-2]
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = first or time.perf_counter() - start
                pieces.append(chunk["choices"][0]["delta"]["content"])
    writer.close()
    return "".join(pieces), usage["completion_tokens"], first if first is not None else time.perf_counter() - start


async def run_arm(url: str, model: str, messages: list[dict], clients: int, max_tokens: int) -> dict:
    """`clients` workers take the requests in order; returns wall time, tokens, TTFTs and answers."""
    results: list = [None] * len(messages)
    next_index = iter(range(len(messages)))

    async def worker():
        for i in next_index:
            results[i] = await one_request(url, model, messages[i], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    wall = time.perf_counter() - start
    return {"wall": wall, "tokens": sum(r[1] for r in results), "ttft": [r[2] for r in results],
            "answers": [r[0] for r in results]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="trained model directory")
    parser.add_argument("--image-folder", type=Path, required=True, help="images to ask about (png/jpg)")
    parser.add_argument("--requests", type=int, default=32, help="requests per arm (default 32)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="every arm runs once per round (default 5)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for the servers (default: torch's choice)")
    parser.add_argument("--question", action="append", help="ask this (repeat for several; default: a mix of six "
                                                            "short and descriptive questions)")
    args = parser.parse_args(argv)

    images = sorted(p.name for p in args.image_folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if not images:
        parser.error(f"no png/jpg images in {args.image_folder}")
    questions = args.question or QUESTIONS
    chooser = random.Random(0)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": chooser.choice(images)}},
                                             {"type": "text", "text": questions[i % len(questions)]}]}
                for i in range(args.requests)]
    arms = [("one-at-a-time", 1, 1), ("queued", 1, 16), ("batched", 16, 1), ("batched", 16, 4), ("batched", 16, 16)]
    servers = {batch: start_server(args.model, args.image_folder, batch, args.threads) for batch in (1, 16)}
    totals = {arm: {"rates": [], "ttft": [], "answers": None, "same": True} for arm in arms}
    try:
        for round_ in range(args.rounds):
            for arm in arms:
                _, url, model = servers[arm[1]]
                result = asyncio.run(run_arm(url, model, messages, arm[2], args.max_tokens))
                total = totals[arm]
                total["rates"].append(result["tokens"] / result["wall"])
                total["ttft"] += result["ttft"]
                baseline = totals[arms[0]]["answers"] or result["answers"]
                total["same"] &= result["answers"] == baseline
                total["answers"] = result["answers"]
                print(f"round {round_ + 1}: {arm[0]:>13} max-batch {arm[1]:>2}, {arm[2]:>2} clients: "
                      f"{result['tokens'] / result['wall']:7.1f} tokens/s", file=sys.stderr)
    finally:
        for process, _, _ in servers.values():
            process.terminate()
            process.wait()

    rate_of = {arm: statistics.median(totals[arm]["rates"]) for arm in arms}
    print(f"model {args.model}, {args.requests} requests x {args.rounds} rounds, greedy, max_tokens "
          f"{args.max_tokens}, OMP_NUM_THREADS={args.threads or os.environ.get('OMP_NUM_THREADS', 'unset')}\n")
    print("| serving | max batch | clients | tokens/s (median of rounds) | vs one-at-a-time | vs queued | TTFT median | TTFT p90 | "
          "answers = one-at-a-time |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for arm in arms:
        total, rate = totals[arm], rate_of[arm]
        ttft = sorted(total["ttft"])
        p90 = ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))]
        print(f"| {arm[0]} | {arm[1]} | {arm[2]} | {rate:.0f} | {rate / rate_of[arms[0]]:.2f}x | "
              f"{rate / rate_of[arms[1]]:.2f}x | {statistics.median(ttft) * 1000:.0f} ms | {p90 * 1000:.0f} ms | "
              f"{'yes' if total['same'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
