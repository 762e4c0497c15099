"""CLIP vision tower on open_clip: LLaVA's feature layer and feature selection, frozen by default, image preprocessing
with LLaVA's aspect modes, and conversion of Hugging Face `CLIPVisionModel` / `CLIPModel` weights.

Features: LLaVA takes `hidden_states[select_layer]` of the CLIP ViT (-2: the output of the penultimate block, before
the final `ln_post` / projection), and with `patch` drops the CLS token. Index 0 of `hidden_states` is the embedding
after the pre-norm (`ln_pre`), index k the output of block k, as in transformers. We run the open_clip ViT's own modules
up to that block and no further, so the blocks after it cost nothing.

Where a tower comes from (`build_vision_tower(spec, pretrained)`):
- an open_clip model name (`"ViT-L-14-336"`), with `pretrained` an open_clip tag resolved only from the local cache
  (nothing is ever downloaded) or a checkpoint file;
- a config dict: an open_clip model config (`{"embed_dim", "vision_cfg", "quick_gelu"}`) or just the vision part
  (`{"image_size": 64, "patch_size": 8, "width": 128, "layers": 4}`);
- a Hugging Face CLIP directory (config.json + weights, e.g. openai/clip-vit-large-patch14-336, LLaVA's tower),
  converted to the open_clip layout; it gives the same features as transformers' `hidden_states[select_layer]`.
  A config field open_clip's ViT cannot express (another activation, num_channels != 3) is refused by name.

A built tower records its architecture as an open_clip config dict (`tower.arch`), so a saved model rebuilds it from
that dict and its saved weights, whatever the source was.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
from pathlib import Path

import torch
from torch import nn

ASPECT_MODES = ("pad", "resize", "crop")
SELECT_FEATURES = ("patch", "cls_patch")
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionTowerError(ValueError):
    """A vision tower spec, checkpoint or option is wrong; the message says which and how to fix it."""


# ---- image preprocessing ---------------------------------------------------------------------------------------------

def expand_to_square(image, background: tuple[int, int, int]):
    """LLaVA's `expand2square`: paste the image centred on a square canvas of `background` colour."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


class ImageProcessor:
    """RGB PIL image -> normalised tensor [3, size, size]: an aspect mode in front of open_clip's eval transform.

    `pad`: pad to a square filled with the mean colour, then resize (LLaVA-1.5's `image_aspect_ratio=pad`);
    `crop`: resize the short side and centre-crop (the plain CLIP processor); `resize`: squash to a square.
    """

    def __init__(self, size: int, mean=OPENAI_MEAN, std=OPENAI_STD, interpolation: str = "bicubic",
                 aspect_mode: str = "pad"):
        import open_clip

        if aspect_mode not in ASPECT_MODES:
            raise VisionTowerError(f"unknown image aspect mode {aspect_mode!r}; valid: {', '.join(ASPECT_MODES)}")
        self.size, self.mean, self.std, self.aspect_mode = int(size), tuple(mean), tuple(std), aspect_mode
        self.background = tuple(int(m * 255) for m in self.mean)
        self.transform = open_clip.image_transform(
            self.size, is_train=False, mean=self.mean, std=self.std, interpolation=interpolation,
            resize_mode="squash" if aspect_mode == "resize" else "shortest")

    def __call__(self, image) -> torch.Tensor:
        if self.aspect_mode == "pad":
            image = expand_to_square(image, self.background)
        return self.transform(image)


# ---- the tower ---------------------------------------------------------------------------------------------------

