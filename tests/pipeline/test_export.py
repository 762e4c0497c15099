"""`llava-pipeline export`: the documented transformers snippet runs on an hf-llava export and generates our answer
(the full round trip is in test_export_transformers_roundtrip.py); hf-llama gives our logits; a LoRA adapter folds
into a merged model with the adapter's outputs; methods that cannot merge say so."""
import shutil
from pathlib import Path

import pytest
import torch

from llava.conversation import tokenize_conversation
from llava.generate import GenerationConfig, generate
from pipeline.export import main
from llava.loading import load_model

transformers = pytest.importorskip("transformers")


def _prompt_ids(loaded, text="<image>\nWhat color is the circle?"):
    ids, _ = tokenize_conversation([{"from": "human", "value": text}], loaded.tokenizer, loaded.template,
                                   add_generation_prompt=True)
    return ids


def docs_snippet(name: str) -> str:
    """The python block of docs/pipeline.md that contains `name`."""
    text = (Path(__file__).parents[2] / "docs" / "pipeline.md").read_text()
    blocks = [b.split("```")[0] for b in text.split("```python\n")[1:]]
    found = [b for b in blocks if name in b]
    assert len(found) == 1, f"expected one python block with {name} in docs/pipeline.md, found {len(found)}"
    return found[0]


def test_documented_transformers_snippet_generates_our_answer(tiny_model_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["--model", str(tiny_model_dir), "--format", "hf-llava", "--out", str(out)]) == 0
    snippet = docs_snippet("LlavaForConditionalGeneration")
    assert snippet.count('"runs/demo/export/llava-hf"') == 1 and snippet.count('"image.png"') == 1
    capsys.readouterr()
    namespace = {}
    exec(snippet.replace('"runs/demo/export/llava-hf"', repr(str(out)))
         .replace('"image.png"', repr(str(image_folder / "mixed.png"))), namespace)
    printed = capsys.readouterr().out

    loaded = load_model(tiny_model_dir, device="cpu")
    ids = _prompt_ids(loaded, "What is in the image?\n<image>")
    pixels = loaded.open_image(image_folder / "mixed.png")[None]
    with torch.no_grad():
        embeds, _ = loaded.model.prepare_inputs_embeds([torch.tensor(ids)], pixels)
        ours = generate(loaded.model.llm, inputs_embeds=embeds, config=GenerationConfig(max_new_tokens=32))[0]
    theirs = namespace["output"][0, namespace["inputs"].input_ids.shape[1]:].tolist()
    assert theirs[:len(ours) + 1] == ours + ([loaded.tokenizer.eos_id] if len(ours) < 32 else [])
    assert printed.strip() == namespace["processor"].decode(ours, skip_special_tokens=True).strip()


def test_hf_llama_export_loads_as_a_causal_lm(tiny_model_dir, tmp_path):
    out = tmp_path / "llama"
    assert main(["--model", str(tiny_model_dir), "--format", "hf-llama", "--out", str(out)]) == 0
    hf = transformers.LlamaForCausalLM.from_pretrained(out)
    loaded = load_model(tiny_model_dir, device="cpu")
    ids = torch.tensor([loaded.tokenizer.encode("How many shapes are there?", bos=True)])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, loaded.model.llm(ids), atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.model").is_file()


def _adapter_model(tiny_model_dir, tmp_path, method, **options):
    """Base model + a trained-looking adapter (random non-zero weights), saved the two ways a run can: adapter-only
    next to a base, and self-contained (base files + adapter files in one directory)."""
    from llava.adapters import apply_adapter, save_adapter, trainable_parameters

    loaded = load_model(tiny_model_dir, device="cpu")
    apply_adapter(loaded.model, method, **options)
    torch.manual_seed(1)
    with torch.no_grad():
        for _, p in trainable_parameters(loaded.model):
            p.add_(torch.randn_like(p) * 0.5)
    adapter_only = tmp_path / f"{method}-adapter"
    save_adapter(loaded.model, adapter_only)
    combined = tmp_path / f"{method}-combined"
    shutil.copytree(tiny_model_dir, combined)
    for file in adapter_only.iterdir():
        shutil.copy(file, combined / file.name)
    return loaded, adapter_only, combined


def test_merged_export_folds_a_lora_adapter(tiny_model_dir, image_folder, tmp_path):
    adapted, adapter_only, combined = _adapter_model(tiny_model_dir, tmp_path, "lora", r=4, alpha=8)
    ids = torch.tensor([_prompt_ids(adapted)])
    pixels = torch.stack([adapted.open_image(image_folder / "red.png")])
    with torch.no_grad():
        expected = adapted.model(ids, images=pixels)["logits"]
        base = load_model(tiny_model_dir).model(ids, images=pixels)["logits"]
    assert not torch.allclose(expected, base, atol=1e-3)  # the adapter changes the output

    from_pair = load_model(adapter_only, base=tiny_model_dir)
    from_combined = load_model(combined)
    assert from_pair.adapter == from_combined.adapter == "lora"
    with torch.no_grad():
        torch.testing.assert_close(from_combined.model(ids, images=pixels)["logits"], expected)

    out = tmp_path / "merged"
    assert main(["--model", str(adapter_only), "--model-base", str(tiny_model_dir), "--format", "merged",
                 "--out", str(out)]) == 0
    merged = load_model(out)
    assert merged.adapter is None and "adapter_config.json" not in {p.name for p in out.iterdir()}
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids, images=pixels)["logits"], expected, atol=1e-3, rtol=1e-3)


def test_adapter_without_base_and_unmergeable_adapter_are_clear_errors(tiny_model_dir, tmp_path, capsys):
    _, adapter_only, combined = _adapter_model(tiny_model_dir, tmp_path, "prompt_tuning", num_tokens=4)
    assert main(["--model", str(adapter_only), "--format", "merged", "--out", str(tmp_path / "a")]) == 2
    assert "--model-base" in capsys.readouterr().err
    assert main(["--model", str(combined), "--format", "hf-llava", "--out", str(tmp_path / "b")]) == 2
    assert "cannot merge a prompt_tuning adapter" in capsys.readouterr().err


def test_linear_projector_cannot_be_a_transformers_llava(tmp_path, capsys):
    from tests.pipeline.conftest import build_tiny_model

    model, tokenizer = build_tiny_model(tmp_path, projector="linear")
    model.save(tmp_path / "linear", tokenizer=tokenizer)
    assert main(["--model", str(tmp_path / "linear"), "--format", "hf-llava", "--out", str(tmp_path / "x")]) == 2
    assert "mlp2x_gelu" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("x")
    assert main(["--model", str(tmp_path / "linear"), "--format", "merged", "--out", str(tmp_path / "busy")]) == 2
    assert "not empty" in capsys.readouterr().err
