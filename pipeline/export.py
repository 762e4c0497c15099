"""`llava-pipeline export --model DIR --format merged|hf-llama|hf-llava --out DIR`.

- `merged`: our own format (LlavaModel.save) with a weight-space adapter folded into the base weights, so chat, eval
  and training load it as a plain model.
- `hf-llama`: the language model alone as a Hugging Face LLaMA directory (+ tokenizer), for text-only tooling.
- `hf-llava`: the whole model in the layout transformers' `LlavaForConditionalGeneration` loads, the layout of the
  llava-hf checkpoints: `vision_tower.vision_model.*` (a CLIP ViT tower written back in Hugging Face CLIP names),
  `multi_modal_projector.linear_1/linear_2` (an mlp2x_gelu projector), `language_model.model.*` and
  `language_model.lm_head.weight`, with the tokenizer, image processor and LlavaProcessor configs beside them, so
  `AutoProcessor` turns a prompt with `<image>` and an image into the inputs our own pipeline builds.
  `<image>` is the id transformers' tokenizer gives it: the first after the SentencePiece vocabulary (as in the
  llava-hf conversion), or the SentencePiece model's own `<image>` piece where it has one. Where that id is already
  a row (a vocabulary padded past the tokenizer, or the piece), the weights are written unchanged; otherwise one row
  is appended (embedding: the mean row, output: zero). `generation_config.json` suppresses the id, so it is never
  sampled.

Open_clip -> Hugging Face CLIP names (the inverse of llava.model.vision.hf_clip_state_dict):

    class_embedding                      embeddings.class_embedding
    conv1.weight                         embeddings.patch_embedding.weight
    positional_embedding                 embeddings.position_embedding.weight
    ln_pre.* / ln_post.*                 pre_layrnorm.* / post_layernorm.*
    transformer.resblocks.N.attn.in_proj_{weight,bias}   encoder.layers.N.self_attn.{q,k,v}_proj.* (split in 3 on dim 0)
    transformer.resblocks.N.attn.out_proj.*              encoder.layers.N.self_attn.out_proj.*
    transformer.resblocks.N.ln_1.* / ln_2.*              encoder.layers.N.layer_norm1.* / layer_norm2.*
    transformer.resblocks.N.mlp.c_fc.* / c_proj.*        encoder.layers.N.mlp.fc1.* / fc2.*
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from llava.io import atomic_path, atomic_save_safetensors, atomic_write_json

FORMATS = ("merged", "hf-llama", "hf-llava")
# open_clip VisionTransformer options that a Hugging Face CLIPVisionModel has no equivalent for (value = the default).
_UNSUPPORTED_VISION_OPTIONS = {"ls_init_value": None, "attentional_pool": False, "no_ln_pre": False,
                               "pos_embed_type": "learnable", "final_ln_after_pool": False, "block_type": None,
                               "qk_norm": False, "scaled_cosine_attn": False, "scale_heads": False,
                               "scale_attn_inner": False, "scale_attn": False, "scale_fc": False}
_BLOCK_NAMES = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
                "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


class ExportError(ValueError):
    """The model cannot be written in the requested format; the message says why and what would work."""


# ---- adapters ------------------------------------------------------------------------------------------------------

def fold_in_adapter(model: nn.Module) -> None:
    """Merge a weight-space adapter into the base weights and take the adapter modules out, leaving a plain model."""
    from llava.adapters import AdapterError, merge_adapter
    from llava.adapters.base import LinearAdapter

    try:
        merge_adapter(model)
    except AdapterError as e:
        raise ExportError(f"{e}; export the adapter directory as it is, or train with a mergeable method") from None
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearAdapter):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                               device="meta")
            linear.weight = module.weight
            linear.bias = module.bias
            parent_name, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, leaf, linear)
    for module in model.modules():
        module.__dict__.pop("adapter_spec", None)


# ---- vision tower ----------------------------------------------------------------------------------------------------

def hf_clip_vision_config(vision) -> dict:
    """CLIPVisionConfig for an open_clip ViT tower; ExportError for towers CLIP's architecture cannot express."""
    arch = vision.arch
    cfg = arch["vision_cfg"]
    for key, default in _UNSUPPORTED_VISION_OPTIONS.items():
        if cfg.get(key, default) != default:
            raise ExportError(f"the vision tower uses open_clip option {key}={cfg[key]!r}, which Hugging Face's "
                              "CLIPVisionModel does not have; export --format merged instead")
    act = cfg.get("act_kwargs") or {}
    if arch.get("quick_gelu"):
        hidden_act = "quick_gelu"
    elif act.get("approximate") == "tanh":
        hidden_act = "gelu_pytorch_tanh"
    elif not act:
        hidden_act = "gelu"
    else:
        raise ExportError(f"the vision tower's activation options {act} have no Hugging Face CLIP equivalent")
    visual = vision.visual
    width = visual.transformer.width
    block = visual.transformer.resblocks[0]
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(visual.transformer.resblocks),
        "num_attention_heads": block.attn.num_heads,
        "image_size": visual.image_size[0],
        "patch_size": visual.patch_size[0],
        "projection_dim": arch.get("embed_dim", 512),
        "hidden_act": hidden_act,
        "layer_norm_eps": visual.ln_pre.eps,
        "num_channels": 3,
        "attention_dropout": 0.0,
    }


