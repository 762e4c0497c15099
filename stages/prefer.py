"""Stage 3, preference tuning against hallucination: DPO (or IPO) on a stage-2 model with chosen/rejected answers.

    llava-pipeline prefer --config F.yaml [key=value ...] [--nproc N]

`model` is stage 2's final model directory (a saved llava model; a stage-2 adapter directory must be merged first
with `llava-pipeline export --format merged`). `data` holds preference records (data_gen.preference: LLaVA rows plus
"chosen" and "rejected", or TRL's prompt/chosen/rejected JSONL). Each pair is two sequences, prompt + chosen and
prompt + rejected, in one batch; a sequence's log-probability is the sum over the tokens of its final answer (its
`</s>` included) and nothing else.

Losses on z = (log πθ(y_w|x) − log π_ref(y_w|x)) − (log πθ(y_l|x) − log π_ref(y_l|x)):
- `sigmoid` (DPO, Rafailov et al. 2023): −log σ(β·z); β = 0.1 is TRL's default;
- `ipo` (Azar et al. 2023): (z − 1/(2β))², on log-probabilities averaged over the answer's tokens, as TRL does.
Logged with the loss: reward_chosen / reward_rejected (β·(log πθ − log π_ref)), reward_margin, reward_accuracy
(share of pairs whose chosen reward is higher) and the policy's logp_chosen / logp_rejected.

The reference is the frozen stage-2 model. Full fine-tuning keeps a frozen copy of it next to the policy (partitioned
like the policy under ZeRO-3, never checkpointed: it is rebuilt from `model` on resume). With `adapter: {method: lora,
...}` (a weight-space method: lora, adalora, loftq, oft, ia3, krona) only the adapter trains and the reference is the
same model with the adapter disabled: no second copy, which saves the size of the whole model (logged at start; for
LLaVA-1.5-7B in bf16, 14.1 GB per rank without ZeRO-3). The projector and tower stay frozen with an adapter, so the
disabled adapter is exactly stage 2.

Writes `output_dir/final/`: a whole model (full tuning) or `adapter_config.json` + `adapter_model.safetensors` whose
recorded base is `model`, so `llava-pipeline eval|chat --model output_dir/final` loads either.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset

from stages import common
from stages.config import ConfigError, dump_yaml
from stages.trainer import TrainConfig

FINAL_DIR = "final"
LOSSES = ("sigmoid", "ipo")
WEIGHT_SPACE_METHODS = ("lora", "adalora", "loftq", "oft", "ia3", "krona")

# HA-DPO / LLaVA-RLHF-style settings scaled to the stage: small lr, one epoch, β 0.1 (configs/vicuna-7b-prefer.yaml).
TRAIN_SECTIONS = {
    "train": ("", dict(lr=5e-7, weight_decay=0.0, warmup_ratio=0.1, lr_schedule="cosine", epochs=1,
                       micro_batch_size=4, grad_accum=1, precision="bf16", zero_stage=3,
                       gradient_checkpointing=True)),
}


@dataclass
class PreferConfig:
    output_dir: str
    model: str  # stage 2's final model directory (a saved llava model): the policy's start and the reference
    # preference records: JSON list or JSONL, LLaVA rows + chosen/rejected, or TRL prompt/chosen/rejected; unset:
    # written offline from `captions` (data_gen.preference) into output_dir/pairs.json before training
    data: str | None = None
    captions: str | None = None  # captions JSONL (with boxes) to write the pairs from when `data` is unset
    pair_types: dict = field(default_factory=lambda: {"description": 1, "short": 1})  # pairs per image and type
    pair_seed: int = 0
    image_folder: str | None = None  # folder the records' (or captions') image paths start from
    beta: float = 0.1
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo
    template: str | None = None  # default: the model's
    max_len: int | None = None  # positions after the image splice; default: the model's
    adapter: dict | None = None  # {method: lora, r: 8, ...}: train an adapter; the reference is it disabled
    on_error: str = "stop"  # stop | skip (a pair whose image fails is replaced by the next one)
    train: TrainConfig | None = None


SCHEMA = PreferConfig


# ---- the loss ------------------------------------------------------------------------------------------------------

def preference_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
                    reference_rejected: torch.Tensor, beta: float, loss: str = "sigmoid"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) from per-pair sequence log-probabilities."""
    z = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
    if loss == "sigmoid":
        losses = -F.logsigmoid(beta * z)
    elif loss == "ipo":
        losses = (z - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown preference loss {loss!r}; losses: {', '.join(LOSSES)}")
    return losses, beta * (policy_chosen - reference_chosen).detach(), beta * (policy_rejected -
                                                                               reference_rejected).detach()


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor,
                   images: torch.Tensor | None, average: bool = False) -> torch.Tensor:
    """Per row: the sum (or mean) of log p(token) over the supervised tokens, computed as LlavaModel.forward computes
    its loss (image splice, right padding, the head only at supervised positions)."""
    from llava.constants import IGNORE_INDEX

    embeds, label_rows = model.prepare_inputs_embeds(input_ids, images, attention_mask, labels, model.config.max_len)
    hidden = model.llm(inputs_embeds=pad_sequence(embeds, batch_first=True), return_hidden=True)
    targets = pad_sequence(label_rows, batch_first=True, padding_value=IGNORE_INDEX)[:, 1:]
    supervised = targets != IGNORE_INDEX
    logits = model.llm.lm_head(hidden[:, :-1][supervised])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 logits: log-softmax in fp32
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[supervised].unsqueeze(1)).squeeze(1)
    rows = supervised.nonzero()[:, 0]
    total = logits.new_zeros(targets.shape[0]).index_add(0, rows, token_logps)
    return total / supervised.sum(1).clamp(min=1) if average else total


