"""What a vision tower's patch tokens say about each object: linear probes on the tokens under each box.

For every box of a captions file (`llava-pipeline scenes` writes them: label "small red circle", normalised bbox), the
tower's selected-layer patch tokens that the box touches are averaged (the features LLaVA's projector reads, at
LLaVA's `select_layer`), and one linear probe per word of the label (size, colour, shape for the scenes) and one each
for the box's column and row (left/center/right, top/middle/bottom, where data_gen.world.position_word finds them
clear) is fitted on the training scenes and scored on the held-out scenes, next to the majority-class baseline. A
tower that cannot tell the shapes apart here cannot give a LLaVA model built on it the answer to "What colour is the
triangle?".

    python bench/clip_probe.py --clip assets/tiny-bases/clip --train runs/demo/scenes/train \
        --heldout runs/demo/scenes/heldout [--select-layer -1] [--pool center]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load_tower(clip_dir: Path, select_layer: int):
    """The open_clip local-dir tower as stage 1 builds it (stages.common reads the layout)."""
    from llava.model.vision import build_vision_tower
    from stages.common import open_clip_dir

    config, weights, _ = open_clip_dir(clip_dir)
    return build_vision_tower(config, weights, select_layer=select_layer).eval()


def box_features(tower, folder: Path, pool: str = "mean") -> tuple[torch.Tensor, list[list[str]]]:
    """[boxes, width] patch tokens under each box (`pool` "mean": their average; "center": the one patch at the box's
    centre, what a reader of one token gets), and each box's words: its label's, then its column and row words
    (data_gen.world.position_word, the rule the questions use; "-" where that is ambiguous)."""
    from data_gen import world
    from data_gen.records import read_captions
    from llava.data.images import open_rgb
    from stages.base import box_weights

    processor = tower.image_processor()
    grid = tower.visual.grid_size[0]
    records, _ = read_captions(folder / "captions.jsonl")
    features, words = [], []
    for start in range(0, len(records), 128):
        chunk = records[start:start + 128]
        with torch.no_grad():
            tokens = tower(torch.stack([processor(open_rgb(folder / "images" / r.image)) for r in chunk]))
        for record, image_tokens in zip(chunk, tokens):
            for box in record.boxes:
                if pool == "center":
                    x0, y0, x1, y1 = box.bbox
                    col, row = (min(grid - 1, int((a + b) / 2 * grid)) for a, b in ((x0, x1), (y0, y1)))
                    features.append(image_tokens[row * grid + col])
                else:
                    features.append(box_weights(box.bbox, grid) @ image_tokens)
                place = world.read_object(box)
                words.append(box.label.split() + [place.column or "-", place.row or "-"])
    if not features:
        raise SystemExit(f"{folder / 'captions.jsonl'} has no boxes to probe")
    return torch.stack(features), words


def probe(train_x, train_y, test_x, test_y, classes: int, steps: int = 300) -> float:
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    linear = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(linear(train_x), train_y).backward()
        optimizer.step()
    with torch.no_grad():
        return float((linear(test_x).argmax(-1) == test_y).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", type=Path, required=True, help="open_clip local dir (the base stage's clip/)")
    parser.add_argument("--train", type=Path, required=True, help="scenes folder with captions.jsonl and images/")
    parser.add_argument("--heldout", type=Path, required=True, help="held-out scenes folder (same layout)")
    parser.add_argument("--select-layer", type=int, default=-2)
    parser.add_argument("--pool", choices=("mean", "center"), default="mean",
                        help="the box's patches averaged, or only the patch at its centre")
    args = parser.parse_args(argv)

    tower = load_tower(args.clip, args.select_layer)
    train_x, train_words = box_features(tower, args.train, args.pool)
    test_x, test_words = box_features(tower, args.heldout, args.pool)
    slots = min(map(len, train_words + test_words)) - 2
    print(f"{len(train_x)} training boxes, {len(test_x)} held-out boxes, layer {args.select_layer}, pool {args.pool}")
    print("| what | classes | held-out probe accuracy | majority baseline |\n|---|---:|---:|---:|")
    # the label's words, then where the box is: the last two slots, boxes with an ambiguous place left out
    for slot, name in [*((k, f"label word {k + 1}") for k in range(slots)), (-2, "column"), (-1, "row")]:
        train = [k for k, w in enumerate(train_words) if w[slot] != "-"]
        test = [k for k, w in enumerate(test_words) if w[slot] != "-"]
        names = sorted({train_words[k][slot] for k in train} | {test_words[k][slot] for k in test})
        train_y = torch.tensor([names.index(train_words[k][slot]) for k in train])
        test_y = torch.tensor([names.index(test_words[k][slot]) for k in test])
        accuracy = probe(train_x[train], train_y, test_x[test], test_y, len(names))
        majority = float(torch.bincount(test_y, minlength=len(names)).max()) / len(test_y)
        print(f"| {name} ({'/'.join(names[:4])}{'/...' if len(names) > 4 else ''}) | {len(names)} | "
              f"{accuracy:.3f} | {majority:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