def hf_clip_vision_state_dict(visual: nn.Module) -> dict[str, torch.Tensor]:
    """open_clip VisionTransformer weights under Hugging Face CLIPVisionModel names (without `vision_model.`)."""
    state = visual.state_dict()
    out = {
        "embeddings.class_embedding": state["class_embedding"],
        "embeddings.patch_embedding.weight": state["conv1.weight"],
        "embeddings.position_embedding.weight": state["positional_embedding"],
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    for n in range(len(visual.transformer.resblocks)):
        src, dst = f"transformer.resblocks.{n}.", f"encoder.layers.{n}."
        for p in ("weight", "bias"):
            q, k, v = state[f"{src}attn.in_proj_{p}"].chunk(3, dim=0)
            out.update({f"{dst}self_attn.q_proj.{p}": q, f"{dst}self_attn.k_proj.{p}": k,
                        f"{dst}self_attn.v_proj.{p}": v})
            for ours, theirs in _BLOCK_NAMES.items():
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"]
    return {k: v.detach().contiguous() for k, v in out.items()}


# ---- the three formats -------------------------------------------------------------------------------------

def _copy_tokenizer(loaded, out: Path) -> None:
    with atomic_path(out / "tokenizer.model") as tmp:
        shutil.copyfile(loaded.tokenizer.model_file, tmp)


def _tokenizer_config(loaded, extra_tokens: dict[int, str] | None = None) -> dict:
    """transformers' LlamaTokenizer settings that tokenize as llava.conversation does.

    `legacy: True`: our text after `<image>`, `</s>` or `<s>` is encoded as its own piece with SentencePiece's dummy
    prefix "▁" (LLaVA's tokenizer_image_token); transformers does the same only in legacy mode, and without it drops
    that "▁" after every special token.
    """
    tok = loaded.tokenizer
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": tok.id_to_piece(tok.bos_id), "eos_token": tok.id_to_piece(tok.eos_id),
        "unk_token": tok.id_to_piece(tok.unk_id), "pad_token": tok.id_to_piece(tok.pad_id),
        "model_max_length": loaded.model.config.max_len, "clean_up_tokenization_spaces": False,
    }
    if extra_tokens:
        config["added_tokens_decoder"] = {
            str(i): {"content": text, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                     "special": True} for i, text in extra_tokens.items()}
        config["extra_special_tokens"] = {"image_token": next(iter(extra_tokens.values()))}
    return config


def _image_token_id(tokenizer) -> int:
    """The id transformers' tokenizer gives `<image>`: the SentencePiece model's own piece where it has one (a
    user-defined symbol), else the first id after the vocabulary, where the tokenizer config adds it."""
    from llava.constants import DEFAULT_IMAGE_TOKEN

    piece = tokenizer.piece_to_id(DEFAULT_IMAGE_TOKEN)
    return piece if tokenizer.id_to_piece(piece) == DEFAULT_IMAGE_TOKEN else tokenizer.vocab_size