class PreferenceModel(nn.Module):
    """What the trainer trains: the policy, and the reference it is compared with. A batch holds the chosen sequences
    of its pairs, then their rejected ones."""

    def __init__(self, policy: nn.Module, reference: nn.Module | None, beta: float, loss: str):
        super().__init__()
        self.policy, self.reference, self.beta, self.loss = policy, reference, beta, loss

    def _reference_logps(self, *batch) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is not None:
                return sequence_logps(self.reference, *batch, average=self.loss == "ipo")
            from llava.adapters import disable_adapter

            with disable_adapter(self.policy):
                return sequence_logps(self.policy, *batch, average=self.loss == "ipo")

    def forward(self, input_ids, labels, attention_mask, images=None) -> dict:
        batch = (input_ids, labels, attention_mask, images)
        policy = sequence_logps(self.policy, *batch, average=self.loss == "ipo")
        reference = self._reference_logps(*batch)
        n = input_ids.shape[0] // 2
        losses, chosen, rejected = preference_loss(policy[:n], policy[n:], reference[:n], reference[n:], self.beta,
                                                   self.loss)
        return {"loss": losses.mean(), "metrics": {
            "reward_chosen": chosen.mean(), "reward_rejected": rejected.mean(),
            "reward_margin": (chosen - rejected).mean(), "reward_accuracy": (chosen > rejected).float().mean(),
            "logp_chosen": policy[:n].detach().mean(), "logp_rejected": policy[n:].detach().mean()}}


# ---- data ----------------------------------------------------------------------------------------------------------

def answer_only(labels: list[int]) -> list[int]:
    """Labels of the final answer alone: earlier assistant turns of a multi-turn prompt are context, not response."""
    from llava.constants import IGNORE_INDEX

    end = max((i for i, v in enumerate(labels) if v != IGNORE_INDEX), default=-1)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return [v if start <= i <= end else IGNORE_INDEX for i, v in enumerate(labels)]