class VisionTower(nn.Module):
    """An open_clip VisionTransformer that returns LLaVA's selected-layer features `[N, tokens, width]`.

    Frozen (the default): no parameter needs grad, the module stays in eval mode even under `model.train()`, and the
    forward runs without building a graph. `set_trainable(True)` unfreezes the parameters on the path to the selected
    layer (the blocks after it, `ln_post` and `proj` never influence the features and stay frozen).
    """

    def __init__(self, arch: dict, preprocess: dict | None = None, *, select_layer: int = -2,
                 select_feature: str = "patch", trainable: bool = False):
        super().__init__()
        from open_clip.model import _build_vision_tower
        from open_clip.transformer import VisionTransformer

        if select_feature not in SELECT_FEATURES:
            raise VisionTowerError(f"unknown select_feature {select_feature!r}; valid: {', '.join(SELECT_FEATURES)}")
        self.arch = copy.deepcopy(arch)
        self.visual = _build_vision_tower(arch.get("embed_dim", 512), arch["vision_cfg"], arch.get("quick_gelu", False))
        if not isinstance(self.visual, VisionTransformer):
            raise VisionTowerError(f"the vision tower must be an open_clip VisionTransformer; this config builds a "
                                   f"{type(self.visual).__name__} ({arch['vision_cfg']})")
        n_blocks = len(self.visual.transformer.resblocks)
        if not -(n_blocks + 1) <= select_layer <= n_blocks:
            raise VisionTowerError(f"select_layer={select_layer} is out of range for a tower with {n_blocks} blocks "
                                   f"(valid: {-(n_blocks + 1)} .. {n_blocks}, as indices of hidden_states)")
        self.select_layer, self.select_feature = select_layer, select_feature
        self.num_blocks = select_layer if select_layer >= 0 else n_blocks + 1 + select_layer  # blocks to run
        size = self.visual.image_size
        self.preprocess = {"size": size[0], "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                           "interpolation": "bicubic", **(preprocess or {})}
        self.set_trainable(trainable)

    @property
    def hidden_size(self) -> int:
        return self.visual.transformer.width

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.visual.image_size)

    @property
    def num_patches(self) -> int:
        return self.visual.grid_size[0] * self.visual.grid_size[1]

    @property
    def num_tokens(self) -> int:
        """Positions each image takes in the LLM sequence."""
        return self.num_patches + (self.select_feature == "cls_patch")

    def image_processor(self, aspect_mode: str = "pad") -> ImageProcessor:
        p = self.preprocess
        return ImageProcessor(p["size"], p["mean"], p["std"], p["interpolation"], aspect_mode)

    def _feature_params(self) -> list[nn.Parameter]:
        v = self.visual
        params = [v.conv1.weight, v.class_embedding, v.positional_embedding, *v.ln_pre.parameters()]
        return params + [p for block in v.transformer.resblocks[:self.num_blocks] for p in block.parameters()]

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = trainable
        for p in self.parameters():
            p.requires_grad_(False)
        if trainable:
            for p in self._feature_params():
                p.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "VisionTower":
        return super().train(mode and getattr(self, "trainable", False))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.image_size:
            raise VisionTowerError(f"images are {tuple(images.shape[-2:])} but the vision tower takes "
                                   f"{self.image_size}; preprocess them with tower.image_processor()")
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            v = self.visual
            x = v.conv1(images.to(v.conv1.weight.dtype)).flatten(2).transpose(1, 2)  # [N, grid*grid, width]
            cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = v.ln_pre(torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype))
            batch_first = getattr(v.transformer, "batch_first", False)
            x = x if batch_first else x.transpose(0, 1)
            for block in v.transformer.resblocks[:self.num_blocks]:
                x = block(x)
            x = x if batch_first else x.transpose(0, 1)
        return x[:, 1:] if self.select_feature == "patch" else x


def build_vision_tower(spec: str | os.PathLike | dict, pretrained: str | None = None, *,
                       cache_dir: str | None = None, select_layer: int = -2, select_feature: str = "patch",
                       trainable: bool = False) -> VisionTower:
    """A tower from an open_clip name, a config dict or a Hugging Face CLIP directory (see the module docstring).

    `pretrained`: None (random weights), an open_clip tag (looked up in the local cache only: `cache_dir`, the
    Hugging Face cache, ~/.cache/clip) or a checkpoint file (.safetensors, .bin/.pt/.pth read with weights_only).
    """
    options = dict(select_layer=select_layer, select_feature=select_feature, trainable=trainable)
    if isinstance(spec, (str, os.PathLike)) and Path(spec).is_dir():
        if pretrained is not None:
            raise VisionTowerError(f"{spec} is a Hugging Face CLIP directory with its own weights; "
                                   f"pretrained={pretrained!r} cannot be applied to it")
        arch, preprocess = hf_clip_arch(spec)
        tower = VisionTower(arch, preprocess, **options)
        load_tower_weights(tower, hf_clip_state_dict(spec, tower.visual), str(spec))
        return tower
    if isinstance(spec, dict):
        arch, preprocess = arch_from_dict(spec), None
        name = None
    else:
        name = str(spec)
        arch, preprocess = open_clip_arch(name)
    if pretrained is None:
        return VisionTower(arch, preprocess, **options)
    file, tag_cfg = resolve_pretrained(name, pretrained, cache_dir)
    if tag_cfg:
        # The weights decide the activation: a tag trained with QuickGELU needs it, whatever the config says.
        arch["quick_gelu"] = bool(tag_cfg.get("quick_gelu", arch.get("quick_gelu", False)))
        preprocess = {k: list(tag_cfg[k]) if k in ("mean", "std") else tag_cfg[k]
                      for k in ("mean", "std", "interpolation") if k in tag_cfg}
    tower = VisionTower(arch, preprocess, **options)
    load_tower_weights(tower, read_open_clip_visual_state(file), file)
    return tower