def _image_processor_config(config) -> dict:
    """LlavaImageProcessor settings for our aspect mode: `pad` is its do_pad (a square of the mean colour, as
    LLaVA's expand2square), `crop` its shortest-edge resize + centre crop, `resize` a resize to the square."""
    size, aspect = config.image_size, config.image_aspect_ratio
    resample = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL's codes
    if config.image_interpolation not in resample:
        raise ExportError(f"image interpolation {config.image_interpolation!r} has no transformers equivalent "
                          f"(supported: {', '.join(resample)})")
    return {
        "image_processor_type": "LlavaImageProcessor", "do_convert_rgb": True, "do_pad": aspect == "pad",
        "do_resize": True, "size": {"height": size, "width": size} if aspect == "resize" else {"shortest_edge": size},
        "resample": resample[config.image_interpolation],
        "do_center_crop": aspect != "resize", "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(config.image_mean), "image_std": list(config.image_std)}


def export_merged(loaded, out: Path) -> None:
    if loaded.adapter is not None:
        fold_in_adapter(loaded.model)
    loaded.model.save(out, tokenizer=loaded.tokenizer)


def export_hf_llama(loaded, out: Path) -> None:
    if loaded.adapter is not None:
        fold_in_adapter(loaded.model)
    loaded.model.llm.save_hf(out)
    _copy_tokenizer(loaded, out)
    atomic_write_json(out / "tokenizer_config.json", _tokenizer_config(loaded))


def export_hf_llava(loaded, out: Path) -> dict:
    """Write the LlavaForConditionalGeneration directory; return its config."""
    from llava.constants import DEFAULT_IMAGE_TOKEN

    model = loaded.model
    if loaded.adapter is not None:
        fold_in_adapter(model)
    config = model.config
    if config.projector_type != "mlp2x_gelu":
        raise ExportError(f"transformers' LLaVA projector is Linear-GELU-Linear (mlp2x_gelu); this model's is "
                          f"{config.projector_type!r}. Export --format merged instead")
    if model.llm.num_virtual_tokens() or model.llm.num_kv_prefix():
        raise ExportError("the language model has prompt or prefix tokens (an unmerged adapter); transformers' LLaMA "
                          "has no place for them")
    vision_config = hf_clip_vision_config(model.vision)
    image_processor = _image_processor_config(config)
    llm = model.llm
    if llm.config.tie_embeddings:
        raise ExportError("tied input/output embeddings are not exported to transformers' LLaVA (an appended image "
                          "token row must be zero on the output side only); export --format merged instead")
    vocab = llm.config.vocab_size
    image_token_index = _image_token_id(loaded.tokenizer)
    if image_token_index > vocab:
        raise ExportError(f"the tokenizer has {image_token_index} pieces but the language model only {vocab} rows")
    add_row = image_token_index == vocab
    text_config = {k: v for k, v in llm.config.to_hf_config(llm.embed_tokens.weight.dtype).items()
                   if k not in ("architectures", "torch_dtype", "dtype")}
    text_config["vocab_size"] = vocab + add_row

    state: dict[str, torch.Tensor] = {}
    for key, tensor in hf_clip_vision_state_dict(model.vision.visual).items():
        state[f"vision_tower.vision_model.{key}"] = tensor
    projector = model.projector
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        state[f"multi_modal_projector.{theirs}.weight"] = projector.get_submodule(ours).weight.detach()
        state[f"multi_modal_projector.{theirs}.bias"] = projector.get_submodule(ours).bias.detach()
    for key, tensor in llm.hf_state_dict().items():
        tensor = tensor.detach()
        if add_row and key == "model.embed_tokens.weight":
            tensor = torch.cat([tensor, tensor.mean(0, keepdim=True)])
        elif add_row and key == "lm_head.weight":
            tensor = torch.cat([tensor, tensor.new_zeros(1, tensor.shape[1])])
        state[f"language_model.{key}"] = tensor.contiguous()

    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors({k: v.cpu() for k, v in state.items()}, out / "model.safetensors",
                            metadata={"format": "pt"})
    dtype = str(llm.embed_tokens.weight.dtype).removeprefix("torch.")
    hf_config = {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "vision_config": vision_config, "text_config": text_config,
        "image_token_index": image_token_index, "image_seq_length": model.vision.num_tokens,
        "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default" if config.select_feature == "patch" else "full",
        "tie_word_embeddings": False, "dtype": dtype, "torch_dtype": dtype,
    }
    atomic_write_json(out / "generation_config.json", {
        "bos_token_id": llm.config.bos_id, "eos_token_id": llm.config.eos_id, "pad_token_id": llm.config.pad_id,
        "suppress_tokens": [image_token_index]})
    _copy_tokenizer(loaded, out)
    atomic_write_json(out / "tokenizer_config.json",
                      _tokenizer_config(loaded, {image_token_index: DEFAULT_IMAGE_TOKEN}))
    atomic_write_json(out / "preprocessor_config.json", image_processor)
    atomic_write_json(out / "processor_config.json", {
        "processor_class": "LlavaProcessor", "image_token": DEFAULT_IMAGE_TOKEN,
        "patch_size": model.vision.visual.patch_size[0], "num_additional_image_tokens": 1,  # the CLS token
        "vision_feature_select_strategy": hf_config["vision_feature_select_strategy"]})
    atomic_write_json(out / "config.json", hf_config)  # last: its presence marks a complete export
    return hf_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llava-pipeline export", description=__doc__.split("\n\n")[1].strip(),
        epilog="Reads: the model directory (--model; an adapter's base from --model-base or its own record). "
               "Writes: the --out directory (new or empty) in the chosen --format, each file atomically.")
    parser.add_argument("--model", "--model-path", dest="model", required=True, help="trained model dir")
    parser.add_argument("--model-base", help="base model dir for an adapter dir that does not record its base")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the saved dtype")
    args = parser.parse_args(argv)

    from llava.loading import ModelLoadError, load_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"llava-pipeline export: {out} is not empty; choose a new --out directory", file=sys.stderr)
        return 2
    try:
        loaded = load_model(args.model, base=args.model_base, device="cpu", dtype=args.dtype)
        {"merged": export_merged, "hf-llama": export_hf_llama, "hf-llava": export_hf_llava}[args.format](loaded, out)
    except (ExportError, ModelLoadError) as e:
        print(f"llava-pipeline export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.format} export of {args.model} ({loaded.source}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
