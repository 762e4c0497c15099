"""Does the model bind an attribute to its object? Colour questions about scenes of one colour against scenes of several,
and where the answer's attention goes.

"What colour is the triangle?" about a scene of one colour is answered by any colour in it; about a red triangle and
a blue circle, only by reading the colour *of the triangle*. A reader that finds the colours but not which object has
which scores 1.0 on the first kind and chance (1 / colours in the scene) on the second. This script measures both, for
  - the LLaMA's reading of scenes written as text (`--llama`, default the shipped bases): accuracy by the number of
    distinct colours in the scene, and, per layer and head, two attention scores on the held-out scene texts:
    `prev` (how much a noun attends to the token just before it, its colour: the look-back a reader needs, since the
    colour comes before the noun) and `sel` (attention of the answer position per token of the asked noun over per
    token of the other nouns; 1.0 is no preference);
  - a trained LLaVA run (`--run`, an out_dir of `llava-pipeline run`): accuracy by distinct colours on the held-out
    images, and per layer and head `sel`, the answer position's attention per patch of the asked object over per
    patch of the other objects.

    python bench/binding.py [--llama assets/tiny-bases/llama] [--run runs/demo] [--questions 300]

docs/demo.md has the numbers. Attention weights are recomputed from each layer's own projections (a forward pre-hook
on every attention module), so the model runs unchanged.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_gen.corpus import OBJECT_WORDS, reads_object_words  # noqa: E402
from data_gen.world import SCENE_COLOURS, SCENE_SHAPES  # noqa: E402

COLOURS, SHAPES = frozenset(SCENE_COLOURS), frozenset(SCENE_SHAPES)


class AttentionRecorder:
    """Each attention module's weights `[heads, T, T]` for the first row of the last forward pass."""

    def __init__(self, llm: torch.nn.Module):
        from llava.model.llama import Attention, apply_rope

        self.weights: list[torch.Tensor] = []
        self._rope = apply_rope
        self.handles = [m.register_forward_pre_hook(self._hook) for m in llm.modules() if isinstance(m, Attention)]

    def _hook(self, module, args):
        x, cos, sin = args[0], args[1], args[2]
        B, T, _ = x.shape
        q = module.q_proj(x).view(B, T, module.n_heads, module.head_dim).transpose(1, 2)
        k = module.k_proj(x).view(B, T, module.n_kv_heads, module.head_dim).transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        k = k.repeat_interleave(module.n_heads // module.n_kv_heads, dim=1)
        scores = (q[0] @ k[0].transpose(-1, -2)) / math.sqrt(module.head_dim)
        causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        self.weights.append(scores.masked_fill(causal, float("-inf")).softmax(-1))

    def run(self, fn):
        self.weights = []
        with torch.no_grad():
            fn()
        return self.weights


def accuracy_table(rows: dict[int, list[bool]]) -> str:
    return ", ".join(f"{n} colour{'s' if n > 1 else ''}: {sum(v) / len(v):.3f} ({len(v)}, chance {1 / n:.2f})"
                     for n, v in sorted(rows.items()))


def head_table(scores: dict[str, dict[tuple[int, int], list]]) -> str:
    """One line per layer, one cell per head: each score's mean over the questions; a (target, other) pair's score
    is mean target / mean other (a ratio of means: one question with no attention on the others cannot dominate)."""
    def mean(values) -> float:
        return sum(values) / max(1, len(values))

    def cell(values: list) -> float:
        if values and isinstance(values[0], tuple):
            return mean([t for t, _ in values]) / max(mean([o for _, o in values]), 1e-12)
        return mean(values)

    keys = sorted(next(iter(scores.values())))
    lines = []
    for layer in sorted({k[0] for k in keys}):
        heads = sorted(k[1] for k in keys if k[0] == layer)
        lines.append(f"  layer {layer}: " + " | ".join(
            " ".join(f"{name} {cell(v[(layer, head)]):.2f}" for name, v in scores.items()) for head in heads))
    return "\n".join(lines)


def shape_of(piece: str) -> str | None:
    """The shape a piece names: a shape word ("triangle") or a one-word object ("large_red_triangle")."""
    words = piece.split("_")
    return words[-1] if words[-1] in SHAPES and (len(words) == 1 or piece in OBJECT_WORDS) else None


def text_binding(llama_dir: Path, count: int) -> None:
    from data_gen.corpus import probe_questions, reading_prompt
    from llava.generate import GenerationConfig, generate
    from llava.model.llama import Llama
    from llava.tokenizer import Tokenizer
    from stages.base import encode_segments

    llm = Llama.from_hf(llama_dir).eval()
    tokenizer = Tokenizer(llama_dir / "tokenizer.model")
    # a LLaMA pretrained on one word per object (corpus.object_words) has those words as pieces: ask it that way
    object_words = reads_object_words(tokenizer)
    questions = [q for q in probe_questions(6 * count, seed=7, object_words=object_words)
                 if q["category"] == "color"][:count]
    prompts = [encode_segments(tokenizer, reading_prompt(q["scene"], q["question"]))[0] for q in questions]
    with torch.no_grad():
        said = [tokenizer.decode(ids).strip().split("\n")[0].strip().lower().rstrip(".")
                for start in range(0, len(prompts), 100)
                for ids in generate(llm, prompts[start:start + 100], config=GenerationConfig(max_new_tokens=4))]
    right: dict[int, list[bool]] = defaultdict(list)
    for q, answer in zip(questions, said):
        right[len(COLOURS & set(q["scene"].replace(";", " ").replace("_", " ").split()))].append(answer == q["answer"])
    print(f"text ({llama_dir}{', one word per object' if object_words else ''}): colour questions by distinct "
          f"colours in the scene: {accuracy_table(right)}")

    recorder = AttentionRecorder(llm)
    scores: dict[str, dict] = {"prev": defaultdict(list), "sel": defaultdict(list)}
    for q, ids in zip(questions, prompts):
        pieces = [tokenizer.decode([i]).strip() for i in ids]
        question_at = max(i for i, p in enumerate(pieces) if p.startswith("Q"))
        nouns = [i for i in range(question_at) if shape_of(pieces[i])]
        asked = next((p for p in pieces[question_at:] if p in SHAPES), None)
        if asked is None or len({shape_of(pieces[i]) for i in nouns}) < 2:
            continue  # "the large object": no noun to look for; one shape: nothing to tell apart
        weights = recorder.run(lambda: llm(torch.tensor([ids])))
        target, other = [i for i in nouns if shape_of(pieces[i]) == asked], \
            [i for i in nouns if shape_of(pieces[i]) != asked]
        for layer, w in enumerate(weights):
            for head in range(w.shape[0]):
                scores["prev"][(layer, head)].append(float(w[head, nouns, [i - 1 for i in nouns]].mean()))
                scores["sel"][(layer, head)].append((float(w[head, -1, target].mean()),
                                                     float(w[head, -1, other].mean())))
    print("  per head (prev: noun -> the token before it; sel: answer -> asked noun / other nouns; a noun is an "
          "object's word when each object is one word, and then prev is not needed):")
    print(head_table(scores))


def image_binding(run: Path, count: int) -> None:
    from data_gen import world
    from data_gen.records import read_captions
    from llava.constants import IMAGE_TOKEN_INDEX
    from llava.conversation import tokenize_conversation
    from llava.evaluation import exact_match, read_answers, read_questions
    from llava.loading import load_model
    from stages.base import box_weights

    loaded = load_model(run / "instruct" / "final")
    model = loaded.model.eval()
    records, _ = read_captions(run / "scenes" / "heldout" / "captions.jsonl")
    boxes = {r.image: r.boxes for r in records}
    answer_file = run / "eval" / "answers.jsonl"
    if not answer_file.is_file():
        raise SystemExit(f"{answer_file} is missing: run the eval stage of {run} first")
    answers = read_answers(answer_file)
    questions = [q for q in read_questions(run / "data" / "questions.jsonl") if q.category == "color"]

    def colours(image: str) -> set[str]:
        return {world.read_object(box).colour for box in boxes[image]}

    right: dict[int, list[bool]] = defaultdict(list)
    for q in questions:
        answer = answers.get(str(q.question_id))
        right[len(colours(q.image))].append(answer is not None and exact_match(answer["text"], q.answer))
    print(f"images ({run}, answers from {answer_file}): colour questions by distinct colours in the image: "
          f"{accuracy_table(right)}")

    grid = math.isqrt(model.vision.num_patches)  # a square grid of patches, row by row

    def patches(box) -> list[int]:  # the patches a box touches, as the region term trains them
        return box_weights(box.bbox, grid).nonzero().flatten().tolist()

    recorder = AttentionRecorder(model.llm)
    scores: dict[str, dict] = {"sel": defaultdict(list)}
    used = 0
    for q in questions:
        if len(colours(q.image)) < 2 or used >= count:
            continue
        ids = tokenize_conversation([{"from": "human", "value": f"<image>\n{q.text}"}], loaded.tokenizer,
                                    loaded.template, add_generation_prompt=True)[0]
        start = ids.index(IMAGE_TOKEN_INDEX)
        asked = [world.read_object(box).colour == q.answer for box in boxes[q.image]]
        target = [start + p for box, hit in zip(boxes[q.image], asked) if hit for p in patches(box)]
        other = [start + p for box, hit in zip(boxes[q.image], asked) if not hit for p in patches(box)]
        if not target or not other:
            continue
        image = loaded.open_image(run / "scenes" / "heldout" / "images" / q.image)
        embeds, _ = model.prepare_inputs_embeds([torch.tensor(ids)], image[None])
        weights = recorder.run(lambda: model.llm(inputs_embeds=embeds[0][None]))
        for layer, w in enumerate(weights):
            for head in range(w.shape[0]):
                scores["sel"][(layer, head)].append((float(w[head, -1, target].mean()),
                                                     float(w[head, -1, other].mean())))
        used += 1
    print(f"  per head, {used} questions (sel: answer -> a patch of the asked object / a patch of the others):")
    print(head_table(scores))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama", type=Path, default=Path("assets/tiny-bases/llama"))
    p.add_argument("--run", type=Path, default=None, help="an out_dir of `llava-pipeline run` (e.g. runs/demo)")
    p.add_argument("--questions", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    text_binding(a.llama, a.questions)
    if a.run is not None:
        image_binding(a.run, a.questions)


if __name__ == "__main__":
    main()
