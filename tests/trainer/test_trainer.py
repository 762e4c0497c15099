"""The DeepSpeed trainer on one CPU process (ZeRO-0 and ZeRO-2), training a tiny LLaMA on Markov-chain tokens."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch
from torch.utils.data import DistributedSampler

import trainer_task as task
from stages.config import ConfigError
from stages import checkpoint as ckpt
from stages import launch
from stages.trainer import (NonFiniteLossError, TrainConfig, TrainerError, deepspeed_config, flops_per_token,
                            lr_multiplier, measure_peak_flops)

CONFIGS = task.REPO / "configs" / "deepspeed"


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def data_order(samples: int = 64, seed: int = 42) -> list[int]:
    """The default sampler's epoch-0 order on one rank (the oracle for which step sees which sample)."""
    return list(DistributedSampler(task.MarkovTokens(samples, 32), num_replicas=1, rank=0, shuffle=True, seed=seed,
                                   drop_last=True))


def test_loss_goes_down_and_every_metric_is_logged(tmp_path):
    cfg = {"output_dir": str(tmp_path), "max_steps": 20, "log_every": 5, "eval_every": 10, "warmup_ratio": 0.1,
           "tensorboard": True}
    trainer, result = task.train(cfg, eval_every_loss=True)
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 5, 10, 15, 20]
    assert rows[0]["loss"] == pytest.approx(math.log(task.VOCAB), abs=0.1)  # random init predicts uniformly
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.5
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0] < math.log(task.VOCAB) - 1.5  # held-out sequences, same chain
    multiplier = lr_multiplier("cosine", 2, 20)
    for r in rows:
        assert r["lr"] == pytest.approx(1e-2 * multiplier(r["step"] - 1))  # the lr this step was taken with
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["tokens_per_s"] / r["samples_per_s"] == pytest.approx(32)  # 32 tokens per sample
        assert 0 < r["mfu"] < 1
    assert list(tmp_path.glob("tensorboard/events.out.tfevents.*"))
    assert result.step == 20 and result.checkpoint == tmp_path / "checkpoints" / "step_00000020"
    assert ckpt.read_state(result.checkpoint)["step"] == 20
    # the final save is complete: its weights are the live weights
    assert max_diff(ckpt.consolidate_checkpoint(result.checkpoint), trainer.state_dict()) == 0


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_lr_schedule_matches_transformers(schedule):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup, total = 7, 50
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    theirs = (get_cosine_schedule_with_warmup(optimizer, warmup, total) if schedule == "cosine"
              else get_constant_schedule_with_warmup(optimizer, warmup))
    ours = lr_multiplier(schedule, warmup, total)
    for step in range(total + 1):
        assert ours(step) == pytest.approx(theirs.lr_lambdas[0](step), abs=1e-12)


def test_only_trainable_parameters_change_and_reach_the_optimizer(tmp_path):
    frozen = ("llm.embed_tokens.", "llm.layers.0.")
    trainer = task.make_trainer({"output_dir": str(tmp_path), "max_steps": 5}, frozen_prefixes=frozen)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable and all(not n.startswith(frozen) for n in trainable)
    in_optimizer = {id(p) for group in trainer.engine.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in trainer.model.parameters() if p.requires_grad}
    result = trainer.fit()
    after = dict(trainer.model.named_parameters())
    for name, old in before.items():
        if name in trainable:
            assert not torch.equal(after[name].detach(), old), f"{name} was trained but did not change"
        else:
            assert torch.equal(after[name].detach(), old), f"frozen {name} changed"
    saved = ckpt.consolidate_checkpoint(result.checkpoint)  # frozen weights are not written to checkpoints
    assert set(saved) == trainable
    assert max_diff(saved, {n: after[n].detach() for n in trainable}) == 0


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    small, _ = task.train({"output_dir": str(tmp_path / "a"), "max_steps": 4, "micro_batch_size": 2,
                           "grad_accum": 4})
    big, _ = task.train({"output_dir": str(tmp_path / "b"), "max_steps": 4, "micro_batch_size": 8})
    assert max_diff(small.state_dict(), big.state_dict()) < 1e-5
    assert metrics(tmp_path / "a")[-1]["loss"] == pytest.approx(metrics(tmp_path / "b")[-1]["loss"], abs=1e-5)