class PreferenceDataset(Dataset):
    """Pairs tokenized as training tokenizes (template, `<image>` placement, length cut); images checked and opened
    like stage 2's (paths stay inside image_folder)."""

    def __init__(self, path: str, tokenizer, *, image_folder: str | None, image_processor, template: str,
                 max_len: int, on_error: str = "stop"):
        from data_gen.preference import PairError, read_pairs
        from llava.data.errors import DataError, check_on_error
        from llava.data.instruct import check_image_path

        try:
            self.pairs = read_pairs(path)
        except PairError as e:
            raise DataError(str(e)) from None
        for pair in self.pairs:
            if "image" in pair:
                check_image_path(pair["image"], f"{path}: pair {pair['id']!r}")
        if any("image" in p for p in self.pairs) and image_folder is None:
            raise DataError(f"{path}: the pairs have images; set image_folder (the folder their paths start from)")
        self.path, self.tokenizer, self.template, self.max_len = path, tokenizer, template, max_len
        self.image_folder = Path(image_folder).resolve() if image_folder else None
        self.image_processor, self.on_error = image_processor, check_on_error(on_error)

    def __len__(self) -> int:
        return len(self.pairs)

    def _sequence(self, pair: dict, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        from llava.conversation import tokenize_conversation
        from llava.data.errors import DataError

        ids, labels = tokenize_conversation(pair["conversations"] + [{"from": "gpt", "value": answer}],
                                            self.tokenizer, self.template, self.max_len, sample_id=pair["id"])
        labels = answer_only(labels)
        if all(v < 0 for v in labels):
            raise DataError(f"{self.path}: pair {pair['id']!r}: the answer is cut off entirely at max_len "
                            f"{self.max_len}; shorten the prompt or raise max_len")
        return torch.tensor(ids), torch.tensor(labels)

    def _load(self, i: int) -> dict:
        from llava.data.errors import DataError
        from llava.data.images import ImageError, open_rgb

        pair = self.pairs[i]
        chosen, rejected = self._sequence(pair, pair["chosen"]), self._sequence(pair, pair["rejected"])
        image = None
        if "image" in pair:
            real = (self.image_folder / pair["image"]).resolve()
            if not real.is_relative_to(self.image_folder):
                raise DataError(f"{self.path}: pair {pair['id']!r}: image {pair['image']!r} resolves outside "
                                f"{self.image_folder}")
            try:
                image = self.image_processor(open_rgb(real))
            except ImageError as e:
                raise DataError(f"{self.path}: pair {pair['id']!r}: {e}") from None
        return {"id": pair["id"], "chosen": chosen, "rejected": rejected, "image": image}

    def __getitem__(self, i: int) -> dict:
        from llava.data.errors import load_or_replace

        return load_or_replace(self._load, ((i + k) % len(self) for k in range(min(len(self), 100))), self.on_error,
                               lambda skipped: f"{self.path}: {skipped} pairs in a row failed to load; is "
                                               "image_folder right?")


def collate_pairs(pad_id: int):
    """Chosen rows first, then rejected rows (same order), each with its pair's image."""
    from llava.constants import IGNORE_INDEX

    def collate(samples: list[dict]) -> dict:
        rows = [s["chosen"] for s in samples] + [s["rejected"] for s in samples]
        images = [s["image"] for s in samples if s["image"] is not None] * 2
        return {"input_ids": pad_sequence([ids for ids, _ in rows], batch_first=True, padding_value=pad_id),
                "labels": pad_sequence([labels for _, labels in rows], batch_first=True, padding_value=IGNORE_INDEX),
                "attention_mask": pad_sequence([torch.ones(len(ids), dtype=torch.long) for ids, _ in rows],
                                               batch_first=True),
                "images": torch.stack(images) if images else None,
                "ids": [s["id"] for s in samples], "num_skipped": sum(s["skipped"] for s in samples)}

    return collate


# ---- the model -----------------------------------------------------------------------------------------------------

def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def check_config(cfg: PreferConfig) -> None:
    from stages.trainer import deepspeed_config

    if cfg.loss not in LOSSES:
        raise ConfigError(f"prefer.loss: {cfg.loss!r} is not one of {', '.join(LOSSES)}")
    if not cfg.beta > 0:
        raise ConfigError(f"prefer.beta must be > 0, got {cfg.beta}")
    model_dir = Path(cfg.model)
    if (model_dir / "adapter_config.json").is_file():
        raise ConfigError(f"prefer.model: {model_dir} is an adapter; merge it into a whole model first "
                          f"(llava-pipeline export --model {model_dir} --format merged --out DIR) and use DIR")
    if not (model_dir / "llava_config.json").is_file():
        raise ConfigError(f"prefer.model: {model_dir} is not a saved llava model (no llava_config.json); give stage "
                          "2's final model directory, e.g. runs/demo/instruct/final")
    if cfg.adapter is not None:
        method = cfg.adapter.get("method")
        if method not in WEIGHT_SPACE_METHODS:
            raise ConfigError(f"prefer.adapter.method: {method!r}; the reference is the model with the adapter "
                              f"disabled, which needs a weight-space method: {', '.join(WEIGHT_SPACE_METHODS)}")
        zero_stage = deepspeed_config(cfg.train, 1)["zero_optimization"]["stage"]
        if method == "adalora" and (zero_stage != 0 or cfg.train.precision != "fp32"):
            raise ConfigError("prefer.adapter: adalora needs train.zero_stage=0 and train.precision=fp32 (its rank "
                              "allocation reads gradients that DeepSpeed's ZeRO and mixed-precision optimizers clear)")


def build(cfg: PreferConfig) -> tuple[PreferenceModel, object]:
    """(PreferenceModel, tokenizer): the stage-2 model as policy, with its reference (a frozen copy, or the adapter
    disabled)."""
    from llava.model.llava import LlavaModel

    check_config(cfg)
    policy = LlavaModel.load(cfg.model, dtype=common.DTYPES[cfg.train.precision])
    policy.config.template = cfg.template or policy.config.template
    policy.config.max_len = cfg.max_len or policy.config.max_len
    policy.vision.requires_grad_(False)
    tokenizer = policy.load_tokenizer()
    copy_size = model_bytes(policy) / 2**20
    if cfg.adapter is None:
        reference = copy.deepcopy(policy).requires_grad_(False)
        common.log(f"[prefer] full tuning; reference: a frozen copy of {cfg.model} ({copy_size:.1f} MiB)")
    else:
        from llava.adapters import apply_adapter

        options = dict(cfg.adapter)
        method = options.pop("method")
        apply_adapter(policy, method, **options)
        reference = None
        common.log(f"[prefer] {method} adapter: {sum(p.numel() for p in policy.parameters() if p.requires_grad)} "
                   f"trainable parameters; reference: the same model with the adapter disabled (saves a "
                   f"{copy_size:.1f} MiB copy)")
    return PreferenceModel(policy, reference, cfg.beta, cfg.loss), tokenizer


# ---- training and saving -----------------------------------------------------------------------------------------

def save_final(cfg: PreferConfig, trainer, tokenizer, final: Path) -> None:
    """The policy alone: a whole model, or the adapter whose recorded base is stage 2's model (collective)."""
    from llava.io import atomic_write_json

    policy = trainer.model.policy
    if cfg.adapter is not None:
        import json

        from llava.adapters import save_adapter, trainable_parameters
        from llava.adapters.api import CONFIG_FILE
        from llava.adapters.base import gathered

        with gathered([p for _, p in trainable_parameters(policy)]):
            if common.is_main():
                save_adapter(policy, final)
        if common.is_main():
            config = json.loads((final / CONFIG_FILE).read_text(encoding="utf-8"))
            config["base_model"] = os.path.relpath(Path(cfg.model).resolve(), final.resolve())
            atomic_write_json(final / CONFIG_FILE, config)
    elif not any(hasattr(p, "ds_id") for p in policy.parameters()):
        if common.is_main():
            policy.save(final, tokenizer=tokenizer)
    else:
        from llava.model.llava import LlavaModel

        state = trainer.state_dict(lambda n: n.startswith("policy."), dtype=policy.llm.embed_tokens.weight.dtype)
        if common.is_main():
            with torch.device("meta"):
                whole = LlavaModel(policy.config)
            whole.load_state_dict({k.removeprefix("policy."): v for k, v in state.items()}, assign=True)
            whole.save(final, tokenizer=tokenizer)
    common.barrier()


def train(cfg: PreferConfig, model: PreferenceModel, tokenizer) -> dict:
    from stages.instruct import adapter_hooks
    from stages.trainer import Trainer, setup_distributed

    out = Path(cfg.output_dir)
    setup_distributed()
    common.save_resolved_config(cfg, out)
    policy = model.policy
    dataset = PreferenceDataset(cfg.data, tokenizer, image_folder=cfg.image_folder,
                                image_processor=policy.image_processor(), template=policy.config.template,
                                max_len=policy.config.max_len, on_error=cfg.on_error)
    common.log(f"[prefer] {len(dataset)} pairs from {cfg.data}; {cfg.loss} loss, beta {cfg.beta}")
    trainer = Trainer(cfg.train, model, dataset, collate_fn=collate_pairs(tokenizer.pad_id),
                      projector_params=lambda n: n.startswith("policy.projector."),
                      forward_only=lambda n: n.startswith(("policy.vision.", "reference.")),
                      **(adapter_hooks() if cfg.adapter is not None else {}))
    result = trainer.fit()
    final = out / FINAL_DIR
    save_final(cfg, trainer, tokenizer, final)
    if common.is_main():
        from llava.io import atomic_write_text

        atomic_write_text(final / "training_config.yaml", dump_yaml(cfg))
    common.barrier()
    return {"model": str(final), "metrics": result.metrics}


def write_pairs(cfg: PreferConfig) -> None:
    """`data` unset: offline pairs from `captions`, written once by rank 0 (resumable: data_gen's item cache)."""
    from data_gen.preference import PAIR_TYPES, generate_pairs

    if cfg.captions is None:
        raise ConfigError("prefer: set data (preference records) or captions (a captions JSONL with boxes to write "
                          "offline pairs from)")
    unknown = [t for t in cfg.pair_types if t not in PAIR_TYPES]
    if unknown:
        raise ConfigError(f"prefer.pair_types: unknown type(s) {unknown}; types: {', '.join(PAIR_TYPES)}")
    path = Path(cfg.output_dir) / "pairs.json"
    if common.is_main():
        summary = generate_pairs(cfg.captions, path, types=cfg.pair_types, seed=cfg.pair_seed, progress=False)
        common.log(f"[prefer] wrote {summary['written']} offline pairs to {path}: {summary['by_kind']}")
    common.barrier()
    cfg.data = str(path)


def run(cfg: PreferConfig) -> dict:
    from stages.trainer import setup_distributed

    setup_distributed()
    if cfg.data is None:
        write_pairs(cfg)
    return train(cfg, *build(cfg))


HELP = (__doc__.split("\n\n")[0] + " Reads: a stage-2 model directory (model) and preference pairs (data; or "
        "captions to write offline pairs from). Writes: output_dir/final (a whole model, or an adapter on model), "
        "metrics.jsonl, checkpoints/, pairs.json when data is unset.")


def main(argv: list[str] | None = None) -> int:
    return common.stage_main(argv, name="prefer", description=HELP, schema=SCHEMA, train_sections=TRAIN_SECTIONS,
                             run=run, entry=main)


if __name__ == "__main__":
    import sys

    sys.exit(main())
