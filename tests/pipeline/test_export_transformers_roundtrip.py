"""`export --format hf-llava` used the way a transformers user uses it: AutoProcessor (tokenizer + image processor)
turns a prompt with `<image>` and a PIL image into inputs, LlavaForConditionalGeneration gives logits and greedy
tokens, and all of it equals our own pipeline (tokenize_conversation + open_image -> LlavaModel -> generate).

Covered: both vision-select options, a vocabulary padded past the tokenizer and one that is not, MHA and GQA, and the
three aspect modes. Nothing on the transformers side is built by hand: ids, pixels and the image-token count all
come from transformers' own classes reading the exported directory."""
import numpy as np
import pytest
import torch
from PIL import Image

from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import get_template, tokenize_conversation
from llava.generate import GenerationConfig, generate
from pipeline.export import main
from llava.loading import load_model

transformers = pytest.importorskip("transformers")

CORPUS = ["Which animal sits on the mat? The grey cat.", "Count the boats: 3 boats, 12 oars.",
          "Is the door open? Yes, wide open!", "Describe the scene in detail: a kitchen, two mugs, één lamp.",
          "USER: hi ASSISTANT: hello there"]
# (select_feature, vocabulary padding past the tokenizer, kv heads of 4 query heads, aspect mode, whether the
# SentencePiece model has its own "<image>" piece)
CASES = [("patch", 0, 4, "pad", False), ("patch", 0, 2, "crop", False), ("patch", 13, 4, "resize", False),
         ("patch", 13, 1, "pad", False), ("cls_patch", 0, 4, "resize", False), ("cls_patch", 0, 2, "pad", False),
         ("cls_patch", 13, 4, "crop", False), ("cls_patch", 13, 2, "pad", False), ("patch", 0, 2, "pad", True)]


@pytest.fixture(scope="module")
def tokenizer_files(tmp_path_factory):
    """{has an "<image>" piece: tokenizer.model}"""
    from llava.tokenizer import Tokenizer

    files = {}
    for image_piece in (False, True):
        files[image_piece] = tmp_path_factory.mktemp("tok") / "tokenizer.model"
        Tokenizer.train(CORPUS * 30, files[image_piece], vocab_size=340,
                        user_symbols=["<image>"] if image_piece else [])
    return files


def save_model(path, tokenizer_file, select_feature, pad_vocab, kv_heads, aspect, seed=5):
    from llava.model.llama import LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_file)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_tower={"image_size": 28, "patch_size": 7, "width": 24, "layers": 3, "head_width": 8},
        select_feature=select_feature, select_layer=-2, image_aspect_ratio=aspect, max_len=1024,
        llm=LlamaConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=kv_heads, ffn_hidden=96, max_seq_len=1024,
                        vocab_size=tokenizer.vocab_size + pad_vocab))
    model = LlavaModel(config)
    with torch.no_grad():  # no target ever uses the padding rows or an "<image>" piece (our ids hold -200 there):
        model.llm.lm_head.weight[tokenizer.vocab_size:] = 0  # a trained model does not predict them; zero logits
        if tokenizer.id_to_piece(tokenizer.piece_to_id("<image>")) == "<image>":  # never win over random ones
            model.llm.lm_head.weight[tokenizer.piece_to_id("<image>")] = 0
        model.llm.norm.weight.add_(torch.randn_like(model.llm.norm.weight))
    model.save(path, tokenizer=tokenizer)


def sample_image():
    rng = np.random.default_rng(7)
    image = Image.fromarray(rng.integers(0, 256, (30, 52, 3), dtype=np.uint8))  # wide: padded or cropped
    image.paste((250, 20, 20), (4, 4, 20, 20))
    return image


CONVERSATION = [{"from": "human", "value": "Which animal sits on the mat?\n<image>"},
                {"from": "gpt", "value": "The grey cat."},
                {"from": "human", "value": "Count the boats:  3 boats, 12 oars; één?"}]


