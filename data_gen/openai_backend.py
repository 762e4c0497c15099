"""GPT backend: the official `openai` client against any OpenAI-compatible chat-completions endpoint.

The client's own retries are off (`max_retries=0`) so that this module decides about every retry: 429, 5xx, 408/409,
timeouts and connection errors back off exponentially with jitter and wait at least as long as Retry-After says; a
reply that is not the JSON object we asked for is re-asked (telling the model what was wrong) a limited number of
times; then the item fails with the reason. 401/403/404 stop the whole run: every item would fail the same way.
The key is read only from OPENAI_API_KEY and is scrubbed from every message this module produces.
"""
from __future__ import annotations

import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime

import openai

from data_gen.prompting import InvalidReply, build_messages, parse_reply, pick_detail_question
from data_gen.records import CaptionRecord

log = logging.getLogger(__name__)

REPLY_SCHEMA = '{"turns": [{"question": "...", "answer": "..."}]}'
_KEY_LIKE = re.compile(r"sk-[A-Za-z0-9_\-*.]{4,}")


class ItemFailed(Exception):
    """This item could not be generated; the message is the reason recorded in the failures file."""


class BackendFatal(RuntimeError):
    """Every item would fail the same way (no key, key rejected, unknown model or URL): stop the run."""


@dataclass
class OpenAIConfig:
    model: str = "gpt-4o-mini"
    base_url: str | None = None  # None: the client's default (OPENAI_BASE_URL or api.openai.com)
    temperature: float = 0.2
    max_tokens: int = 1024
    timeout: float = 60.0  # seconds per request
    max_retries: int = 6  # transport retries per request
    max_reasks: int = 2  # extra asks after an invalid reply
    base_delay: float = 1.0  # first backoff delay, doubled per retry
    max_delay: float = 60.0
    rpm: float = 0.0  # requests per minute over all workers; 0 = no limit
    price_in: float | None = None  # USD per 1M input tokens, for the cost estimate
    price_out: float | None = None  # USD per 1M output tokens
    json_mode: bool = True  # send response_format={"type": "json_object"} (dropped if the endpoint rejects it)


class RequestRateLimiter:
    """Spaces request starts at least 60/rpm seconds apart across threads."""

    def __init__(self, rpm: float):
        self.interval = 60.0 / rpm if rpm > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


@dataclass
class Usage:
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    retries: int = 0
    reasks: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)


