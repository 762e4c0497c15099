"""`llava.generate.BatchDecoder`: rows that join, leave and are removed between steps get exactly what
`generate` gives each of them alone (greedy and seeded sampling), whatever the batch around them does."""
import pytest
import torch
from torch import nn

from llava.generate import BatchDecoder, GenerationConfig, generate
from llava.model import Llama
from llava.model.llama import LlamaConfig

NEVER = (-1,)  # a stop id no model produces


@pytest.fixture(scope="module")
def model():
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=128, max_seq_len=256)
    return Llama(config).init_weights(std=0.3, seed=0).eval()


def _embeds(model, ids):
    with torch.no_grad():
        return model.embed_tokens(torch.tensor(ids))


def _alone(model, ids, config):
    return generate(model, inputs_embeds=[_embeds(model, ids)], config=config)[0]


def _run(model, arrivals, configs):
    """Add prompt i after `arrivals[i]` steps (those arriving together in one prefill); step until all are done;
    return each row's ids."""
    decoder, rows, step = BatchDecoder(model), {}, 0
    while len(rows) < len(arrivals) or len(decoder):
        now = [i for i, (_, at) in enumerate(arrivals) if at == step]
        if now:
            added = decoder.add([_embeds(model, arrivals[i][0]) for i in now], [configs[i] for i in now])
            rows.update(zip(now, added))
        decoder.step()
        step += 1
    return [rows[i].ids for i in range(len(arrivals))], rows


def test_rows_joining_between_steps_get_what_they_get_alone(model):
    prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 40], [1, 50, 51, 52], [1, 60, 61, 62, 63, 64, 65, 66, 67, 68, 69], [2]]
    arrivals = list(zip(prompts, (0, 0, 3, 5, 9)))
    lengths = (12, 20, 6, 15, 9)
    configs = [GenerationConfig(max_new_tokens=n, stop_token_ids=NEVER) for n in lengths]
    got, rows = _run(model, arrivals, configs)
    assert got == [_alone(model, p, c) for p, c in zip(prompts, configs)]
    assert [len(g) for g in got] == list(lengths)
    assert all(row.finish_reason == "length" for row in rows.values())


def test_stop_ids_end_rows_at_different_steps(model):
    prompts = [[1, 30, 31, 32, 33, 34], [1, 40], [1, 50, 51, 52], [1, 60, 61]]
    free = [_alone(model, p, GenerationConfig(max_new_tokens=16, stop_token_ids=NEVER)) for p in prompts]
    stops = tuple({row[i] for row, i in zip(free, (3, 8, 12))})
    config = GenerationConfig(max_new_tokens=16, stop_token_ids=stops)
    got, rows = _run(model, list(zip(prompts, (0, 1, 1, 4))), [config] * 4)
    assert got == [_alone(model, p, config) for p in prompts]
    assert len({len(g) for g in got}) > 1
    assert {row.finish_reason for row in rows.values()} == {"stop"} | ({"length"} if 16 in map(len, got) else set())


def test_seeded_sampling_rows_keep_their_own_generator(model):
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11], [1, 12]]
    configs = [GenerationConfig(max_new_tokens=10, temperature=t, top_p=p, seed=s, stop_token_ids=NEVER)
               for t, p, s in ((0.9, 1.0, 1), (1.3, 0.8, 2), (0.0, 1.0, None))]
    got, _ = _run(model, list(zip(prompts, (0, 2, 2))), configs)
    assert got == [_alone(model, p, c) for p, c in zip(prompts, configs)]


def test_removed_rows_leave_and_the_rest_continue_unchanged(model):
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=NEVER)
    prompts = [[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 40], [1, 50, 51]]
    decoder = BatchDecoder(model)
    rows = decoder.add([_embeds(model, p) for p in prompts], [config] * len(prompts))
    for _ in range(3):
        decoder.step()
    decoder.remove([rows[0]])  # the longest row leaves: the others' padding columns go with it
    assert len(decoder) == 2 and decoder.mask.shape[1] < 9 + 3
    while len(decoder):
        decoder.step()
    assert [rows[1].ids, rows[2].ids] == [_alone(model, p, config) for p in prompts[1:]]
    assert len(rows[0].ids) == 3 and rows[0].finish_reason is None


class VirtualTokens(nn.Module):
    """Prompt tuning's hook: `num_tokens` embeddings in front of every row."""

    def __init__(self, num_tokens, dim):
        super().__init__()
        self.num_tokens = num_tokens
        self.embeds = nn.Parameter(torch.randn(num_tokens, dim, generator=torch.Generator().manual_seed(5)))

    def forward(self, batch_size):
        return self.embeds.expand(batch_size, -1, -1)


class KVPrefix(nn.Module):
    """Prefix tuning's hook: per-layer keys and values every query sees first."""

    def __init__(self, num_tokens, n_kv_heads, head_dim, seed):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.num_tokens = num_tokens
        self.keys = nn.Parameter(torch.randn(n_kv_heads, num_tokens, head_dim, generator=generator))
        self.values = nn.Parameter(torch.randn(n_kv_heads, num_tokens, head_dim, generator=generator))

    def forward(self, batch_size):
        return self.keys.expand(batch_size, -1, -1, -1), self.values.expand(batch_size, -1, -1, -1)


@pytest.mark.parametrize("hook", ["virtual_tokens", "kv_prefix"])
def test_adapter_hooks_keep_their_place_when_rows_join(hook):
    """Virtual tokens stay in front of every row's padding (as in `generate`), a KV prefix in front of every key."""
    config = LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, ffn_hidden=128, max_seq_len=256)
    model = Llama(config).init_weights(std=0.3, seed=1).eval()
    plain = [_alone(model, [1, 5, 6, 7], GenerationConfig(max_new_tokens=8, stop_token_ids=NEVER))]
    if hook == "virtual_tokens":
        model.input_prompt = VirtualTokens(3, config.dim)
    else:
        for i, layer in enumerate(model.layers):
            layer.self_attn.kv_prefix = KVPrefix(4, config.n_kv_heads, config.head_dim, seed=i)
    prompts = [[1, 5, 6, 7], [1, 40], [1, 50, 51, 52, 53, 54, 55, 56, 57], [1, 60, 61]]
    configs = [GenerationConfig(max_new_tokens=n, stop_token_ids=NEVER) for n in (8, 12, 5, 9)]
    got, _ = _run(model, list(zip(prompts, (0, 0, 2, 4))), configs)
    assert got == [_alone(model, p, c) for p, c in zip(prompts, configs)]
    assert got[0] != plain[0]  # the hook took part
