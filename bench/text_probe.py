"""The text probe of a tiny LLaMA on more questions than the manifest's 200, by category and by the number of objects
in the scene: how well it reads a scene written as text, the ability stage 2 builds on (docs/demo.md).

    python bench/text_probe.py [--llama assets/tiny-bases/llama] [--questions 1000] [--seed 7]

The questions come from data_gen.corpus.probe_questions (scenes of their own stream; seed 1 is the manifest's probe,
so the default 7 is another draw), asked and checked exactly as the base stage's probe asks them in the "qa" style
(stages.base.probe_answers). A LLaMA whose tokenizer has the object words as pieces (corpus.object_words) is asked
with one word per object, as it was trained. Prints a table and the overall share right.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_gen.corpus import probe_questions, reads_object_words  # noqa: E402
from data_gen.vqa import CATEGORIES  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llama", default="assets/tiny-bases/llama", help="Hugging Face LLaMA folder")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=7, help="probe stream seed (the manifest's probe uses 1)")
    args = parser.parse_args(argv)

    from llava.model.llama import Llama
    from llava.tokenizer import Tokenizer
    from stages.base import probe_answers

    torch.manual_seed(0)
    llm = Llama.from_hf(args.llama).eval()
    tokenizer = Tokenizer(Path(args.llama) / "tokenizer.model")
    object_words = reads_object_words(tokenizer)
    questions = probe_questions(args.questions, args.seed, object_words=object_words)
    right = probe_answers(llm, tokenizer, questions, template="vicuna_v1", batch_size=100, style="qa")
    cells: dict[tuple[str, int], list[bool]] = defaultdict(list)
    for question, ok in zip(questions, right):
        cells[question["category"], question["objects"]].append(ok)
    counts = sorted({n for _, n in cells})
    print(f"{args.llama}: {len(questions)} questions (seed {args.seed}), one word per object: {object_words}")
    print("category   " + "".join(f"{f'{n} object' + 's' * (n > 1):>14}" for n in counts) + f"{'all':>10}")
    for category in CATEGORIES:
        row = [cells.get((category, n), []) for n in counts]
        every = [ok for cell in row for ok in cell]
        print(f"{category:<11}" + "".join(f"{sum(c) / len(c):>8.3f} ({len(c):>3})" if c else f"{'—':>14}"
                                          for c in row) + f"{sum(every) / max(1, len(every)):>10.3f}")
    print(f"overall {sum(right) / len(right):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
