"""A tiny random LLaVA model on disk and `llava-pipeline serve` apps running on a free local port, in a thread."""
import contextlib
from pathlib import Path

import pytest
import torch
from PIL import Image

TEXT = ["What color is the circle? red", "How many shapes are there? 2", "Is there a blue square? No",
        "A small red circle on the left and a large blue square on the right.", "USER: hello ASSISTANT: hi"]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The test model's matrices are tiny, and on a busy machine torch's thread pool spends its time waiting for
    cores (60x slower per token when the machine was shared) instead of computing. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from llava.model.llama import LlamaConfig
    from llava.model.llava import LlavaConfig, LlavaModel
    from llava.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("serve_model")
    tokenizer = Tokenizer.train(TEXT * 20, tmp / "tokenizer.model", vocab_size=300)
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_tower={"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        projector_type="mlp2x_gelu", max_len=512,
        llm=LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size,
                        ffn_hidden=128, max_seq_len=512))
    LlavaModel(config).save(tmp / "model", tokenizer=tokenizer)
    return tmp / "model"


@pytest.fixture(scope="session")
def loaded(model_dir):
    from llava.loading import load_model

    return load_model(model_dir, device="cpu")


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("serve_images")
    Image.new("RGB", (40, 30), (220, 40, 40)).save(folder / "red.png")
    image = Image.new("RGB", (50, 64), (230, 230, 230))
    image.paste((40, 170, 70), (5, 5, 25, 25))
    image.save(folder / "mixed.png")
    return folder


@pytest.fixture(scope="session")
def serve(loaded):
    """serve(**settings) -> context manager yielding (base URL, app) for the tiny model with those ServeSettings."""
    from serve_helpers import running

    from pipeline.serve import ServeSettings, create_app

    @contextlib.contextmanager
    def start(**settings):
        app = create_app(loaded, ServeSettings(model_name="tiny", **settings))
        with running(app) as url:
            yield url, app
    return start
