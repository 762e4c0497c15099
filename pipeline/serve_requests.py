"""The OpenAI Chat Completions request of `llava-pipeline serve`: checked field by field and turned into a LLaVA
conversation plus at most one image.

Every problem becomes an `APIError` carrying the HTTP status and OpenAI's error body (`message`, `type`, `code`,
`param`), where `param` names the field as OpenAI does (`messages[1].content[0].image_url.url`), so a client sees which
part of its request to fix instead of a hang or a stack trace.

The conversation is built the way `llava-pipeline chat` builds it: the image tag goes in front of the text of the
message that carries the image, `<image>` typed by a user is removed, texts are stripped and an empty answer counts as
"...". So a conversation sent here renders to the very prompt `chat` renders for it.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit
from urllib.request import url2pathname

from llava.constants import DEFAULT_IMAGE_TOKEN

SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name for the system message
# Accepted but without effect when they have these values (clients such as LangChain send them).
NO_OP_VALUES = {"n": 1, "frequency_penalty": 0, "presence_penalty": 0, "logprobs": False}
SUPPORTED = ("model", "messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
             "stream", "stream_options", "user", *NO_OP_VALUES)
DEFAULT_TEMPERATURE = 0.2  # as `llava-pipeline chat` and LLaVA's CLI


class APIError(Exception):
    """An HTTP error in the OpenAI error format."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def bad_request(message: str, param: str | None = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass
class ImageLimits:
    max_bytes: int = 10 * 2**20  # encoded size of one image
    max_pixels: int = 4096 * 4096  # width x height after decoding the header, before decoding the pixels
    folder: Path | None = None  # image paths are served from inside this folder only


@dataclass
class ChatRequest:
    model: str
    conversation: list[dict]  # LLaVA turns: {"from": "human"|"gpt", "value": str}
    system: str | None  # replaces the template's system prompt when given
    image_url: str | None  # the conversation's one image
    image_param: str | None  # where it was in the request, for error messages
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def parse_chat_request(body: dict) -> ChatRequest:
    """Check every field of a chat completion request; raise APIError(400) naming the first bad one."""
    for key, value in body.items():
        if key not in SUPPORTED:
            raise bad_request(f"unsupported parameter {key!r}; this server supports: {', '.join(SUPPORTED)}",
                              key, "unsupported_parameter")
        expected = NO_OP_VALUES.get(key, value)
        if value is not None and (value != expected or isinstance(value, bool) != isinstance(expected, bool)):
            raise bad_request(f"{key}={json.dumps(value)} is not supported; only {json.dumps(expected)}", key,
                              "unsupported_value")
    body = {k: v for k, v in body.items() if v is not None}  # OpenAI treats null as "not given"
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required: the name listed by GET /v1/models", "model", "missing_required")
    system, conversation, image_url, image_param = _conversation(body.get("messages"))
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise bad_request("stream_options must be {\"include_usage\": bool} and needs stream=true", "stream_options")
    include_usage = _bool(options or {}, "include_usage", False, "stream_options.include_usage")
    max_key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number(body, max_key, None, int, low=1)
    stop = body.get("stop", ())
    stop = (stop,) if isinstance(stop, str) else stop
    if (not isinstance(stop, (list, tuple)) or len(stop) > 4
            or any(not isinstance(s, str) or not s for s in stop)):
        raise bad_request("stop must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return ChatRequest(model=model, conversation=conversation, system=system, image_url=image_url,
                       image_param=image_param, max_tokens=max_tokens,
                       temperature=_number(body, "temperature", DEFAULT_TEMPERATURE, float, low=0, high=2),
                       top_p=_number(body, "top_p", 1.0, float, low=0, high=1, low_open=True),
                       seed=_number(body, "seed", None, int, low=-2**63, high=2**64 - 1), stop=tuple(stop),
                       stream=stream,
                       include_usage=include_usage)


def _bool(body: dict, key: str, default: bool, param: str | None = None) -> bool:
    value = body.get(key, default)
    if not isinstance(value, bool):
        raise bad_request(f"{param or key} must be true or false, got {json.dumps(value)}", param or key)
    return value


def _number(body: dict, key: str, default, kind, *, low=None, high=None, low_open=False):
    if key not in body:
        return default
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise bad_request(f"{key} must be {'an integer' if kind is int else 'a number'}, got {json.dumps(value)}",
                          key)
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low}" if high is None else \
            f"in {'(' if low_open else '['}{low}, {high}]"
        raise bad_request(f"{key}={value} must be {bounds}", key)
    return kind(value)


def _conversation(messages) -> tuple[str | None, list[dict], str | None, str | None]:
    """(system prompt, LLaVA turns, image URL, where the image was) from OpenAI messages."""
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages",
                          "missing_required" if messages is None else "invalid_value")
    systems, turns = [], []
    image_url = image_param = None
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict) or "role" not in message:
            raise bad_request(f"{where} must be an object with 'role' and 'content'", where)
        role = message["role"]
        if role in SYSTEM_ROLES:
            if turns:
                raise bad_request(f"{where}: a {role} message must come before the user and assistant messages "
                                  "(the template has one system prompt, at the start)", f"{where}.role")
            systems.append(_text_only(message.get("content"), f"{where}.content"))
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role not in ("user", "assistant"):
            raise bad_request(f"{where}.role={role!r} is not supported; use system, user or assistant",
                              f"{where}.role")
        if role != expected:
            raise bad_request(f"{where} is from {role!r} but {expected!r} was expected: after the system messages, "
                              "user and assistant messages alternate, starting with user", f"{where}.role")
        if role == "assistant":
            turns.append({"from": "gpt", "value": _text_only(message.get("content"), f"{where}.content") or "..."})
            continue
        text, url, param = _user_content(message.get("content"), f"{where}.content")
        if url is not None:
            if image_url is not None:
                raise bad_request(f"{param}: a second image; LLaVA models see one image per conversation "
                                  f"(the first is at {image_param})", param, "too_many_images")
            image_url, image_param = url, param
            text = f"{DEFAULT_IMAGE_TOKEN}\n{text}"
        elif not text:
            raise bad_request(f"{where}.content is empty", f"{where}.content")
        turns.append({"from": "human", "value": text})
    if not turns or turns[-1]["from"] != "human":
        raise bad_request("the last message must be from the user (it is the question to answer)", "messages")
    return ("\n".join(systems) if systems else None), turns, image_url, image_param