def test_resume_ignores_an_incomplete_checkpoint_and_continues_exactly(tmp_path, capsys):
    cfg = {"output_dir": str(tmp_path), "max_steps": 8, "save_every": 3, "keep_last": 2, "log_every": 1}
    trainer, result = task.train(cfg, label_dropout=0.2)  # random labels dropped: the RNG must be restored too
    uninterrupted = trainer.state_dict()
    rows = metrics(tmp_path)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path / "checkpoints")] == ["step_00000006", "step_00000008"]

    # A save of step 8 that crashed half way: no marker, a torn file.
    broken = tmp_path / "checkpoints" / "step_00000008"
    (broken / ckpt.MARKER).unlink()
    (broken / "mp_rank_00_model_states.pt").write_bytes(b"torn")
    assert ckpt.latest_complete(tmp_path / "checkpoints").name == "step_00000006"
    with open(tmp_path / "metrics.jsonl", "a") as log:
        log.write('{"step": 9, "lo')  # a line torn by the crash

    trainer, result = task.train(cfg, label_dropout=0.2)
    out = capsys.readouterr().out
    assert "removed incomplete checkpoint" in out and "resumed from" in out and "at step 6/8" in out
    assert max_diff(trainer.state_dict(), uninterrupted) < 1e-6
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 9))  # one clean history, no repeated steps
    assert metrics(tmp_path)[-1]["loss"] == pytest.approx(rows[-1]["loss"], abs=1e-6)
    assert result.checkpoint == broken and (broken / ckpt.MARKER).is_file()

    # Resuming a finished run does nothing and changes nothing.
    trainer, result = task.train(cfg, label_dropout=0.2)
    assert result.step == 8 and max_diff(trainer.state_dict(), uninterrupted) < 1e-6


def test_streamed_dataset_resumes_by_reading_past_consumed_batches(tmp_path):
    cfg = {"output_dir": str(tmp_path), "max_steps": 20, "save_every": 9}  # 16 steps per epoch
    trainer, _ = task.train(cfg, dataset=task.StreamedMarkovTokens(64, 32))
    uninterrupted = trainer.state_dict()
    ckpt.remove_checkpoint(tmp_path / "checkpoints" / "step_00000020")
    state = ckpt.read_state(ckpt.latest_complete(tmp_path / "checkpoints"))
    assert (state["step"], state["epoch"], state["batches_consumed"]) == (18, 1, 2)  # resume 2 batches into epoch 1
    trainer, result = task.train(cfg, dataset=task.StreamedMarkovTokens(64, 32))
    assert result.step == 20 and max_diff(trainer.state_dict(), uninterrupted) < 1e-6

    with pytest.raises(TrainerError, match="yielded 16 micro-batches in epoch 0, fewer than its len"):
        task.train({"output_dir": str(tmp_path / "short"), "max_steps": 20},
                   dataset=task.StreamedMarkovTokens(64, 32, claimed_len=80))


class SkippingMarkovTokens(task.MarkovTokens):
    """Every 5th sample stands in for one bad sample the dataset skipped (as InstructDataset does with on_error=skip)."""

    def __getitem__(self, i: int) -> dict:
        return {**super().__getitem__(i), "skipped": int(i % 5 == 0)}


def collate_with_skips(samples: list[dict]) -> dict:
    return {**task.collate(samples), "num_skipped": sum(s["skipped"] for s in samples)}


def test_skipped_samples_are_counted_in_metrics_and_survive_resume(tmp_path, capsys):
    cfg = {"output_dir": str(tmp_path), "max_steps": 6, "save_every": 3, "keep_last": 0, "log_every": 1}
    options = dict(dataset=SkippingMarkovTokens(64, 32), collate_fn=collate_with_skips)
    task.train(cfg, **options)
    order = data_order()
    expected = [sum(i % 5 == 0 for i in order[:4 * step]) for step in range(1, 7)]  # micro_batch_size 4
    assert expected[-1] > 0 and [r["skipped_samples"] for r in metrics(tmp_path)] == expected
    assert f"finished at step 6, {expected[-1]} samples skipped" in capsys.readouterr().out

    ckpt.remove_checkpoint(tmp_path / "checkpoints" / "step_00000006")
    task.train(cfg, **options)  # resumes at step 3: the count before it comes from the checkpoint
    assert "at step 3/6" in capsys.readouterr().out
    assert [r["skipped_samples"] for r in metrics(tmp_path)] == expected


class EpochRecorder:
    """Wraps a sampler or streamed dataset and records the set_epoch calls the trainer makes."""

    def __init__(self):
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)
        super().set_epoch(epoch)


