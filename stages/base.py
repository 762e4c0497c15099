"""Demo only: the foundation models a real run downloads, made from the scene data in a few CPU minutes.

The offline demo has no pretrained CLIP or LLaMA, so this stage builds tiny ones from the generated text and images:

1. a SentencePiece BPE tokenizer (LLaMA conventions) trained on the captions and the instruction data;
2. a small open_clip CLIP (custom config: 64 px images, patch 8) trained contrastively with open_clip's own `ClipLoss`
   on image-caption pairs, its text tower reading our tokenizer's ids (pooled at `</s>`), plus a region-phrase term
   where the captions file has object boxes: each box's patch tokens, pooled, must pick the box's label among the
   batch's labels (as RegionCLIP / GLIP ground phrases). From 2000 captions alone a tiny CLIP learns colours but
   hardly shapes, so the LLaVA built on it cannot find "the triangle"; the region term puts shapes into the patch
   tokens LLaVA reads (docs/stages.md has the measurements); with `clip.place_weight`, a training-only linear head
   asks the same tokens for their object's column and row as well. Saved in open_clip's local-dir layout
   (`clip/open_clip_config.json` + `clip/open_clip_model.safetensors`), which `ModelSpec.vision_tower`
   and `open_clip.create_model("local-dir:...")` both load;
3. a tiny LLaMA pretrained as a language model on the same text (captions, and the instruction conversations rendered
   with the chat template, images left out) and, with `corpus`, on scenes written as text followed by questions about
   them (data_gen.corpus), which teaches it to read facts from its context as a pretrained LLM does; saved as a Hugging
   Face directory `llm/` with its `tokenizer.model`. A text-only probe (`probe`: held-out scenes as text, one
   short-answer question each, greedy answer, exact match) measures that reading ability every `lm.train.eval_every`
   steps and at the end.

With `ship_to`, the finished models are also copied there in the layout the demo starts from (`clip/` in open_clip's
local-dir layout, `llama/` in Hugging Face's) with a `manifest.json`: sha256 of every file, the config, the seed, the
command, the commit, the probe numbers. `make bases` runs configs/tiny-bases.yaml, which ships assets/tiny-bases/.

Both trainings run on the shared trainer (stages/trainer.py), so checkpoints, resume, metrics and `--nproc` work as in
the real stages. Real runs skip this stage and point `model.llm` / `model.vision_tower` at real checkpoints.

    llava-pipeline base output_dir=runs/demo/base captions=runs/demo/scenes/captions.jsonl \
        instruct_data=[runs/demo/data/train.json] clip.train.epochs=4
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from data_gen import world
from data_gen.corpus import CorpusSpec
from data_gen.records import Box
from llava.constants import IGNORE_INDEX
from llava.io import jsonl_lines, parse_json_line
from stages.config import ConfigError
from stages import common
from stages.trainer import TrainConfig

CLIP_DIR, LLM_DIR, TOKENIZER_FILE = "clip", "llm", "tokenizer.model"

# Defaults for the two trainings (unset keys of `clip.train` / `lm.train`): sized for 2 CPU cores and a few thousand
# scenes. fp32: on small matrices bf16 buys nothing on a CPU.
TRAIN_SECTIONS = {
    "clip.train": ("clip_train", dict(epochs=8, micro_batch_size=64, lr=1e-3, weight_decay=0.1, warmup_ratio=0.1,
                                      precision="fp32", num_workers=0, log_every=10, tensorboard=False)),
    "lm.train": ("lm_train", dict(epochs=1, max_steps=200, micro_batch_size=16, lr=3e-3, weight_decay=0.1,
                                  warmup_ratio=0.05, precision="fp32", num_workers=0, log_every=10,
                                  tensorboard=False)),
}


@dataclass
class TokenizerSpec:
    vocab_size: int = 1000  # an upper bound: SentencePiece stops earlier when the text has fewer pieces
    # > 0: train on every k-th text so that at most this many are read (the corpus repeats its wording; a sample
    # gives the same pieces at a fraction of the time). 0: all texts.
    max_texts: int = 0


@dataclass
class ClipSpec:
    """A small ViT CLIP: vision tower shapes match what the LLaVA model will read (64 patch tokens of width 128)."""
    image_size: int = 64
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    head_width: int = 32
    embed_dim: int = 128
    text_width: int = 128
    text_heads: int = 4
    text_layers: int = 2
    context_length: int = 48  # caption tokens (ours) incl. </s>; longer captions are cut, keeping </s>
    # The image embedding: "tok" (the CLS token, as OpenAI's CLIP) or "avg" (the mean of the patch tokens, so the
    # contrastive loss shapes every patch token, which is what LLaVA reads).
    pool_type: str = "tok"
    # Weight of the region-phrase term (0: off). It uses the "boxes" of the captions file ({"label", "bbox": [x0, y0,
    # x1, y1] normalised}); records without boxes add nothing to it.
    region_weight: float = 1.0
    # What the region term classifies: "mean", each box's patch tokens averaged; "patch", every patch token under a
    # box on its own, so that each token carries its object's words (a reader of one token, as LLaVA's LLM is of an
    # image token, then finds the shape there too: docs/demo.md).
    region_pool: str = "mean"
    # Weight of the place term (0: off): the region term's patch tokens (per box or per patch, as `region_pool`)
    # also tell their object's column (left/center/right) and row (top/middle/bottom) through a linear head that
    # exists in training only (it is not saved: the tower stays a plain open_clip CLIP). The places come from
    # data_gen.world.position_word, the rule the questions use, so an object whose column or row is ambiguous trains
    # none there. A reader of one image token then finds where its object is as well as what it is (docs/demo.md).
    place_weight: float = 0.0
    train: TrainConfig | None = None

    def __post_init__(self):
        if self.region_weight < 0:
            raise ConfigError(f"base.clip.region_weight must be >= 0, got {self.region_weight}")
        if self.region_pool not in ("mean", "patch"):
            raise ConfigError(f"base.clip.region_pool must be 'mean' or 'patch', got {self.region_pool!r}")
        if self.place_weight < 0 or (self.place_weight and not self.region_weight):
            raise ConfigError(f"base.clip.place_weight must be >= 0 and needs region_weight > 0 (it trains the "
                              f"region term's tokens), got place_weight {self.place_weight}, region_weight "
                              f"{self.region_weight}")


@dataclass
class LMSpec:
    """A tiny LLaMA: `preset` from llava.model.llama.PRESETS with the shape overrides below; vocab = the tokenizer's."""
    preset: str = "tiny"
    dim: int | None = 128
    n_layers: int | None = 4
    n_heads: int | None = 4
    n_kv_heads: int | None = 2
    ffn_hidden: int | None = 352
    max_seq_len: int = 512
    block_size: int = 128  # tokens per training sequence (the text is packed)
    template: str = "vicuna_v1"  # how instruction conversations are rendered into pretraining text
    whole_documents: bool = False  # pack without cutting a document across blocks (PackedText)
    one_per_block: bool = False  # one document per block, padded: no other document in its context (PackedText)
    answers_only: bool = False  # conversations train on their answers alone (as stage 2); plain texts on every token
    # normal(0, init_std) for every linear and embedding (transformers' initializer_range, 0.02, is tuned for widths
    # of 768 and more); at dim 160, 0.08 (about 1/sqrt(dim)) read text faster in bench/reading_curve (docs/demo.md)
    init_std: float = 0.02
    train: TrainConfig | None = None

    def __post_init__(self):
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or self.init_std <= 0:
            raise ConfigError(f"base.lm.init_std must be a number > 0, got {self.init_std!r}")


