"""Stage 3 end to end on a tiny model: the reference of every weight-space adapter is stage 2 itself, full tuning and
LoRA train through the shared trainer (metrics logged, final model loadable by eval/chat), a kill -9 between
checkpoints resumes to the uninterrupted result, ZeRO-3 on two ranks, and the run config's prefer stage."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import prefer_config

REPO = Path(__file__).resolve().parents[2]
METRICS = {"loss", "reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "logp_chosen",
           "logp_rejected"}
ADAPTERS = {"lora": {"r": 2}, "adalora": {"init_r": 4, "target_r": 2}, "loftq": {"r": 2, "alpha": 2},
            "oft": {"block_size": 16}, "ia3": {}, "krona": {}}


def _write(path: Path, config: dict) -> str:
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _batch(data, model, tokenizer):
    from stages.prefer import PreferenceDataset, collate_pairs

    dataset = PreferenceDataset(str(data.pairs), tokenizer, image_folder=str(data.images),
                                image_processor=model.image_processor(), template=model.config.template,
                                max_len=model.config.max_len)
    batch = collate_pairs(tokenizer.pad_id)([dataset[i] for i in (1, 3)])  # short-answer pairs: quick
    return {k: v for k, v in batch.items() if k not in ("ids", "num_skipped")}


@pytest.mark.parametrize("method", sorted(ADAPTERS))
def test_adapter_reference_is_the_model_with_the_adapter_disabled(prefer_data, method):
    from llava.adapters import apply_adapter
    from llava.model.llava import LlavaModel
    from stages.prefer import PreferenceModel, sequence_logps

    stage2 = LlavaModel.load(prefer_data.model)
    policy = LlavaModel.load(prefer_data.model)
    apply_adapter(policy, method, **ADAPTERS[method])
    with torch.no_grad():  # a trained adapter: not the identity any more
        for name, p in policy.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    tokenizer = policy.load_tokenizer()
    batch = _batch(prefer_data, policy, tokenizer)
    wrapped = PreferenceModel(policy, None, 0.1, "sigmoid")
    reference = wrapped._reference_logps(*batch.values())
    with torch.no_grad():
        stage2_logps = sequence_logps(stage2, **batch)
        policy_logps = sequence_logps(policy, **batch)
    if method != "loftq":  # LoftQ's base is the quantised weight: disabling the adapter gives that, not stage 2
        assert torch.allclose(reference, stage2_logps, rtol=1e-6)
    assert (reference - policy_logps).abs().max() > 1e-3  # the policy is the adapted model
    wrapped(**batch)["loss"].backward()
    with_grad = {n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert with_grad and with_grad <= trainable
    assert not any(n.startswith(("projector.", "vision.")) for n in trainable)  # disabled adapter == stage 2


def _final_weights(path: Path) -> dict:
    from llava.model.llava import LlavaModel

    return LlavaModel.load(path).state_dict()


def one_thread(run):
    """Run with one intra-op thread, as the killed subprocess (OMP_NUM_THREADS=1) does: the same reduction order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full_run(prefer_data, tmp_path_factory):
    """Full tuning, 4 steps, checkpoints at 2 and 4 (the kill test's uninterrupted reference)."""
    from pipeline.cli import main

    out = tmp_path_factory.mktemp("full")
    config = _write(out.parent / f"{out.name}.yaml", prefer_config(prefer_data, out, train={"save_every": 2}))
    assert one_thread(lambda: main(["prefer", "--config", config])) == 0
    return out


