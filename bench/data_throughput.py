"""Data loading throughput and padding waste, measured against reference-style loaders in the same run.

Loaders (one process each, same images, same tokenizer, same 336 px CLIP transform with LLaVA's `pad` mode):
- `pairs`: our webdataset shard reader (PairDataset);
- `instruct`: our LLaVA-JSON dataset (InstructDataset: JSON parsed once into a compact buffer, images opened lazily);
- `llava`: LLaVA's LazySupervisedDataset approach (JSON list parsed once; per item PIL open, convert, pad, transform);
- `naive`: json.load of the whole file on every item access, then the same PIL work (the baseline the issue names).
Their cost beyond the shared image work is what differs; the JSON size (`--json-entries`) drives the naive loader.

Padding waste: share of padded positions in right-padded batches, for random batches, LLaVA's mega-batches
(`group_batches=1`) and our default grouping, on a LLaVA-1.5-like length mix (94 % image samples of 576 image tokens +
text, 6 % long text-only samples) and on the benchmark's own JSON.

    python bench/data_throughput.py [--json-entries 20000] [--items 200] [--images 64]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava.conversation import tokenize_conversation  # noqa: E402
from llava.data.instruct import InstructDataset  # noqa: E402
from llava.data.pairs import PairDataset, write_shards  # noqa: E402
from llava.data.sampler import ModalityLengthGroupedSampler, padding_waste  # noqa: E402
from llava.model.vision import ImageProcessor  # noqa: E402
from llava.tokenizer import Tokenizer  # noqa: E402

WORDS = ("a the cat dog man woman table street car red blue green small large sitting standing near on under next "
         "to holding looking at picture image shows there is are two three people building sky tree water").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """Smooth colour gradients plus mild noise: decodes like a photo (random noise would be unrealistically slow)."""
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * rng.uniform(0.1, 0.5) + y * rng.uniform(0.1, 0.5) + rng.uniform(0, 255)) % 255
                     for _ in range(3)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8))


def build_data(work: Path, n_images: int, n_entries: int, seed: int):
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    images = work / "images"
    images.mkdir()
    items = []
    for i in range(n_images):
        width, height = rng.choice([(640, 480), (480, 640), (640, 427), (500, 375)])
        photo_like(nprng, width, height).save(images / f"{i:06d}.jpg", quality=90)
        items.append({"id": f"{i:06d}", "image": str(images / f"{i:06d}.jpg"), "caption": sentence(rng, 12)})
    entries = []
    for k in range(n_entries):
        if rng.random() < 0.94:
            turns = []
            for t in range(rng.choice([1, 1, 2, 3, 5])):
                question = ("<image>\n" if t == 0 else "") + sentence(rng, rng.randint(5, 15))
                turns += [{"from": "human", "value": question},
                          {"from": "gpt", "value": sentence(rng, rng.randint(3, 80))}]
            entries.append({"id": str(k), "image": f"{k % n_images:06d}.jpg", "conversations": turns})
        else:
            entries.append({"id": str(k), "conversations": [
                {"from": "human", "value": sentence(rng, rng.randint(10, 60))},
                {"from": "gpt", "value": sentence(rng, rng.randint(50, 600))}]})
    json_file = work / "instruct.json"
    json_file.write_text(json.dumps(entries))
    corpus = [item["caption"] for item in items] + [sentence(rng, 20) for _ in range(200)]
    tokenizer = Tokenizer.train(corpus * 5, work / "tokenizer.model", vocab_size=600)
    return items, json_file, tokenizer


def expand2square(image, background):
    """LLaVA's train.py helper (the reference's own code path for image_aspect_ratio=pad)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


class ReferenceLoader:
    """LLaVA-style item access: `reload_json=True` re-reads the whole JSON per item (the naive baseline)."""

    def __init__(self, json_file: Path, image_folder: Path, tokenizer, processor: ImageProcessor, reload_json: bool):
        self.json_file, self.image_folder, self.tokenizer = json_file, image_folder, tokenizer
        self.transform, self.background = processor.transform, processor.background
        self.reload_json = reload_json
        self.entries = None if reload_json else json.loads(json_file.read_text())

    def __getitem__(self, i: int):
        entries = json.loads(self.json_file.read_text()) if self.reload_json else self.entries
        entry = entries[i]
        images = []
        if "image" in entry:
            image = Image.open(self.image_folder / entry["image"]).convert("RGB")
            images.append(self.transform(expand2square(image, self.background)))
        return tokenize_conversation(entry["conversations"], self.tokenizer, "vicuna_v1"), images


