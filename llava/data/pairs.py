"""Image-caption pairs in webdataset tar shards (stage 1): writing shards, and a loader of `plain`-template samples.

Shard contract: each sample is `<key>.jpg` or `<key>.png` (the image) + `<key>.txt` (the caption, UTF-8) + optional
`<key>.json` (metadata; its "id" names the sample in messages); keys are relative names without `..` parts (a shard
with others was not written by `write_shards` and is refused). `write_shards` also writes `index.json` (shard files and
sample counts), last, so its presence marks a complete set. The reader checks each shard it reads in full against the
count index.json records for it: a shard cut at a member boundary reads as a shorter valid tar, and only the count
tells. Shards without an index.json beside them (e.g. `data_gen.scenes`' own) have no recorded count to check.

Distributed reading: every rank yields exactly `len(dataset)` = total // world_size samples per epoch, so ranks take the
same number of steps. Shards are shuffled per epoch (seed + epoch) and dealt to (rank, worker) slots; with fewer
shards than slots, each slot reads every shard and keeps every n-th sample instead. A slot whose share runs out before
its quota starts over (a few samples repeat); one with more stops at its quota.
"""
from __future__ import annotations

import argparse
import glob
import io
import itertools
import json
import os
import random
import re
import sys
import tarfile
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from llava.conversation import tokenize_conversation
from llava.data.errors import DataError, check_on_error, log
from llava.data.images import DEFAULT_MAX_PIXELS, ImageError, open_rgb
from llava.data.instruct import _read_json_list, check_image_path

INDEX_FILE = "index.json"
BROKEN_SHARD = "__broken_shard__"  # key of the marker _read yields after a shard that broke off: samples lost
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


# ---- writing -----------------------------------------------------------------------------------------------------

