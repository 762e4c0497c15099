"""LLaVA instruction data exactly as released: a JSON list of `{"id", "image"?, "conversations": [{"from", "value"}]}`.

The JSON is parsed once and checked entry by entry (structure, roles, image paths); each entry is then kept serialized
in one bytes buffer, so DataLoader workers share it without the copy-on-access growth of a big list of dicts.
`lengths` (for length grouping) are estimated from character counts with a tokens-per-character ratio fitted on a
random subset (`lengths="exact"` tokenizes everything instead).
Images are opened in `__getitem__`, relative to `image_folder`; a path that could leave the folder (absolute, or with
a `..` part) is refused at load, and one that resolves outside it (through a symlink) when it is read. `<image>` tags follow LLaVA: a sample with one image and no tag gets `"<image>\\n"` in front
of its first question (as LLaVA's eval scripts do); otherwise tags and images must match in number.

Bad data: with `on_error="stop"` (default) the first malformed entry or unusable image raises DataError naming the
file, entry index and id; with `on_error="skip"` malformed entries are dropped at load (`num_malformed`) and a sample
whose image fails is replaced by the next sample of the same modality, the count travelling with the sample
(`sample["skipped"]`, summed per batch by the collator) so skips in DataLoader workers are not lost.
"""
from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from llava.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava.conversation import (ConversationError, get_template, length_profile, token_lengths,
                                tokenize_conversation)
from llava.data.errors import DataError, check_on_error, load_or_replace, log
from llava.data.images import DEFAULT_MAX_PIXELS, ImageError, open_rgb

MAX_REPLACEMENT_TRIES = 100  # a run of failures this long means a wrong image_folder, not a few bad files
CALIBRATION_SAMPLES = 2000  # samples tokenized exactly to fit the length estimate


_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def check_image_path(path, where: str) -> str:
    """A relative path inside the image folder, or DataError (string checks only: cheap for 665K entries)."""
    if not isinstance(path, str) or not path.strip():
        raise DataError(f"{where}: 'image' must be a non-empty relative path, got {path!r}")
    if path.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(path):
        raise DataError(f"{where}: image path {path!r} is absolute; paths must be relative to the image folder")
    if ".." in re.split(r"[\\/]", path):
        raise DataError(f"{where}: image path {path!r} contains '..' and could leave the image folder")
    return path