def load_tower_weights(tower: VisionTower, state: dict[str, torch.Tensor], source: str) -> None:
    expected = tower.visual.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VisionTowerError(f"{source}: weights do not match the tower architecture; missing "
                               f"{missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected "
                               f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise VisionTowerError(f"{source}: {key} has shape {tuple(tensor.shape)}, the architecture implies "
                                   f"{tuple(expected[key].shape)}")
    tower.visual.load_state_dict(state)


# ---- open_clip configs and checkpoints -------------------------------------------------------------------------------

def open_clip_arch(name: str) -> tuple[dict, None]:
    import open_clip

    cfg = open_clip.get_model_config(name.replace("/", "-"))
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3)
        raise VisionTowerError(f"unknown open_clip model {name!r}" + (f" (did you mean {', '.join(close)}?)" if close
                               else "") + "; see open_clip.list_models(), or pass a config dict or a HF CLIP directory")
    return arch_from_dict(cfg), None


def arch_from_dict(cfg: dict) -> dict:
    """Normalise an open_clip model config, or a bare vision config, to {"embed_dim", "vision_cfg", "quick_gelu"}."""
    from open_clip import CLIPVisionCfg

    cfg = copy.deepcopy(cfg)
    if "vision_cfg" in cfg:
        vision_cfg, embed_dim, quick_gelu = cfg["vision_cfg"], cfg.get("embed_dim", 512), cfg.get("quick_gelu", False)
    else:
        embed_dim, quick_gelu = cfg.pop("embed_dim", 512), cfg.pop("quick_gelu", False)
        vision_cfg = cfg
    valid = [f.name for f in dataclasses.fields(CLIPVisionCfg)]
    for key in vision_cfg:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            raise VisionTowerError(f"vision config: unknown key {key!r}" + (f" (did you mean {close[0]!r}?)" if close
                                   else "") + f"; valid keys: {', '.join(valid)}, plus embed_dim and quick_gelu")
    if vision_cfg.get("timm_model_name") or isinstance(vision_cfg.get("layers"), (list, tuple)):
        raise VisionTowerError("only open_clip ViT towers are supported (not timm or ResNet towers): "
                               f"{vision_cfg}")
    return {"embed_dim": embed_dim, "vision_cfg": vision_cfg, "quick_gelu": bool(quick_gelu)}


