"""How fast a tiny LLaMA learns to read facts from its context: the bases' text probe against training steps, in a
plain PyTorch loop (no DeepSpeed, no packing), to try corpus formats and model shapes in minutes.

Each step trains on `--batch` fresh corpus scenes (data_gen.corpus's scene stream, never repeated) written as text,
each followed by `--questions` short-answer questions as reading lines (`Q: ...` / `A: ...` after the scene, without
LLaVA's short-answer instruction), one document per row. `--answers-only` trains the answers alone (the bases'
corpus style "qa"); without it every token. Every `--every` steps it answers the probe's held-out questions (200
scenes of another stream, data_gen.corpus.probe_questions, 40 per category) greedily and prints exact match per
category. AdamW (betas 0.9 / `--beta2`, weight decay 0.1 on every parameter), warm-up over the first 5 % of the
steps, then cosine to 0, gradient clipping 1.0, fp32, seed 0.

    python bench/reading_curve.py --answers-only [--steps 1000] [--every 250] [--dim 160 --layers 4 ...]

The tokenizer is the shipped bases' (`assets/tiny-bases/llama/tokenizer.model`), so a run measures the format and the
model, not a tokenizer. docs/demo.md has the numbers; one step of 32 documents takes about 1 s on one CPU thread.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_gen.corpus import probe_questions, reading_question, scene_as_text, scene_record  # noqa: E402
from data_gen.paraphrases import training_rewording  # noqa: E402
from data_gen.vqa import draw_short_answers  # noqa: E402
from data_gen.world import Vocabulary  # noqa: E402
from llava.model.llama import Llama, LlamaConfig  # noqa: E402
from llava.tokenizer import Tokenizer  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", default=str(ROOT / "assets" / "tiny-bases" / "llama" / "tokenizer.model"))
    p.add_argument("--dim", type=int, default=160)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=432)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32, help="documents (scenes) per step")
    p.add_argument("--questions", type=int, default=8, help="questions per scene")
    p.add_argument("--paraphrase-fraction", type=float, default=0.3)
    p.add_argument("--answers-only", action="store_true")
    p.add_argument("--every", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--init-std", type=float, default=0.02, help="normal(0, std) init of linears and embeddings")
    return p.parse_args(argv)


def main(argv=None) -> None:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    tok = Tokenizer(a.tokenizer)

    def question_line(question: str) -> list[int]:
        return tok.encode("\n" + reading_question(question))

    reword, vocabulary = training_rewording(a.paraphrase_fraction), Vocabulary()

    def document(index: int) -> tuple[list[int], list[int]]:
        record = scene_record(0, index, 64)
        rng = random.Random(f"exp:{index}")
        turns = draw_short_answers(record, vocabulary, rng, a.questions, reword)
        ids = [tok.bos_id] + tok.encode(scene_as_text(record, rng))
        labels = [-100] * len(ids) if a.answers_only else list(ids)
        for turn in turns:
            q, answer = question_line(turn["question"]), tok.encode(" " + turn["answer"])
            ids += q + answer
            labels += ([-100] * len(q) if a.answers_only else q) + answer
        return ids + [tok.eos_id], labels + [tok.eos_id]

    config = LlamaConfig.from_name("tiny", dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                                   ffn_hidden=a.ffn, vocab_size=tok.vocab_size, max_seq_len=512, bos_id=tok.bos_id,
                                   eos_id=tok.eos_id)
    llm = Llama(config).init_weights(std=a.init_std, seed=0)
    print(f"{sum(p.numel() for p in llm.parameters()) / 1e6:.2f} M parameters", flush=True)
    probe = probe_questions(200, 1)

    @torch.no_grad()
    def run_probe() -> tuple[float, dict]:
        llm.eval()
        right: dict[str, list[bool]] = {}
        for q in probe:
            x = torch.tensor([[tok.bos_id] + tok.encode(q["scene"]) + question_line(q["question"])])
            said: list[int] = []
            for _ in range(3):  # greedy; an answer is one word
                token = int(llm(x)[0, -1].argmax())
                if token == tok.eos_id:
                    break
                said.append(token)
                x = torch.cat([x, torch.tensor([[token]])], 1)
                if "\n" in tok.decode(said):
                    break
            answer = tok.decode(said).split("\n")[0].strip().lower()
            right.setdefault(q["category"], []).append(answer == q["answer"].lower())
        llm.train()
        return (sum(sum(v) for v in right.values()) / len(probe),
                {c: round(sum(v) / len(v), 2) for c, v in sorted(right.items())})

    opt = torch.optim.AdamW(llm.parameters(), lr=a.lr, betas=(0.9, a.beta2), weight_decay=0.1)
    warmup, started, index = max(1, a.steps // 20), time.time(), 0
    for step in range(1, a.steps + 1):
        scale = step / warmup if step <= warmup else \
            0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, a.steps - warmup)))
        for group in opt.param_groups:
            group["lr"] = a.lr * scale
        docs = [document(index + k) for k in range(a.batch)]
        index += a.batch
        width = max(len(ids) for ids, _ in docs)
        x = torch.zeros((a.batch, width), dtype=torch.long)
        y = torch.full((a.batch, width), -100)
        for k, (ids, labels) in enumerate(docs):
            x[k, :len(ids)], y[k, :len(labels)] = torch.tensor(ids), torch.tensor(labels)
        logits = llm(x[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, 1:].flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(llm.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.3f} ({time.time() - started:.0f} s)", flush=True)
        if step % a.every == 0 or step == a.steps:
            total, per = run_probe()
            print(f"probe at step {step}: {total:.3f} {per}", flush=True)


if __name__ == "__main__":
    main()