def rate(fn, n: int, rounds: int) -> float:
    """Best of `rounds` (samples/s): the least disturbed run on a shared machine."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def llava_like_lengths(n: int, seed: int):
    rng = np.random.default_rng(seed)
    has_image = rng.random(n) > 0.062
    with_image = np.clip(576 + rng.lognormal(np.log(250), 0.6, n), 0, 2048)
    text_only = np.clip(rng.lognormal(np.log(600), 0.9, n), 20, 2048)
    return np.where(has_image, with_image, text_only).astype(int).tolist(), has_image.tolist()


def waste_table(group_lengths, has_image, settings, seed: int, true_lengths=None):
    """Waste of batches grouped by `group_lengths`, counted with `true_lengths` (default: the same)."""
    true_lengths = group_lengths if true_lengths is None else true_lengths
    print(f"  {'batch x gpus x accum':>22} {'random':>8} {'LLaVA mega-batch':>17} {'ours (default)':>15}")
    for batch_size, world_size, grad_accum in settings:
        order = list(range(len(group_lengths)))
        random.Random(seed).shuffle(order)
        row = [padding_waste(true_lengths, [order[i:i + batch_size] for i in range(0, len(order), batch_size)])]
        for group_batches in (1, 32):
            sampler = ModalityLengthGroupedSampler(group_lengths, has_image, batch_size=batch_size,
                                                   world_size=world_size, grad_accum=grad_accum,
                                                   group_batches=group_batches, seed=seed)
            row.append(padding_waste(true_lengths, [b for step in sampler.global_batches() for b in step]))
        print(f"  {f'{batch_size}x{world_size}x{grad_accum}':>22} {row[0]:>8.1%} {row[1]:>17.1%} {row[2]:>15.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--json-entries", type=int, default=20000, help="entries in the instruction JSON")
    parser.add_argument("--items", type=int, default=100, help="samples read per loader")
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--rounds", type=int, default=2, help="repeats per loader; the best is reported")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        items, json_file, tokenizer = build_data(work, args.images, args.json_entries, args.seed)
        processor = ImageProcessor(args.image_size, aspect_mode="pad")
        write_shards((items * (args.items // len(items) + 1))[:args.items], work / "shards", shard_size=100)
        print(f"data: {args.images} JPEG photos, {args.json_entries} JSON entries "
              f"({json_file.stat().st_size / 2**20:.1f} MiB), built in {time.perf_counter() - t0:.1f}s")

        timings, loaded = {}, {}
        for mode in ("estimate", "exact"):
            t0 = time.perf_counter()
            loaded[mode] = InstructDataset(json_file, tokenizer, image_folder=work / "images",
                                           image_processor=processor, num_image_tokens=576, lengths=mode)
            timings[mode] = time.perf_counter() - t0
        instruct, exact_lengths = loaded["estimate"], loaded["exact"].lengths
        for mode, seconds in timings.items():
            print(f"InstructDataset init, lengths={mode}: {seconds:.2f}s = {seconds / args.json_entries * 1e6:.0f} "
                  f"us/entry (665K entries: ~{seconds / args.json_entries * 665e3:.0f}s)")

        n, rounds = args.items, args.rounds
        pairs = PairDataset(work / "shards", tokenizer, processor, shuffle_buffer=100)
        llava_style = ReferenceLoader(json_file, work / "images", tokenizer, processor, reload_json=False)
        naive = ReferenceLoader(json_file, work / "images", tokenizer, processor, reload_json=True)
        n_naive = max(10, n // 10)
        results = {
            "pairs (webdataset)": rate(lambda: sum(1 for _ in pairs), n, rounds),
            "instruct (ours)": rate(lambda: [instruct[i] for i in range(n)], n, rounds),
            "llava-style (json once)": rate(lambda: [llava_style[i] for i in range(n)], n, rounds),
            "naive (json.load per item)": rate(lambda: [naive[i] for i in range(n_naive)], n_naive, rounds),
        }
        base = results["naive (json.load per item)"]
        print(f"\nthroughput, 1 process, best of {rounds}, {args.image_size}px pad + CLIP transform + tokenization:")
        for name, value in results.items():
            print(f"  {name:<28} {value:8.1f} samples/s   {value / base:6.1f}x naive")

        print("\npadding waste, LLaVA-1.5-like length mix (100k samples):")
        settings = [(16, 8, 1), (16, 1, 1), (4, 8, 4), (4, 1, 1)]
        waste_table(*llava_like_lengths(100_000, args.seed), settings, args.seed)
        print(f"\npadding waste, this benchmark's JSON ({args.json_entries} samples), grouped by exact token lengths:")
        waste_table(exact_lengths.tolist(), instruct.has_image.tolist(), settings, args.seed)
        print("same, grouped by the default estimated lengths (waste counted with the exact ones):")
        waste_table(instruct.lengths.tolist(), instruct.has_image.tolist(), settings, args.seed,
                    true_lengths=exact_lengths.tolist())


if __name__ == "__main__":
    main()
