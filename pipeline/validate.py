"""`llava-pipeline validate`: a pre-flight scan of instruction data, read exactly the way training will read it.

Training finds a bad row only when it reaches it (with `on_error=stop`, hours in) or skips it quietly (`skip`). This
scans the whole file first, through the training code itself (`llava.data.instruct.InstructDataset`, its template and
tokenizer, `llava.data.images.open_rgb`), and reports:

- every bad row by JSON index and id, with the reason: structure, roles, `<image>` tags vs images, image paths that
  would leave the image folder, images that are missing or do not decode (or trip the decompression-bomb guard), and
  samples whose every answer token is cut by `max_len` (they would train on nothing);
- how many samples `max_len` truncates after the image splice (each `<image>` becomes `image_tokens` positions), and in
  how many of them image features are cut;
- a histogram of sequence lengths and the padding the batching would waste, with the length-grouped sampler that
  training uses and with a random order.

Exit status: 0 clean, 1 bad rows (or an unreadable file), 2 wrong arguments or config. Rows are probed in parallel
DataLoader workers (as training loads them); `--sample K` probes a random K of them.

`--config RUN.yaml` takes everything from a run config's `instruct` section, wired to the earlier stages the way
`llava-pipeline run` wires it (or from an instruct stage config): data, image folder, template, max_len, the tokenizer
and vision tower of the model it starts from, micro-batch size, grad_accum and ranks.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.conversation import TEMPLATES, tokenize_conversation
from llava.data.errors import DataError
from llava.data.images import DEFAULT_MAX_PIXELS
from llava.data.instruct import InstructDataset
from llava.data.sampler import ModalityLengthGroupedSampler, padding_waste
from llava.io import atomic_write_json
from stages.config import ConfigError, bind

EXIT_CLEAN, EXIT_BAD_ROWS, EXIT_USAGE = 0, 1, 2
SHOWN_ROWS = 20  # bad rows printed; the JSON report holds all of them


@dataclass
class ValidateSettings:
    data: str
    tokenizer: str
    image_folder: str | None = None
    template: str = "vicuna_v1"
    max_len: int = 2048
    image_tokens: int = 576  # positions one image takes after the splice (ViT-L/14 at 336 px: 576)
    batch_size: int = 16  # per rank, as training batches
    world_size: int = 1
    grad_accum: int = 1
    sample: int = 0  # > 0: probe only this many random rows (structure is still checked for every row)
    seed: int = 0
    workers: int = min(8, os.cpu_count() or 1)
    max_pixels: int = DEFAULT_MAX_PIXELS
    model_vocab_size: int | None = None  # the model's embedding rows, when known: the tokenizer must fit in them

    def check(self) -> None:
        if self.template not in TEMPLATES:
            raise ConfigError(f"unknown template {self.template!r}; valid: {', '.join(TEMPLATES)}")
        for name in ("max_len", "image_tokens", "batch_size", "world_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sample < 0 or self.workers < 0:
            raise ConfigError("sample and workers must be >= 0")


class _RecordingDataset(InstructDataset):
    """InstructDataset that also keeps (index, id, message) of every malformed entry it leaves out, in a list the
    caller owns: the caller keeps it even when the constructor raises because no entry at all is usable."""

    def __init__(self, *args, problems: list, **kwargs):
        self.problems = problems
        super().__init__(*args, **kwargs)

    def _check_entry(self, entry, index: int) -> dict:
        try:
            return super()._check_entry(entry, index)
        except DataError as e:
            self.problems.append({"index": index, "id": entry.get("id") if isinstance(entry, dict) else None,
                                  "reason": str(e)})
            raise


class _Probe(Dataset):
    """Loads row i exactly as training does (`dataset[i]`, images decoded) and measures it against max_len."""

    def __init__(self, dataset: InstructDataset, image_tokens: int, max_len: int):
        self.dataset, self.image_tokens, self.max_len = dataset, image_tokens, max_len

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        record = self.dataset.record(i)
        out = {"row": i, "index": record["index"], "id": record["id"], "error": None}
        try:
            self.dataset[i]
        except DataError as e:
            out["error"] = str(e)
            return out
        ids, labels = tokenize_conversation(record["conversations"], self.dataset.tokenizer, self.dataset.template)
        out.update(self.measure(ids, labels))
        return out

    def measure(self, ids: list[int], labels: list[int]) -> dict:
        """Positions after the image splice, and what a cut at max_len removes."""
        position = image_cut = supervised = supervised_kept = 0
        for token, label in zip(ids, labels):
            width = self.image_tokens if token == IMAGE_TOKEN_INDEX else 1
            if token == IMAGE_TOKEN_INDEX and position + width > self.max_len:
                image_cut += 1
            if label != IGNORE_INDEX:
                supervised += 1
                supervised_kept += position < self.max_len
            position += width
        return {"length": position, "images_cut": image_cut, "supervised": supervised,
                "supervised_kept": supervised_kept}


def _as_list(batch: list) -> list:
    return batch


def _undecorated(image):
    """The image processor of the scan: decoding is what can fail; resizing a decoded image cannot."""
    return image


def _load_dataset(s: ValidateSettings, tokenizer) -> tuple[InstructDataset | None, list[dict], str | None]:
    """(dataset or None, malformed rows, fatal message): structure is checked for every row at load."""
    problems: list[dict] = []
    quiet = logging.getLogger("llava.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the report lists the rows; no warning per row as well
    try:
        dataset = _RecordingDataset(
            s.data, tokenizer, image_folder=s.image_folder, image_processor=_undecorated,
            template=s.template, max_len=s.max_len, num_image_tokens=s.image_tokens, on_error="skip",
            max_pixels=s.max_pixels, problems=problems)
    except DataError as e:
        if problems:  # every row is malformed: the rows are the report
            return None, problems, None
        return None, problems, _with_hint(str(e), Path(s.data))
    finally:
        quiet.setLevel(level)
    if dataset.num_malformed != len(problems):
        raise RuntimeError(f"InstructDataset left out {dataset.num_malformed} entries but reported "
                           f"{len(problems)}: pipeline/validate.py is out of step with llava/data/instruct.py")
    dataset.on_error = "stop"  # from here on, a row that fails to load raises for that row, not the next one's
    return dataset, problems, None


def _with_hint(message: str, path: Path) -> str:
    """A file of JSON Lines fails as 'not valid JSON at line 2': say what it is and how to convert it."""
    if "not valid JSON at line 2" not in message:
        return message
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return message
    if not isinstance(first, dict):
        return message
    return (f"{message}\n  {path} looks like JSON Lines (one sample per line); training reads one JSON list. "
            f"Convert it with:\n  python -c \"import json,sys; print(json.dumps([json.loads(l) for l in "
            f"open(sys.argv[1]) if l.strip()]))\" {path} > {path.with_suffix('.json')}")


def scan(s: ValidateSettings) -> dict:
    """Check every row (or `s.sample` random rows) and return the report (see the module docstring)."""
    from llava.tokenizer import Tokenizer

    s.check()
    started = time.perf_counter()
    tokenizer = Tokenizer(s.tokenizer)
    if s.model_vocab_size is not None and tokenizer.vocab_size > s.model_vocab_size:
        raise ConfigError(f"tokenizer {tokenizer.model_file} has {tokenizer.vocab_size} pieces but the model's "
                          f"embedding has {s.model_vocab_size} rows: ids from {s.model_vocab_size} up would index past "
                          f"it. Use the tokenizer the model was trained with (the tokenizer.model in its directory)")
    report: dict = {"settings": asdict(s)}
    dataset, bad_rows, fatal = _load_dataset(s, tokenizer)
    if fatal is not None:
        return {**report, "fatal": fatal, "num_bad": 1, "bad_rows": [], "seconds": time.perf_counter() - started}
    report["entries"] = len(bad_rows) + (len(dataset) if dataset is not None else 0)
    rows: list[dict] = []
    if dataset is not None:
        chosen = np.arange(len(dataset))
        if 0 < s.sample < len(dataset):
            chosen = np.sort(np.random.default_rng(s.seed).choice(len(dataset), s.sample, replace=False))
        loader = DataLoader(_Probe(dataset, s.image_tokens, s.max_len), sampler=chosen.tolist(), batch_size=16,
                            num_workers=s.workers, collate_fn=_as_list)
        rows = [row for batch in loader for row in batch]
    bad_rows = bad_rows + [{"index": r["index"], "id": r["id"], "reason": r["error"]} for r in rows if r["error"]]
    good = [r for r in rows if not r["error"]]
    for r in good:
        if r["supervised"] and not r["supervised_kept"]:
            bad_rows.append({"index": r["index"], "id": r["id"], "reason": (
                f"{s.data}: entry {r['index']} (id {r['id']!r}): {r['length']} positions after the image splice; "
                f"max_len {s.max_len} cuts every answer token, so it would train on nothing (raise max_len or "
                f"shorten the sample)")})
    bad_rows.sort(key=lambda r: r["index"])
    report.update({
        "checked": len(rows), "sampled": 0 < s.sample < report["entries"], "num_bad": len(bad_rows),
        "bad_rows": bad_rows,
    })
    if dataset is not None:
        report.update(_length_report(s, dataset, good))
        ids = Counter(dataset.record(i)["id"] for i in range(len(dataset)))
        report["duplicate_ids"] = sorted(k for k, n in ids.items() if n > 1)
    report["seconds"] = time.perf_counter() - started
    return report


def _length_report(s: ValidateSettings, dataset: InstructDataset, good: list[dict]) -> dict:
    lengths = np.array([r["length"] for r in good], dtype=np.int64)
    truncated = [r for r in good if r["length"] > s.max_len]
    out: dict = {
        "with_images": int(dataset.has_image.sum()), "text_only": int((~dataset.has_image).sum()),
        "truncated": {
            "count": len(truncated), "images_cut": sum(1 for r in truncated if r["images_cut"]),
            "answer_tokens_lost": int(sum(r["supervised"] - r["supervised_kept"] for r in truncated)),
            "rows": [{"index": r["index"], "id": r["id"], "length": r["length"], "images_cut": r["images_cut"]}
                     for r in truncated],
        },
    }
    if len(lengths):
        out["lengths"] = {
            "min": int(lengths.min()), "median": float(np.median(lengths)), "p95": float(np.percentile(lengths, 95)),
            "max": int(lengths.max()), "mean": float(lengths.mean()), "histogram": _histogram(lengths, s.max_len),
        }
    # Padding as training will have it: batches from the sampler over the lengths it is given (the dataset's, an
    # estimate by default), padded to the real lengths (measured for every probed row; the estimate for the rest).
    lengths_seen, has_image = dataset.lengths.tolist(), dataset.has_image.tolist()
    real = list(lengths_seen)
    for r in good:
        real[r["row"]] = min(r["length"], s.max_len)
    grouped = ModalityLengthGroupedSampler(lengths_seen, has_image, batch_size=s.batch_size, world_size=s.world_size,
                                           grad_accum=s.grad_accum, seed=s.seed)
    grouped_batches = [b for step in grouped.global_batches() for b in step]
    order = torch.randperm(len(real), generator=torch.Generator().manual_seed(s.seed)).tolist()
    random_batches = [order[k:k + s.batch_size] for k in range(0, len(order), s.batch_size)]
    out["padding_waste"] = {"batch_size": s.batch_size, "length_grouped": padding_waste(real, grouped_batches),
                            "random": padding_waste(real, random_batches)}
    return out


def _histogram(lengths: np.ndarray, max_len: int, bins: int = 8) -> list[dict]:
    """`bins` equal bins up to max_len, plus one bin for what max_len cuts."""
    width = max(1, math.ceil(max_len / bins))
    edges = list(range(0, max_len, width)) + [max_len]
    counts = [int(((lengths > lo) & (lengths <= hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    out = [{"from": lo + 1, "to": hi, "count": n} for lo, hi, n in zip(edges, edges[1:], counts)]
    over = int((lengths > max_len).sum())
    if over:
        out.append({"from": max_len + 1, "to": int(lengths.max()), "count": over})
    return out


def format_report(report: dict) -> str:
    s = report["settings"]
    if "fatal" in report:
        return f"validate: {report['fatal']}"
    lines = [f"{s['data']}: {report['entries']} rows; probed {report['checked']}"
             f"{' (random sample)' if report['sampled'] else ''} with template {s['template']}, max_len "
             f"{s['max_len']}, {s['image_tokens']} positions per image, in {report['seconds']:.1f} s"]
    if "with_images" in report:
        lines.append(f"  {report['with_images']} rows with images, {report['text_only']} text-only")
    if report["num_bad"]:
        lines.append(f"BAD ROWS: {report['num_bad']}")
        lines += [f"  {r['reason']}" for r in report["bad_rows"][:SHOWN_ROWS]]
        if report["num_bad"] > SHOWN_ROWS:
            lines.append(f"  ... {report['num_bad'] - SHOWN_ROWS} more (write them all with --report FILE)")
    else:
        lines.append("bad rows: none")
    if "truncated" in report:
        t = report["truncated"]
        lines.append(f"truncated by max_len {s['max_len']}: {t['count']} rows (image features cut in "
                     f"{t['images_cut']}, {t['answer_tokens_lost']} answer tokens lost)")
    if "lengths" in report:
        n = report["lengths"]
        lines.append(f"lengths after the image splice: min {n['min']}, median {n['median']:.0f}, p95 {n['p95']:.0f}, "
                     f"max {n['max']}")
        top = max(b["count"] for b in n["histogram"]) or 1
        for b in n["histogram"]:
            bar = "#" * round(40 * b["count"] / top)
            cut = "  (cut)" if b["from"] > s["max_len"] else ""
            lines.append(f"  {b['from']:>6}-{b['to']:<6} {b['count']:>8} {bar}{cut}")
    if "padding_waste" in report:
        p = report["padding_waste"]
        lines.append(f"padding waste at batch size {p['batch_size']}: {100 * p['length_grouped']:.1f} % with the "
                     f"length-grouped sampler, {100 * p['random']:.1f} % in random order")
    if report.get("duplicate_ids"):
        dup = report["duplicate_ids"]
        lines.append(f"note: {len(dup)} ids occur more than once (messages name rows by index too): "
                     f"{', '.join(map(str, dup[:5]))}{' ...' if len(dup) > 5 else ''}")
    return "\n".join(lines)


def model_facts(model_dir: str | Path) -> tuple[int, int]:
    """(positions one image takes, embedding rows) of a saved model directory (LlavaModel.save)."""
    from llava.model.llava import CONFIG_FILE, LlavaConfig

    config_file = Path(model_dir) / CONFIG_FILE
    if not config_file.is_file():
        raise ConfigError(f"{config_file}: not found (--model expects a directory written by LlavaModel.save)")
    config = LlavaConfig.from_dict(json.loads(config_file.read_text(encoding="utf-8")), where=str(config_file))
    return _image_tokens(config), config.llm.vocab_size


def _image_tokens(config) -> int:
    """Positions per image of a LlavaConfig's tower, built on the meta device (no weights read, no memory)."""
    from llava.model.vision import VisionTower, arch_from_dict, hf_clip_arch, open_clip_arch
    from stages.common import OPEN_CLIP_CONFIG

    spec = config.vision_tower
    if isinstance(spec, dict):
        arch = arch_from_dict(spec)
    elif (Path(spec) / OPEN_CLIP_CONFIG).is_file():
        arch = arch_from_dict(json.loads((Path(spec) / OPEN_CLIP_CONFIG).read_text(encoding="utf-8"))["model_cfg"])
    elif Path(spec).is_dir():
        arch = hf_clip_arch(spec)[0]
    else:
        arch = open_clip_arch(spec)[0]
    with torch.device("meta"):
        tower = VisionTower(arch, select_layer=config.select_layer, select_feature=config.select_feature)
    return tower.num_tokens