@dataclass
class ProbeSpec:
    """The text-only reading probe: `questions` held-out scenes written as text, one short question each."""
    questions: int = 0  # 0: no probe
    seed: int = 1  # scenes of the probe stream (data_gen.corpus.probe_questions), not of the corpus


@dataclass
class BaseConfig:
    output_dir: str
    captions: str  # captions JSONL: {"id", "image", "captions": [...], ...} per line (as `llava-pipeline scenes`)
    image_folder: str | None = None  # default: <captions dir>/images
    instruct_data: list = field(default_factory=list)  # LLaVA JSON files whose text joins the tokenizer/LM corpus
    seed: int = 0
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    clip: ClipSpec = field(default_factory=ClipSpec)
    lm: LMSpec = field(default_factory=LMSpec)
    corpus: CorpusSpec | None = None  # scenes as text + questions for the LLM (data_gen.corpus); None: none
    probe: ProbeSpec = field(default_factory=ProbeSpec)
    ship_to: str | None = None  # also copy the models here with a manifest (the demo's assets/tiny-bases)


SCHEMA = BaseConfig  # what `--config` binds to; TRAIN_SECTIONS gives its train defaults


# ---- reading the corpus --------------------------------------------------------------------------------------------

def read_captions(path: Path) -> list[dict]:
    """Caption records, checked line by line (the error names file:line and the key)."""
    from llava.data.errors import DataError
    from llava.data.instruct import check_image_path

    if not path.is_file():
        raise DataError(f"captions: {path} not found (write it with `llava-pipeline scenes`)")
    records = []
    for where, line in jsonl_lines(path):
        record = parse_json_line(line, where, DataError)
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected an object with 'image' and 'captions'")
        image = check_image_path(record.get("image"), where)
        captions = record.get("captions")
        if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip()
                                                                      for c in captions):
            raise DataError(f"{where}: 'captions' must be a non-empty list of strings")
        records.append({"image": image, "captions": captions,
                        "boxes": _read_boxes(record.get("boxes", []), where)})
    if not records:
        raise DataError(f"{path}: no caption records")
    return records