class RecordingSampler(EpochRecorder, DistributedSampler):
    def __init__(self, dataset):
        EpochRecorder.__init__(self)
        DistributedSampler.__init__(self, dataset, num_replicas=1, rank=0, shuffle=True, seed=42, drop_last=True)
        self.orders: list[list[int]] = []

    def __iter__(self):
        order = list(super().__iter__())
        self.orders.append(order)
        return iter(order)


class RecordingStream(EpochRecorder, task.StreamedMarkovTokens):
    def __init__(self, samples: int, seq_len: int):
        EpochRecorder.__init__(self)
        task.StreamedMarkovTokens.__init__(self, samples, seq_len)


def test_every_epoch_is_announced_so_the_data_reshuffles(tmp_path):
    dataset = task.MarkovTokens(16, 32)  # 4 steps per epoch; 10 steps span epochs 0, 1 and 2
    sampler = RecordingSampler(dataset)
    task.train({"output_dir": str(tmp_path / "map"), "max_steps": 10}, dataset=dataset, sampler=sampler)
    assert sampler.epochs == [0, 1, 2]
    assert len({tuple(order) for order in sampler.orders}) == 3  # a new order each epoch
    stream = RecordingStream(16, 32)
    task.train({"output_dir": str(tmp_path / "stream"), "max_steps": 10}, dataset=stream)
    assert stream.epochs == [0, 1, 2]


def test_rng_state_is_saved_without_pickle_and_restores_every_generator(tmp_path):
    import random

    import numpy as np
    from safetensors import safe_open

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in python's state, and one in numpy's:
    np.random.standard_normal()
    path = tmp_path / "rng.safetensors"
    ckpt.save_rng_state(path)
    draws = (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ckpt.set_rng_state(ckpt.load_rng_state(path))
    assert (random.random(), random.gauss(0, 1), np.random.standard_normal(3).tolist(), torch.rand(3).tolist()) == draws
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == {"torch", "numpy"} and set(f.metadata()) == {"python", "numpy"}
    path.write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match=r"rng.safetensors: unreadable RNG state"):
        ckpt.load_rng_state(path)


