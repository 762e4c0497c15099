"""One loader for every directory a run or a user has: eval, chat and export call `load_model(dir)` and get the same
`LoadedModel` (model + tokenizer + template + image preprocessing) whatever the directory holds.

What is in the directory decides, never its name:
- `llava_config.json` (LlavaModel.save): the whole model; with `adapter_config.json` next to it, the adapter is loaded
  onto it (stage 2 through an adapter writes such a directory);
- `adapter_config.json` alone: an adapter whose base model directory is recorded in it (or given as `base`);
- `config.json` with `mm_vision_tower` (a released LLaVA-1.5 directory): needs `vision_tower_dir`, the local Hugging
  Face CLIP directory its tower names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

ADAPTER_CONFIG = "adapter_config.json"
LLAVA_CONFIG = "llava_config.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The directory is not a model this project can load; the message says what was found and what to pass."""


@dataclass
class LoadedModel:
    """A model ready for generation, with what is needed to talk to it."""
    model: "torch.nn.Module"  # llava.model.llava.LlavaModel
    tokenizer: object  # llava.tokenizer.Tokenizer
    template: str
    model_id: str
    source: str = ""
    adapter: str | None = None  # adapter method when one is attached (unmerged)
    _processor: Callable | None = field(default=None, repr=False)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.tokenizer.eos_id,)

    def stop_strings(self, template: str | None = None) -> tuple[str, ...]:
        """The plain (stage-1) template ends a caption with a newline instead of </s>."""
        return ("\n",) if (template or self.template) == "plain" else ()

    def open_image(self, path: str | Path) -> torch.Tensor:
        from llava.data.images import ImageError, open_rgb

        if self._processor is None:
            self._processor = self.model.image_processor()
        try:  # open_rgb: decompression-bomb guard, any mode (CMYK, 16-bit, alpha) to RGB, errors naming the file
            return self._processor(open_rgb(path))
        except ImageError as e:
            raise ModelLoadError(str(e)) from None

    @torch.no_grad()
    def generate_texts(self, conversations: Sequence[list[dict]], images: Sequence[torch.Tensor | None], config,
                       on_text: Callable[[int, str], None] | None = None,
                       template: str | None = None) -> list[str]:
        """One answer per conversation (each ends with a human turn; `images[i]` for its `<image>` tag, or None)."""
        from llava.conversation import tokenize_conversation
        from llava.generate import generate

        device = next(self.model.parameters()).device
        ids = [torch.tensor(tokenize_conversation(c, self.tokenizer, template or self.template,
                                                  add_generation_prompt=True)[0], device=device)
               for c in conversations]
        present = [image for image in images if image is not None]
        pixels = torch.stack(present).to(device) if present else None
        embeds, _ = self.model.prepare_inputs_embeds(ids, pixels)
        new_ids = generate(self.model.llm, inputs_embeds=embeds, config=config, tokenizer=self.tokenizer,
                           on_text=on_text)
        return [self.tokenizer.decode(row).strip() for row in new_ids]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_directory(path: Path) -> str:
    names = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else []
    return ", ".join(names) or "nothing"


def load_model(path: str | Path, *, base: str | Path | None = None, vision_tower_dir: str | Path | None = None,
               device: str | None = None, dtype: str | torch.dtype | None = None, merge: bool = False,
               template: str | None = None) -> LoadedModel:
    """Load any trained output directory (see the module docstring) for generation, in eval mode on `device`."""
    from llava.model.llava import LlavaModel

    path = Path(path)
    torch_dtype = resolve_dtype(dtype)
    if not path.is_dir():
        raise ModelLoadError(f"model directory not found: {path}")
    adapter_method = None
    if (path / LLAVA_CONFIG).is_file():
        model = LlavaModel.load(path, dtype=torch_dtype)
        source = "llava model"
        if (path / ADAPTER_CONFIG).is_file():
            adapter_method = _attach_adapter(model, path)
            source = f"llava model + {adapter_method} adapter"
    elif (path / ADAPTER_CONFIG).is_file():
        base_dir = Path(base) if base is not None else _recorded_base(path)
        if not (base_dir / LLAVA_CONFIG).is_file():
            raise ModelLoadError(f"{path} holds an adapter whose base model {base_dir} is not a saved llava model "
                                 f"(no {LLAVA_CONFIG}); pass the base model directory (--model-base)")
        model = LlavaModel.load(base_dir, dtype=torch_dtype)
        adapter_method = _attach_adapter(model, path)
        source = f"{base_dir} + {adapter_method} adapter"
    elif (path / "config.json").is_file() and "mm_vision_tower" in _read_json(path / "config.json"):
        if vision_tower_dir is None:
            tower = _read_json(path / "config.json")["mm_vision_tower"]
            raise ModelLoadError(f"{path} is a LLaVA-1.5 directory whose vision tower is {tower!r}: pass the local "
                                 "Hugging Face CLIP directory of that tower (--vision-tower DIR)")
        model = LlavaModel.from_llava_hf(path, vision_tower_dir=vision_tower_dir, dtype=torch_dtype)
        source = "LLaVA-1.5 directory"
    else:
        raise ModelLoadError(f"{path} is not a model directory: expected {LLAVA_CONFIG} (a saved llava model), "
                             f"{ADAPTER_CONFIG} (an adapter) or a LLaVA-1.5 config.json; found "
                             f"{describe_directory(path)}")
    if merge and adapter_method is not None:
        from llava.adapters import merge_adapter

        merge_adapter(model)
        source += " (merged)"
    model = model.to(resolve_device(device)).eval()
    tokenizer = model.load_tokenizer()
    if tokenizer.vocab_size > model.llm.config.vocab_size:
        raise ModelLoadError(f"{path}: the tokenizer has {tokenizer.vocab_size} pieces but the language model only "
                             f"{model.llm.config.vocab_size} embeddings; they do not belong together")
    return LoadedModel(model=model, tokenizer=tokenizer, template=template or model.config.template,
                       model_id=_model_id(path), source=source, adapter=adapter_method)


def _model_id(path: Path) -> str:
    """`runs/demo/instruct/final` -> "instruct-final": the folder name alone is often just "final"."""
    resolved = path.resolve()
    return f"{resolved.parent.name}-{resolved.name}" if resolved.name in ("final", "merged") else resolved.name


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON ({e})") from None


def _recorded_base(adapter_dir: Path) -> Path:
    config = _read_json(adapter_dir / ADAPTER_CONFIG)
    recorded = config.get("base_model") or config.get("base_model_name_or_path")
    if not recorded:
        raise ModelLoadError(f"{adapter_dir / ADAPTER_CONFIG} does not record its base model; pass the base model "
                             "directory (--model-base)")
    base = Path(recorded)
    return base if base.is_absolute() else adapter_dir / base  # relative to the adapter: the run folder can move


def _attach_adapter(model, adapter_dir: Path) -> str:
    from llava.adapters import load_adapter

    load_adapter(model, adapter_dir)
    return str(_read_json(adapter_dir / ADAPTER_CONFIG).get("method") or
               _read_json(adapter_dir / ADAPTER_CONFIG).get("peft_type", "adapter")).lower()
