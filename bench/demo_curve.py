"""How fast stage 2 learns the demo's short answers: exact match on training and held-out questions every N steps.

Starts from a finished demo run's stage-1 output (`RUN/align`), trains projector + LLM (as the demo's stage 2: AdamW,
warm-up then cosine, gradient clipping 1.0) on a chosen part of the run's instruction data, and every `--every` steps
answers `--questions` short-answer questions of training scenes (turns of the training data) and of the held-out scenes
(`RUN/data/questions.jsonl`) greedily, scored like `llava-pipeline eval` (exact match after normalisation). The gap
between the two columns is over-fitting to the training scenes; a slow rise of both is the model's learning speed.

`--vision` separates what the LLM can learn from what the tower shows it:
- `clip` (default): the run's CLIP tower and stage-1 projector, as the demo trains them.
- `oracle`: the tower and projector are replaced by exact per-patch scene facts, read from the captions files'
  boxes: for each of the grid's patches, one-hot colour + shape + size of every box over it, plus one-hot row and
  column, through a fresh trainable 2-layer MLP. A perfect vision tower could give the LLM no more than this.
- `text`: no image at all; the scene is given as text in its place ("Objects: large red triangle in the bottom left
  corner; ..."), as the data generator's GPT sees it.

    python bench/demo_curve.py --run runs/demo [--data short_answer] [--steps 1600] [--every 400] [--lr 1e-3] \
        [--vision clip|oracle|text]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def training_questions(samples: list[dict], limit: int) -> list[dict]:
    """The first short-answer turn of the first `limit` samples, as eval question lines (with the reference)."""
    from llava.constants import DEFAULT_IMAGE_TOKEN

    out = []
    for sample in samples[:limit]:
        human, gpt = sample["conversations"][0]["value"], sample["conversations"][1]["value"]
        text = human.replace(DEFAULT_IMAGE_TOKEN + "\n", "").replace("\n" + DEFAULT_IMAGE_TOKEN, "")
        out.append({"question_id": sample["id"], "image": sample["image"], "text": text, "answer": gpt,
                    "category": "train"})
    return out


def scene_facts(captions_jsonl: Path, grid: int) -> dict[str, torch.Tensor]:
    """{image file: [grid * grid, features]} exact per-patch facts of each scene (see --vision oracle)."""
    from data_gen.records import read_captions
    from data_gen.world import SCENE_COLOURS, SCENE_SHAPES, SCENE_SIZES, read_objects
    from stages.base import box_weights

    colours, shapes, sizes = list(SCENE_COLOURS), list(SCENE_SHAPES), list(SCENE_SIZES)
    base = len(colours) + len(shapes) + len(sizes)
    records, _ = read_captions(captions_jsonl)
    facts = {}
    for record in records:
        f = torch.zeros(grid, grid, base + 2 * grid)
        for i in range(grid):
            f[i, :, base + i] = 1.0  # row
            f[:, i, base + grid + i] = 1.0  # column
        for obj in read_objects(record.boxes):
            if None in (obj.colour, obj.shape, obj.size):
                raise SystemExit(f"{captions_jsonl}: image {record.image}: box label {obj.label!r} is not a scene "
                                 "label '<size> <colour> <shape>'; --vision oracle needs a `scenes` run")
            under = box_weights((obj.x1, obj.y1, obj.x2, obj.y2), grid).view(grid, grid) > 0  # as the base stage
            for feature in (colours.index(obj.colour), len(colours) + shapes.index(obj.shape),
                            len(colours) + len(shapes) + sizes.index(obj.size)):
                f[..., feature] += under.float()
        facts[record.image] = f.flatten(0, 1)
    return facts


def scene_texts(captions_jsonl: Path) -> dict[str, str]:
    """{image file: "Objects: <label> <location>; ..."} (see --vision text)."""
    from data_gen.records import read_captions
    from data_gen.world import read_objects

    records, _ = read_captions(captions_jsonl)
    return {r.image: "Objects: " + "; ".join(f"{o.label} {o.location}" for o in read_objects(r.boxes)) + "."
            for r in records}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="out_dir of a finished `llava-pipeline run`")
    parser.add_argument("--data", default="short_answer",
                        help="comma-separated parts of RUN/data: conversation, detail, reasoning, short_answer")
    parser.add_argument("--steps", type=int, default=1600)
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--questions", type=int, default=150, help="questions per side at each evaluation")
    parser.add_argument("--max-len", type=int, default=384)
    parser.add_argument("--vision", choices=("clip", "oracle", "text"), default="clip")
    args = parser.parse_args(argv)

    from llava.data.collate import Collator
    from llava.data.instruct import InstructDataset
    from llava.evaluation import answer_questions, read_questions, score_answers
    from llava.loading import LoadedModel
    from stages import instruct
    from stages.common import bind_stage

    torch.manual_seed(0)
    samples = [s for part in args.data.split(",") for s in
               json.loads((args.run / "data" / f"{part.strip()}.json").read_text())]
    random.Random(0).shuffle(samples)
    scenes = {side: args.run / "scenes" / side / "captions.jsonl" for side in ("train", "heldout")}
    scene_text = {side: scene_texts(path) for side, path in scenes.items()} if args.vision == "text" else {}
    if args.vision == "text":
        from llava.constants import DEFAULT_IMAGE_TOKEN

        samples = [{"id": s["id"], "conversations": [
            {**turn, "value": turn["value"].replace(DEFAULT_IMAGE_TOKEN, scene_text["train"][s["image"]])}
            if k == 0 else turn
            for k, turn in enumerate(s["conversations"])]} for s in samples]
    scratch = Path(tempfile.mkdtemp(prefix="demo_curve_"))
    (scratch / "train.json").write_text(json.dumps(samples))
    short = json.loads((args.run / "data" / "short_answer.json").read_text())
    (scratch / "train_questions.jsonl").write_text(
        "".join(json.dumps(q) + "\n" for q in training_questions(short, args.questions)))

    cfg = bind_stage(instruct.SCHEMA, {"output_dir": str(scratch / "out"), "align_dir": str(args.run / "align"),
                                       "data": str(scratch / "train.json"),
                                       "image_folder": str(args.run / "scenes" / "train" / "images"),
                                       "max_len": args.max_len, "train": {"precision": "fp32"}},
                     name="demo_curve", train_sections=instruct.TRAIN_SECTIONS)
    model, tokenizer = instruct.starting_model(cfg)
    data = InstructDataset(cfg.data, tokenizer, image_folder=cfg.image_folder, image_processor=model.image_processor(),
                           template=model.config.template, max_len=args.max_len,
                           num_image_tokens=model.num_image_tokens)
    collate = Collator(tokenizer.pad_id)
    facts = {}
    if args.vision == "oracle":
        grid = model.vision.visual.grid_size[0]
        facts = {side: scene_facts(path, grid) for side, path in scenes.items()}
        width = next(iter(facts["train"].values())).shape[-1]
        model.projector = torch.nn.Sequential(torch.nn.Linear(width, model.llm.config.dim), torch.nn.GELU(),
                                              torch.nn.Linear(model.llm.config.dim, model.llm.config.dim))
        model.encode_images = lambda facts_batch: model.projector(facts_batch)  # "images" are now facts tensors
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sides = (("train", scratch / "train_questions.jsonl", args.run / "scenes" / "train" / "images"),
             ("held-out", args.run / "data" / "questions.jsonl", args.run / "scenes" / "heldout" / "images"))
    print(f"{len(data)} samples ({args.data}); {args.steps} steps x {args.batch}; lr {args.lr}; vision {args.vision}\n")
    print("| step | seconds | train exact match | held-out exact match | held-out by category |")
    print("|---:|---:|---:|---:|---|")

    def evaluate(step: int, seconds: float) -> None:
        model.eval()
        loaded = LoadedModel(model=model, tokenizer=tokenizer, template=model.config.template, model_id="curve")
        cells, detail = [], ""
        for name, question_file, folder in sides:
            questions = [q for q in read_questions(question_file) if q.answer is not None][:args.questions]
            side = "train" if name == "train" else "heldout"
            if args.vision == "oracle":
                loaded.open_image = lambda path, side=side: facts[side][Path(path).name]
            elif args.vision == "text":
                questions = [dataclasses.replace(q, image=None, text=f"{scene_text[side][q.image]}\n{q.text}")
                             for q in questions]
            texts = answer_questions(loaded, questions, folder, batch_size=50, max_new_tokens=8)
            scores = score_answers(questions, {str(q.question_id): t for q, t in zip(questions, texts)})
            cells.append(scores["overall"]["accuracy"])
            if name == "held-out":
                detail = " ".join(f"{c} {v['accuracy']:.2f}" for c, v in scores["categories"].items())
        print(f"| {step} | {seconds:.0f} | {cells[0]:.3f} | {cells[1]:.3f} | {detail} |", flush=True)
        model.train()

    order = torch.randperm(len(data)).tolist()
    warmup = max(1, args.steps // 30)
    model.train()
    started = time.perf_counter()
    for step in range(args.steps):
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = args.lr * scale
        picked = [order[(step * args.batch + j) % len(order)] for j in range(args.batch)]
        batch = collate([data[i] for i in picked])
        if args.vision == "oracle":
            batch["images"] = torch.stack([facts["train"][data.record(i)["images"][0]] for i in picked])
        loss = model(**{k: batch[k] for k in ("input_ids", "labels", "attention_mask", "images")})["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % args.every == 0 or step + 1 == args.steps:
            evaluate(step + 1, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
