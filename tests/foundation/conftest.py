"""Fixtures for the foundation tests: a SentencePiece tokenizer trained here and a tiny LLaMA sized to it."""
import pytest

from llava.model import Llama, LlamaConfig
from llava.tokenizer import Tokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "USER: What is in the image? ASSISTANT: A cat is sitting on a red mat.",
    "Two dogs play in the green park near a lake. The sky is blue and the grass is green.",
    "How many people are there? Three people are walking along the road with 12 bags.",
    "The quick brown fox jumps over the lazy dog; then it runs away into the forest.",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(CORPUS * 20, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=320)


@pytest.fixture(scope="session")
def text_model(tokenizer) -> Llama:
    """A random LLaMA over the tokenizer's vocabulary (wide init: sampled text is varied, argmax ties rare)."""
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                         vocab_size=tokenizer.vocab_size, max_seq_len=512)
    return Llama(config).init_weights(std=0.15, seed=0).eval()
