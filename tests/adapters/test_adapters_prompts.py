"""Prompt-type methods with image-token inputs, labels, the KV cache and left-padded batches; folding and reuse of
encoder outputs at inference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from adapter_cases import TINY, batch, perturb_adapter, tiny_llama
from llava.adapters import (apply_adapter, fold_adapter, load_adapter, save_adapter, trainable_parameters)

PROMPT_CASES = {
    "prompt_tuning": dict(num_tokens=4),
    "p_tuning": dict(template_ids=[-1, 11, -1, 12, 13, -1], encoder="mlp", encoder_hidden=32),
    "prefix_tuning": dict(num_tokens=3, encoder_hidden=32),
    "prefix_tuning_v2": dict(num_tokens=3),
    "lora": dict(r=2),  # a weight-space method through the same paths, for contrast
}


def adapted(method):
    model = apply_adapter(tiny_llama(), method, **PROMPT_CASES[method])
    perturb_adapter(model, scale=0.2)
    return model


@torch.no_grad()
def greedy(model, ids, mask, steps, cached=True):
    """Greedy decode; returns (tokens [B, steps], last-position logits per step [B, steps, V])."""
    tokens, logits_seen = [], []
    if cached:
        cache = model.new_cache(ids.shape[0], ids.shape[1] + steps)
        logits = model(ids, attention_mask=mask, cache=cache, last_only=True)[:, -1]
    else:
        seq = ids
        logits = model(seq, attention_mask=mask)[:, -1]
    for _ in range(steps):
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        logits_seen.append(logits)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        if cached:
            logits = model(nxt[:, None], attention_mask=mask, cache=cache)[:, -1]
        else:
            seq = torch.cat((seq, nxt[:, None]), dim=1)
            logits = model(seq, attention_mask=mask)[:, -1]
    return torch.stack(tokens, 1), torch.stack(logits_seen, 1)


@pytest.mark.parametrize("method", list(PROMPT_CASES))
def test_cached_decode_equals_recompute_and_batched_equals_single(method):
    model = adapted(method)
    lengths = [7, 4, 6]
    rows = [batch(seed=10 + i, batch_size=1, length=n)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.stack([F.pad(r, (width - len(r), 0), value=0) for r in rows])  # left padding
    mask = torch.stack([F.pad(torch.ones_like(r), (width - len(r), 0), value=0) for r in rows])
    tokens, logits = greedy(model, ids, mask, steps=5)
    tokens_full, logits_full = greedy(model, ids, mask, steps=5, cached=False)
    assert torch.equal(tokens, tokens_full)
    torch.testing.assert_close(logits, logits_full, rtol=1e-4, atol=1e-5)
    for i, row in enumerate(rows):
        single_tokens, single_logits = greedy(model, row[None], torch.ones_like(row)[None], steps=5)
        assert torch.equal(single_tokens[0], tokens[i])
        torch.testing.assert_close(single_logits[0], logits[i], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning", "prefix_tuning_v2"])
def test_image_embeddings_and_labels_need_no_change(method):
    """Virtual tokens/prefixes go before the spliced image+text embeddings; logits line up with the labels."""
    model = adapted(method)
    ids = batch(length=10)
    embeds = model.embed_tokens(ids).detach().clone()
    embeds[:, 1:5] = torch.randn(2, 4, TINY.dim)  # four "image patch" features after BOS
    labels = ids.clone()
    labels[:, :5] = -100
    model.train()
    logits = model(inputs_embeds=embeds)
    assert logits.shape[:2] == labels.shape
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    loss.backward()
    assert all(p.grad is not None for _, p in trainable_parameters(model))
    model.eval()
    if method in ("prompt_tuning", "p_tuning"):  # the same as prepending the prompt to the embeddings by hand
        base = tiny_llama()
        n = model.input_prompt.num_tokens
        with torch.no_grad():
            prompt = model.input_prompt(2)
            expected = base(inputs_embeds=torch.cat((prompt, embeds), 1))[:, n:]
            torch.testing.assert_close(model(inputs_embeds=embeds), expected, rtol=1e-5, atol=1e-5)


def test_prefix_v2_text_init_equals_prepending_the_text():
    text = [5, 17, 42, 99]
    model = apply_adapter(tiny_llama(), "prefix_tuning_v2", num_tokens=4, init="text", init_token_ids=text)
    ids = batch()
    with torch.no_grad():
        expected = tiny_llama()(torch.cat((torch.tensor([text] * 2), ids), 1))[:, 4:]
        torch.testing.assert_close(model(ids), expected, rtol=1e-5, atol=1e-5)


def test_prompt_tuning_text_init_takes_a_tokenizer():
    class Tokenizer:  # the interface apply_adapter uses: encode(text) -> ids
        def encode(self, text):
            return [ord(c) % TINY.vocab_size for c in text]

    model = apply_adapter(tiny_llama(), "prompt_tuning", num_tokens=5, init="text", init_text="abc",
                          tokenizer=Tokenizer())
    expected_ids = [97, 98, 99, 97, 98]  # repeated to fill the prompt, as peft does
    torch.testing.assert_close(model.input_prompt.embeddings, model.embed_tokens.weight[expected_ids])
    assert model.adapter_spec.options["init_token_ids"] == [97, 98, 99]
    assert "tokenizer" not in model.adapter_spec.options


def test_p_tuning_template_mixes_learned_and_anchor_tokens():
    class Tokenizer:
        def encode(self, text):
            return {" look: ": [30, 31], " answer:": [40]}[text]

    model = apply_adapter(tiny_llama(), "p_tuning", template="[P][P] look: [P] answer:", tokenizer=Tokenizer(),
                          encoder_hidden=16)
    assert model.adapter_spec.options["template_ids"] == [-1, -1, 30, 31, -1, 40]
    prompt = model.input_prompt.compute()
    assert prompt.shape == (6, TINY.dim)
    torch.testing.assert_close(prompt[[2, 3, 5]], model.embed_tokens.weight[[30, 31, 40]])
    assert sum(p.numel() for _, p in trainable_parameters(model)) == 3 * TINY.dim + (
        TINY.dim * 16 + 16 + 16 * 16 + 16 + 16 * TINY.dim + TINY.dim)


@pytest.mark.parametrize("method", ["p_tuning", "prefix_tuning"])
def test_fold_replaces_the_encoder_by_its_output(method, tmp_path):
    model = adapted(method)
    ids = batch()
    with torch.no_grad():
        before = model(ids)
    fold_adapter(model)
    assert trainable_parameters(model) == []
    assert not hasattr(model, "prefix_trunk")
    assert not any("mlp_head" in n or "out_proj" in n for n, _ in model.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(model(ids), before, rtol=1e-5, atol=1e-6)
    save_adapter(model, tmp_path)
    fresh = tiny_llama()
    load_adapter(fresh, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids), before, rtol=1e-5, atol=1e-6)


def test_encoder_output_is_reused_at_inference_until_weights_change():
    model = adapted("p_tuning").eval()
    encoder = model.input_prompt
    calls = []
    compute = encoder.compute
    encoder.compute = lambda: (calls.append(1), compute())[1]
    ids = batch()
    with torch.no_grad():
        first = model(ids)
        model(ids)
        assert len(calls) == 1
        encoder.embedding.add_(0.5)  # an in-place update (as an optimiser makes) invalidates it
        assert (model(ids) - first).abs().max() > 1e-4
        assert len(calls) == 2
    model(ids)  # with gradients enabled it is always recomputed
    assert len(calls) == 3
