"""Stage 1: only the projector trains; its file has LLaVA's names and rebuilds into stage 2's model."""
import torch
import yaml

from stage_helpers import changed, losses, snapshot


def test_only_the_projector_changes(align_run):
    model, before = align_run.model, align_run.before
    assert changed(before, model, "vision.") == []
    assert changed(before, model, "llm.") == []
    projector = [n for n in before if n.startswith("projector.")]
    assert sorted(changed(before, model, "projector.")) == sorted(projector)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(projector)


def test_loss_goes_down(align_run):
    assert len(losses(align_run.out)) == 8  # one logged loss per step
    print(align_run.loss_before, align_run.loss_after)
    assert align_run.loss_after < align_run.loss_before - 0.1


def test_projector_file_has_llava_names_and_loads_into_a_rebuilt_model(align_run):
    from safetensors.torch import load_file

    from llava.model.llava import LlavaModel
    from stages.common import read_model_config

    state = load_file(align_run.outputs["projector"])
    assert sorted(state) == [f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("bias", "weight")]
    trained = dict(align_run.model.projector.named_parameters())
    for key, tensor in state.items():
        assert torch.equal(tensor, trained[key.removeprefix("model.mm_projector.")].detach())

    config, tokenizer_file = read_model_config(align_run.out / "model_config.json")
    assert tokenizer_file.is_file()
    rebuilt = LlavaModel.build(config)
    rebuilt.load_projector(align_run.outputs["projector"])
    for name, tensor in rebuilt.state_dict().items():  # the same model stage 1 trained, bit for bit
        assert torch.equal(tensor, align_run.model.state_dict()[name]), name


def test_resolved_config_is_saved(align_run):
    saved = yaml.safe_load((align_run.out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-2 and saved["train"]["weight_decay"] == 0.0  # override, then stage default
    assert saved["train"]["output_dir"] == str(align_run.out)
    assert saved["model"]["projector_type"] == "mlp2x_gelu"


def test_the_fresh_projector_comes_from_the_train_seed_not_the_process_rng(align_run):
    """torch seeds its default generator differently in every process: a projector drawn from it made two runs of one
    config train from different starting points. The draw depends on train.seed alone and leaves the caller's RNG
    where it was."""
    import dataclasses

    from stages import align

    cfg = align_run.cfg
    projectors = []
    for process_seed in (1, 2):
        torch.manual_seed(process_seed)
        state = torch.get_rng_state()
        model, _, _ = align.build(cfg)
        assert torch.equal(torch.get_rng_state(), state)
        projectors.append(snapshot(model.projector))
    assert projectors[0].keys() == projectors[1].keys()
    assert all(torch.equal(projectors[0][k], projectors[1][k]) for k in projectors[0])

    other = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=cfg.train.seed + 1))
    model, _, _ = align.build(other)
    assert not torch.equal(snapshot(model.projector)["0.weight"], projectors[0]["0.weight"])
