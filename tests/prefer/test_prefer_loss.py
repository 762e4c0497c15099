"""DPO / IPO against the formulas computed independently: per-pair losses and their gradients with respect to the
log-probabilities in float64 by hand, sequence log-probabilities from the model's full logits token by token, and
the whole PreferenceModel's parameter gradients against the formula applied to those hand-computed log-probs."""
import copy
import math

import pytest
import torch

from stages.prefer import (PreferenceModel, answer_only, collate_pairs, preference_loss, sequence_logps)

LOGPS = torch.tensor([[-12.0, -15.5, -11.0, -16.0], [-30.2, -28.0, -31.0, -27.5], [-3.0, -3.0, -2.0, -2.0]],
                     dtype=torch.float64)  # columns: policy chosen, policy rejected, reference chosen, ref rejected


def oracle(pc: float, pr: float, rc: float, rr: float, beta: float, loss: str) -> tuple[float, float, float]:
    """(loss, d loss / d policy_chosen, d loss / d policy_rejected) by the papers' formulas, written out."""
    z = (pc - rc) - (pr - rr)
    if loss == "sigmoid":  # -log sigmoid(beta z) = log(1 + exp(-beta z)); derivative -beta * sigmoid(-beta z)
        value = math.log1p(math.exp(-beta * z))
        slope = -beta / (1 + math.exp(beta * z))
    else:  # (z - 1 / (2 beta))^2
        value = (z - 1 / (2 * beta)) ** 2
        slope = 2 * (z - 1 / (2 * beta))
    return value, slope, -slope


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_loss_and_gradients_match_the_formula(loss, beta):
    logps = LOGPS.clone().requires_grad_(True)
    losses, chosen, rejected = preference_loss(logps[:, 0], logps[:, 1], logps[:, 2], logps[:, 3], beta, loss)
    losses.sum().backward()
    for row, values in enumerate(LOGPS.tolist()):
        value, d_chosen, d_rejected = oracle(*values, beta, loss)
        assert losses[row].item() == pytest.approx(value, rel=1e-12)
        assert logps.grad[row, 0].item() == pytest.approx(d_chosen, rel=1e-12)
        assert logps.grad[row, 1].item() == pytest.approx(d_rejected, rel=1e-12)
        assert logps.grad[row, 2:].abs().sum() > 0  # the reference enters the margin (it is detached in training)
        assert chosen[row].item() == pytest.approx(beta * (values[0] - values[2]))
        assert rejected[row].item() == pytest.approx(beta * (values[1] - values[3]))


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="sigmoid, ipo"):
        preference_loss(*LOGPS.T, 0.1, "hinge")


def test_answer_only_keeps_the_last_answer():
    ignore = -100
    labels = [ignore, ignore, 5, 6, ignore, ignore, 7, 8, 9, ignore]
    assert answer_only(labels) == [ignore] * 6 + [7, 8, 9, ignore]


def _pairs_batch(data, tokenizer, model):
    from stages.prefer import PreferenceDataset

    dataset = PreferenceDataset(str(data.pairs), tokenizer, image_folder=str(data.images),
                                image_processor=model.image_processor(), template=model.config.template,
                                max_len=model.config.max_len)
    batch = collate_pairs(tokenizer.pad_id)([dataset[i] for i in (0, 1, 2)])
    return {k: v for k, v in batch.items() if k not in ("ids", "num_skipped")}


def _token_by_token(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p(answer token), answer tokens) per row from the model's full logits, positions found by walking
    the labels the model sees (after the image splice and its length cut)."""
    logits = model(batch["input_ids"], images=batch["images"], attention_mask=batch["attention_mask"],
                   return_logits=True)["logits"].double()
    embeds, label_rows = model.prepare_inputs_embeds(batch["input_ids"], batch["images"], batch["attention_mask"],
                                                     batch["labels"], model.config.max_len)
    totals, counts = [], []
    for row, labels in enumerate(label_rows):
        total = torch.zeros((), dtype=torch.float64)
        for position in range(1, len(labels)):
            if labels[position] != -100:
                total = total + torch.log_softmax(logits[row, position - 1], dim=-1)[labels[position]]
        totals.append(total)
        counts.append(int((labels[1:] != -100).sum()))
    return torch.stack(totals), torch.tensor(counts, dtype=torch.float64)


def test_sequence_logps_equal_the_token_by_token_sum(prefer_data):
    from llava.model.llava import LlavaModel

    model = LlavaModel.load(prefer_data.model, dtype=torch.float64)
    tokenizer = model.load_tokenizer()
    batch = _pairs_batch(prefer_data, tokenizer, model)
    with torch.no_grad():
        fast = sequence_logps(model, **batch)
        slow, answer_tokens = _token_by_token(model, batch)
        mean = sequence_logps(model, **batch, average=True)
    assert torch.allclose(fast, slow, rtol=1e-10)
    assert (answer_tokens > 0).all()
    assert torch.allclose(mean, slow / answer_tokens, rtol=1e-10)


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_model_gradients_match_the_formula_on_hand_computed_logps(prefer_data, loss):
    """The policy's parameter gradients of PreferenceModel equal those of the formula applied to the log-probs
    computed token by token, with the reference a frozen copy taken before any update."""
    from llava.model.llava import LlavaModel

    torch.manual_seed(0)
    policy = LlavaModel.load(prefer_data.model, dtype=torch.float64)  # float64: the two paths agree to 1e-9
    with torch.no_grad():  # move the policy off the reference so the margin is not zero
        for p in policy.llm.parameters():
            p.add_(0.01 * torch.randn_like(p))
    reference = LlavaModel.load(prefer_data.model, dtype=torch.float64).requires_grad_(False)
    tokenizer = policy.load_tokenizer()
    batch = _pairs_batch(prefer_data, tokenizer, policy)
    beta = 0.2

    wrapped = PreferenceModel(policy, reference, beta, loss)
    out = wrapped(**batch)
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}

    twin = copy.deepcopy(policy)
    twin.zero_grad(set_to_none=True)
    logps, lengths = _token_by_token(twin, batch)
    with torch.no_grad():
        ref, _ = _token_by_token(reference, batch)
    if loss == "ipo":
        logps, ref = logps / lengths, ref / lengths
    n = len(logps) // 2
    z = (logps[:n] - ref[:n]) - (logps[n:] - ref[n:])
    expected_loss = (torch.log1p(torch.exp(-beta * z)) if loss == "sigmoid" else (z - 1 / (2 * beta)) ** 2).mean()
    expected_loss.backward()
    assert out["loss"].item() == pytest.approx(expected_loss.item(), rel=1e-9)
    want = {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        assert torch.allclose(got[name], want[name], rtol=1e-7, atol=1e-12), name
    metrics = out["metrics"]
    assert metrics["reward_margin"].item() == pytest.approx(
        (beta * ((logps[:n] - ref[:n]) - (logps[n:] - ref[n:]))).mean().item(), rel=1e-9)
    assert metrics["reward_accuracy"].item() == pytest.approx(float((z > 0).double().mean()))
