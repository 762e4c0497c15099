"""Shared fixtures: a small SentencePiece tokenizer trained here (LLaMA conventions: unk 0, bos 1, eos 2)."""
import pytest

from llava.tokenizer import Tokenizer

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A cat is sitting on a red mat.",
    "[INST] <<SYS>> You are a helpful language and vision assistant. <</SYS>> [/INST]",
    "Describe the picture briefly. Two dogs play in the green park near a lake.",
    "What colour is the car? The car is blue. How many people are there? Three people.",
]


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(CORPUS * 10, tmp_path_factory.mktemp("tok") / "tokenizer.model", vocab_size=400)