def _clean(text: str) -> str:
    return text.replace(DEFAULT_IMAGE_TOKEN, "").strip()


def _parts(content, param: str) -> list[tuple[dict, str]]:
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    out = []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if not isinstance(part, dict) or part.get("type") not in ("text", "image_url"):
            raise bad_request(f"{where} must be {{\"type\": \"text\", \"text\": ...}} or "
                              "{\"type\": \"image_url\", \"image_url\": {\"url\": ...}}", f"{where}.type")
        out.append((part, where))
    return out


def _part_text(part: dict, where: str) -> str:
    if not isinstance(part.get("text"), str):
        raise bad_request(f"{where}.text must be a string", f"{where}.text")
    return part["text"]


def _text_only(content, param: str) -> str:
    if content is None or isinstance(content, str):
        return _clean(content or "")
    texts = []
    for part, where in _parts(content, param):
        if part["type"] != "text":
            raise bad_request(f"{where}: only user messages may hold images", f"{where}.type")
        texts.append(_part_text(part, where))
    return _clean("\n".join(texts))


def _user_content(content, param: str) -> tuple[str, str | None, str | None]:
    if isinstance(content, str):
        return _clean(content), None, None
    if content is None:
        raise bad_request(f"{param} is required", param, "missing_required")
    texts, url, url_param = [], None, None
    for part, where in _parts(content, param):
        if part["type"] == "text":
            texts.append(_part_text(part, where))
            continue
        image = part.get("image_url")
        if not isinstance(image, dict) or not isinstance(image.get("url"), str) or not image["url"]:
            raise bad_request(f"{where}.image_url must be {{\"url\": \"data:image/...;base64,...\"}}",
                              f"{where}.image_url.url")
        if url is not None:
            raise bad_request(f"{where}: a second image; LLaVA models see one image per conversation",
                              f"{where}.image_url", "too_many_images")
        url, url_param = image["url"], f"{where}.image_url.url"
    return _clean("\n".join(texts)), url, url_param


# ---- images ------------------------------------------------------------------------------------------------------

def read_image(url: str, limits: ImageLimits, param: str):
    """The RGB PIL image behind a `data:` URL or a path inside the image folder; never fetches from the network."""
    from llava.data.images import ImageError, open_rgb

    if url.startswith("data:"):
        data = _data_url_bytes(url, limits, param)
        name = param
    else:
        path = _folder_path(url, limits, param)
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise _too_large(size, limits, param)
        data, name = path, url
    try:
        return open_rgb(data, name=name, max_pixels=limits.max_pixels)
    except ImageError as e:
        raise bad_request(str(e), param, "invalid_image") from None


def _too_large(size: int, limits: ImageLimits, param: str) -> APIError:
    return APIError(413, f"{param}: the image is {size} bytes, above the server's limit of {limits.max_bytes} bytes "
                         "(--max-image-bytes)", code="image_too_large", param=param)


def _data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    mime = header[len("data:"):].removesuffix(";base64")
    if not comma or not header.endswith(";base64") or not mime.startswith("image/"):
        raise bad_request(f"{param}: expected a data URL of the form data:image/<type>;base64,<data>", param,
                          "invalid_image_url")
    if len(payload) // 4 * 3 > limits.max_bytes + 2:  # decoded size, known before decoding
        raise _too_large(len(payload) // 4 * 3, limits, param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad_request(f"{param}: the base64 data does not decode ({e})", param, "invalid_image_url") from None
    if len(data) > limits.max_bytes:
        raise _too_large(len(data), limits, param)
    return data


def _folder_path(url: str, limits: ImageLimits, param: str) -> Path:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme in ("http", "https"):
        raise bad_request(f"{param}: this server does not fetch images from the network; send the image as a "
                          "data:image/...;base64 URL", param, "remote_image_url")
    if scheme == "file":
        given = url2pathname(parts.path)
    elif len(scheme) > 1:  # one letter is a Windows drive, e.g. C:/images/a.png
        raise bad_request(f"{param}: unsupported URL scheme {scheme!r}; send a data:image/...;base64 URL", param,
                          "invalid_image_url")
    else:
        given = url
    if limits.folder is None:
        raise bad_request(f"{param}: image paths are only served from a folder given to the server with "
                          "--image-folder; send the image as a data:image/...;base64 URL", param, "invalid_image_url")
    folder = limits.folder.resolve()
    path = (folder / given).resolve()  # an absolute path stays itself; symlinks are followed before the check
    if not path.is_relative_to(folder):
        raise bad_request(f"{param}: {given!r} is outside the server's image folder", param, "invalid_image_url")
    if not path.is_file():
        raise bad_request(f"{param}: {given!r}: no such image in the server's image folder", param,
                          "invalid_image_url")
    return path
