"""Batching samples for LlavaModel.forward: right padding, labels padded with IGNORE_INDEX, an attention mask, and
the batch's images stacked in placeholder order (sample by sample, as `images` expects)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence

from llava.constants import IGNORE_INDEX


@dataclass
class Collator:
    pad_id: int  # the tokenizer's pad id (unk for LLaMA, as LLaVA does); masked out by attention_mask and labels

    def __call__(self, samples: list[dict]) -> dict:
        if not samples:
            raise ValueError("Collator: empty batch")
        input_ids = [s["input_ids"] for s in samples]
        images = [image for s in samples for image in s["images"]]
        shapes = {tuple(image.shape) for image in images}
        if len(shapes) > 1:
            raise ValueError(f"Collator: images of different shapes {sorted(shapes)} in one batch; preprocess them "
                             "with one image processor")
        return {
            "input_ids": pad_sequence(input_ids, batch_first=True, padding_value=self.pad_id),
            "labels": pad_sequence([s["labels"] for s in samples], batch_first=True, padding_value=IGNORE_INDEX),
            "attention_mask": pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids in input_ids],
                                           batch_first=True, padding_value=0),
            "images": torch.stack(images) if images else None,
            "ids": [s["id"] for s in samples],
            "num_skipped": sum(s.get("skipped", 0) for s in samples),  # bad samples replaced on the way (on_error=skip)
        }
