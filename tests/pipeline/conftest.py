"""A tiny random LLaVA model saved to disk (tokenizer + CLIP ViT + LLaMA), shared by the eval, chat and export tests."""
from pathlib import Path

import pytest
import torch
from PIL import Image

TEXT = ["What color is the circle? red", "How many shapes are there? 2", "Is there a blue square? No",
        "A small red circle on the left and a large blue square on the right.", "USER: hello ASSISTANT: hi"]


def build_tiny_model(tmp: Path, projector: str = "mlp2x_gelu", seed: int = 0):
    from llava.model.llama import LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.tokenizer import Tokenizer

    tokenizer = Tokenizer.train(TEXT * 20, tmp / "tokenizer.model", vocab_size=300)
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_tower={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        projector_type=projector, max_len=512,
        llm=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                        ffn_hidden=128, max_seq_len=512))
    model = LlavaModel(config)
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny_model")
    model, tokenizer = build_tiny_model(tmp)
    model.save(tmp / "model", tokenizer=tokenizer)
    return tmp / "model"


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), (220, 40, 40)).save(folder / "red.png")
    Image.new("RGB", (32, 32), (40, 90, 220)).save(folder / "blue.png")
    image = Image.new("RGB", (50, 64), (230, 230, 230))
    image.paste((40, 170, 70), (5, 5, 25, 25))
    image.save(folder / "mixed.png")
    return folder
