"""The SentencePiece wrapper against sentencepiece itself and transformers' LlamaTokenizer."""
import json
import shutil

import pytest
import sentencepiece as spm

from llava.tokenizer import Tokenizer

TEXTS = ["Hello world", "A cat is sitting on a red mat.", "two  spaces inside", "numbers 2024 and 3.14",
         "ünïcode and 猫 and emoji 🙂", "line\nbreak\ttab", "USER: What is in the image? ASSISTANT:"]


def test_conventions_and_training(tokenizer):
    assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.pad_id == tokenizer.unk_id  # LLaMA has no pad piece; LLaVA pads with unk
    assert tokenizer.vocab_size == 320
    assert tokenizer.id_to_piece(tokenizer.bos_id) == "<s>" and tokenizer.piece_to_id("</s>") == 2


def test_matches_sentencepiece_directly(tokenizer):
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer.model_file))
    for text in TEXTS:
        ids = sp.encode(text)
        assert tokenizer.encode(text) == ids
        assert tokenizer.encode(text, bos=True, eos=True) == [1, *ids, 2]
        assert tokenizer.decode([1, *ids, 2]) == sp.decode(ids) == text  # byte fallback: lossless


def test_unknown_characters_fall_back_to_bytes(tokenizer):
    ids = tokenizer.encode("猫")
    assert all(tokenizer.id_to_piece(i).startswith("<0x") or tokenizer.id_to_piece(i) == "▁" for i in ids)
    assert tokenizer.unk_id not in ids


def test_matches_transformers_llama_tokenizer(tokenizer, tmp_path):
    """transformers builds its LlamaTokenizer from the same tokenizer.model offline; plain text encodes alike,
    including the leading bos that LLaMA checkpoints ask for (add_bos_token)."""
    from transformers import AutoTokenizer

    shutil.copy(tokenizer.model_file, tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True}))
    try:
        theirs = AutoTokenizer.from_pretrained(tmp_path)
    except (ImportError, ValueError, OSError) as e:  # a transformers build without the sentencepiece converter
        pytest.skip(f"transformers cannot build LlamaTokenizer offline here: {e}")
    for text in TEXTS:
        assert theirs.encode(text) == tokenizer.encode(text, bos=True), text
        assert theirs.decode(theirs.encode(text), skip_special_tokens=True) == text


def test_train_rejects_empty_text_and_missing_model(tmp_path):
    with pytest.raises(ValueError, match="empty text"):
        Tokenizer.train(["", "  "], tmp_path / "t.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer(tmp_path)


def test_directory_and_user_symbols(tmp_path):
    tok = Tokenizer.train(["a b c <image> d"] * 30, tmp_path / "tokenizer.model", vocab_size=300,
                          user_symbols=["<image>"])
    assert Tokenizer(tmp_path).encode("x <image> y") == tok.encode("x <image> y")
    assert tok.piece_to_id("<image>") in tok.encode("x <image> y")