def _read_boxes(boxes, where: str) -> list[tuple[str, tuple[float, float, float, float]]]:
    """The record's boxes as (label, bbox), checked by the data generator's own box parser."""
    from data_gen.records import InputError, parse_box
    from llava.data.errors import DataError

    if not isinstance(boxes, list):
        raise DataError(f"{where}: 'boxes' must be a list of {{'label', 'bbox'}} objects")
    try:
        parsed = [parse_box(box, f"{where}: boxes[{k}]") for k, box in enumerate(boxes)]
    except InputError as e:
        raise DataError(str(e)) from None
    return [(box.label, box.bbox) for box in parsed]


def read_conversations(files: list) -> list[list[dict]]:
    from llava.data.errors import DataError
    from llava.data.instruct import _read_json_list

    conversations = []
    for file in files:
        for index, entry in enumerate(_read_json_list(Path(file))):
            if not isinstance(entry, dict) or not isinstance(entry.get("conversations"), list):
                raise DataError(f"{file}: entry {index} has no 'conversations' list")
            conversations.append(entry["conversations"])
    return conversations


def _without_image_tags(conversation: list[dict]) -> list[dict]:
    from llava.constants import DEFAULT_IMAGE_TOKEN

    return [{**turn, "value": turn["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()} for turn in conversation]


def tokenizer_corpus(captions: list[dict], conversations: list[list[dict]], template: str,
                     texts: list[str] = ()) -> list[str]:
    """Every text the models will see: captions, plain `texts` and rendered conversations (roles, system prompt; no
    image tags)."""
    from llava.conversation import get_template

    render = get_template(template).render
    out = [caption for record in captions for caption in record["captions"]] + list(texts)
    out += [render(_without_image_tags(c)).replace("</s>", "\n") for c in conversations]
    return out


def object_words(cfg: BaseConfig) -> tuple[str, ...]:
    """The tokenizer's symbols of their own: the corpus's one-word objects when it writes them (CorpusSpec)."""
    from data_gen.corpus import OBJECT_WORDS

    return OBJECT_WORDS if cfg.corpus is not None and cfg.corpus.object_words else ()


# ---- CLIP ----------------------------------------------------------------------------------------------------------

def clip_model_config(spec: ClipSpec, vocab_size: int, eos_id: int, pad_id: int) -> dict:
    """open_clip model config: a ViT image tower and a causal text tower pooled at our tokenizer's </s>."""
    return {
        "embed_dim": spec.embed_dim,
        "vision_cfg": {"image_size": spec.image_size, "patch_size": spec.patch_size, "width": spec.width,
                       "layers": spec.layers, "head_width": spec.head_width, "pool_type": spec.pool_type},
        "text_cfg": {"context_length": spec.context_length, "vocab_size": vocab_size, "width": spec.text_width,
                     "heads": spec.text_heads, "layers": spec.text_layers, "pool_type": "eos", "eos_id": eos_id,
                     "pad_id": pad_id},
    }


def box_weights(bbox: tuple[float, float, float, float], grid: int) -> torch.Tensor:
    """[grid * grid] weights averaging the patches a normalised box touches (row-major, as the ViT's tokens)."""
    x0, y0, x1, y1 = bbox
    cols = range(min(grid - 1, int(x0 * grid)), max(min(grid, math.ceil(x1 * grid)), int(x0 * grid) + 1))
    rows = range(min(grid - 1, int(y0 * grid)), max(min(grid, math.ceil(y1 * grid)), int(y0 * grid) + 1))
    weights = torch.zeros(grid, grid)
    weights[rows.start:rows.stop, cols.start:cols.stop] = 1.0
    return (weights / weights.sum()).flatten()


def box_places(bbox: tuple[float, float, float, float]) -> tuple[int, int]:
    """(column, row) of a normalised box as indices into world.COLUMNS / world.ROWS, -1 where ambiguous: the column
    and row world.SceneObject gives every generator's questions."""
    place = world.read_object(Box("", bbox))
    return (world.COLUMNS.index(place.column) if place.column else -1,
            world.ROWS.index(place.row) if place.row else -1)


class CaptionPairs(Dataset):
    """(image, one of its captions) per scene; the caption is drawn anew each time, so epochs see other phrasings.
    With `grid`, also the scene's boxes as patch weights `regions` [max boxes, grid * grid], `region_labels`
    (indices into `self.phrases`, -1 for padding) and `region_places` [max boxes, 2]: each box's column and row
    (box_places; -1 where ambiguous and for padding)."""

    def __init__(self, records: list[dict], image_folder: Path, tokenizer, image_processor, context_length: int,
                 grid: int | None = None):
        self.records, self.image_folder = records, image_folder
        self.tokenizer, self.image_processor, self.context_length = tokenizer, image_processor, context_length
        self.grid = grid
        self.phrases = sorted({label for r in records for label, _ in r.get("boxes", ())}) if grid else []
        self.phrase_index = {phrase: k for k, phrase in enumerate(self.phrases)}
        self.max_boxes = max((len(r.get("boxes", ())) for r in records), default=0) if grid else 0

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        from llava.data.images import open_rgb

        record = self.records[i]
        caption = record["captions"][int(torch.randint(len(record["captions"]), ()))]
        ids = self.tokenizer.encode(caption)[:self.context_length - 1] + [self.tokenizer.eos_id]
        text = torch.full((self.context_length,), self.tokenizer.pad_id, dtype=torch.long)
        text[:len(ids)] = torch.tensor(ids)
        image = self.image_processor(open_rgb(self.image_folder / record["image"]))
        item = {"images": image, "texts": text}
        if self.max_boxes:
            item["regions"] = torch.zeros(self.max_boxes, self.grid * self.grid)
            item["region_labels"] = torch.full((self.max_boxes,), -1, dtype=torch.long)
            item["region_places"] = torch.full((self.max_boxes, 2), -1, dtype=torch.long)
            for k, (label, bbox) in enumerate(record["boxes"]):
                item["regions"][k] = box_weights(bbox, self.grid)
                item["region_labels"][k] = self.phrase_index[label]
                item["region_places"][k] = torch.tensor(box_places(bbox))
        return item

    def phrase_tokens(self) -> torch.Tensor:
        """[phrases, context_length] token ids of the box labels, each ended by </s> and padded (open_clip's text
        tower takes exactly its context length)."""
        ids = [self.tokenizer.encode(p)[:self.context_length - 1] + [self.tokenizer.eos_id] for p in self.phrases]
        out = torch.full((len(ids), self.context_length), self.tokenizer.pad_id, dtype=torch.long)
        for k, row in enumerate(ids):
            out[k, :len(row)] = torch.tensor(row)
        return out


class ContrastiveObjective(nn.Module):
    """CLIP's symmetric InfoNCE through open_clip's ClipLoss (features of other ranks join the negatives), plus
    `region_weight` times the region-phrase term: the boxes' patch tokens, in CLIP's joint space (averaged per box,
    or each on its own with `region_pool` "patch"), classify their own labels among the labels present in the
    rank's batch, the text tower embedding the labels; plus `place_weight` times the place term: a linear head
    (`place_head`, training only) on the same patch tokens, before CLIP's projection, classifies their box's column
    among 3 and its row among 3 (`region_places`), where the box has one."""

    def __init__(self, clip: nn.Module, rank: int, world_size: int, phrase_tokens: torch.Tensor | None = None,
                 region_weight: float = 0.0, region_pool: str = "mean", place_weight: float = 0.0):
        super().__init__()
        from open_clip.loss import ClipLoss

        self.clip = clip
        self.loss = ClipLoss(rank=rank, world_size=world_size)
        self.phrase_tokens, self.region_weight = phrase_tokens, region_weight  # a plain attribute: not saved
        self.region_pool, self.place_weight = region_pool, place_weight
        # logits 0-2: the column (world.COLUMNS), 3-5: the row (world.ROWS)
        self.place_head = nn.Linear(clip.visual.proj.shape[0], 6) if place_weight else None
        # CLIP's own parameters (temperature, text positions and projection) and the image projection are read here,
        # outside their modules' forward: ZeRO-3 must gather them for this module's forward (a no-op otherwise).
        from deepspeed.runtime.zero.partition_parameters import register_external_parameter

        for parameter in [*clip.parameters(recurse=False), clip.visual.proj]:
            register_external_parameter(self, parameter)

    def forward(self, images: torch.Tensor, texts: torch.Tensor, regions: torch.Tensor | None = None,
                region_labels: torch.Tensor | None = None, region_places: torch.Tensor | None = None) -> dict:
        visual = self.clip.visual
        visual.output_tokens = True  # (pooled, patch tokens after ln_post); off again so the saved model is plain
        try:
            pooled, tokens = visual(images)
        finally:
            visual.output_tokens = False
        scale = self.clip.logit_scale.exp()
        loss = self.loss(F.normalize(pooled, dim=-1), self.clip.encode_text(texts, normalize=True), scale)
        if self.region_weight and self.phrase_tokens is not None and regions is not None:
            valid = region_labels >= 0
            if not bool(valid.any()):  # a batch without boxes: the text tower still runs a phrase, so that every
                # rank makes the same ZeRO-3 gathers (a rank skipping a module's forward would hang the others); so
                # does the place head
                phrases = self.clip.encode_text(self.phrase_tokens[:1].to(texts.device), normalize=True)
                extra = self.place_head(tokens[:, 0]).sum() if self.place_head is not None else 0.0
                return {"loss": loss + 0.0 * (phrases.sum() + extra)}
            if self.region_pool == "patch":  # every (box, patch under it) pair; a patch two boxes touch has two
                image, box, patch = ((regions > 0) & valid[..., None]).nonzero(as_tuple=True)
                pooled_tokens, labels = tokens[image, patch], region_labels[image, box]
                places = region_places[image, box] if region_places is not None else None
            else:
                pooled_tokens = torch.einsum("bkp,bpw->bkw", regions.to(tokens.dtype), tokens)[valid]
                labels = region_labels[valid]
                places = region_places[valid] if region_places is not None else None
            present = torch.unique(labels)
            phrases = self.clip.encode_text(self.phrase_tokens[present].to(texts.device), normalize=True)
            logits = scale * F.normalize(pooled_tokens @ visual.proj, dim=-1) @ phrases.T
            loss = loss + self.region_weight * F.cross_entropy(logits, torch.searchsorted(present, labels))
            if self.place_head is not None and places is not None:
                logits = self.place_head(pooled_tokens)
                for axis in range(2):
                    known = places[:, axis] >= 0
                    axis_logits = logits[known, 3 * axis:3 * axis + 3]
                    term = (F.cross_entropy(axis_logits, places[known, axis]) if bool(known.any())
                            else 0.0 * axis_logits.sum())
                    loss = loss + self.place_weight * term
        return {"loss": loss}


def train_clip(cfg: BaseConfig, records: list[dict], tokenizer, out: Path) -> dict:
    import open_clip

    from llava.io import atomic_save_safetensors, atomic_write_json
    from llava.model.vision import OPENAI_MEAN, OPENAI_STD, ImageProcessor
    from stages.trainer import Trainer, setup_distributed

    spec = cfg.clip
    dist_info = setup_distributed()
    torch.manual_seed(cfg.seed)
    model_cfg = clip_model_config(spec, tokenizer.vocab_size, tokenizer.eos_id, tokenizer.pad_id)
    clip = open_clip.CLIP(**model_cfg, output_dict=True)
    # DeepSpeed's initial broadcast cannot view a 0-dim tensor as bytes: hold the temperature as [1] while training.
    clip.logit_scale = nn.Parameter(clip.logit_scale.detach().reshape(1))
    preprocess = {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                  "resize_mode": "shortest"}
    processor = ImageProcessor(spec.image_size, OPENAI_MEAN, OPENAI_STD, "bicubic", "pad")
    image_folder = Path(cfg.image_folder) if cfg.image_folder else Path(cfg.captions).parent / "images"
    grid = spec.image_size // spec.patch_size if spec.region_weight else None
    dataset = CaptionPairs(records, image_folder, tokenizer, processor, spec.context_length, grid=grid)
    objective = ContrastiveObjective(clip, dist_info.rank, dist_info.world_size,
                                     dataset.phrase_tokens() if dataset.max_boxes else None, spec.region_weight,
                                     spec.region_pool, spec.place_weight)
    if grid:
        common.log(f"[base] CLIP region-phrase term (weight {spec.region_weight}, {spec.region_pool}): "
                   f"{sum(len(r['boxes']) for r in records)} boxes, {len(dataset.phrases)} distinct labels"
                   + (f"; place term (weight {spec.place_weight})" if spec.place_weight else ""))
    trainer = Trainer(spec.train, objective, dataset)
    result = trainer.fit()
    state = trainer.state_dict(lambda name: name.startswith("clip."))
    if common.is_main():
        state = {k.removeprefix("clip."): v for k, v in state.items()}
        state["logit_scale"] = state["logit_scale"].reshape(())
        atomic_save_safetensors(state, out / "open_clip_model.safetensors")
        atomic_write_json(out / common.OPEN_CLIP_CONFIG, {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    common.barrier()
    return result.metrics


# ---- language model ------------------------------------------------------------------------------------------------

def encode_segments(tokenizer, segments: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """`<s>` and each (text, trained) segment encoded on its own: (ids, labels), labels -100 where not trained. The
    text probe encodes its prompts the same way, so it asks exactly as the corpus does."""
    ids, labels = [tokenizer.bos_id], [IGNORE_INDEX]
    for text, trained in segments:
        piece = tokenizer.encode(text)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def lm_documents(captions: list[dict], conversations: list[list[dict]], tokenizer, template: str,
                 texts: list[str] = (), answers_only: bool = False,
                 readings: list[list[tuple[str, bool]]] = ()) -> list[tuple[list[int], list[int]]]:
    """(token ids, labels) of every text: captions and plain `texts` as `<s> text </s>` trained on every token,
    conversations exactly as stage 2 tokenizes them (same template, same `</s>` after answers) with the image
    placeholder left out, trained on every token or, with `answers_only`, on the answers alone (as stage 2), and
    reading documents (data_gen.corpus, style "qa") trained on their answers and the closing `</s>`."""
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import tokenize_conversation

    plain = [tokenizer.encode(caption, bos=True, eos=True) for record in captions for caption in record["captions"]]
    plain += [tokenizer.encode(text, bos=True, eos=True) for text in texts]
    docs = [(ids, ids) for ids in plain]
    for segments in readings:
        ids, labels = encode_segments(tokenizer, segments)
        docs.append((ids + [tokenizer.eos_id], labels + [tokenizer.eos_id]))
    for conversation in conversations:
        ids, labels = tokenize_conversation(conversation, tokenizer, template)
        kept = [k for k, t in enumerate(ids) if t != IMAGE_TOKEN_INDEX]
        ids = [ids[k] for k in kept]
        docs.append((ids, [labels[k] for k in kept] if answers_only else ids))
    return docs


class PackedText(Dataset):
    """Documents (in a seeded random order) packed into blocks of `block_size` tokens.

    By default the documents are concatenated and cut, so a document may start in one block and end in the next.
    With `whole_documents`, a document that does not fit in the rest of a block starts the next one (a longer one
    is cut to a block) and the rest is padding without loss (`labels` -100): a question then never loses the scene it
    asks about, which the reading corpus needs (cut documents taught the LLM to answer without looking: probe 0.34
    after 600 steps). With `one_per_block` as well, every document has a block of its own: attention is causal over
    the whole block, so a question packed after another scene also sees that scene's objects, distractors a reader of
    one image never has (NextTokenObjective drops the padding columns no label needs, so this costs little).
    """

    def __init__(self, documents: list[tuple[list[int], list[int]]], block_size: int, seed: int,
                 whole_documents: bool = False, pad_id: int = 0, one_per_block: bool = False):
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        if whole_documents or one_per_block:
            blocks: list[tuple[list[int], list[int]]] = [([], [])]
            for i in order:
                ids, labels = (part[:block_size] for part in documents[i])
                if blocks[-1][0] and (one_per_block or len(blocks[-1][0]) + len(ids) > block_size):
                    blocks.append(([], []))
                blocks[-1][0].extend(ids)
                blocks[-1][1].extend(labels)
            self.blocks = torch.full((len(blocks), block_size), pad_id, dtype=torch.long)
            self.labels = torch.full((len(blocks), block_size), -100, dtype=torch.long)
            for k, (ids, labels) in enumerate(blocks):
                self.blocks[k, :len(ids)] = torch.tensor(ids, dtype=torch.long)
                self.labels[k, :len(labels)] = torch.tensor(labels, dtype=torch.long)
            return
        stream = torch.tensor([t for i in order for t in documents[i][0]], dtype=torch.long)
        labels = torch.tensor([t for i in order for t in documents[i][1]], dtype=torch.long)
        n_blocks = len(stream) // block_size
        if n_blocks < 1:
            raise ConfigError(f"lm: the corpus has {len(stream)} tokens, fewer than one block of {block_size}")
        self.blocks = stream[:n_blocks * block_size].view(n_blocks, block_size)
        self.labels = labels[:n_blocks * block_size].view(n_blocks, block_size)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.blocks[i], "labels": self.labels[i]}


class NextTokenObjective(nn.Module):
    """Causal LM loss over every position of a packed block (but padding, where `labels` are -100). Columns after the
    batch's last trained label are dropped before the forward pass: causal attention makes them unable to change
    any trained position, so the loss is the same and padded blocks cost what their longest document costs."""

    def __init__(self, llm: nn.Module):
        super().__init__()
        self.llm = llm

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        if labels is not None:
            trained = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()
            end = int(trained[-1]) + 2 if len(trained) else 2
            input_ids, labels = input_ids[:, :end], labels[:, :end]
        logits = self.llm(input_ids[:, :-1])
        targets = input_ids if labels is None else labels
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets[:, 1:].flatten(), ignore_index=-100)
        return {"loss": loss, "logits": logits}


def text_probe(llm: nn.Module, tokenizer, questions: list[dict], template: str, batch_size: int = 50,
               style: str = "chat") -> dict:
    """Reading from context, without images: each held-out scene as text, then one short-answer question, asked in
    the corpus's style ("chat": the chat template with the short-answer instruction; "qa": a `Q:`/`A:` reading
    line); the greedy answer (its first line) must equal the reference (case and a final period aside).
    {"probe": overall, "probe_<category>": ...}."""
    right: dict[str, list[bool]] = {}
    for question, ok in zip(questions, probe_answers(llm, tokenizer, questions, template, batch_size, style)):
        right.setdefault(question["category"], []).append(ok)
    scores = {f"probe_{c}": sum(v) / len(v) for c, v in sorted(right.items())}
    return {"probe": sum(sum(v) for v in right.values()) / max(1, len(questions)), **scores}


def probe_answers(llm: nn.Module, tokenizer, questions: list[dict], template: str, batch_size: int = 50,
                  style: str = "chat") -> list[bool]:
    """Whether each probe question is answered right (text_probe's asking and checking, question by question)."""
    from data_gen.corpus import reading_prompt
    from llava.conversation import tokenize_conversation
    from llava.generate import GenerationConfig, generate

    if style == "qa":
        prompts = [encode_segments(tokenizer, reading_prompt(q["scene"], q["question"]))[0] for q in questions]
    else:
        prompts = [tokenize_conversation([{"from": "human", "value": f"{q['scene']}\n{q['question']}"}], tokenizer,
                                         template, add_generation_prompt=True)[0] for q in questions]
    answers = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            answers += generate(llm, prompts[start:start + batch_size], config=GenerationConfig(max_new_tokens=6))
    said = [tokenizer.decode(ids).strip().split("\n")[0].strip().lower().rstrip(".").strip() for ids in answers]
    return [text == question["answer"].lower() for question, text in zip(questions, said)]


def train_lm(cfg: BaseConfig, documents: list[list[int]], tokenizer, out: Path) -> dict:
    from data_gen.corpus import probe_questions
    from llava.model.llama import Llama, LlamaConfig
    from stages.trainer import Trainer

    spec = cfg.lm
    shape = {k: getattr(spec, k) for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden")
             if getattr(spec, k) is not None}
    config = LlamaConfig.from_name(spec.preset, **shape, vocab_size=tokenizer.vocab_size,
                                   max_seq_len=spec.max_seq_len, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    llm = Llama(config).init_weights(std=spec.init_std, seed=cfg.seed)
    questions = probe_questions(cfg.probe.questions, cfg.probe.seed, object_words=bool(object_words(cfg))) \
        if cfg.probe.questions else []
    curve: list[dict] = []

    def probe(objective: nn.Module, step: int) -> dict:
        style = cfg.corpus.style if cfg.corpus else "chat"
        scores = text_probe(objective.llm, tokenizer, questions, spec.template, style=style)
        if style == "qa" and cfg.corpus.chat_fraction:  # the same questions asked in stage 2's template as well
            chat = text_probe(objective.llm, tokenizer, questions, spec.template, style="chat")
            scores.update({f"chat_{k}": v for k, v in chat.items()})
        curve.append({"step": step, **scores})
        common.log(f"[base] text probe at step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    packed = PackedText(documents, spec.block_size + 1, cfg.seed, spec.whole_documents, tokenizer.pad_id,
                        spec.one_per_block)
    trainer = Trainer(spec.train, NextTokenObjective(llm), packed,
                      eval_fn=probe if questions else None)
    result = trainer.fit()
    state = trainer.state_dict(lambda name: name.startswith("llm."))
    if common.is_main():
        with torch.device("meta"):
            trained = Llama(config)
        trained.load_state_dict({k.removeprefix("llm."): v for k, v in state.items()}, strict=False, assign=True)
        if config.tie_embeddings:
            trained.lm_head.weight = trained.embed_tokens.weight
        trained.save_hf(out)
        (out / TOKENIZER_FILE).write_bytes(tokenizer.model_file.read_bytes())
    common.barrier()
    return {**result.metrics, "probe_curve": curve}


# ---- the stage -----------------------------------------------------------------------------------------------------

def run(cfg: BaseConfig) -> dict:
    """Tokenizer, CLIP and LLaMA into cfg.output_dir; returns their paths and the final training metrics."""
    from llava.tokenizer import Tokenizer
    from stages.trainer import setup_distributed

    out = Path(cfg.output_dir)
    if not isinstance(cfg.instruct_data, list):
        raise ConfigError(f"instruct_data: expected a list of LLaVA JSON files, got {cfg.instruct_data!r}")
    setup_distributed()
    common.save_resolved_config(cfg, out)
    commit = _commit() if cfg.ship_to else None  # the code that builds them: a commit made meanwhile is not it
    timings = {}
    started = time.perf_counter()
    records = read_captions(Path(cfg.captions))
    conversations = read_conversations(cfg.instruct_data)
    texts: list[str] = []
    readings: list[list[tuple[str, bool]]] = []
    if cfg.corpus is not None:
        from data_gen.corpus import documents

        corpus = documents(cfg.corpus)
        conversations += corpus.conversations
        texts, readings = corpus.texts, corpus.readings
    tokenizer_file = out / TOKENIZER_FILE
    if common.is_main():
        corpus = tokenizer_corpus(records, conversations, cfg.lm.template,  # segments are encoded one by one
                                  texts + [text for segments in readings for text, _ in segments])
        if cfg.tokenizer.max_texts:
            corpus = corpus[::math.ceil(len(corpus) / cfg.tokenizer.max_texts)]
        Tokenizer.train(corpus, tokenizer_file, vocab_size=cfg.tokenizer.vocab_size, user_symbols=object_words(cfg))
    common.barrier()
    tokenizer = Tokenizer(tokenizer_file)
    timings["tokenizer_s"] = time.perf_counter() - started
    common.log(f"[base] tokenizer: {tokenizer.vocab_size} pieces from {len(records)} caption records and "
               f"{len(conversations)} conversations ({timings['tokenizer_s']:.1f} s)")

    started = time.perf_counter()
    clip_metrics = train_clip(cfg, records, tokenizer, out / CLIP_DIR)
    timings["clip_s"] = time.perf_counter() - started

    started = time.perf_counter()
    documents = lm_documents(records, conversations, tokenizer, cfg.lm.template, texts, cfg.lm.answers_only,
                             readings)
    common.log(f"[base] LM corpus: {len(documents)} documents, {sum(len(ids) for ids, _ in documents)} tokens")
    lm_metrics = train_lm(cfg, documents, tokenizer, out / LLM_DIR)
    timings["lm_s"] = time.perf_counter() - started
    common.log("[base] " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    if cfg.ship_to and common.is_main():
        ship(cfg, out, Path(cfg.ship_to), {"clip": clip_metrics, "lm": lm_metrics, "seconds": timings,
                                           "commit": commit})
    common.barrier()
    return {"tokenizer": str(tokenizer_file), "vision_tower": str(out / CLIP_DIR), "llm": str(out / LLM_DIR),
            "clip_metrics": clip_metrics, "lm_metrics": lm_metrics, "seconds": timings}


# ---- shipping the bases -------------------------------------------------------------------------------------------

SHIPPED = {CLIP_DIR: ("clip", (common.OPEN_CLIP_CONFIG, "open_clip_model.safetensors")),
           LLM_DIR: ("llama", ("config.json", "model.safetensors", TOKENIZER_FILE))}
MANIFEST = "manifest.json"


def sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def ship(cfg: BaseConfig, built: Path, dest: Path, metrics: dict) -> None:
    """Copy the models into `dest` (clip/, llama/) and write `dest/manifest.json` last (its presence marks a complete
    set): sha256 and size of every file, the resolved config, seed, command, commit (`metrics["commit"]`, read when
    the run started) and the probe numbers."""
    import shutil
    import sys

    from llava.io import atomic_path, atomic_write_json
    from stages.config import to_dict

    (dest / MANIFEST).unlink(missing_ok=True)
    files = {}
    for source, (target, names) in SHIPPED.items():
        (dest / target).mkdir(parents=True, exist_ok=True)
        for name in names:
            with atomic_path(dest / target / name) as tmp:
                shutil.copyfile(built / source / name, tmp)
            files[f"{target}/{name}"] = {"sha256": sha256(dest / target / name),
                                         "bytes": (dest / target / name).stat().st_size}
    lm = metrics["lm"]
    final_probe = {k: v for k, v in (lm["probe_curve"][-1] if lm.get("probe_curve") else {}).items() if k != "step"}
    atomic_write_json(dest / MANIFEST, {
        "files": files, "seed": cfg.seed, "config": to_dict(cfg), "command": "make bases (" + " ".join(sys.argv) + ")",
        "commit": metrics["commit"], "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "text_probe": final_probe,
        "text_probe_curve": lm.get("probe_curve", []), "seconds": metrics["seconds"],
        "clip_final_loss": metrics["clip"].get("loss"), "lm_final_loss": lm.get("loss")})
    common.log(f"[base] shipped {len(files)} files to {dest} (manifest {dest / MANIFEST})")


def check_manifest(dest: Path) -> dict:
    """The manifest of shipped bases, after checking every file's sha256 (a ValueError names the first that
    differs or is missing)."""
    manifest = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    for name, entry in manifest["files"].items():
        path = dest / name
        if not path.is_file():
            raise ValueError(f"{dest / MANIFEST}: {name} is missing; rebuild the bases with `make bases`")
        if sha256(path) != entry["sha256"]:
            raise ValueError(f"{dest / MANIFEST}: {name} has another sha256 than the manifest's; rebuild the bases "
                             "with `make bases` or restore the file")
    return manifest


HELP = (__doc__.split("\n\n")[0] + " Reads: the captions JSONL with its images (captions) and instruction JSON "
        "(instruct_data). Writes: output_dir/tokenizer.model, clip/, llm/, their training folders (metrics.jsonl, "
        "checkpoints/), and with ship_to the shipped copy plus manifest.json.")


def main(argv: list[str] | None = None) -> int:
    return common.stage_main(argv, name="base", description=HELP, schema=SCHEMA,
                             train_sections=TRAIN_SECTIONS, run=run, entry=main)


if __name__ == "__main__":
    import sys

    sys.exit(main())