class Payload:
    """Unpickling this creates a directory: the proof that loading ran the file's code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_planted_pickles_in_a_checkpoint_are_refused_by_name(tmp_path):
    cfg = {"output_dir": str(tmp_path), "max_steps": 2, "save_every": 1, "keep_last": 0}
    task.train(cfg)
    latest = ckpt.latest_complete(tmp_path / "checkpoints")
    ckpt.screen_pickles(latest)  # what DeepSpeed wrote passes
    states = latest / "mp_rank_00_model_states.pt"
    original = states.read_bytes()
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, states)
    refused = rf"{re.escape(str(states))}: refusing to unpickle it: it names posix\.mkdir"
    with pytest.raises(ckpt.UnsafeCheckpointError, match=refused):
        task.train({**cfg, "max_steps": 3})
    with pytest.raises(ckpt.UnsafeCheckpointError, match=refused):
        ckpt.consolidate_checkpoint(latest)
    states.write_bytes(original[:len(original) // 2])
    with pytest.raises(ckpt.UnsafeCheckpointError, match=rf"{re.escape(str(states))}: cannot be checked"):
        ckpt.consolidate_checkpoint(latest)
    assert not marker.exists()
    states.write_bytes(original)
    _, result = task.train({**cfg, "max_steps": 3})  # the restored file resumes
    assert result.step == 3


def test_resume_settings_are_checked(tmp_path):
    task.train({"output_dir": str(tmp_path / "done"), "max_steps": 2})
    with pytest.raises(TrainerError, match="resume=False"):
        task.make_trainer({"output_dir": str(tmp_path / "done"), "max_steps": 2, "resume": False}).fit()
    with pytest.raises(TrainerError, match="micro_batch_size=4 but this run has micro_batch_size=2"):
        task.make_trainer({"output_dir": str(tmp_path / "done"), "max_steps": 4, "micro_batch_size": 2}).fit()
    with pytest.raises(TrainerError, match="different set of parameters"):
        task.make_trainer({"output_dir": str(tmp_path / "done"), "max_steps": 4},
                          frozen_prefixes=("llm.lm_head.",)).fit()
    with pytest.raises(TrainerError, match="no complete checkpoint"):
        task.make_trainer({"output_dir": str(tmp_path / "fresh"), "max_steps": 2, "resume": True}).fit()


def test_nan_loss_stops_with_the_step_and_sample_ids(tmp_path):
    poisoned = data_order()[4 * 4 + 1]  # second sample of step 5 (micro_batch_size 4)
    with pytest.raises(NonFiniteLossError) as error:
        task.train({"output_dir": str(tmp_path), "max_steps": 10, "save_every": 2}, poison_sample=poisoned)
    message = str(error.value)
    assert "step 5" in message and f"seq-{poisoned}" in message and str(poisoned) in message
    checkpoints = ckpt.checkpoint_dirs(tmp_path / "checkpoints")
    assert [p.name for p in checkpoints] == ["step_00000002", "step_00000004"]
    assert all((p / ckpt.MARKER).is_file() for p in checkpoints)
    weights = ckpt.consolidate_checkpoint(checkpoints[-1])
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path, fp16_training):
    ds_json = tmp_path / "fp16.json"
    ds_json.write_text(json.dumps({"fp16": {"enabled": "auto", "initial_scale_power": 24, "hysteresis": 1}}))
    task.train({"output_dir": str(tmp_path / "run"), "max_steps": 6, "log_every": 1, "precision": "fp16",
                "zero_stage": 2, "deepspeed_config": str(ds_json)})
    rows = metrics(tmp_path / "run")
    skipped = [r["skipped_steps"] for r in rows]
    assert skipped == sorted(skipped) and skipped[-1] >= 1  # cumulative, and the huge initial scale overflowed
    assert rows[-1]["loss_scale"] < 2**24
    overflowed = [r for r, prev in zip(rows, [0] + skipped) if r["skipped_steps"] > prev]
    assert all(not math.isfinite(r["grad_norm"]) for r in overflowed)
    # Its checkpoint (a dynamic loss scaler among the pickled objects) passes the screening and resumes.
    _, result = task.train({"output_dir": str(tmp_path / "run"), "max_steps": 6, "log_every": 1,
                            "precision": "fp16", "zero_stage": 2, "deepspeed_config": str(ds_json)})
    assert result.step == 6 and metrics(tmp_path / "run")[-1]["skipped_steps"] == skipped[-1]
    with pytest.raises(ConfigError, match="fp16 needs zero_stage"):
        deepspeed_config(TrainConfig(output_dir="x", precision="fp16", zero_stage=0), 1)


def test_fp16_is_refused_where_the_cpu_lacks_it(tmp_path):
    """On a CPU without AVX512-FP16 / AMX-FP16 (emulated here by capping oneDNN's instruction set, as such a machine
    reports it), precision fp16 is a named error that says what to use instead, raised before any training."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "PYTHONPATH": str(Path(task.__file__).parent)}
    code = ("import trainer_task, sys\n"
            "from stages.trainer import TrainerError\n"
            "try:\n"
            f"    trainer_task.train({{'output_dir': {str(tmp_path / 'run')!r}, 'max_steps': 2, 'precision': 'fp16', "
            "'zero_stage': 2})\n"
            "except TrainerError as e:\n"
            "    print('REFUSED:', e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    assert "REFUSED: precision fp16 is not supported on cpu; use bf16 or fp32" in done.stdout
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain, _ = task.train({"output_dir": str(tmp_path / "plain"), "max_steps": 3})
    recompute, _ = task.train({"output_dir": str(tmp_path / "ckpt"), "max_steps": 3, "gradient_checkpointing": True})
    assert recompute.model.llm.gradient_checkpointing and not plain.model.llm.gradient_checkpointing
    assert max_diff(plain.state_dict(), recompute.state_dict()) < 1e-6


def test_flops_per_token_counts_trained_frozen_and_forward_only_parameters():
    model = torch.nn.ModuleDict({"vision": torch.nn.Linear(10, 10, bias=False),  # 100, frozen, runs first
                                 "projector": torch.nn.Linear(10, 20, bias=False),  # 200, trained
                                 "llm": torch.nn.Linear(20, 30, bias=False)})  # 600, frozen behind the projector
    model["vision"].weight.requires_grad_(False)
    model["llm"].weight.requires_grad_(False)
    assert flops_per_token(model, lambda name: name.startswith("vision.")) == 2 * 100 + 6 * 200 + 4 * 600
    assert flops_per_token(model) == 4 * 100 + 6 * 200 + 4 * 600


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_bf16_trains(tmp_path, zero_stage):
    trainer, _ = task.train({"output_dir": str(tmp_path), "max_steps": 8, "log_every": 1, "precision": "bf16",
                             "zero_stage": zero_stage})
    rows = metrics(tmp_path)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert trainer.model.llm.lm_head.weight.dtype == torch.bfloat16  # DeepSpeed runs the module in bf16
    assert all(t.dtype == torch.float32 for t in trainer.state_dict().values())


def test_peak_flops_is_measured_when_not_configured():
    assert measure_peak_flops(torch.device("cpu"), torch.float32) > 1e8


def test_gathered_state_dict_selects_by_name(tmp_path):
    trainer, _ = task.train({"output_dir": str(tmp_path), "max_steps": 1})
    subset = trainer.state_dict(lambda name: name.startswith(task.SUBSET_PREFIX))
    full = trainer.state_dict()
    assert subset and set(subset) == {k for k in full if k.startswith(task.SUBSET_PREFIX)}
    assert max_diff(subset, {k: full[k] for k in subset}) == 0
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in full.values())


