"""The adapter hooks of `Llama`: `input_prompt` (virtual tokens prepended) and `Attention.kv_prefix` (per-layer key/value
prefixes), checked against transformers fed the same embeddings / past key values, and on the KV cache."""
import pytest
import torch
from foundation_helpers import random_ids, save_hf_model
from torch import nn

from llava.generate import GenerationConfig, generate
from llava.model import Llama


class ConstantPrompt(nn.Module):
    def __init__(self, num_tokens: int, dim: int, seed: int = 0):
        super().__init__()
        self.num_tokens = num_tokens
        self.embeds = nn.Parameter(torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(seed)))

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.embeds.expand(batch_size, -1, -1)


class ConstantPrefix(nn.Module):
    def __init__(self, num_tokens: int, n_kv_heads: int, head_dim: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.num_tokens = num_tokens
        self.keys = nn.Parameter(torch.randn(n_kv_heads, num_tokens, head_dim, generator=gen))
        self.values = nn.Parameter(torch.randn(n_kv_heads, num_tokens, head_dim, generator=gen))

    def forward(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys.expand(batch_size, -1, -1, -1), self.values.expand(batch_size, -1, -1, -1)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = tmp_path_factory.mktemp("hooks")
    theirs = save_hf_model(path, num_key_value_heads=2)
    return Llama.from_hf(path), theirs


def with_prompt(model: Llama, n: int = 5) -> Llama:
    model.input_prompt = ConstantPrompt(n, model.config.dim)
    return model


def with_prefix(model: Llama, p: int = 4) -> Llama:
    for i, layer in enumerate(model.layers):
        layer.self_attn.kv_prefix = ConstantPrefix(p, model.config.n_kv_heads, model.config.head_dim, seed=i)
    return model


def without_hooks(model: Llama) -> Llama:
    model.input_prompt = None
    for layer in model.layers:
        layer.self_attn.kv_prefix = None
    return model


@pytest.fixture
def ours(pair):
    yield pair[0]
    without_hooks(pair[0])


def test_input_prompt_matches_transformers_on_prepended_embeddings(ours, pair):
    theirs = pair[1]
    with_prompt(ours, 5)
    ids = random_ids(2, 12)
    with torch.no_grad():
        embeds = torch.cat((ours.input_prompt(2), theirs.get_input_embeddings()(ids)), dim=1)
        expected = theirs(inputs_embeds=embeds).logits[:, 5:]
        got = ours(ids)
    assert got.shape == (2, 12, 256)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_kv_prefix_matches_transformers_past_key_values_and_shifts_positions(ours, pair):
    from transformers import DynamicCache

    theirs, p = pair[1], 4
    with_prefix(ours, p)
    ids = random_ids(2, 10, seed=1)

    def theirs_with_prefix(**kwargs):
        cache = DynamicCache(config=theirs.config)
        for i, layer in enumerate(ours.layers):
            cache.update(*layer.self_attn.kv_prefix(2), i)
        return theirs(input_ids=ids, attention_mask=torch.ones(2, p + 10, dtype=torch.long), cache=cache,
                      **kwargs).logits

    with torch.no_grad():
        got = ours(ids)
        torch.testing.assert_close(got, theirs_with_prefix(), atol=1e-5, rtol=0)  # positions p..p+9, as in peft
        unshifted = theirs_with_prefix(position_ids=torch.arange(10).expand(2, 10))
    assert (got - unshifted).abs().max() > 1e-3  # the shift is really what the comparison checks


@pytest.mark.parametrize("hook", ["prompt", "prefix", "both"])
@pytest.mark.parametrize("padded", [False, True])
def test_cached_decode_equals_full_recompute_with_hooks(ours, hook, padded):
    if hook in ("prompt", "both"):
        with_prompt(ours, 3)
    if hook in ("prefix", "both"):
        with_prefix(ours, 4)
    ids = random_ids(2, 16, seed=2)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :6] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask if padded else None)
        cache = ours.new_cache(2, 16)
        pieces = [ours(ids[:, :7], attention_mask=mask[:, :7] if padded else None, cache=cache)]
        for t in range(7, 16):
            pieces.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1] if padded else None, cache=cache))
    real = mask.bool()
    torch.testing.assert_close(torch.cat(pieces, dim=1)[real], full[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hook", ["prompt", "prefix"])
def test_generation_with_hooks_batched_equals_one_by_one(ours, hook):
    (with_prompt if hook == "prompt" else with_prefix)(ours)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (4, 9)]
    config = GenerationConfig(max_new_tokens=10, stop_token_ids=(-1,))
    batched = generate(ours, prompts, config=config)
    assert batched == [generate(ours, [p], config=config)[0] for p in prompts]
    plain = generate(without_hooks(ours), prompts, config=config)
    assert plain != batched  # the hook changed the answers, so it took part


def test_input_prompt_generation_matches_transformers(ours, pair):
    theirs = pair[1]
    with_prompt(ours, 5)
    ids = random_ids(1, 6, seed=3)
    with torch.no_grad():
        embeds = torch.cat((ours.input_prompt(1), theirs.get_input_embeddings()(ids)), dim=1)
    expected = theirs.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, 11, dtype=torch.long),
                               max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    got = generate(ours, [ids[0].tolist()], config=GenerationConfig(max_new_tokens=12, stop_token_ids=(-1,)))
    assert got == [expected[0].tolist()]