def items_from_folder(folder: str | os.PathLike) -> list[dict]:
    """Pairs from a folder of images, each with a same-named .txt caption (`cat.jpg` + `cat.txt`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    items = []
    for image in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
        caption_file = image.with_suffix(".txt")
        rel = image.relative_to(folder).as_posix()
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else None
        items.append({"id": rel, "image": str(image), "caption": caption, "source": str(caption_file)})
    if not items:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return items


def items_from_json(json_file: str | os.PathLike, image_folder: str | os.PathLike) -> list[dict]:
    """Pairs from a JSON list of `{"image", "caption"}` or of LLaVA stage-1 entries (the gpt turn is the caption)."""
    json_file, image_folder = Path(json_file), Path(image_folder)
    items = []
    for index, entry in enumerate(_read_json_list(json_file)):
        where = f"{json_file}: entry {index}"
        if not isinstance(entry, dict) or "image" not in entry:
            items.append({"id": str(index), "image": None, "caption": None, "source": f"{where}: no 'image'"})
            continue
        sample_id = str(entry.get("id", index))
        caption = entry.get("caption")
        if caption is None and isinstance(entry.get("conversations"), list):
            answers = [t.get("value") for t in entry["conversations"] if isinstance(t, dict) and t.get("from") == "gpt"]
            caption = answers[-1] if answers else None
        try:
            image = str(image_folder / check_image_path(entry["image"], f"{where} (id {sample_id!r})"))
        except DataError as e:
            items.append({"id": sample_id, "image": None, "caption": None, "source": str(e)})
            continue
        items.append({"id": sample_id, "image": image, "caption": caption, "source": f"{where} (id {sample_id!r})"})
    return items


def write_shards(items: Iterable[dict], out_dir: str | os.PathLike, *, shard_size: int = 1000,
                 prefix: str = "pairs", on_error: str = "stop", max_pixels: int = DEFAULT_MAX_PIXELS) -> dict:
    """Write `{"id", "image" (file path), "caption", "meta"?}` items as tar shards + index.json; return the index.

    Every image is decoded once here, so a corrupt file stops (or is skipped and counted) now rather than mid-run.
    JPEG and PNG bytes are stored as they are; other formats are re-encoded as PNG.
    """
    from llava.io import atomic_path, atomic_write_json

    check_on_error(on_error)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: list[dict] = []
    skipped = 0
    total = 0

    def flush() -> None:
        name = f"{prefix}-{len(shards):06d}.tar"
        with atomic_path(out_dir / name) as tmp, tarfile.open(tmp, "w") as tar:
            for sample in pending:
                for suffix, data in sample["files"].items():
                    info = tarfile.TarInfo(f"{sample['key']}.{suffix}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    tar.addfile(info, io.BytesIO(data))
        shards.append({"file": name, "count": len(pending)})
        pending.clear()

    for item in items:
        try:
            files = _encode_pair(item, max_pixels)
        except DataError as e:
            if on_error == "stop":
                raise
            log.warning("%s (skipped)", e)
            skipped += 1
            continue
        # webdataset splits keys at the first dot, so ids (often file names) live in the json, not in the key.
        pending.append({"key": f"{total:09d}", "files": files})
        total += 1
        if len(pending) == shard_size:
            flush()
    if pending:
        flush()
    if not total:
        raise DataError(f"{out_dir}: no usable pairs to write ({skipped} skipped)")
    index = {"format": "llava-pairs", "total": total, "skipped": skipped, "shards": shards}
    atomic_write_json(out_dir / INDEX_FILE, index)
    return index


def _encode_pair(item: dict, max_pixels: int) -> dict[str, bytes]:
    where = item.get("source") or f"item {item.get('id')!r}"
    if item.get("image") is None:
        raise DataError(f"{where}: no image")
    caption = item.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"{where}: missing or empty caption for image {item['image']}")
    if not Path(item["image"]).is_file():
        raise DataError(f"{where}: {item['image']}: image file not found")
    try:
        data = Path(item["image"]).read_bytes()
        image = open_rgb(data, name=item["image"], max_pixels=max_pixels)
    except (ImageError, OSError) as e:
        raise DataError(f"{where}: {e}") from None
    kind = Image.open(io.BytesIO(data)).format  # the real format, whatever the file suffix says
    if kind in ("JPEG", "PNG"):
        image_file = {"jpg" if kind == "JPEG" else "png": data}
    else:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        image_file = {"png": buffer.getvalue()}
    meta = {"id": str(item.get("id")), **item.get("meta", {})}
    return {**image_file, "txt": caption.strip().encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")}


def shards_main(argv: list[str]) -> int:
    """Command line: image-caption pairs (a folder or a JSON list) -> webdataset shards."""
    parser = argparse.ArgumentParser(
        prog="llava-pipeline shards", description=shards_main.__doc__,
        epilog="Reads: a folder of images with same-named .txt captions (--images), or a JSON list (--json) and the "
               "images under --image-folder. Writes: the --out folder: pairs-*.tar shards and index.json.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images with same-named .txt captions")
    source.add_argument("--json", help="JSON list of {image, caption} or LLaVA stage-1 entries")
    parser.add_argument("--image-folder", help="folder the JSON's image paths are relative to")
    parser.add_argument("--out", required=True, help="output folder for the .tar shards and index.json")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--on-error", choices=("stop", "skip"), default="stop")
    args = parser.parse_args(argv)
    if args.json and not args.image_folder:
        parser.error("--json needs --image-folder")
    try:
        items = items_from_folder(args.images) if args.images else items_from_json(args.json, args.image_folder)
        index = write_shards(items, args.out, shard_size=args.shard_size, on_error=args.on_error)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {index['total']} pairs in {len(index['shards'])} shards to {args.out}"
          f" ({index['skipped']} skipped)")
    return 0


# ---- reading -----------------------------------------------------------------------------------------------------

def read_index(folder: str | os.PathLike) -> list[tuple[str, int]] | None:
    """(path, recorded sample count) per shard from `folder`/index.json as `write_shards` writes it; None without one."""
    index_file = Path(folder) / INDEX_FILE
    if not index_file.is_file():
        return None
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
        return [(str(Path(folder) / entry["file"]), int(entry["count"])) for entry in index["shards"]]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise DataError(f"{index_file}: unreadable shard index ({type(e).__name__}: {e}); write the shards again "
                        f"or delete it to count samples from the tar headers") from None


def recorded_counts(paths: Iterable[str]) -> dict[str, int]:
    """Sample counts that an index.json beside the shards records for them; shards it does not list are left out."""
    counts: dict[str, int] = {}
    for folder in {str(Path(p).parent) for p in paths}:
        counts.update(read_index(folder) or [])
    return {p: counts[p] for p in paths if p in counts}


def list_shards(shards: str | os.PathLike | Sequence) -> list[tuple[str, int]]:
    """(path, sample count) per shard from a directory (its index.json, else its *.tar), a brace/glob pattern, or a
    list of paths. Counts come from index.json or, without one, from the tar headers."""
    if isinstance(shards, (str, os.PathLike)) and Path(shards).is_dir():
        indexed = read_index(shards)
        if indexed is not None:
            return indexed
        paths = sorted(str(p) for p in Path(shards).glob("*.tar"))
    elif isinstance(shards, (str, os.PathLike)):
        from webdataset.shardlists import expand_urls

        paths = sorted(p for url in expand_urls(str(shards)) for p in (glob.glob(url) or [url]))
    else:
        paths = [str(p) for p in shards]
    if not paths:
        raise DataError(f"{shards}: no .tar shards found")
    return [(p, _count_samples(p)) for p in paths]


def _count_samples(path: str) -> int:
    try:
        with tarfile.open(path) as tar:
            return len({m.name.split(".", 1)[0] for m in tar
                        if m.isfile() and m.name.lower().endswith((".jpg", ".png"))})
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{path}: cannot read the shard ({e})") from None


class PairDataset(IterableDataset):
    """Tokenized `plain`-template samples from webdataset shards: {"id", "input_ids", "labels", "images", "skipped"}."""

    def __init__(self, shards, tokenizer, image_processor, *, max_len: int = 2048, shuffle_buffer: int = 1000,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None, on_error: str = "stop",
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.shards = list_shards(shards)
        self.recorded_counts = recorded_counts([path for path, _ in self.shards])
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.max_len, self.shuffle_buffer, self.seed, self.max_pixels = max_len, shuffle_buffer, seed, max_pixels
        self.on_error = check_on_error(on_error)
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        self.rank, self.world_size = rank, world_size
        self.total = sum(count for _, count in self.shards)
        if self.total < world_size:
            raise DataError(f"{len(self.shards)} shards hold {self.total} samples, fewer than {world_size} ranks")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.total // self.world_size

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        quota = len(self) // n_workers + (worker < len(self) % n_workers)
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        rng = random.Random(f"{self.seed}/{self.epoch}/{slot}")
        produced = skipped = 0
        for repeat in itertools.count():  # passes over this slot's share until the quota is met
            seen, produced_before = 0, produced
            for raw in self._shuffled(self._pass(repeat, slot, n_slots), min(self.shuffle_buffer, quota), rng):
                if BROKEN_SHARD in raw:
                    skipped += raw[BROKEN_SHARD]
                    continue
                seen += 1
                if produced >= quota:
                    return
                try:
                    sample = self._decode(raw)
                except DataError as e:
                    if self.on_error == "stop":
                        raise
                    log.warning("%s (skipped)", e)
                    skipped += 1
                    continue
                sample["skipped"], skipped = skipped, 0
                produced += 1
                yield sample
            if produced >= quota:
                return
            if not seen:
                raise DataError(f"rank {self.rank}: its share of the {len(self.shards)} shards holds no readable "
                                f"samples")
            if produced == produced_before:  # every sample failed: another pass would fail the same way, forever
                raise DataError(f"rank {self.rank}: none of the {seen} samples in its share of the {len(self.shards)} "
                                f"shards could be used ({skipped} skipped); see the warnings above")

    def _pass(self, repeat: int, slot: int, n_slots: int) -> Iterator[dict]:
        """One pass over this slot's raw samples; each pass deals the shards in a new shuffled order."""
        order = list(self.shards)
        random.Random(f"{self.seed}/{self.epoch}/{repeat}").shuffle(order)
        split_shards = len(order) >= n_slots
        mine = order[slot::n_slots] if split_shards else order
        position = 0
        for raw in self._read(path for path, _ in mine):
            if BROKEN_SHARD in raw:
                if split_shards or slot == 0:  # every slot reads a shared shard: one of them counts its loss
                    yield raw
                continue
            if split_shards or position % n_slots == slot:
                yield raw
            position += 1

    @staticmethod
    def _shuffled(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
        """Shuffle within a buffer of `size` raw (still encoded) samples: decoded images would cost ~1 MB each."""
        buffer: list[dict] = []
        for raw in stream:
            buffer.append(raw)
            if len(buffer) >= size:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer

    def _read(self, paths: Iterable[str]) -> Iterator[dict]:
        """Raw samples of each shard in turn. A shard that breaks off (a tar error, or fewer samples than index.json
        records) stops the run; with skip, a `{BROKEN_SHARD: samples lost}` marker follows its good samples so the
        loss is counted like any skipped sample."""
        from webdataset.tariterators import tar_file_expander, group_by_keys, url_opener

        for path in paths:
            read = 0
            expected = self.recorded_counts.get(path)
            try:
                for raw in group_by_keys(tar_file_expander(url_opener([{"url": path}]))):
                    read += 1
                    yield raw
            except Exception as e:  # noqa: BLE001 - tarfile/IO errors of a broken shard
                error = DataError(f"{path}: cannot read the shard ({type(e).__name__}: {e})")
            else:
                if expected is None or read >= expected:
                    continue
                error = DataError(f"{path}: holds {read} samples but index.json says {expected}: the file is "
                                  f"truncated; copy it again")
            if self.on_error == "stop":
                raise error from None
            log.warning("%s (skipped)", error)
            yield {BROKEN_SHARD: max(expected - read, 1) if expected is not None else 1}

    def _decode(self, raw: dict) -> dict:
        key = str(raw.get("__key__"))
        where = f"{raw.get('__url__')}: sample {key!r}"
        if key.startswith(("/", "\\")) or ".." in re.split(r"[\\/]", key):
            raise DataError(f"{where}: member name {key!r} is an absolute or .. path; refusing an unsafe shard")
        meta = {}
        if "json" in raw:
            try:
                meta = json.loads(raw["json"])
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataError(f"{where}: bad json ({e})") from None
        sample_id = str(meta.get("id", raw.get("__key__"))) if isinstance(meta, dict) else str(raw.get("__key__"))
        where = f"{where} (id {sample_id!r})"
        data = raw.get("jpg", raw.get("png"))
        if data is None or "txt" not in raw:
            present = sorted(k for k in raw if not k.startswith("__"))
            raise DataError(f"{where}: needs a jpg or png image and a txt caption, has {present}")
        try:
            caption = raw["txt"].decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: caption is not UTF-8 ({e})") from None
        if not caption:
            raise DataError(f"{where}: empty caption")
        try:
            image = self.image_processor(open_rgb(data, name=where, max_pixels=self.max_pixels))
        except ImageError as e:
            raise DataError(str(e)) from None
        conversations = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
        input_ids, labels = tokenize_conversation(conversations, self.tokenizer, "plain", self.max_len)
        return {"id": sample_id, "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "images": [image]}


if __name__ == "__main__":
    raise SystemExit(shards_main(sys.argv[1:]))
