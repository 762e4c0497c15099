"""`llava-pipeline serve`: a trained model behind the OpenAI Chat Completions API, with a web chat page at `/`.

Any OpenAI client (the `openai` package, LangChain, curl) talks to `POST /v1/chat/completions`: system, user and
assistant messages, user content as text or parts with one image (a `data:image/...;base64,` URL, or a path inside
`--image-folder`; the server never fetches from the network), `temperature`, `top_p`, `max_tokens`, `stop`, `seed`,
and `stream: true` for Server-Sent Events chunks exactly as OpenAI sends them. `GET /v1/models` and `GET /health`.

Concurrent requests share forward passes: the engine (pipeline/serve_engine.py) batches them continuously, so a
request that arrives while others generate joins them at the next step. The prompt is rendered with the template
saved with the model, the same way `llava-pipeline chat` renders it.

Built on FastAPI + uvicorn, the serving stack the Python ecosystem uses (vLLM, SGLang and LLaMA-Factory serve their
OpenAI APIs with it): HTTP/1.1 parsing, keep-alive, disconnect detection and graceful shutdown come from maintained
code rather than a hand-written server. Listens on 127.0.0.1 unless told otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hmac
import ipaddress
import json
import logging
import os
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from pipeline.chat import add_model_arguments
from pipeline.serve_requests import APIError, ChatRequest, ImageLimits, bad_request, parse_body, parse_chat_request

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("llava.serve")


@dataclasses.dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 16
    max_queue: int = 64
    max_body_bytes: int = 20 * 2**20
    image_limits: ImageLimits = dataclasses.field(default_factory=ImageLimits)


class Prompter:
    """Turns a checked request into prompt ids, pixels and generation settings (runs off the event loop: it
    tokenizes and decodes images)."""

    def __init__(self, loaded, limits: ImageLimits):
        self.loaded, self.limits = loaded, limits
        self.processor = loaded.model.image_processor()
        llava_config = loaded.model.config
        self.context = min(llava_config.max_len, llava_config.llm.max_seq_len)
        self.image_tokens = loaded.model.num_image_tokens

    def template(self, system: str | None):
        from llava.conversation import get_template

        template = get_template(self.loaded.template)
        if system is None:
            return template
        if template.style == "plain":
            raise bad_request("this model's template 'plain' has no system prompt; leave out the system message",
                              "messages[0].role")
        return dataclasses.replace(template, system=system)

    def prepare(self, chat: ChatRequest):
        """(prompt ids, pixels or None, prompt token count, GenerationConfig)."""
        from llava.constants import IMAGE_TOKEN_INDEX
        from llava.conversation import ConversationError, tokenize_conversation
        from llava.generate import GenerationConfig
        from pipeline.serve_requests import read_image

        template = self.template(chat.system)
        try:
            ids = tokenize_conversation(chat.conversation, self.loaded.tokenizer, template,
                                        add_generation_prompt=True)[0]
        except ConversationError as e:
            raise bad_request(str(e), "messages") from None
        pixels = None
        if chat.image_url is not None:
            pixels = self.processor(read_image(chat.image_url, self.limits, chat.image_param))
        n_images = ids.count(IMAGE_TOKEN_INDEX)
        prompt_tokens = len(ids) + n_images * (self.image_tokens - 1)
        image_note = f", {n_images * self.image_tokens} of them for the image" if n_images else ""
        if prompt_tokens >= self.context:
            raise bad_request(f"the messages take {prompt_tokens} tokens{image_note}, but this model's context is "
                              f"{self.context} tokens (prompt + completion); shorten the conversation", "messages",
                              "context_length_exceeded")
        max_tokens = chat.max_tokens or self.context - prompt_tokens
        if prompt_tokens + max_tokens > self.context:
            raise bad_request(f"this model's context is {self.context} tokens, but {prompt_tokens + max_tokens} were "
                              f"requested: {prompt_tokens} in the messages{image_note} and {max_tokens} for the "
                              f"completion (max_tokens); lower max_tokens to at most "
                              f"{self.context - prompt_tokens} or shorten the conversation", "max_tokens",
                              "context_length_exceeded")
        config = GenerationConfig(max_new_tokens=max_tokens, temperature=chat.temperature, top_p=chat.top_p,
                                  seed=chat.seed, stop_token_ids=self.loaded.stop_token_ids,
                                  stop_strings=self.loaded.stop_strings(template.name) + chat.stop)
        return ids, pixels, prompt_tokens, config


def create_app(loaded, settings: ServeSettings):
    """The FastAPI application; the engine thread starts and stops with it."""
    from pipeline.serve_engine import Engine, Job, QueueFull

    engine = Engine(loaded, settings.max_batch, settings.max_queue)
    prompter = Prompter(loaded, settings.image_limits)
    # One thread decodes images and tokenizes, off the event loop. Not a pool of many: every Python thread competes
    # with the engine thread for the GIL, which it takes back after each of the hundreds of torch calls in a step.
    preparing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llava-serve-prepare")

    outbox = None

    @asynccontextmanager
    async def lifespan(_app):
        nonlocal outbox
        outbox = Outbox(asyncio.get_running_loop())
        engine.start()
        yield
        engine.stop()
        preparing.shutdown()

    app = FastAPI(title="llava-pipeline serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(_request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        body = APIError(error.status_code, str(error.detail), code=code).body()
        return JSONResponse(body, status_code=error.status_code, headers=getattr(error, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_request, error: Exception):
        log.exception("unexpected error")
        body = APIError(500, f"internal error: {type(error).__name__}", type="server_error").body()
        return JSONResponse(body, status_code=500)

    def busy() -> APIError:
        return APIError(429, f"the server is busy: {settings.max_queue} requests are already waiting (--max-queue); "
                             "retry shortly", type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})

    def check_key(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            what = "no API key was given" if not given else "the API key is not correct"
            raise APIError(401, f"{what}: send 'Authorization: Bearer <key>' with the key the server was started "
                                "with (--api-key)", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request)
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "llava-pipeline"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        chat = parse_chat_request(parse_body(await read_body(request, settings.max_body_bytes)))
        if chat.model != settings.model_name:
            raise APIError(404, f"the model {chat.model!r} does not exist; this server serves "
                                f"{settings.model_name!r} (GET /v1/models)", code="model_not_found", param="model")
        if engine.queue_full():  # refuse before decoding the image; submit() checks again, atomically
            raise busy()
        ids, pixels, prompt_tokens, config = await asyncio.get_running_loop().run_in_executor(
            preparing, prompter.prepare, chat)
        events = asyncio.Queue()
        job = Job(ids, pixels, config, emit=lambda event: outbox.put(events, event))
        try:
            engine.submit(job)
        except QueueFull:
            raise busy() from None
        reply = Reply(settings.model_name, prompt_tokens, chat.include_usage)
        if chat.stream:
            return StreamingResponse(stream_events(engine, job, events, reply), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(await collect(engine, job, events, reply, request))

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


class Outbox:
    """Hands the engine thread's events to the event loop with one wake-up for all the events of a step, instead of
    one per token per request (each wake-up is a write to the loop's self-pipe, paid by the engine thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    def put(self, queue: asyncio.Queue, event: tuple) -> None:
        with self.lock:
            self.items.append((queue, event))
            if self.scheduled:
                return
            self.scheduled = True
        self.loop.call_soon_threadsafe(self.deliver)

    def deliver(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, event in items:
            queue.put_nowait(event)


async def read_body(request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (a declared length is checked up front)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _body_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the server's limit of {limit} bytes (--max-body-bytes); "
                         "send a smaller image", code="request_too_large")


class Reply:
    """OpenAI's response and chunk objects for one request."""

    def __init__(self, model: str, prompt_tokens: int, include_usage: bool):
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model, self.prompt_tokens, self.include_usage = model, prompt_tokens, include_usage

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}

    def completion(self, content: str, finish_reason: str, completion_tokens: int) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                             "logprobs": None, "finish_reason": finish_reason}],
                "usage": self.usage(completion_tokens)}

    def chunk(self, delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> str:
        data = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None,
                                              "finish_reason": finish_reason}]}
        if self.include_usage:
            data["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return f"data: {json.dumps(data)}\n\n"


async def stream_events(engine, job, events: asyncio.Queue, reply: Reply):
    """Role chunk, content deltas, the finish_reason chunk, (usage), `[DONE]`; a client that goes away cancels.

    Text that piles up while the connection is busy goes out as one delta (OpenAI's deltas, too, may hold several
    tokens), so a loaded server writes and its clients parse fewer events instead of falling further behind.
    """
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            waiting = [await events.get()]
            while not events.empty():
                waiting.append(events.get_nowait())
            text = "".join(event[1] for event in waiting if event[0] == "text")
            out = reply.chunk({"content": text}) if text else ""
            last = waiting[-1]
            if last[0] == "done":
                out += reply.chunk({}, finish_reason=last[1])
                if reply.include_usage:
                    out += reply.chunk({}, usage=reply.usage(last[2]))
            elif last[0] == "error":  # the stream has started: report the error in it, as OpenAI does
                out += f"data: {json.dumps(APIError(500, last[1], type='server_error').body())}\n\n"
            if last[0] == "text":
                yield out
                continue
            yield out + "data: [DONE]\n\n"
            return
    finally:
        engine.cancel(job)  # a no-op once done; frees the batch slot when the client disconnected


async def collect(engine, job, events: asyncio.Queue, reply: Reply, request) -> dict:
    """The whole answer; stops generating if the client disconnects while waiting."""
    async def answer():
        pieces = []
        while True:
            event = await events.get()
            if event[0] == "text":
                pieces.append(event[1])
            elif event[0] == "done":
                return reply.completion("".join(pieces), event[1], event[2])
            else:
                raise APIError(500, event[1], type="server_error")

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    result, watcher = asyncio.ensure_future(answer()), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({result, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not result.done():
            result.cancel()
            engine.cancel(job)
    if not result.done() or result.cancelled():
        raise APIError(499, "the client closed the connection", code="client_closed_request")
    return result.result()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline serve", description=__doc__.split("\n\n")[0],
        epilog="Reads: the model directory (--model) and images sent in requests (data: URLs, or paths inside "
               "--image-folder). Writes: nothing to disk; answers HTTP on --host:--port (web chat page at /, OpenAI "
               "API at /v1, GET /health).")
    add_model_arguments(parser)
    parser.add_argument("--model-name", help="the name clients send as 'model' (default: from the directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                            "only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=os.environ.get("LLAVA_PIPELINE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $LLAVA_PIPELINE_API_KEY)")
    parser.add_argument("--max-batch", type=int, default=16, help="most requests generating together (default 16)")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="most requests waiting for a batch slot; more get 429 (default 64)")
    parser.add_argument("--image-folder", type=Path, help="serve image paths from inside this folder (default: "
                                                          "data: URLs only)")
    parser.add_argument("--max-body-bytes", type=int, default=ServeSettings.max_body_bytes,
                        help="largest request body; larger gets 413 (default 20 MiB)")
    parser.add_argument("--max-image-bytes", type=int, default=ImageLimits.max_bytes,
                        help="largest encoded image; larger gets 413 (default 10 MiB)")
    parser.add_argument("--max-image-pixels", type=int, default=ImageLimits.max_pixels,
                        help="largest width x height of an image; larger gets 400 (default 4096 x 4096)")
    args = parser.parse_args(argv)

    if args.image_folder is not None and not args.image_folder.is_dir():
        parser.error(f"--image-folder {args.image_folder}: not a directory")
    if not is_loopback(args.host) and not args.api_key:
        print(f"llava-pipeline serve: warning: --host {args.host} accepts connections from other machines and no "
              "--api-key is set: anyone who reaches this port can use the model", file=sys.stderr)
    import uvicorn

    from llava.loading import ModelLoadError, load_model

    try:
        loaded = load_model(args.model, base=args.model_base, vision_tower_dir=args.vision_tower, device=args.device,
                            dtype=args.dtype, template=args.conv_mode)
        settings = ServeSettings(model_name=args.model_name or loaded.model_id, api_key=args.api_key,
                                 max_batch=args.max_batch, max_queue=args.max_queue,
                                 max_body_bytes=args.max_body_bytes,
                                 image_limits=ImageLimits(args.max_image_bytes, args.max_image_pixels,
                                                          args.image_folder))
        app = create_app(loaded, settings)
    except (ModelLoadError, ValueError, OSError) as e:
        print(f"llava-pipeline serve: {e}", file=sys.stderr)
        return 2
    print(f"llava-pipeline serve: {settings.model_name} ({loaded.source}) on http://{args.host}:{args.port}/ "
          f"(chat page at /, API at /v1)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