class OpenAIBackend:
    def __init__(self, config: OpenAIConfig, seed: int = 0):
        key = os.environ.get("OPENAI_API_KEY", "")
        if not key.strip():
            raise BackendFatal("OPENAI_API_KEY is not set: export OPENAI_API_KEY=... (the key is read only from the "
                               "environment; for a local server that ignores keys any non-empty value works)")
        self._key = key
        self.config = config
        self.seed = seed
        self.source = f"openai:{config.model}"
        self.usage = Usage()
        self._client = openai.OpenAI(api_key=key, base_url=config.base_url, timeout=config.timeout, max_retries=0)
        self._json_mode = config.json_mode
        self._limiter = RequestRateLimiter(config.rpm)
        self._jitter = random.Random()
        self._lock = threading.Lock()

    def redact(self, text: str) -> str:
        """Remove the key (and anything shaped like an OpenAI key, e.g. a server echoing part of it)."""
        return _KEY_LIKE.sub("sk-***", text.replace(self._key, "***"))

    def generate(self, record: CaptionRecord, response_type: str) -> list[dict]:
        detail_question = pick_detail_question(self.seed, record.id) if response_type == "detail" else None
        messages = build_messages(record, response_type, detail_question)
        reason = ""
        for ask in range(self.config.max_reasks + 1):
            if ask:
                self.usage.add(reasks=1)
            content, finish_reason = self._complete(messages)
            try:
                if finish_reason == "length":
                    raise InvalidReply(f"the reply was cut off at {self.config.max_tokens} tokens (raise --max-tokens)")
                turns = parse_reply(content, response_type)
            except InvalidReply as e:
                reason = str(e)
                log.debug("invalid reply for %s/%s: %s", record.id, response_type, reason)
                messages = messages + [
                    {"role": "assistant", "content": (content or "")[:4000]},
                    {"role": "user", "content": f"That reply is not usable: {reason}. Reply again with only the "
                                                f"JSON object {REPLY_SCHEMA}."},
                ]
                continue
            if detail_question is not None:
                turns[0]["question"] = detail_question
            return turns
        raise ItemFailed(self.redact(f"invalid reply after {self.config.max_reasks + 1} asks: {reason}"))

    def _complete(self, messages: list[dict]) -> tuple[str | None, str | None]:
        """One chat completion with transport retries; returns (content, finish_reason)."""
        plain_retry = False  # this request is the retry without response_format after a 400
        last_error = ""
        attempt = 0
        while attempt <= self.config.max_retries:
            use_json = self._json_mode and not plain_retry
            extra = {"response_format": {"type": "json_object"}} if use_json else {}
            self._limiter.wait()
            self.usage.add(requests=1)
            try:
                response = self._client.chat.completions.create(
                    model=self.config.model, messages=messages, temperature=self.config.temperature,
                    max_tokens=self.config.max_tokens, **extra)
            except openai.BadRequestError as e:
                if use_json:
                    plain_retry = True  # the endpoint may not know response_format: ask once more without it
                    continue
                raise ItemFailed(self._describe("rejected by the server (400)", e)) from None
            except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
                hint = {401: "the server rejected OPENAI_API_KEY", 403: "the key may not use this model",
                        404: "check --model and --base-url"}.get(e.status_code, "")
                raise BackendFatal(self._describe(f"HTTP {e.status_code}: {hint}", e)) from None
            except (openai.APITimeoutError, openai.APIConnectionError, openai.RateLimitError,
                    openai.InternalServerError, openai.ConflictError) as e:
                last_error = self._describe(_kind(e), e)
                self._backoff(attempt, e, last_error)
                attempt += 1
                continue
            except openai.APIStatusError as e:
                if e.status_code == 408:
                    last_error = self._describe("HTTP 408", e)
                    self._backoff(attempt, e, last_error)
                    attempt += 1
                    continue
                raise ItemFailed(self._describe(f"HTTP {e.status_code}", e)) from None
            if plain_retry and self._json_mode:
                with self._lock:
                    if self._json_mode:
                        self._json_mode = False
                        log.warning("the endpoint rejected response_format=json_object; continuing without it")
            usage = getattr(response, "usage", None)
            if usage is not None:
                self.usage.add(input_tokens=usage.prompt_tokens or 0, output_tokens=usage.completion_tokens or 0)
            if not response.choices:
                return None, None
            choice = response.choices[0]
            return choice.message.content, choice.finish_reason
        raise ItemFailed(f"gave up after {self.config.max_retries + 1} tries: {last_error}")

    def _backoff(self, attempt: int, error: Exception, description: str) -> None:
        if attempt >= self.config.max_retries:
            return
        self.usage.add(retries=1)
        delay = min(self.config.max_delay, self.config.base_delay * 2 ** attempt) * (0.5 + 0.5 * self._jitter.random())
        retry_after = _retry_after(error)
        if retry_after is not None:
            delay = max(delay, retry_after)
        log.debug("retry %d in %.2fs after %s", attempt + 1, delay, description)
        time.sleep(delay)

    def _describe(self, what: str, error: Exception) -> str:
        detail = getattr(error, "message", None) or str(error) or type(error).__name__
        return self.redact(f"{what}: {detail}")[:500]

    def usage_report(self) -> dict:
        c, u = self.config, self.usage
        cost = None
        if c.price_in is not None and c.price_out is not None:
            cost = round(u.input_tokens / 1e6 * c.price_in + u.output_tokens / 1e6 * c.price_out, 6)
        return {"model": c.model, "requests": u.requests, "retries": u.retries, "reasks": u.reasks,
                "input_tokens": u.input_tokens, "output_tokens": u.output_tokens, "cost_usd": cost,
                "price_per_million": {"input": c.price_in, "output": c.price_out}}


def _kind(error: Exception) -> str:
    if isinstance(error, openai.APITimeoutError):
        return "timed out"
    if isinstance(error, openai.APIConnectionError):
        return "connection error"
    return f"HTTP {getattr(error, 'status_code', '?')}"


def _retry_after(error: Exception) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date), if the server sent one."""
    response = getattr(error, "response", None)
    if response is None:
        return None
    headers = response.headers
    try:
        if "retry-after-ms" in headers:
            return max(0.0, float(headers["retry-after-ms"]) / 1000)
        if "retry-after" in headers:
            value = headers["retry-after"]
            try:
                return max(0.0, float(value))
            except ValueError:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None
    return None
