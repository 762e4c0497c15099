"""`Llama` against transformers' LlamaForCausalLM on the same weights: logits, greedy generation, KV cache,
left padding, save_hf round trip, activation checkpointing."""
import json

import pytest
import torch
import torch.nn.functional as F
from foundation_helpers import VARIANTS, hf_model, random_ids, save_hf_model

from llava.generate import GenerationConfig, generate
from llava.model import Llama


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    """(ours, theirs) on identical weights, ours loaded from theirs' save_pretrained directory."""
    path = tmp_path_factory.mktemp(request.param)
    theirs = save_hf_model(path, **VARIANTS[request.param])
    return Llama.from_hf(path), theirs


def test_logits_match_transformers(pair):
    ours, theirs = pair
    ids = random_ids(2, 48)  # 48 > original_max_position_embeddings of the llama3 variant: scaling matters
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_bf16_logits_match_transformers(tmp_path):
    """Norms in fp32 and rotary tables cast after computing in fp32, as transformers does (equal bit for bit with
    torch 2.14 / transformers 5; the tolerance only leaves room for other versions' kernels)."""
    import transformers

    save_hf_model(tmp_path, **VARIANTS["gqa_theta500k_tied"])
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = Llama.from_hf(tmp_path, dtype=torch.bfloat16)
    ids = random_ids(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=2e-2, rtol=2e-2)


def test_left_padded_logits_match_transformers(pair):
    ours, theirs = pair
    ids = random_ids(2, 20, seed=1)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)


def test_greedy_generation_matches_transformers(pair):
    ours, theirs = pair
    prompt = random_ids(1, 9, seed=2)
    expected = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=32, do_sample=False,
                               eos_token_id=None, pad_token_id=0)[0, prompt.shape[1]:].tolist()
    config = GenerationConfig(max_new_tokens=32, stop_token_ids=(-1,))  # -1 never appears: run all 32 steps
    assert generate(ours, [prompt[0].tolist()], config=config) == [expected]
    assert len(expected) == 32


def test_generation_stops_at_eos_like_transformers(tmp_path):
    theirs = save_hf_model(tmp_path, **VARIANTS["mha"])
    ours = Llama.from_hf(tmp_path)
    prompt = random_ids(1, 6, seed=3)
    free_run = theirs.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=0)[0, 6:].tolist()
    eos = free_run[10]  # pretend the 11th generated token is eos: both must stop right before it
    ours.config.eos_id = eos
    expected = theirs.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                               pad_token_id=0)[0, 6:].tolist()
    got = generate(ours, [prompt[0].tolist()], config=GenerationConfig(max_new_tokens=24))[0]
    assert got == expected[:expected.index(eos)] == free_run[:free_run.index(eos)]


def test_repetition_penalty_generation_matches_transformers(tmp_path):
    theirs = save_hf_model(tmp_path, **VARIANTS["mha"])
    ours = Llama.from_hf(tmp_path)
    prompt = random_ids(1, 8, seed=4)
    expected = theirs.generate(prompt, max_new_tokens=20, do_sample=False, repetition_penalty=1.8,
                               eos_token_id=None, pad_token_id=0)[0, 8:].tolist()
    config = GenerationConfig(max_new_tokens=20, repetition_penalty=1.8, stop_token_ids=(-1,))
    got = generate(ours, [prompt[0].tolist()], config=config)[0]
    assert got == expected
    plain = generate(ours, [prompt[0].tolist()], config=GenerationConfig(max_new_tokens=20, stop_token_ids=(-1,)))
    assert plain[0] != got  # the penalty changed something, so the comparison above tested it


def test_batched_left_padded_generation_equals_one_by_one(pair):
    ours, _ = pair
    prompts = [random_ids(1, n, seed=10 + n)[0].tolist() for n in (3, 11, 7)]
    config = GenerationConfig(max_new_tokens=16, stop_token_ids=(-1,))
    batched = generate(ours, prompts, config=config)
    assert batched == [generate(ours, [p], config=config)[0] for p in prompts]


