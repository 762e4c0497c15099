"""Synthetic scenes with known objects: images, captions and boxes, plus webdataset shards of image–caption pairs.

The world is small on purpose so that a tiny model can learn it: a plain gray background and 1–3 non-overlapping
shapes (circle, square, triangle) in six colours and two sizes. Every caption is built from the same facts as the boxes
(data_gen.world), so captions, boxes and pixels always agree. Scene i depends only on (seed, i): the same seed gives
byte-identical files, and rendering more scenes keeps the first ones unchanged.
"""
from __future__ import annotations

import io
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from data_gen.records import Box, CaptionRecord, write_captions
from data_gen import world
from data_gen.world import SCENE_COLOURS, SCENE_SHAPES, SCENE_SIZES, SceneObject
from llava.io import atomic_path

MIN_CANVAS = 32
SHARD_PATTERN = "pairs-%05d.tar"
BACKGROUNDS = (190, 250)  # the gray shades of training backgrounds (both ends included)


@dataclass(frozen=True)
class PlacedShape:
    size: str
    colour: str
    shape: str
    x0: int
    y0: int
    side: int

    @property
    def label(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    def bbox(self, canvas: int) -> tuple[float, float, float, float]:
        return (self.x0 / canvas, self.y0 / canvas, (self.x0 + self.side) / canvas, (self.y0 + self.side) / canvas)


@dataclass(frozen=True)
class Scene:
    background: int
    shapes: tuple[PlacedShape, ...]


def sample_scene(rng: random.Random, canvas: int, background: tuple[int, int] = BACKGROUNDS) -> Scene:
    """1–3 shapes whose boxes keep a gap of at least `gap` pixels and that all have a position word (their centres
    avoid the lines between thirds; see world.position_word), so every caption and answer can place every shape."""
    gap = max(1, canvas // 32)
    background = rng.randint(*background)  # a gray shade (out-of-distribution test images use other shades)
    count = rng.randint(1, 3)
    while True:  # a full canvas is rare; start the scene over (still deterministic in rng)
        placed: list[PlacedShape] = []
        for _ in range(count):
            shape = _place_one(rng, canvas, gap, placed)
            if shape is None:
                break
            placed.append(shape)
        if len(placed) == count:
            return Scene(background, tuple(placed))


def _place_one(rng: random.Random, canvas: int, gap: int, placed: list[PlacedShape]) -> PlacedShape | None:
    size = rng.choice(sorted(SCENE_SIZES))
    colour = rng.choice(list(SCENE_COLOURS))
    shape = rng.choice(SCENE_SHAPES)
    lo, hi = SCENE_SIZES[size]
    side = rng.randint(math.ceil(lo * canvas), math.floor(hi * canvas))
    for _ in range(100):
        x0, y0 = rng.randint(0, canvas - side), rng.randint(0, canvas - side)
        cx, cy, extent = (x0 + side / 2) / canvas, (y0 + side / 2) / canvas, side / canvas
        if None in (world.position_word(cx, extent, world.COLUMNS), world.position_word(cy, extent, world.ROWS)):
            continue
        if all(_apart(x0, y0, side, other, gap) for other in placed):
            return PlacedShape(size, colour, shape, x0, y0, side)
    return None


def _apart(x0: int, y0: int, side: int, other: PlacedShape, gap: int) -> bool:
    return (x0 >= other.x0 + other.side + gap or other.x0 >= x0 + side + gap
            or y0 >= other.y0 + other.side + gap or other.y0 >= y0 + side + gap)


def draw_scene(scene: Scene, canvas: int) -> Image.Image:
    """Aliased drawing (no anti-aliasing): every pixel of a shape has exactly the shape's colour."""
    image = Image.new("RGB", (canvas, canvas), (scene.background,) * 3)
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        fill = SCENE_COLOURS[s.colour]
        x1, y1 = s.x0 + s.side - 1, s.y0 + s.side - 1
        if s.shape == "circle":
            draw.ellipse([s.x0, s.y0, x1, y1], fill=fill)
        elif s.shape == "square":
            draw.rectangle([s.x0, s.y0, x1, y1], fill=fill)
        else:  # triangle pointing up: base along the bottom of the box, apex at the top centre
            draw.polygon([(s.x0, y1), (x1, y1), (s.x0 + (s.side - 1) / 2, s.y0)], fill=fill)
    return image


def _background_word(value: int) -> str:
    return "gray" if value < 215 else "light gray" if value < 235 else "pale gray"


def scene_captions(scene: Scene, canvas: int, rng: random.Random, count: int = 3) -> list[str]:
    """`count` captions in different phrasings; each names every object by its full label."""
    objects = [world.read_object(Box(s.label, s.bbox(canvas))) for s in scene.shapes]
    background = _background_word(scene.background)
    builders = [_caption_inventory, _caption_counted, _caption_located, _caption_there_is, _caption_plain_image]
    if sum(_unique_label(o, objects) for o in objects) >= 2:  # relate only objects a reader can tell apart
        builders.append(_caption_relation)
    chosen = rng.sample(builders, min(count, len(builders)))
    return [world.capitalise(build(rng.sample(objects, len(objects)), background, rng)) for build in chosen]


def _unique_label(obj: SceneObject, objects: list[SceneObject]) -> bool:
    return sum(o.label == obj.label for o in objects) == 1


def _caption_inventory(objects: list[SceneObject], background: str, rng: random.Random) -> str:
    return f"{world.inventory(objects)} on a {background} background."


def _caption_counted(objects: list[SceneObject], background: str, rng: random.Random) -> str:
    if len(objects) == 1:
        return f"a single shape: {world.with_article(objects[0].label)}."
    return f"{world.number_word(len(objects))} shapes: {world.inventory(objects)}."


def _caption_located(objects: list[SceneObject], background: str, rng: random.Random) -> str:
    return world.join_list([f"{world.with_article(o.label)} {o.location}" for o in objects]) + "."


def _caption_there_is(objects: list[SceneObject], background: str, rng: random.Random) -> str:
    groups = world.grouped_counts(objects)
    verb = "is" if groups[0][1] == 1 else "are"
    place = rng.choice(["in this picture", "in the image", f"on a plain {background} background"])
    return f"there {verb} {world.inventory(objects)} {place}."


def _caption_plain_image(objects: list[SceneObject], background: str, rng: random.Random) -> str:
    opening = rng.choice([f"a {background} image with", "simple shapes on a plain background:",
                          "a plain picture showing"])
    return f"{opening} {world.inventory(objects)}."


def _caption_relation(objects: list[SceneObject], background: str, rng: random.Random) -> str:
    a, b = [o for o in objects if _unique_label(o, objects)][:2]
    relations = []
    if world.left_of(a, b):
        relations.append("to the left of")
    if world.left_of(b, a):
        relations.append("to the right of")
    if world.above(a, b):
        relations.append("above")
    if world.above(b, a):
        relations.append("below")
    text = f"{world.with_article(a.label)} {rng.choice(relations)} {world.with_article(b.label)}"
    for other in objects:
        if other is not a and other is not b:
            text += f", and {world.with_article(other.label)} {other.location}"
    return text + "."


def render_scenes(out_dir: str | os.PathLike, num: int, seed: int = 0, size: int = 64, shards_per: int = 1000,
                  captions_per_image: int = 3, prefix: str = "scene",
                  background: tuple[int, int] = BACKGROUNDS) -> dict:
    """Write out_dir/images/*.png, out_dir/captions.jsonl (image paths relative to out_dir/images) and
    out_dir/shards/pairs-%05d.tar (one sample per image: png, txt = one of its captions, json = {"id"}).

    Returns a summary dict with the paths and counts.
    """
    if size < MIN_CANVAS:
        raise ValueError(f"--size {size} is too small: the scene world needs a canvas of at least {MIN_CANVAS} px")
    if num < 1 or shards_per < 1 or captions_per_image < 1:
        raise ValueError("--num, --shards-per and --captions-per-image must be at least 1")
    out_dir = Path(out_dir)
    image_dir, shard_dir = out_dir / "images", out_dir / "shards"
    image_dir.mkdir(parents=True, exist_ok=True)
    shard_dir.mkdir(parents=True, exist_ok=True)

    records: list[CaptionRecord] = []
    pairs: list[tuple[str, bytes, str]] = []  # the shard being filled
    shard_paths: list[Path] = []
    for index in range(num):
        rng = random.Random(f"{seed}:{index}")
        scene = sample_scene(rng, size, background)
        captions = scene_captions(scene, size, rng, captions_per_image)
        record_id = f"{prefix}_{index:06d}"
        buffer = io.BytesIO()
        draw_scene(scene, size).save(buffer, format="PNG")
        png = buffer.getvalue()
        with atomic_path(image_dir / f"{record_id}.png") as tmp:
            tmp.write_bytes(png)
        boxes = tuple(Box(s.label, s.bbox(size)) for s in scene.shapes)
        records.append(CaptionRecord(record_id, f"{record_id}.png", tuple(captions), boxes))
        pairs.append((record_id, png, rng.choice(captions)))
        if len(pairs) == shards_per or index == num - 1:
            shard_paths.append(_write_shard(shard_dir / (SHARD_PATTERN % len(shard_paths)), pairs))
            pairs = []
    for stale in set(shard_dir.glob("pairs-*.tar")) - set(shard_paths):
        stale.unlink()  # left from an earlier, larger render: a loader globbing the folder must see only this one

    captions_path = out_dir / "captions.jsonl"
    write_captions(captions_path, records)  # last: its presence marks a finished render
    return {"images": len(records), "image_folder": str(image_dir), "captions": str(captions_path),
            "shards": [str(p) for p in shard_paths]}


def _write_shard(path: Path, pairs: list[tuple[str, bytes, str]]) -> Path:
    """Written under a temporary name and renamed, so a reader never sees half a tar."""
    import webdataset as wds  # here, not at the top: webdataset imports torch, which generate and coco do not need

    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        writer = wds.TarWriter(f, mtime=0.0)  # fixed mtime: same seed, same bytes
        for record_id, png, caption in pairs:
            writer.write({"__key__": record_id, "png": png, "txt": caption,
                          "json": json.dumps({"id": record_id}).encode("utf-8")})
        writer.close()
    return path