@pytest.mark.parametrize("select_feature,pad_vocab,kv_heads,aspect,image_piece", CASES)
def test_transformers_pipeline_equals_ours(tmp_path, tokenizer_files, select_feature, pad_vocab, kv_heads, aspect,
                                           image_piece):
    save_model(tmp_path / "model", tokenizer_files[image_piece], select_feature, pad_vocab, kv_heads, aspect)
    out = tmp_path / "hf"
    assert main(["--model", str(tmp_path / "model"), "--format", "hf-llava", "--out", str(out)]) == 0
    ours = load_model(tmp_path / "model", device="cpu")
    processor = transformers.AutoProcessor.from_pretrained(out, backend="pil")
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched weights
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    expected_id = ours.tokenizer.piece_to_id("<image>") if image_piece else ours.tokenizer.vocab_size
    assert hf.config.image_token_index == image_id == expected_id
    assert hf.config.image_seq_length == ours.model.vision.num_tokens

    prompt = get_template(ours.template).render(CONVERSATION, add_generation_prompt=True)
    assert "<image>" in prompt and "</s>" in prompt
    inputs = processor(images=sample_image(), text=prompt, return_tensors="pt")
    ids, _ = tokenize_conversation(CONVERSATION, ours.tokenizer, ours.template, add_generation_prompt=True)
    expanded = []
    for t in ids:
        expanded += [image_id] * ours.model.vision.num_tokens if t == IMAGE_TOKEN_INDEX else [t]
    assert inputs.input_ids[0].tolist() == expanded

    image_path = tmp_path / "image.png"
    sample_image().save(image_path)
    pixels = ours.open_image(image_path)[None]
    torch.testing.assert_close(inputs.pixel_values, pixels, atol=1e-5, rtol=0)

    vocab = ours.model.llm.config.vocab_size
    with torch.no_grad():
        our_logits = ours.model(torch.tensor([ids]), images=pixels)["logits"]
        their_logits = hf(**inputs).logits
    assert their_logits.shape[:2] == our_logits.shape[:2]
    assert their_logits.shape[-1] == vocab + (image_id == vocab)  # a row appended only where no row is free
    torch.testing.assert_close(their_logits[..., :vocab], our_logits, atol=1e-4, rtol=1e-4)
    assert hf.generation_config.suppress_tokens == [image_id]  # <image> is never generated ...
    if image_id == vocab:
        assert torch.all(their_logits[..., vocab] == 0)  # ... and its appended output row is zero

    with torch.no_grad():  # greedy, as `llava-pipeline chat` runs it (ours stops before eos, transformers at it)
        embeds, _ = ours.model.prepare_inputs_embeds([torch.tensor(ids)], pixels)
        our_ids = generate(ours.model.llm, inputs_embeds=embeds, config=GenerationConfig(max_new_tokens=12))[0]
        their_ids = hf.generate(**inputs, do_sample=False, max_new_tokens=12)[0, inputs.input_ids.shape[1]:].tolist()
    assert their_ids[:len(our_ids) + 1] == our_ids + ([ours.tokenizer.eos_id] if len(our_ids) < 12 else [])


@pytest.mark.parametrize("template", ["vicuna_v1", "llava_v1", "llama_2", "plain"])
def test_auto_tokenizer_ids_equal_ours_around_image_and_special_tokens(tmp_path, tokenizer_files, template):
    save_model(tmp_path / "model", tokenizer_files[False], "patch", 3, 2, "pad")
    assert main(["--model", str(tmp_path / "model"), "--format", "hf-llava", "--out", str(tmp_path / "hf")]) == 0
    ours = load_model(tmp_path / "model", device="cpu")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    conversation = CONVERSATION + [{"from": "gpt", "value": "Three boats."},
                                   {"from": "human", "value": "Left:<image>\n\n and  right:<image>two?"},
                                   {"from": "gpt", "value": " Two,  both 12."}]
    if template == "plain":
        conversation = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "A grey cat on a mat."}]
    ids, _ = tokenize_conversation(conversation, ours.tokenizer, template)
    text = get_template(template).render(conversation)
    expected = [image_id if t == IMAGE_TOKEN_INDEX else t for t in ids]
    assert tokenizer(text).input_ids == expected, text