def test_inputs_embeds_generation_equals_token_prompts(pair):
    ours, _ = pair
    prompts = [random_ids(1, n, seed=20 + n)[0].tolist() for n in (5, 9)]
    embeds = [ours.embed_tokens(torch.tensor(p)).detach() for p in prompts]
    config = GenerationConfig(max_new_tokens=12, stop_token_ids=(-1,))
    assert generate(ours, inputs_embeds=embeds, config=config) == generate(ours, prompts, config=config)


@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_decode_equals_full_recompute(pair, padded):
    ours, _ = pair
    ids = random_ids(2, 24, seed=5)
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :5] = 0
    with torch.no_grad():
        full = ours(ids, attention_mask=mask if padded else None)
        cache = ours.new_cache(2, 24)
        pieces = [ours(ids[:, :10], attention_mask=mask[:, :10] if padded else None, cache=cache)]
        for t in range(10, 24):
            pieces.append(ours(ids[:, t:t + 1], attention_mask=mask[:, :t + 1] if padded else None, cache=cache))
    cached = torch.cat(pieces, dim=1)
    real = mask.bool()
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=0)
    assert cache.length == 24


def test_save_hf_round_trip_loads_in_transformers(pair, tmp_path):
    import transformers

    ours, _ = pair
    ours.save_hf(tmp_path / "single")
    ours.save_hf(tmp_path / "sharded", max_shard_bytes=40_000)
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ids = random_ids(2, 30, seed=6)
    with torch.no_grad():
        expected = ours(ids)
        for name in ("single", "sharded"):
            theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / name).eval()
            torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
            again = Llama.from_hf(tmp_path / name)
            assert torch.equal(again(ids), expected)


def test_old_style_config_json_loads(tmp_path):
    """Configs written by transformers < 5 (LLaMA-2, Vicuna) keep rope_theta / rope_scaling at the top level."""
    import transformers

    save_hf_model(tmp_path, **VARIANTS["linear_scaling"])
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_parameters")
    config.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 2.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = Llama.from_hf(tmp_path)
    assert ours.config.rope_theta == 20000.0 and ours.config.rope_scaling == {"type": "linear", "factor": 2.0}
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = random_ids(1, 40, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_activation_checkpointing_gives_same_gradients():
    ours = Llama.from_name("tiny").init_weights(seed=0, std=0.1)
    ids = random_ids(2, 33, vocab=ours.config.vocab_size, seed=8)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        ours.zero_grad(set_to_none=True)
        ours.train()
        ours.gradient_checkpointing = checkpointing
        logits = ours(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_transformers_gradients_match():
    """One training step's gradients agree with transformers' (same loss on the same weights)."""
    import tempfile

    theirs = hf_model(seed=1, **VARIANTS["mha"]).train()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = Llama.from_hf(tmp).train()
    ids = random_ids(2, 17, seed=9)
    F.cross_entropy(ours(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    F.cross_entropy(theirs(input_ids=ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
    theirs_grads = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        key = name if name == "lm_head.weight" else f"model.{name}"
        torch.testing.assert_close(p.grad, theirs_grads[key].grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("name,count", [
    ("llama2-7b", 6_738_415_616), ("vicuna-13b-v1.5", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("llama3-8b", 8_030_261_248), ("llama-1b", 1_100_048_384),  # published parameter counts
])
def test_presets_have_the_published_sizes(name, count):
    with torch.device("meta"):
        assert Llama.from_name(name).num_params() == count


def test_preset_config_round_trips_through_hf_config():
    import transformers

    from llava.model import LlamaConfig

    for name in ("llama2-7b", "llama3.1-8b", "llama2-70b"):
        config = LlamaConfig.from_name(name)
        hf = transformers.LlamaConfig(**config.to_hf_config())
        assert LlamaConfig.from_hf_config(hf.to_dict()) == config
        with torch.device("meta"):
            assert sum(p.numel() for p in transformers.LlamaForCausalLM(hf).parameters()) == \
                Llama(config).num_params()
