"""Sampling, stop tokens and strings, streaming and batching of `llava.generate.generate`."""
from types import SimpleNamespace

import pytest
import torch
from foundation_helpers import random_ids, save_hf_model
from torch import nn

from llava.generate import (GenerationConfig, TextStream, apply_repetition_penalty, generate, process_logits,
                            top_k_filter, top_p_filter)
from llava.model import Llama

NEVER = (-1,)  # a stop id no model produces: run to max_new_tokens


# ---- logits processors against transformers' -------------------------------------------------------------------

def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)) * 3
    ids = torch.tensor([[1, 4, 4, 9, 30], [0, 0, 0, 0, 0], [49, 2, 17, 17, 8]])
    seen = torch.zeros(3, 50, dtype=torch.bool).scatter_(1, ids, True)
    for penalty in (1.3, 0.7):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, atol=0, rtol=0)


@pytest.mark.parametrize("k", [1, 5, 50, 80])
def test_top_k_matches_transformers(k):
    from transformers import TopKLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(k))
    expected = TopKLogitsWarper(top_k=k)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, k), expected)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_matches_transformers(p):
    from transformers import TopPLogitsWarper

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 2
    expected = TopPLogitsWarper(top_p=p)(None, logits.clone())
    got = top_p_filter(logits, p)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert torch.equal(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_processing_chain_matches_transformers_order():
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(3, 60, generator=torch.Generator().manual_seed(2)) * 4
    ids = torch.tensor([[3, 5, 7], [0, 59, 59], [10, 11, 12]])
    seen = torch.zeros(3, 60, dtype=torch.bool).scatter_(1, ids, True)
    config = GenerationConfig(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.4)
    chain = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.4), TemperatureLogitsWarper(0.7),
                                 TopKLogitsWarper(20), TopPLogitsWarper(0.8)])
    torch.testing.assert_close(process_logits(logits, config, seen), chain(ids, logits.clone()), atol=0, rtol=0)


# ---- sampling on a real model ------------------------------------------------------------------------------------

def test_top_k_one_and_tiny_top_p_equal_greedy(text_model):
    prompts = [[1, 40, 41, 42], [1, 50]]
    greedy = generate(text_model, prompts, config=GenerationConfig(max_new_tokens=20, stop_token_ids=NEVER))
    for sampled in (GenerationConfig(max_new_tokens=20, temperature=1.5, top_k=1, seed=3, stop_token_ids=NEVER),
                    GenerationConfig(max_new_tokens=20, temperature=1.5, top_p=1e-6, seed=3, stop_token_ids=NEVER)):
        assert generate(text_model, prompts, config=sampled) == greedy


def test_fixed_seed_reproduces_and_seeds_differ(text_model):
    def run(seed):
        config = GenerationConfig(max_new_tokens=24, temperature=1.0, top_p=0.95, top_k=100, seed=seed,
                                  stop_token_ids=NEVER)
        return generate(text_model, [[1, 60, 61], [1, 70]], config=config)

    first = run(7)
    assert run(7) == first
    assert run(8) != first
    greedy = generate(text_model, [[1, 60, 61], [1, 70]], config=GenerationConfig(max_new_tokens=24,
                                                                                   stop_token_ids=NEVER))
    assert first != greedy


@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")  # that is the point
def test_inputs_embeds_penalty_sees_only_generated_ids(tmp_path):
    """As in transformers' generate(inputs_embeds=...), the prompt has no ids, so only new tokens are penalised."""
    theirs = save_hf_model(tmp_path)
    ours = Llama.from_hf(tmp_path)
    prompt = random_ids(1, 7, seed=11)
    embeds = theirs.get_input_embeddings()(prompt).detach()
    expected = theirs.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                               do_sample=False, repetition_penalty=2.0, eos_token_id=None, pad_token_id=0)
    config = GenerationConfig(max_new_tokens=16, repetition_penalty=2.0, stop_token_ids=NEVER)
    assert generate(ours, inputs_embeds=[embeds[0]], config=config) == [expected[0].tolist()]