def resolve_pretrained(name: str | None, pretrained: str, cache_dir: str | None) -> tuple[str, dict]:
    """A local checkpoint file for `pretrained` (a file path, or an open_clip tag found in a local cache)."""
    if Path(pretrained).is_file():
        return str(pretrained), {}
    import open_clip

    if name is None:
        raise VisionTowerError(f"pretrained={pretrained!r} is not a file; tags need an open_clip model name as the "
                               "tower spec, a config dict takes a checkpoint file")
    tag_cfg = open_clip.get_pretrained_cfg(name.replace("/", "-"), pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name.replace("/", "-"))
        raise VisionTowerError(f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {name!r}"
                               + (f" (tags: {', '.join(tags)})" if tags else ""))
    looked = []
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(tag_cfg["hf_hub"])  # "org/repo/" (default file) or "org/repo/file"
        candidates = [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for candidate in candidates:
            found = try_to_load_from_cache(repo_id, candidate, cache_dir=cache_dir)
            if isinstance(found, str):
                return found, tag_cfg
            looked.append(f"Hugging Face cache {repo_id}/{candidate}")
    local = [tag_cfg["file"]] if tag_cfg.get("file") else []
    if tag_cfg.get("url"):
        local.append(os.path.join(cache_dir or os.path.expanduser("~/.cache/clip"), os.path.basename(tag_cfg["url"])))
    for path in local:
        if Path(path).is_file():
            return path, tag_cfg
    looked += local
    raise VisionTowerError(f"open_clip weights {name}/{pretrained} are not in the local cache (looked at: "
                           f"{'; '.join(looked)}). Nothing is downloaded here: copy the checkpoint file onto this "
                           "machine and pass its path as pretrained=..., or fill the cache on a machine with network")


def read_open_clip_visual_state(file: str) -> dict[str, torch.Tensor]:
    """The `visual.*` weights of an open_clip checkpoint (a full CLIP model or a bare visual state dict)."""
    try:
        if str(file).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any read failure is reported with the file name
        raise VisionTowerError(f"{file}: cannot read the checkpoint ({type(e).__name__}: {e}); TorchScript archives "
                               "(OpenAI's original .pt files) are not read, use open_clip's safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        state = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    return state


# ---- Hugging Face CLIP -------------------------------------------------------------------------------------------
# transformers (CLIPVisionModel; keys may sit under "vision_model.")  open_clip VisionTransformer
# embeddings.class_embedding                                          class_embedding
# embeddings.patch_embedding.weight                                   conv1.weight
# embeddings.position_embedding.weight [1 + grid*grid, width], CLS 1st positional_embedding (same layout)
# pre_layrnorm.{weight,bias}                                          ln_pre.*
# encoder.layers.N.self_attn.{q,k,v}_proj.{weight,bias}               transformer.resblocks.N.attn.in_proj_*
#                                                                     (q, k, v stacked along dim 0)
# encoder.layers.N.self_attn.out_proj.*                               transformer.resblocks.N.attn.out_proj.*
# encoder.layers.N.layer_norm{1,2}.*                                  transformer.resblocks.N.ln_{1,2}.*
# encoder.layers.N.mlp.fc1.* / fc2.*                                  transformer.resblocks.N.mlp.c_fc.* / c_proj.*
# post_layernorm.*                                                    ln_post.*
# visual_projection.weight ([proj, width]; CLIPModel,                proj ([width, proj], transposed)
#   CLIPVisionModelWithProjection)

# CLIPVisionConfig's defaults (a CLIPModel's config.json may leave its vision_config empty).
_HF_CLIP_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "projection_dim": 512, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                     "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# hidden_act -> (open_clip quick_gelu, nn.GELU kwargs). transformers spells exact GELU two ways and its tanh
# approximation five ways; each is the same function as open_clip's nn.GELU (approximate="tanh" for the latter).
_TANH = {"approximate": "tanh"}
_HF_ACTIVATIONS = {"quick_gelu": (True, None), "gelu": (False, None), "gelu_python": (False, None),
                   "gelu_pytorch_tanh": (False, _TANH), "gelu_python_tanh": (False, _TANH), "gelu_new": (False, _TANH),
                   "gelu_fast": (False, _TANH), "gelu_accurate": (False, _TANH)}
_HF_BLOCK_MAP = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                 "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def exact_mlp_ratio(intermediate_size: int, width: int) -> float:
    """The smallest mlp_ratio with int(width * mlp_ratio) == intermediate_size, the MLP width open_clip builds.

    intermediate_size / width alone can land one unit short after rounding (e.g. 4304 / 1152 for SigLIP so400m).
    """
    ratio = intermediate_size / width
    while int(width * ratio) < intermediate_size:
        ratio = math.nextafter(ratio, math.inf)
    return ratio


def hf_clip_arch(path: str | os.PathLike) -> tuple[dict, dict]:
    """open_clip arch + preprocessing of a HF CLIP directory (config.json, optional preprocessor_config.json).

    Every CLIPVisionConfig field that changes the features is honoured; a value open_clip's ViT cannot express is
    refused by name. A CLIPModel's projection is sized by its top-level projection_dim, as transformers sizes
    visual_projection (its vision_config's projection_dim is unused there).
    """
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise VisionTowerError(f"{config_file}: not found (expected a Hugging Face CLIP directory)")
    hf = json.loads(config_file.read_text())
    model_type = hf.get("model_type")
    where = "vision_config." if model_type == "clip" else ""
    if model_type == "clip":
        vc = {**_HF_CLIP_DEFAULTS, **(hf.get("vision_config") or {}), "projection_dim": hf.get("projection_dim", 512)}
    elif model_type == "clip_vision_model":
        vc = {**_HF_CLIP_DEFAULTS, **hf}
    else:
        raise VisionTowerError(f"{config_file}: model_type {model_type!r} is not a CLIP model "
                               "(expected 'clip' or 'clip_vision_model')")

    def refuse(field: str, why: str):
        raise VisionTowerError(f"{config_file}: {where}{field}={vc[field]!r} is not supported: {why}")

    for field in ("image_size", "patch_size"):
        if not isinstance(vc[field], int) or isinstance(vc[field], bool) or vc[field] < 1:
            refuse(field, "it must be one positive integer (square images and patches, as CLIPVisionModel uses)")
    if vc["num_channels"] != 3:
        refuse("num_channels", "the tower takes RGB images (3 channels)")
    if vc["hidden_size"] % vc["num_attention_heads"]:
        refuse("num_attention_heads", f"it does not divide hidden_size={vc['hidden_size']}")
    if vc["hidden_act"] not in _HF_ACTIVATIONS:
        refuse("hidden_act", f"supported: {', '.join(_HF_ACTIVATIONS)}")
    quick_gelu, act_kwargs = _HF_ACTIVATIONS[vc["hidden_act"]]
    width, heads = vc["hidden_size"], vc["num_attention_heads"]
    vision_cfg = {"image_size": vc["image_size"], "patch_size": vc["patch_size"], "width": width,
                  "layers": vc["num_hidden_layers"], "head_width": width // heads,
                  "mlp_ratio": exact_mlp_ratio(vc["intermediate_size"], width),
                  "norm_kwargs": {"eps": vc["layer_norm_eps"]}}
    if act_kwargs:
        vision_cfg["act_kwargs"] = dict(act_kwargs)
    arch = {"embed_dim": vc["projection_dim"], "vision_cfg": vision_cfg, "quick_gelu": quick_gelu}
    preprocess = {"size": vc["image_size"], "mean": list(OPENAI_MEAN), "std": list(OPENAI_STD),
                  "interpolation": "bicubic"}
    processor_file = path / "preprocessor_config.json"
    if processor_file.is_file():
        proc = json.loads(processor_file.read_text())
        crop = proc.get("crop_size", vc["image_size"])
        preprocess["size"] = crop["height"] if isinstance(crop, dict) else crop
        preprocess["mean"] = list(proc.get("image_mean", OPENAI_MEAN))
        preprocess["std"] = list(proc.get("image_std", OPENAI_STD))
        preprocess["interpolation"] = "bilinear" if proc.get("resample") == 2 else "bicubic"
    return arch, preprocess


def hf_clip_state_dict(path: str | os.PathLike, visual: nn.Module) -> dict[str, torch.Tensor]:
    """The vision weights of a HF CLIP directory, renamed and packed for the open_clip `visual` module."""
    from llava.model.llama import iter_hf_tensors

    hf: dict[str, torch.Tensor] = {}
    for key, tensor, source in iter_hf_tensors(path):
        key = key.removeprefix("vision_model.")
        if key.startswith(("text_model.", "text_projection", "logit_scale")) or key.endswith("position_ids"):
            continue
        hf[key] = tensor
    state = {"proj": visual.proj.detach().clone()}  # a CLIPVisionModel has no projection; LLaVA never uses it
    take = hf.pop
    try:
        state["class_embedding"] = take("embeddings.class_embedding")
        state["conv1.weight"] = take("embeddings.patch_embedding.weight")
        state["positional_embedding"] = take("embeddings.position_embedding.weight")
        for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
            for p in ("weight", "bias"):
                state[f"{ours}.{p}"] = take(f"{theirs}.{p}")
        if "visual_projection.weight" in hf:
            state["proj"] = take("visual_projection.weight").t().contiguous()
        for n in range(len(visual.transformer.resblocks)):
            src, dst = f"encoder.layers.{n}.", f"transformer.resblocks.{n}."
            for p in ("weight", "bias"):
                state[f"{dst}attn.in_proj_{p}"] = torch.cat(
                    [take(f"{src}self_attn.{x}_proj.{p}") for x in ("q", "k", "v")], dim=0)
                for theirs, ours in _HF_BLOCK_MAP.items():
                    state[f"{dst}{ours}.{p}"] = take(f"{src}{theirs}.{p}")
    except KeyError as e:
        raise VisionTowerError(f"{path}: missing CLIP vision weight {e.args[0]!r}") from None
    if hf:
        raise VisionTowerError(f"{path}: unexpected CLIP vision weights {sorted(hf)[:5]} (does config.json match "
                               "the checkpoint?)")
    return state
