"""Bad inputs of stage 1 (image-caption pairs in webdataset shards), one table for the reader and one for the writer.

Reader (`PairDataset`): with on_error=stop a DataError names the shard, the sample key and id, and the reason; with
skip the sample is left out and counted (`sample["skipped"]`) and every good sample still arrives.
Writer (`write_shards`): a bad pair stops with its source named, or is skipped and counted in index.json.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from faults_lib import CORRUPT_BYTES, bomb_png, cases, image_bytes
from llava.data.errors import DataError
from llava.data.pairs import PairDataset, list_shards, write_shards

GOOD = ["good0", "good1", "good2"]


def member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, io.BytesIO(data)


def good_members(key: str, sample_id: str) -> list[tuple[str, bytes]]:
    return [(f"{key}.png", image_bytes("RGB")), (f"{key}.txt", f"a red square {sample_id}".encode()),
            (f"{key}.json", json.dumps({"id": sample_id}).encode())]


@dataclass(frozen=True)
class ShardFault:
    name: str
    members: list  # (name, bytes) of the bad sample, key "000000009"
    message: str  # regex


BAD_KEY = "000000009"
SHARD_FAULTS = [
    ShardFault("corrupt image bytes", [(f"{BAD_KEY}.png", CORRUPT_BYTES), (f"{BAD_KEY}.txt", b"cap")],
               r"cannot decode image"),
    ShardFault("huge dimensions (decompression bomb)", [(f"{BAD_KEY}.png", bomb_png(10_000, 10_000)),
                                                        (f"{BAD_KEY}.txt", b"cap")], r"decompression-bomb guard"),
    ShardFault("missing caption", [(f"{BAD_KEY}.png", image_bytes())], r"needs a jpg or png image and a txt caption"),
    ShardFault("missing image", [(f"{BAD_KEY}.txt", b"cap")], r"needs a jpg or png image and a txt caption"),
    ShardFault("empty caption", [(f"{BAD_KEY}.png", image_bytes()), (f"{BAD_KEY}.txt", b"  ")], r"empty caption"),
    ShardFault("caption not UTF-8", [(f"{BAD_KEY}.png", image_bytes()), (f"{BAD_KEY}.txt", b"\xff\xfe")],
               r"caption is not UTF-8"),
    ShardFault("malformed json metadata", [(f"{BAD_KEY}.png", image_bytes()), (f"{BAD_KEY}.txt", b"cap"),
                                           (f"{BAD_KEY}.json", b"{not json")], r"bad json"),
    ShardFault("member with an absolute path", [("/etc/cron.d/x.png", image_bytes()), ("/etc/cron.d/x.txt", b"c")],
               r"(absolute|outside|unsafe)"),
    ShardFault("member with a .. path", [("../../x.png", image_bytes()), ("../../x.txt", b"c")],
               r"(\.\.|outside|unsafe)"),
]

def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            tar.addfile(*member(name, data))
    return path


def shard_with(tmp_path: Path, bad: list[tuple[str, bytes]]) -> Path:
    members = []
    for k, sample_id in enumerate(GOOD[:2]):
        members += good_members(f"{k:09d}", sample_id)
    members += bad + good_members("000000010", GOOD[2])
    return write_tar(tmp_path / "pairs-000000.tar", members)


def dataset(shards, tokenizer, on_error: str) -> PairDataset:
    return PairDataset(shards, tokenizer, lambda image: image, max_len=64, shuffle_buffer=1, rank=0, world_size=1,
                       on_error=on_error)


@pytest.mark.parametrize("fault", cases(SHARD_FAULTS))
def test_reader_stop_names_shard_and_sample(tmp_path, tokenizer, fault):
    shard = shard_with(tmp_path, fault.members)
    with pytest.raises(DataError) as info:
        list(dataset([shard], tokenizer, "stop"))
    message = str(info.value)
    assert str(shard) in message and re.search(fault.message, message), message


@pytest.mark.parametrize("fault", cases(SHARD_FAULTS))
def test_reader_skip_counts_and_keeps_every_good_sample(tmp_path, tokenizer, fault):
    shard = shard_with(tmp_path, fault.members)
    samples = list(dataset([shard], tokenizer, "skip"))
    assert {s["id"] for s in samples} == set(GOOD)
    assert sum(s["skipped"] for s in samples) >= 1


def test_truncated_shard_stops_with_its_name(tmp_path, tokenizer):
    shard = shard_with(tmp_path, [])
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DataError, match=re.escape(str(shard)) + r": cannot read the shard"):
        list(dataset([shard], tokenizer, "stop"))


def written_shards(tmp_path: Path) -> tuple[Path, Path]:
    """Two shards of 3 pairs with an index.json, as write_shards makes them; returns (folder, second shard)."""
    out = tmp_path / "shards"
    items = [{"id": f"s{i}", "image": str(_image(tmp_path, f"s{i}.png")), "caption": f"caption {i}"}
             for i in range(6)]
    index = write_shards(items, out, shard_size=3)
    return out, out / index["shards"][1]["file"]


def member_offsets(shard: Path) -> list[int]:
    with tarfile.open(shard) as tar:
        return [m.offset for m in tar.getmembers()]


def test_truncated_shard_in_skip_mode_is_counted(tmp_path, tokenizer):
    out, broken = written_shards(tmp_path)
    broken.write_bytes(broken.read_bytes()[:member_offsets(broken)[4] + 600])  # inside a member's data
    samples = list(dataset(out, tokenizer, "skip"))
    assert {"s0", "s1", "s2"} <= {s["id"] for s in samples}
    assert sum(s["skipped"] for s in samples) >= 1


def test_shard_cut_at_a_member_boundary_is_detected(tmp_path, tokenizer):
    out, broken = written_shards(tmp_path)
    broken.write_bytes(broken.read_bytes()[:member_offsets(broken)[3]])  # first sample whole, the rest gone
    with pytest.raises(DataError, match=re.escape(str(broken)) + r".*(truncated|index\.json)"):
        list(dataset(out, tokenizer, "stop"))


def _image(root: Path, name: str, content: bytes | None = None) -> Path:
    path = root / "src" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes("RGB") if content is None else content)
    return path


@dataclass(frozen=True)
class WriterFault:
    name: str
    item: dict = field(default_factory=dict)  # merged into {"id": "bad", "caption": "c", "image": <path>}
    image: bytes | None = b""  # b"": a good image; None: no file
    message: str = ""


WRITER_FAULTS = [
    WriterFault("missing image file", image=None, message=r"bad\.png: image file not found"),
    WriterFault("corrupt image bytes", image=CORRUPT_BYTES, message=r"bad\.png: cannot decode image"),
    WriterFault("empty caption", item={"caption": " "}, message=r"missing or empty caption"),
]


@pytest.mark.parametrize("fault", cases(WRITER_FAULTS))
def test_writer_stops_or_skips_and_counts(tmp_path, fault):
    path = tmp_path / "src" / "bad.png"
    if fault.image is not None:
        _image(tmp_path, "bad.png", fault.image or None)
    good = [{"id": f"g{i}", "image": str(_image(tmp_path, f"g{i}.png")), "caption": f"c{i}"} for i in range(2)]
    bad = {"id": "bad", "caption": "c", "image": str(path), "source": "list.json: entry 1", **fault.item}
    items = [good[0], bad, good[1]]
    with pytest.raises(DataError, match=r"list\.json: entry 1: .*" + fault.message):
        write_shards(items, tmp_path / "stop", on_error="stop")
    assert not (tmp_path / "stop" / "index.json").exists()  # no index: the shard set is not complete
    index = write_shards(items, tmp_path / "skip", on_error="skip")
    assert index["skipped"] == 1 and index["total"] == 2
    assert sum(count for _, count in list_shards(tmp_path / "skip")) == 2


def test_no_shards_and_no_pairs(tmp_path):
    with pytest.raises(DataError, match=r"no \.tar shards found"):
        list_shards(tmp_path)
    with pytest.raises(DataError, match=r"no usable pairs to write \(1 skipped\)"):
        write_shards([{"id": "x", "image": None, "caption": "c"}], tmp_path / "out", on_error="skip")