def test_rows_finishing_early_leave_the_batch_without_changing_the_others(text_model):
    """Rows stop at different steps (a stop id taken from each free run); the shrunken batch, left padding
    included, still gives every row what it gets alone."""
    prompts = [[1, 30, 31, 32, 33, 34], [1, 40], [1, 50, 51, 52], [1, 60, 61]]
    free = generate(text_model, prompts, config=GenerationConfig(max_new_tokens=16, stop_token_ids=NEVER))
    stops = tuple({row[i] for row, i in zip(free, (3, 8, 12))})
    config = GenerationConfig(max_new_tokens=16, stop_token_ids=stops)
    batched = generate(text_model, prompts, config=config)
    assert batched == [generate(text_model, [p], config=config)[0] for p in prompts]
    assert len({len(row) for row in batched}) > 1  # they really finished at different steps


# ---- text: stop strings and streaming ---------------------------------------------------------------------------

class ScriptCache:
    def __init__(self, batch_size: int):
        self.rows, self.step = list(range(batch_size)), 0

    def reorder(self, index: torch.Tensor) -> None:
        self.rows = [self.rows[i] for i in index.tolist()]


class ScriptedLM(nn.Module):
    """Emits a fixed token script per prompt through Llama's forward/new_cache interface, so that the text
    handling (stop strings, streaming, batching) can be tested on chosen token sequences."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, eos_id: int = 2):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # generate finds the device through the parameters
        self.scripts, self.vocab_size = scripts, vocab_size
        self.config = SimpleNamespace(eos_id=eos_id, pad_id=None)
        self.batch_sizes: list[int] = []

    def new_cache(self, batch_size: int, max_len: int) -> ScriptCache:
        return ScriptCache(batch_size)

    def forward(self, input_ids=None, *, inputs_embeds=None, attention_mask=None, cache=None, last_only=False):
        batch = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        assert batch == len(cache.rows)
        self.batch_sizes.append(batch)
        logits = torch.zeros(batch, 1, self.vocab_size)
        for position, row in enumerate(cache.rows):
            script = self.scripts[row]
            logits[position, 0, script[min(cache.step, len(script) - 1)]] = 1.0
        cache.step += 1
        return logits


def stream(model, prompts, tokenizer, **config):
    pieces: dict[int, list[str]] = {i: [] for i in range(len(prompts))}
    out = generate(model, prompts, config=GenerationConfig(**config), tokenizer=tokenizer,
                   on_text=lambda i, delta: pieces[i].append(delta))
    return out, pieces


def test_stop_string_inside_a_token_cuts_before_that_token(tokenizer):
    script = tokenizer.encode("Hello USER: more text")
    model = ScriptedLM([script], tokenizer.vocab_size)
    out, pieces = stream(model, [[1]], tokenizer, max_new_tokens=30, stop_strings=("USER:",))
    text = tokenizer.decode(out[0])
    assert text.rstrip() == "Hello" and "U" not in "".join(pieces[0])
    assert "".join(pieces[0]) == text
    assert out[0] == script[:len(out[0])]


def test_stop_string_prefix_is_held_back_until_resolved(tokenizer):
    """"US" could start "USER:"; once "USA" shows it does not, the held text is released."""
    script = tokenizer.encode("Go to the USA now") + [tokenizer.eos_id]
    model = ScriptedLM([script], tokenizer.vocab_size)
    out, pieces = stream(model, [[1]], tokenizer, max_new_tokens=40, stop_strings=("USER:",))
    assert tokenizer.decode(out[0]) == "Go to the USA now" == "".join(pieces[0])
    assert not any(p.endswith(("U", "US")) for p in pieces[0][:-1])


def test_byte_fallback_pieces_are_streamed_whole(tokenizer):
    text = "a 猫 é x ünï"
    script = tokenizer.encode(text) + [tokenizer.eos_id]
    assert any(tokenizer.id_to_piece(i).startswith("<0x") for i in script)  # really byte fallback
    model = ScriptedLM([script], tokenizer.vocab_size)
    out, pieces = stream(model, [[1]], tokenizer, max_new_tokens=40)
    assert "".join(pieces[0]) == text == tokenizer.decode(out[0])
    assert not any("\ufffd" in p for p in pieces[0])
    assert len(pieces[0]) > 3  # streamed, not released at the end only


def test_stop_tokens_are_excluded_and_rows_leave_the_batch(tokenizer):
    scripts = [tokenizer.encode("one two three four five six"),
               tokenizer.encode("short") + [2],
               tokenizer.encode("the red mat") + [99]]
    assert len(scripts[1]) < len(scripts[2]) < 20 < len(scripts[0])
    model = ScriptedLM(scripts, tokenizer.vocab_size)
    out = generate(model, [[1], [1, 5], [1, 6, 7]], config=GenerationConfig(max_new_tokens=20,
                                                                             stop_token_ids=(2, 99)))
    assert out == [scripts[0][:20], scripts[1][:-1], scripts[2][:-1]]
    sizes = model.batch_sizes
    assert sizes == [3] * len(scripts[1]) + [2] * (len(scripts[2]) - len(scripts[1])) + [1] * (20 - len(scripts[2]))
    assert len(sizes) == 20  # prefill + 19 decode steps: the 20th token needs no forward


def test_default_stop_is_the_model_eos(tokenizer):
    script = tokenizer.encode("a b") + [tokenizer.eos_id]
    out = generate(ScriptedLM([script], tokenizer.vocab_size, eos_id=tokenizer.eos_id), [[1]])
    assert out == [script[:-1]]


def test_stop_strings_on_a_real_model(text_model, tokenizer):
    prompts = [[1] + tokenizer.encode("The cat"), [1] + tokenizer.encode("Two dogs play")]
    free = generate(text_model, prompts, config=GenerationConfig(max_new_tokens=40, stop_token_ids=NEVER))
    for row, ids in enumerate(free):
        text = tokenizer.decode(ids)
        stop = text[len(text) // 2:len(text) // 2 + 3]
        assert len(stop) == 3
        config = GenerationConfig(max_new_tokens=40, stop_token_ids=NEVER, stop_strings=(stop, "never-seen"))
        pieces = []
        cut = generate(text_model, [prompts[row]], config=config, tokenizer=tokenizer,
                       on_text=lambda _, d: pieces.append(d))[0]
        cut_text = tokenizer.decode(cut)
        assert cut == ids[:len(cut)]
        assert stop not in cut_text and text.startswith(cut_text)
        # the longest token prefix whose text ends before the stop string: one more token reaches into it
        assert len(cut_text) <= text.index(stop) < len(tokenizer.decode(ids[:len(cut) + 1]))
        assert "".join(pieces) == cut_text


def test_streaming_concatenation_equals_final_decode_in_a_batch(text_model, tokenizer):
    prompts = [[1] + tokenizer.encode(t) for t in ("A cat", "How many people are there?", "Green")]
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    config = GenerationConfig(max_new_tokens=30, temperature=0.9, seed=5, stop_strings=("dog",))
    out = generate(text_model, prompts, config=config, tokenizer=tokenizer,
                   on_text=lambda i, delta: pieces[i].append(delta))
    for i, ids in enumerate(out):
        assert "".join(pieces[i]) == tokenizer.decode(ids)
        assert "dog" not in tokenizer.decode(ids)
    assert sum(len(p) for p in pieces.values()) > 3


def test_text_stream_releases_only_whole_tokens():
    decode = {(): "", (1,): "ab", (1, 2): "ab\ufffd", (1, 2, 3): "abé", (1, 2, 3, 4): "abé ST", (1, 2, 3, 4, 5): "abé STOP!"}
    released = []
    s = TextStream(lambda ids: decode[tuple(ids)], stop_strings=("STOP",), emit=released.append)
    assert s.push([1]) is None and released == ["ab"]
    assert s.push([1, 2]) is None and released == ["ab"]  # unfinished byte sequence
    assert s.push([1, 2, 3]) is None and released == ["ab", "é"]
    assert s.push([1, 2, 3, 4]) is None and released == ["ab", "é"]  # " ST" could be the start of "STOP"
    assert s.push([1, 2, 3, 4, 5]) == 3  # keep "abé"; token 4 holds the start of the stop string
    s.finish([1, 2, 3])
    assert "".join(released) == "abé"


# ---- arguments ---------------------------------------------------------------------------------------------------

def test_bad_arguments_are_rejected(text_model, tokenizer):
    with pytest.raises(ValueError, match="exactly one of prompts"):
        generate(text_model)
    with pytest.raises(ValueError, match="need a tokenizer"):
        generate(text_model, [[1]], config=GenerationConfig(stop_strings=("x",)))
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(text_model, [[1], []])
    with pytest.raises(ValueError, match="temperature=-1"):
        GenerationConfig(temperature=-1)
    with pytest.raises(ValueError, match="top_p=0"):
        GenerationConfig(top_p=0)
    assert generate(text_model, [[1, 2]], config=GenerationConfig(max_new_tokens=0)) == [[]]
    assert generate(text_model, []) == []
