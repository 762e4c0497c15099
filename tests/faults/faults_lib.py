"""Bad inputs made on the spot: images in odd modes and broken files, LLaVA samples, a tiny tokenizer, and helpers
that prove "nothing already done is lost" (file digests, temp-file leftovers)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions. USER: What is in the image? ASSISTANT: A red square and a blue "
    "circle on a white table.",
    "Describe the picture in detail. There are two shapes: a green triangle on the left and a yellow star.",
] * 20 + [f"the quick brown fox jumps over the lazy dog {i}" for i in range(100)]


def make_tokenizer(path: Path):
    from llava.tokenizer import Tokenizer

    return Tokenizer.train(CORPUS, path, vocab_size=400)


# ---- images ---------------------------------------------------------------------------------------------------------

def image_bytes(mode: str = "RGB", size: tuple[int, int] = (24, 16), fmt: str = "PNG", color=None) -> bytes:
    image = Image.new(mode, size, color if color is not None else {"RGB": (200, 40, 40)}.get(mode, 0))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header that claims width x height pixels of 1-bit grey, with a tiny (wrong) body: the guard must
    refuse it from the header, before any pixel is decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    data = image_bytes("RGB", (64, 64), "JPEG")
    return data[: len(data) // 2]


CORRUPT_BYTES = b"this is not an image at all" * 10

# Every training fault test uses these settings, so one uninterrupted run (conftest's reference_run) serves them all.
TRAIN_RUN = {"max_steps": 8, "save_every": 2, "keep_last": 0}


# ---- samples --------------------------------------------------------------------------------------------------------

def sample(sample_id: str, image: str | None = "ok.png", question: str = "What is in the image?",
           answer: str = "A red square.") -> dict:
    entry = {"id": sample_id, "conversations": [{"from": "human", "value": ("<image>\n" if image else "") + question},
                                                {"from": "gpt", "value": answer}]}
    if image is not None:
        entry["image"] = image
    return entry


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


# ---- "nothing lost" ------------------------------------------------------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): digest(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def temp_leftovers(root: Path) -> list[str]:
    """Files named like llava.io's temporaries (`.NAME.XXXX.tmp`) anywhere under root."""
    return [str(p) for p in Path(root).rglob(".*.tmp")]


def fill(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size))


# ---- the table's known gaps ----------------------------------------------------------------------------------------
# Case name -> what is wrong and the fix, for faults the code does not handle yet. Such a case runs as a strict xfail:
# the suite shows the failure today and fails loudly once the fix lands (then delete the entry).
KNOWN_GAPS: dict[str, str] = {}


def cases(table: list, name=lambda case: case.name) -> list:
    """pytest params of a fault table, ids from the names, known gaps marked strict xfail with their fix."""
    import re

    import pytest

    return [pytest.param(case, id=re.sub(r"\W+", "-", name(case)).strip("-"),
                         marks=[pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[name(case)])]
                         if name(case) in KNOWN_GAPS else []) for case in table]
