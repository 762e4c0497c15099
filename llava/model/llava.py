"""LLaVA: a CLIP vision tower, a projector and a LLaMA decoder; image features are spliced into the token sequence.

Inputs: `input_ids` hold IMAGE_TOKEN_INDEX placeholders; `images` holds the batch's images in the order their
placeholders appear (row by row, left to right). Each placeholder becomes that image's projected patch features
(`vision.num_tokens` positions), whose labels are IGNORE_INDEX; then the rows are right-padded and cut to
`config.max_len`. Any number of images per row works, including none.

Checkpoints:
- `save(dir)` / `LlavaModel.load(dir)`: `llava_config.json` (tower architecture, feature layer, projector, LLaMA
  config, template, image preprocessing), `llm/` (a Hugging Face LLaMA directory that transformers loads as is),
  `vision.safetensors` (open_clip layout), `mm_projector.safetensors` (LLaVA's key names) and the tokenizer. The
  directory is self-contained: loading repeats none of the options.
- `save_projector` / `load_projector`: the projector alone under LLaVA's names (`model.mm_projector.0.weight`), so
  LLaVA's stage-1 `mm_projector.bin` files load.
- `LlavaModel.from_llava_hf(dir, vision_tower_dir=...)`: a released LLaVA-1.5 directory (LLaMA weights plus
  `model.mm_projector.*`, `mm_*` keys in config.json); the CLIP tower comes from a local Hugging Face CLIP directory.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from llava.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava.model.llama import CheckpointError, Llama, LlamaConfig
from llava.model.projector import build_projector
from llava.conversation import get_template
from llava.model.vision import ASPECT_MODES, ImageProcessor, VisionTower, build_vision_tower, load_tower_weights

PROJECTOR_PREFIX = "model.mm_projector."
CONFIG_FILE = "llava_config.json"


@dataclass
class LlavaConfig:
    # Vision tower: an open_clip model name, an open_clip config dict or a Hugging Face CLIP directory. A built or
    # loaded model holds the resolved open_clip config dict here.
    vision_tower: str | dict = "ViT-L-14-336"
    vision_pretrained: str | None = None  # open_clip tag (local cache only) or checkpoint file; used by build()
    vision_cache_dir: str | None = None
    select_layer: int = -2  # index into the tower's hidden states, as LLaVA's mm_vision_select_layer
    select_feature: str = "patch"  # "patch" drops the CLS token, "cls_patch" keeps it
    freeze_vision: bool = True
    image_aspect_ratio: str = "pad"  # "pad" (LLaVA-1.5), "crop" (plain CLIP processor) or "resize" (squash)
    projector_type: str = "mlp2x_gelu"  # "linear", "mlp{N}x_gelu" or "identity"
    llm: LlamaConfig = field(default_factory=LlamaConfig)
    llm_path: str | None = None  # Hugging Face LLaMA directory whose weights build() loads
    template: str = "vicuna_v1"
    # Image preprocessing; None takes the tower's own (open_clip tag or HF preprocessor_config.json).
    image_size: int | None = None
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    image_interpolation: str | None = None
    tokenizer_file: str = "tokenizer.model"
    max_len: int = 2048  # sequence length after the image splice (LLaVA's model_max_length)

    def __post_init__(self) -> None:
        get_template(self.template)  # unknown names fail here, listing the valid ones
        if self.image_aspect_ratio not in ASPECT_MODES:
            raise ValueError(f"image_aspect_ratio={self.image_aspect_ratio!r}; valid: {', '.join(ASPECT_MODES)}")
        if self.max_len < 1:
            raise ValueError(f"max_len={self.max_len} must be >= 1")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "llava config") -> "LlavaConfig":
        data = dict(data)
        _check_keys(data, [f.name for f in dataclasses.fields(cls)], where)
        llm = data.pop("llm", None)
        if isinstance(llm, dict):
            _check_keys(llm, [f.name for f in dataclasses.fields(LlamaConfig)], f"{where}: llm")
            llm = LlamaConfig(**llm)
        return cls(**data, **({"llm": llm} if llm is not None else {}))


def _check_keys(data: dict, valid: list[str], where: str) -> None:
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise ValueError(f"{where}: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; valid keys: {', '.join(sorted(valid))}")


class LlavaModel(nn.Module):
    def __init__(self, config: LlavaConfig, *, llm: Llama | None = None, vision: VisionTower | None = None):
        """Assemble the parts; missing ones are built from `config` with random weights (see `build` for loading)."""
        super().__init__()
        if vision is None:
            vision = build_vision_tower(config.vision_tower, select_layer=config.select_layer,
                                        select_feature=config.select_feature, trainable=not config.freeze_vision)
        if llm is None:
            llm = Llama(config.llm).init_weights()
        self.vision, self.llm = vision, llm
        self.projector = build_projector(config.projector_type, vision.hidden_size, llm.config.dim)
        p = vision.preprocess
        self.config = dataclasses.replace(
            config, vision_tower=vision.arch, llm=llm.config, select_layer=vision.select_layer,
            select_feature=vision.select_feature, freeze_vision=not vision.trainable,
            image_size=config.image_size or p["size"], image_mean=list(config.image_mean or p["mean"]),
            image_std=list(config.image_std or p["std"]),
            image_interpolation=config.image_interpolation or p["interpolation"])
        if self.config.image_size != vision.image_size[0]:
            raise ValueError(f"image_size={self.config.image_size} but the vision tower takes {vision.image_size}")
        self.tokenizer_path: Path | None = None  # copied next to the weights by save()

    # ---- construction -------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, config: LlavaConfig, dtype: torch.dtype | None = None) -> "LlavaModel":
        """Build with pretrained parts: the LLaMA from `config.llm_path`, the tower from `config.vision_pretrained`."""
        llm = Llama.from_hf(config.llm_path, dtype) if config.llm_path else None
        vision = build_vision_tower(config.vision_tower, config.vision_pretrained, cache_dir=config.vision_cache_dir,
                                    select_layer=config.select_layer, select_feature=config.select_feature,
                                    trainable=not config.freeze_vision)
        model = cls(config, llm=llm, vision=vision)
        if config.llm_path and (Path(config.llm_path) / config.tokenizer_file).is_file():
            model.tokenizer_path = Path(config.llm_path) / config.tokenizer_file
        return model.to(dtype) if dtype is not None else model

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_tokens

    def image_processor(self) -> ImageProcessor:
        c = self.config
        return ImageProcessor(c.image_size, c.image_mean, c.image_std, c.image_interpolation, c.image_aspect_ratio)

    # ---- images and the splice -----------------------------------------------------------------------------------
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> projected features [N, num_image_tokens, llm dim] in the LLM's dtype."""
        features = self.vision(images)
        weight = next(self.projector.parameters(), None)
        features = self.projector(features.to(features.dtype if weight is None else weight.dtype))
        return features.to(self.llm.embed_tokens.weight.dtype)

    def _projector_in_graph(self) -> torch.Tensor | None:
        """0 * (features of a blank input): keeps projector (and a trainable tower) in the graph for text-only batches,
        so every rank produces the same gradients under DeepSpeed/DDP."""
        if self.vision.trainable:
            blank = torch.zeros(1, 3, *self.vision.image_size, device=self.llm.embed_tokens.weight.device)
            return 0.0 * self.encode_images(blank).sum()
        weight = next(self.projector.parameters(), None)
        if weight is None:
            return None
        return 0.0 * self.projector(weight.new_zeros(1, 1, self.vision.hidden_size)).sum()

    def prepare_inputs_embeds(self, input_ids: torch.Tensor | Sequence[torch.Tensor],
                              images: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                              labels: torch.Tensor | None = None, max_len: int | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per-row embeddings `[len_i, dim]` (and labels `[len_i]`) with image features spliced in.

        `input_ids`: a padded `[B, T]` tensor (with `attention_mask` marking real tokens, left or right padding) or a
        list of 1-D tensors. The result has no padding, ready for right-padded training or left-padded generation.
        """
        embed = self.llm.embed_tokens
        if isinstance(input_ids, torch.Tensor):
            keep = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                    else attention_mask.to(torch.bool))
            text_embeds = embed(input_ids.clamp(min=0))  # one lookup for the batch; placeholders are replaced below
            rows = [(input_ids[b][keep[b]], text_embeds[b][keep[b]], None if labels is None else labels[b][keep[b]])
                    for b in range(input_ids.shape[0])]
        else:
            if labels is not None and len(labels) != len(input_ids):
                raise ValueError(f"{len(input_ids)} rows of input_ids but {len(labels)} rows of labels")
            rows = [(ids, embed(ids.clamp(min=0)), None if labels is None else labels[b])
                    for b, ids in enumerate(input_ids)]
        n_placeholders = sum(int((ids == IMAGE_TOKEN_INDEX).sum()) for ids, _, _ in rows)
        n_images = 0 if images is None else images.shape[0]
        if n_placeholders != n_images:
            raise ValueError(f"the batch has {n_placeholders} image placeholders (IMAGE_TOKEN_INDEX) but {n_images} "
                             "images; pass exactly one image per placeholder, in order")
        features = self.encode_images(images) if n_images else None
        image_labels = None
        if features is not None and labels is not None:
            image_labels = torch.full((features.shape[1],), IGNORE_INDEX, dtype=torch.long, device=features.device)

        out_embeds: list[torch.Tensor] = []
        out_labels: list[torch.Tensor] = []
        image_idx = 0
        for ids, text, row_labels in rows:
            pieces, label_pieces, start = [], [], 0
            for pos in (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist():
                pieces += [text[start:pos], features[image_idx]]
                if row_labels is not None:
                    label_pieces += [row_labels[start:pos], image_labels]
                image_idx += 1
                start = pos + 1
            pieces.append(text[start:])
            out_embeds.append(torch.cat(pieces)[:max_len])
            if row_labels is not None:
                label_pieces.append(row_labels[start:])
                out_labels.append(torch.cat(label_pieces)[:max_len])
        if n_images == 0 and torch.is_grad_enabled():
            keep_alive = self._projector_in_graph()
            if keep_alive is not None:
                out_embeds[0] = out_embeds[0] + keep_alive.to(out_embeds[0].dtype)
        return out_embeds, (out_labels if labels is not None else None)

    def forward(self, input_ids, labels: torch.Tensor | None = None, images: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, return_logits: bool | None = None) -> dict:
        """dict(loss, logits, num_tokens): mean fp32 cross-entropy over supervised (shifted) tokens.

        Logits of every position are only materialised when asked for (`return_logits`, default: when there are no
        labels): the loss needs the head only at supervised positions, which saves a [B, T, vocab] tensor per step.
        """
        embeds, label_rows = self.prepare_inputs_embeds(input_ids, images, attention_mask, labels, self.config.max_len)
        hidden = self.llm(inputs_embeds=pad_sequence(embeds, batch_first=True), return_hidden=True)
        out: dict = {"loss": None, "logits": None, "num_tokens": None}
        if label_rows is not None:
            targets = pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX)[:, 1:]
            supervised = targets != IGNORE_INDEX
            logits = self.llm.lm_head(hidden[:, :-1][supervised]).float()
            num_tokens = supervised.sum()
            out["loss"] = F.cross_entropy(logits, targets[supervised], reduction="sum") / num_tokens.clamp(min=1)
            out["num_tokens"] = num_tokens
        if return_logits or (return_logits is None and labels is None):
            out["logits"] = self.llm.lm_head(hidden)
        return out

    # ---- projector files ------------------------------------------------------------------------------------------
    def projector_state_dict(self) -> dict[str, torch.Tensor]:
        return {PROJECTOR_PREFIX + k: v for k, v in self.projector.state_dict().items()}

    def save_projector(self, path: str | os.PathLike) -> None:
        """Write the projector under LLaVA's key names: .safetensors, or .bin (torch.save) as LLaVA writes it."""
        from llava.io import atomic_path, atomic_save_safetensors

        state = {k: v.detach().cpu().contiguous() for k, v in self.projector_state_dict().items()}
        if str(path).endswith(".safetensors"):
            atomic_save_safetensors(state, path)
        else:
            with atomic_path(path) as tmp:
                torch.save(state, tmp)

    def load_projector(self, path: str | os.PathLike) -> None:
        """Load a projector file (ours or LLaVA's `mm_projector.bin`; .bin read with weights_only=True)."""
        path = str(path)
        try:
            if path.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(path)
            else:
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any read failure is reported with the file name
            raise CheckpointError(f"{path}: cannot read projector weights ({type(e).__name__}: {e})") from None
        self._assign_projector(state, path)

    def _assign_projector(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        if any("mm_projector." in k for k in state):
            state = {k.split("mm_projector.", 1)[1]: v for k, v in state.items() if "mm_projector." in k}
        expected = self.projector.state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            def shapes(d):
                return {k: tuple(v.shape) for k, v in sorted(d.items())}

            raise CheckpointError(
                f"{source}: projector weights {shapes(state)} do not fit projector_type="
                f"{self.config.projector_type!r} from vision width {self.vision.hidden_size} to LLM width "
                f"{self.llm.config.dim}, which needs {shapes(expected)}")
        self.projector.load_state_dict(state)

    # ---- whole model ---------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, tokenizer=None) -> None:
        """Write a self-contained directory; `tokenizer` (a Tokenizer or a file) defaults to the one loaded with."""
        from llava.io import atomic_path, atomic_save_safetensors, atomic_write_json

        path = Path(path)
        source = tokenizer.model_file if hasattr(tokenizer, "model_file") else tokenizer
        source = Path(source) if source is not None else self.tokenizer_path
        if source is None or not Path(source).is_file():
            raise ValueError(f"save({path}): no tokenizer to copy alongside the weights ({source}); pass "
                             "tokenizer=Tokenizer(...) or a tokenizer.model path")
        # Over an older save, its config would vouch for a mix of old and new files if this save failed half way.
        (path / CONFIG_FILE).unlink(missing_ok=True)
        self.llm.save_hf(path / "llm")
        atomic_save_safetensors(self.vision.visual.state_dict(), path / "vision.safetensors")
        self.save_projector(path / "mm_projector.safetensors")
        with atomic_path(path / self.config.tokenizer_file) as tmp:
            shutil.copyfile(source, tmp)
        config = dataclasses.replace(self.config, vision_pretrained=None, vision_cache_dir=None, llm_path=None)
        atomic_write_json(path / CONFIG_FILE, config.to_dict())  # written last: its presence marks a complete save

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: torch.dtype | None = None) -> "LlavaModel":
        from safetensors.torch import load_file

        path = Path(path)
        config_file = path / CONFIG_FILE
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: not found (expected a directory written by LlavaModel.save; for a "
                                  "released LLaVA-1.5 directory use LlavaModel.from_llava_hf)")
        config = LlavaConfig.from_dict(json.loads(config_file.read_text()), where=str(config_file))
        llm = Llama.from_hf(path / "llm", dtype)
        vision = VisionTower(config.vision_tower, select_layer=config.select_layer,
                             select_feature=config.select_feature, trainable=not config.freeze_vision)
        load_tower_weights(vision, load_file(str(path / "vision.safetensors")), str(path / "vision.safetensors"))
        model = cls(config, llm=llm, vision=vision)
        model.load_projector(path / "mm_projector.safetensors")
        if (path / config.tokenizer_file).is_file():
            model.tokenizer_path = path / config.tokenizer_file
        return model.to(dtype or llm.embed_tokens.weight.dtype).train(False)

    def load_tokenizer(self):
        from llava.tokenizer import Tokenizer

        if self.tokenizer_path is None:
            raise ValueError("this model has no tokenizer file (build it from a directory holding tokenizer.model)")
        return Tokenizer(self.tokenizer_path)

    # ---- released LLaVA-1.5 directories -------------------------------------------------------------------------
    @classmethod
    def from_llava_hf(cls, path: str | os.PathLike, vision_tower_dir: str | os.PathLike | Mapping | None = None,
                      dtype: torch.dtype | None = None, template: str = "vicuna_v1") -> "LlavaModel":
        """Load a released LLaVA-1.5 directory (e.g. liuhaotian/llava-v1.5-7b).

        `vision_tower_dir`: the local Hugging Face CLIP directory for config.json's `mm_vision_tower`, or a mapping
        from such names to directories. The tower weights some releases carry (`model.vision_tower.*`) are ignored,
        as LLaVA ignores them: the frozen tower is the CLIP checkpoint. `template`: LLaVA-1.5 chats with `vicuna_v1`.
        """
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{config_file}: not found (expected a LLaVA-1.5 directory)")
        hf = json.loads(config_file.read_text())
        where = str(config_file)
        tower_name = hf.get("mm_vision_tower") or hf.get("vision_tower")
        if not tower_name:
            raise CheckpointError(f"{where}: no mm_vision_tower key; this is not a LLaVA checkpoint")
        for key, ok in (("mm_use_im_start_end", False), ("mm_use_im_patch_token", False)):
            if hf.get(key, False) != ok:
                raise CheckpointError(f"{where}: {key}={hf[key]!r} is not supported (LLaVA-1.5 uses {ok})")
        if hf.get("mm_patch_merge_type", "flat") != "flat":
            raise CheckpointError(f"{where}: mm_patch_merge_type={hf['mm_patch_merge_type']!r} (LLaVA-NeXT) is not "
                                  "supported; only 'flat' (LLaVA-1.5)")
        aspect = hf.get("image_aspect_ratio") or "square"
        if aspect not in ("pad", "square"):
            raise CheckpointError(f"{where}: image_aspect_ratio={aspect!r} is not supported (pad or square)")
        vision_dir = _resolve_tower_dir(tower_name, vision_tower_dir, where)
        vision = build_vision_tower(vision_dir, select_layer=hf.get("mm_vision_select_layer", -1),
                                    select_feature=hf.get("mm_vision_select_feature", "patch"))
        if hf.get("mm_hidden_size", vision.hidden_size) != vision.hidden_size:
            raise CheckpointError(f"{where}: mm_hidden_size={hf['mm_hidden_size']} but the CLIP tower in {vision_dir} "
                                  f"has width {vision.hidden_size}; is vision_tower_dir the right model?")
        llm = _load_llava_llm(path, hf, dtype)
        config = LlavaConfig(
            vision_tower=vision.arch, select_layer=vision.select_layer, select_feature=vision.select_feature,
            image_aspect_ratio="pad" if aspect == "pad" else "crop",
            projector_type=hf.get("mm_projector_type", "linear"), llm=llm.config, template=template,
            max_len=hf.get("tokenizer_model_max_length") or llm.config.max_seq_len)
        model = cls(config, llm=llm, vision=vision)
        state = _read_prefixed(path, PROJECTOR_PREFIX)
        if not state:
            raise CheckpointError(f"{path}: no {PROJECTOR_PREFIX}* weights found; is this a LLaVA checkpoint?")
        model._assign_projector(state, str(path))
        if (path / "tokenizer.model").is_file():
            model.tokenizer_path = path / "tokenizer.model"
        return model.to(dtype or llm.embed_tokens.weight.dtype).train(False)


def _resolve_tower_dir(name: str, given, where: str) -> Path:
    if isinstance(given, Mapping):
        if name not in given:
            raise CheckpointError(f"{where}: mm_vision_tower {name!r} is not in vision_tower_dir (has: "
                                  f"{', '.join(map(str, given))})")
        given = given[name]
    if given is None:
        if Path(name).is_dir():
            return Path(name)
        raise CheckpointError(f"{where}: mm_vision_tower is {name!r}, which is not a local directory; pass "
                              f"vision_tower_dir=<local Hugging Face CLIP directory of {name}>")
    if not Path(given).is_dir():
        raise CheckpointError(f"vision_tower_dir {given} is not a directory (expected a Hugging Face CLIP directory)")
    return Path(given)


def _load_llava_llm(path: Path, hf: dict, dtype: torch.dtype | None) -> Llama:
    """Read the LLaMA part of a LLaVA directory (model_type llava_llama) through Llama.from_hf.

    from_hf only accepts model_type "llama", so it reads a temporary directory holding a rewritten config.json and
    links to the original weight files (nothing is copied); LLaVA's extra modules are skipped by prefix.
    """
    with tempfile.TemporaryDirectory(prefix="llava_llm_") as tmp:
        for file in path.iterdir():
            if file.name != "config.json" and file.suffix in (".safetensors", ".bin", ".json"):
                os.symlink(file.resolve(), Path(tmp) / file.name)
        (Path(tmp) / "config.json").write_text(json.dumps({**hf, "model_type": "llama"}))
        try:
            return Llama.from_hf(tmp, dtype, ignore_prefixes=(PROJECTOR_PREFIX, "model.vision_tower."))
        except CheckpointError as e:
            raise CheckpointError(str(e).replace(tmp, str(path))) from None


def _read_prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors whose key starts with `prefix`, reading only the files (for safetensors, the keys) that hold them."""
    files = None
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / index_name).is_file():
            weight_map = json.loads((path / index_name).read_text())["weight_map"]
            files = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
            break
    if files is None:
        files = [n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()][:1]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        file = path / name
        if name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                state.update({k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)})
        else:
            shard = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            state.update({k: v for k, v in shard.items() if k.startswith(prefix)})
    return state