def _llm_vocab_size(config) -> int:
    if config.llm_path and (Path(config.llm_path) / "config.json").is_file():
        return int(json.loads((Path(config.llm_path) / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    return config.llm.vocab_size


def settings_from_config(path: str, overrides: list[str]) -> tuple[ValidateSettings, str]:
    """What the instruct stage of `path` will read: a run config (its `instruct` section, wired to earlier stages by
    the runner, as `llava-pipeline run` would) or the instruct stage's own config. Returns (settings, where)."""
    from stages.config import load_config
    from stages import common, instruct

    data = load_config(path, overrides)
    world_size = 1
    if "instruct" in data or "output_dir" not in data:  # a run config
        from pipeline import runner

        config = bind(runner.RunConfig, data, path)
        runner.validate_sections(config, path)
        if config.instruct is None:
            raise ConfigError(f"{path}: no 'instruct' section to validate")
        run = runner.Run(config, Path(config.out_dir), path, runner.STAGES)
        try:
            section = runner.plan_instruct(run, config.instruct).settings
        except runner.PipelineError as e:
            raise ConfigError(str(e)) from None
        world_size, where = config.nproc, f"{path}: instruct"
    else:
        section, where = data, path
    cfg = common.bind_stage(instruct.SCHEMA, section, name=where, train_sections=instruct.TRAIN_SECTIONS)
    if cfg.align_dir is not None:
        model_config, tokenizer = common.read_model_config(Path(cfg.align_dir) / common.MODEL_CONFIG)
    elif cfg.model is not None:
        model_config, tokenizer = common.llava_config(cfg.model, template=cfg.template, max_len=cfg.max_len)
    else:
        raise ConfigError(f"{where}: give align_dir or model (the validation needs the tokenizer and the tower)")
    settings = ValidateSettings(
        data=cfg.data, tokenizer=str(tokenizer), image_folder=cfg.image_folder, template=cfg.template,
        max_len=cfg.max_len, image_tokens=_image_tokens(model_config), batch_size=cfg.train.micro_batch_size,
        world_size=world_size, grad_accum=cfg.train.grad_accum, seed=cfg.train.seed,
        model_vocab_size=_llm_vocab_size(model_config))
    return settings, where


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline validate", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Reads: the instruction JSON, its images and the tokenizer (or a config naming them). Writes: nothing "
               "but the report: a summary on the console, every bad row with --report FILE.")
    parser.add_argument("--config", help="a run config (its instruct section) or an instruct stage config: data, "
                                          "images, tokenizer, template, max_len, tower and batching from there")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="with --config: dotted overrides")
    parser.add_argument("--data", help="LLaVA instruction JSON (a list of samples)")
    parser.add_argument("--image-folder", help="folder the samples' image paths are relative to")
    parser.add_argument("--tokenizer", help="tokenizer.model (or a folder holding one)")
    parser.add_argument("--template", default="vicuna_v1", help=f"one of {', '.join(TEMPLATES)} (default vicuna_v1)")
    parser.add_argument("--max-len", type=int, default=2048, help="model_max_length (default 2048)")
    tokens = parser.add_mutually_exclusive_group()
    tokens.add_argument("--image-tokens", type=int, help="positions per image after the splice (default 576)")
    tokens.add_argument("--model", help="a saved model directory: positions per image from its vision tower, and a "
                                        "check that the tokenizer fits its embedding")
    parser.add_argument("--batch-size", type=int, default=16, help="micro-batch size per rank (default 16)")
    parser.add_argument("--world-size", type=int, help="ranks, for the sampler's mega-batches (default 1, or the run "
                                                        "config's nproc)")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--sample", type=int, default=0, help="probe only K random rows (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=ValidateSettings.workers, help="loader processes")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="decompression-bomb limit")
    parser.add_argument("--report", help="write the full report (every bad row) as JSON here")
    args = parser.parse_intermixed_args(argv)
    if args.config is None and (not args.data or not args.tokenizer or args.overrides):
        parser.error("give --config RUN.yaml [key=value ...], or --data and --tokenizer")
    try:
        if args.config is not None:
            settings, _ = settings_from_config(args.config, args.overrides)
            settings.sample, settings.workers, settings.max_pixels = args.sample, args.workers, args.max_pixels
            settings.world_size = args.world_size or settings.world_size
        else:
            image_tokens, vocab = model_facts(args.model) if args.model else (args.image_tokens or 576, None)
            settings = ValidateSettings(
                data=args.data, tokenizer=args.tokenizer, image_folder=args.image_folder, template=args.template,
                max_len=args.max_len, image_tokens=image_tokens, batch_size=args.batch_size,
                world_size=args.world_size or 1, grad_accum=args.grad_accum, sample=args.sample, seed=args.seed,
                workers=args.workers, max_pixels=args.max_pixels, model_vocab_size=vocab)
        report = scan(settings)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.report:
        atomic_write_json(args.report, report)
    print(format_report(report))
    return EXIT_BAD_ROWS if report["num_bad"] else EXIT_CLEAN