def test_full_tuning_logs_dpo_metrics_and_saves_a_loadable_model(full_run, prefer_data):
    from llava.loading import load_model

    rows = [json.loads(line) for line in (full_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(METRICS <= set(r) for r in rows)
    assert rows[0]["reward_margin"] == 0.0 and rows[0]["loss"] == pytest.approx(0.6931472)  # policy == reference
    assert all(0.0 <= r["reward_accuracy"] <= 1.0 for r in rows)
    trained, stage2 = _final_weights(full_run / "final"), _final_weights(prefer_data.model)
    assert any(not torch.equal(trained[k], stage2[k]) for k in stage2 if k.startswith("llm."))
    assert all(torch.equal(trained[k], stage2[k]) for k in stage2 if k.startswith("vision."))
    assert not list((full_run / "checkpoints").glob("*/*reference*"))
    loaded = load_model(full_run / "final")
    assert loaded.source == "llava model"


def test_kill_between_checkpoints_resumes_to_the_uninterrupted_result(full_run, prefer_data, tmp_path):
    from pipeline.cli import main

    out = tmp_path / "killed"
    config = _write(tmp_path / "killed.yaml", prefer_config(prefer_data, out, train={"save_every": 2}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "faults"), str(REPO)]),
           "OMP_NUM_THREADS": "1"}
    victim = subprocess.run([sys.executable, str(REPO / "tests" / "faults" / "kill_at.py"), "train-after-step:3", "--",
                             "stages.prefer", "--config", config], cwd=REPO, env=env, capture_output=True, timeout=600)
    assert victim.returncode == -signal.SIGKILL, victim.stdout.decode()[-2000:] + victim.stderr.decode()[-2000:]
    assert not (out / "final").exists()
    assert one_thread(lambda: main(["prefer", "--config", config])) == 0
    resumed, reference = _final_weights(out / "final"), _final_weights(full_run / "final")
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]


def test_lora_saves_an_adapter_on_the_stage2_model(prefer_data, tmp_path):
    from pipeline.cli import main
    from llava.loading import load_model

    out = tmp_path / "lora"
    config = _write(tmp_path / "lora.yaml", prefer_config(prefer_data, out, adapter={"method": "lora", "r": 2},
                                                          train={"max_steps": 2, "lr": 1e-2}))
    assert main(["prefer", "--config", config]) == 0
    config_file = json.loads((out / "final" / "adapter_config.json").read_text())
    assert (out / "final" / config_file["base_model"]).resolve() == prefer_data.model.resolve()
    loaded = load_model(out / "final")
    assert loaded.adapter == "lora"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert METRICS <= set(rows[-1])


def test_bad_settings_are_refused_with_the_fix(prefer_data, tmp_path, capsys):
    from pipeline.cli import main

    cases = [({"loss": "hinge"}, "sigmoid, ipo"), ({"adapter": {"method": "prompt_tuning"}}, "weight-space"),
             ({"model": str(prefer_data.images)}, "not a saved llava model")]
    for extra, message in cases:
        config = _write(tmp_path / "bad.yaml", prefer_config(prefer_data, tmp_path / "bad", **extra))
        assert main(["prefer", "--config", config]) != 0
        assert message in capsys.readouterr().err


@pytest.mark.slow
def test_two_ranks_zero3_full_tuning_and_lora(prefer_data, tmp_path):
    """ZeRO-3 partitions policy and reference; the saved policy (or adapter) is gathered whole."""
    from safetensors.torch import load_file

    from pipeline.cli import main

    out = tmp_path / "zero3"
    config = _write(tmp_path / "zero3.yaml", prefer_config(prefer_data, out, train={"max_steps": 2, "zero_stage": 3}))
    assert main(["prefer", "--config", config, "--nproc", "2"]) == 0
    trained, stage2 = _final_weights(out / "final"), _final_weights(prefer_data.model)
    assert trained.keys() == stage2.keys() and all(t.numel() for t in trained.values())
    assert any(not torch.equal(trained[k], stage2[k]) for k in stage2 if k.startswith("llm."))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert METRICS <= set(rows[-1])

    lora = _write(tmp_path / "lora.yaml", prefer_config(prefer_data, tmp_path / "lora", train={"max_steps": 2,
                  "zero_stage": 3}, adapter={"method": "lora", "r": 2}))
    assert main(["prefer", "--config", lora, "--nproc", "2"]) == 0
    saved = load_file(str(tmp_path / "lora" / "final" / "adapter_model.safetensors"))
    assert saved and all(t.numel() for t in saved.values()) and all("lora" in k for k in saved)