# ---- DeepSpeed config filling (no engine) ------------------------------------------------------------------------

@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_deepspeed_configs_are_filled_from_the_train_config(name, stage):
    cfg = TrainConfig(output_dir="x", deepspeed_config=str(CONFIGS / f"{name}.json"), micro_batch_size=3,
                      grad_accum=2, max_grad_norm=0.5, precision="bf16")
    ds = deepspeed_config(cfg, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 2, 24)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == stage
    assert '"auto"' not in json.dumps(ds)
    if stage == 3:
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# LLaVA's scripts/zero3_offload.json: "auto" everywhere, all-auto optimizer and scheduler sections.
LLAVA_ZERO3_OFFLOAD = {
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": True},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                 "warmup_num_steps": "auto"}},
    "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                          "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                          "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                          "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                          "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                          "gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "steps_per_print": 1e5, "wall_clock_breakdown": False,
}


def write_json(tmp_path, data) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_llava_deepspeed_json_is_accepted(tmp_path):
    ds = deepspeed_config(TrainConfig(output_dir="x", deepspeed_config=write_json(tmp_path, LLAVA_ZERO3_OFFLOAD)), 8)
    assert "optimizer" not in ds and "scheduler" not in ds and '"auto"' not in json.dumps(ds)
    assert "reduce_bucket_size" not in ds["zero_optimization"]  # DeepSpeed's default
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


@pytest.mark.parametrize("change, settings, match", [
    ({"train_micro_batch_size_per_gpu": 16}, {}, r"train_micro_batch_size_per_gpu is 16 .*micro_batch_size"),
    ({}, {"zero_stage": 2}, r"zero_optimization.stage is 3 .*zero_stage"),
    ({}, {"precision": "fp32"}, r"bf16.enabled is True .*precision"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}, {}, r"remove the 'optimizer' section"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}, {}, r"remove the 'scheduler' section"),
])
def test_deepspeed_json_conflicts_are_errors(tmp_path, change, settings, match):
    data = {**LLAVA_ZERO3_OFFLOAD, **change}
    with pytest.raises(ConfigError, match=match):
        deepspeed_config(TrainConfig(output_dir="x", deepspeed_config=write_json(tmp_path, data), **settings), 8)


def test_offload_flag_needs_zero():
    ds = deepspeed_config(TrainConfig(output_dir="x", zero_stage=2, offload_optimizer=True), 1)
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="offload_optimizer needs zero_stage"):
        deepspeed_config(TrainConfig(output_dir="x", zero_stage=0, offload_optimizer=True), 1)


# ---- launch helper -------------------------------------------------------------------------------------------

def test_launch_runs_one_process_here_and_builds_a_torchrun_command(monkeypatch):
    seen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launch.run(lambda argv: seen.append(argv) or 3, ["--x", "1"], nproc=1) == 3 and seen == [["--x", "1"]]
    assert launch.resolve(launch.target_of(task.main)) is task.main
    command = launch.agent_command(2, "trainer_task:main", ["a=1"])
    assert command[1:] == ["-m", "stages.launch", "--agent", "--nproc", "2", "trainer_task:main", "a=1"]
    assert launch.torchrun_args(2, "trainer_task:main", ["a=1"]) == [
        "--standalone", "--nproc-per-node=2", "-m", "stages.launch", "trainer_task:main", "a=1"]
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a rank of a launcher: never spawn again
    assert launch.run(lambda argv: 0, [], nproc=2) == 0