class InstructDataset(Dataset):
    def __init__(self, json_path: str | os.PathLike, tokenizer, *, image_folder: str | os.PathLike | None = None,
                 image_processor=None, template: str = "vicuna_v1", max_len: int = 2048,
                 num_image_tokens: int = 576, on_error: str = "stop", max_pixels: int = DEFAULT_MAX_PIXELS,
                 lengths: str = "estimate", seed: int = 0):
        self.json_path = Path(json_path)
        self.tokenizer, self.template = tokenizer, get_template(template)
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self._real_image_folder = self.image_folder.resolve() if self.image_folder is not None else None
        self.image_processor, self.max_len, self.max_pixels = image_processor, max_len, max_pixels
        self.on_error = check_on_error(on_error)
        self.num_malformed = 0

        if lengths not in ("estimate", "exact"):
            raise ValueError(f"lengths={lengths!r}; valid: estimate, exact")
        records, json_index, profiles = [], [], []
        for index, entry in enumerate(_read_json_list(self.json_path)):
            try:
                record, profile = self._check_entry(entry, index)
            except DataError as e:
                if self.on_error == "stop":
                    raise
                log.warning("%s (skipped)", e)
                self.num_malformed += 1
                continue
            records.append(record)
            json_index.append(index)
            profiles.append(profile)
        if not records:
            raise DataError(f"{self.json_path}: no usable entries ({self.num_malformed} malformed)")
        if self.num_malformed:
            log.warning("%s: skipped %d malformed entries of %d", self.json_path, self.num_malformed,
                        self.num_malformed + len(records))
        n_images = np.array([len(r["images"]) for r in records])
        if n_images.any() and (self.image_folder is None or self.image_processor is None):
            raise DataError(f"{self.json_path}: {int((n_images > 0).sum())} entries have images; pass image_folder "
                            "and image_processor (e.g. model.image_processor())")
        self.json_index = np.array(json_index)
        self.has_image = n_images > 0
        conversations = [r["conversations"] for r in records]
        if lengths == "exact":
            tokens = np.array(token_lengths(conversations, tokenizer, self.template))
        else:
            tokens = self._estimate_tokens(conversations, np.array(profiles), seed)
        # Positions in the model after each placeholder becomes num_image_tokens features, as the model cuts them.
        self.lengths = np.minimum(tokens + n_images * (num_image_tokens - 1), max_len)
        encoded = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._offsets = np.cumsum([0] + [len(e) for e in encoded])
        self._blob = b"".join(encoded)
        self._by_modality = {flag: np.flatnonzero(self.has_image == flag) for flag in (False, True)}

    def _estimate_tokens(self, conversations: list, profiles: np.ndarray, seed: int) -> np.ndarray:
        """Token counts as control tokens + characters x (tokens per character of a tokenized random subset).

        Exact counts cost a SentencePiece pass over the whole dataset (minutes for LLaVA-1.5's 665K samples, on every
        rank); for grouping by length, a per-dataset ratio is as good (bench/data_throughput.py compares them).
        """
        fixed, chars = profiles[:, 0], profiles[:, 1]
        rng = np.random.default_rng(seed)
        subset = rng.choice(len(conversations), min(len(conversations), CALIBRATION_SAMPLES), replace=False)
        exact = np.array(token_lengths([conversations[i] for i in subset], self.tokenizer, self.template))
        ratio = (exact - fixed[subset]).sum() / max(int(chars[subset].sum()), 1)
        return fixed + np.rint(chars * ratio).astype(int)

    def _where(self, index: int, sample_id=None) -> str:
        return f"{self.json_path}: entry {index}" + (f" (id {sample_id!r})" if sample_id is not None else "")

    def _check_entry(self, entry, index: int) -> dict:
        if not isinstance(entry, dict):
            raise DataError(f"{self._where(index)}: expected an object with 'conversations', got "
                            f"{type(entry).__name__}")
        sample_id = entry.get("id", index)
        where = self._where(index, sample_id)
        if "conversations" not in entry:
            raise DataError(f"{where}: missing 'conversations'")
        image = entry.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(paths, list):
            raise DataError(f"{where}: 'image' must be a path or a list of paths, got {image!r}")
        paths = [check_image_path(p, where) for p in paths]
        conversations = entry["conversations"]
        try:
            conversations = _place_image_tags(conversations, len(paths))
            segments = self.template.segments(conversations, need_answer=True)
        except ConversationError as e:
            raise DataError(f"{where}: {e}") from None
        record = {"id": str(sample_id), "index": index, "images": paths, "conversations": conversations}
        return record, length_profile(segments)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def record(self, i: int) -> dict:
        """The checked entry i: {"id", "index" (in the JSON file), "images", "conversations"}."""
        return pickle.loads(self._blob[self._offsets[i]:self._offsets[i + 1]])  # written by __init__ above

    def __getitem__(self, i: int) -> dict:
        group = self._by_modality[bool(self.has_image[i])]
        start = int(np.searchsorted(group, i))
        candidates = (int(group[(start + k) % len(group)]) for k in range(min(len(group), MAX_REPLACEMENT_TRIES)))
        return load_or_replace(
            self._load, candidates, self.on_error,
            lambda skipped: f"{self.json_path}: {skipped} samples in a row failed to load around entry "
                            f"{self.json_index[i]}; is image_folder ({self.image_folder}) right?")

    def _load(self, i: int) -> dict:
        record = self.record(i)
        input_ids, labels = tokenize_conversation(record["conversations"], self.tokenizer, self.template,
                                                  self.max_len)
        # A cut that drops placeholders drops their images too (the model needs one image per placeholder).
        n_kept = input_ids.count(IMAGE_TOKEN_INDEX)
        images = []
        for path in record["images"][:n_kept]:
            where = self._where(record["index"], record["id"])
            # The string checks at load cannot see symlinks: follow them now and open what they point to.
            real = (self.image_folder / path).resolve()
            if not real.is_relative_to(self._real_image_folder):
                raise DataError(f"{where}: image path {path!r} resolves to {real}, outside the image folder "
                                f"{self._real_image_folder}")
            try:
                image = open_rgb(real, max_pixels=self.max_pixels)
            except ImageError as e:
                raise DataError(f"{where}: {e}") from None
            images.append(self.image_processor(image))
        return {"id": record["id"], "input_ids": torch.tensor(input_ids, dtype=torch.long),
                "labels": torch.tensor(labels, dtype=torch.long), "images": images}


def _read_json_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"{path}: JSON data file not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: the top level must be a JSON list of samples, got {type(data).__name__}")
    return data


def _place_image_tags(conversations, n_images: int):
    """Check tag/image counts; a single image without a tag goes in front of the first question."""
    if not isinstance(conversations, list) or not conversations or not all(
            isinstance(t, dict) and isinstance(t.get("value"), str) for t in conversations):
        raise ConversationError("'conversations' must be a non-empty list of {'from', 'value'} objects with string "
                                "values")
    n_tags = sum(turn["value"].count(DEFAULT_IMAGE_TOKEN) for turn in conversations)
    if n_images == 1 and n_tags == 0:
        first = conversations[0]
        return [{**first, "value": DEFAULT_IMAGE_TOKEN + "\n" + first["value"]}, *conversations[1:]]
    if n_tags != n_images:
        raise ConversationError(f"{n_tags} <image> tags but {n_images} images")
    return conversations
