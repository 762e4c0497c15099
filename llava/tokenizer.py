"""SentencePiece tokenizer with LLaMA's conventions (unk 0, bos 1, eos 2, no pad piece; pad falls back to unk, as
LLaVA does for LLaMA/Vicuna), and training of a small BPE model for the offline demo."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import sentencepiece as spm


class Tokenizer:
    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if model_file.is_dir():
            model_file = model_file / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(f"{model_file}: SentencePiece model not found (expected a LLaMA tokenizer.model)")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.unk_id: int = self.sp.unk_id()
        self.pad_id: int = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.unk_id

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; control tokens (bos/eos/pad) are dropped, byte-fallback pieces are joined."""
        return self.sp.decode([int(i) for i in ids if int(i) not in (self.bos_id, self.eos_id, self.pad_id)])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    @staticmethod
    def train(texts: Iterable[str], out_file: str | Path, vocab_size: int = 1000,
              user_symbols: Iterable[str] = ()) -> "Tokenizer":
        """Train a LLaMA-style BPE model (byte fallback, digits split, dummy prefix) and write it atomically."""
        from llava.io import atomic_path

        lines = [line for text in texts for line in text.splitlines() if line.strip()]
        if not lines:
            raise ValueError("cannot train a tokenizer on empty text")
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, split_digits=True,
            character_coverage=1.0, normalization_rule_name="identity", add_dummy_prefix=True,
            remove_extra_whitespaces=False, user_defined_symbols=list(user_symbols),
            hard_vocab_limit=False, num_threads=1, minloglevel=2,
        )
        with atomic_path(out_file) as tmp:
            tmp.write_bytes(model.getvalue())
        return Tokenizer(out_file)
