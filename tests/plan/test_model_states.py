"""Model-state memory per rank against DeepSpeed's own estimators, called here: with every parameter trained in bf16
our formula must give DeepSpeed's numbers exactly (and the tables its `*_all_cold` functions print); frozen
parameters only add their 16-bit weights."""
import os
import re

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                           estimate_zero3_model_states_mem_needs_all_cold)
from deepspeed.runtime.zero.stage_1_and_2 import (estimate_zero2_model_states_mem_needs,
                                                  estimate_zero2_model_states_mem_needs_all_cold)

from stages.memory import GiB, model_state_bytes

LLAVA_7B = 6_759_395_328  # LLM + projector: what stage 2 trains
LARGEST = 32000 * 4096
SETUPS = [(1, 1), (8, 1), (8, 2), (4, 4)]  # (GPUs per node, nodes)


def ours(stage, gpus, nodes, trainable=LLAVA_7B, total=LLAVA_7B, **offload):
    return model_state_bytes(total, trainable, LARGEST, precision="bf16", zero_stage=stage, ranks=gpus * nodes,
                             ranks_per_node=gpus, **offload)


@pytest.mark.parametrize("gpus, nodes", SETUPS)
def test_zero2_equals_deepspeed(gpus, nodes):
    for offload in (False, True):
        cpu, gpu = estimate_zero2_model_states_mem_needs(LLAVA_7B, gpus, nodes, cpu_offload=offload)
        mine = ours(2, gpus, nodes, offload_optimizer=offload)
        assert abs(mine.gpu - gpu) <= 1 and abs(mine.cpu - cpu) <= 1


@pytest.mark.parametrize("gpus, nodes", SETUPS)
def test_zero3_equals_deepspeed(gpus, nodes):
    for opt, params in ((False, False), (True, False), (True, True)):
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(LLAVA_7B, LARGEST, gpus, nodes, cpu_offload=opt,
                                                            cpu_offload_params=params, zero_init=True)
        mine = ours(3, gpus, nodes, offload_optimizer=opt, offload_params=params)
        assert abs(mine.gpu - gpu) <= 1 and abs(mine.cpu - cpu) <= 1


def printed_rows(capsys) -> dict[str, tuple[float, float]]:
    """DeepSpeed's printed table: options -> (per CPU GB, per GPU GB) (its 'GB' are GiB, 2 decimals)."""
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)$", line)
        if match:
            options = match.group(3).replace(" ", "").replace("OffloadDeviceEnum.", "")
            rows[options] = (float(match.group(1)), float(match.group(2)))
    return rows


@pytest.mark.parametrize("gpus, nodes", SETUPS)
def test_printed_all_cold_tables_agree(capsys, gpus, nodes):
    estimate_zero2_model_states_mem_needs_all_cold(LLAVA_7B, gpus, nodes)
    rows = printed_rows(capsys)
    assert len(rows) == 2
    for offload in (False, True):
        mine = ours(2, gpus, nodes, offload_optimizer=offload)
        assert rows[f"offload_optimizer={'cpu' if offload else 'none'}"] == (round(mine.cpu / GiB, 2),
                                                                             round(mine.gpu / GiB, 2))
    estimate_zero3_model_states_mem_needs_all_cold(LLAVA_7B, LARGEST, gpus, nodes)
    rows = printed_rows(capsys)
    for opt, params in ((False, False), (True, False), (True, True)):
        mine = ours(3, gpus, nodes, offload_optimizer=opt, offload_params=params)
        key = f"offload_param={'cpu' if params else 'none'},offload_optimizer={'cpu' if opt else 'none'},zero_init=1"
        assert rows[key] == (round(mine.cpu / GiB, 2), round(mine.gpu / GiB, 2))


def test_frozen_parameters_cost_only_their_weights():
    tower = 304_293_888
    full = ours(2, 8, 1, total=LLAVA_7B + tower)
    assert full.gpu - ours(2, 8, 1).gpu == 2 * tower
    stage1 = ours(2, 8, 1, trainable=20_979_712, total=LLAVA_7B + tower)  # projector only
    assert stage1.gpu == 2 * (LLAVA_7B + tower) + 18 * 20_979_712 // 8
    z3 = ours(3, 8, 1, trainable=20_979_712, total=LLAVA_7B + tower)
    assert z3.gpu == 4 * LARGEST + (2 * (LLAVA_7B + tower) + 16 * 20_979_712) // 8
    fp32 = model_state_bytes(100, 100, 10, precision="fp32", zero_stage=0, ranks=1, ranks_per_node=1)
    assert fp32.gpu == 100 * (4 + 4 + 8)  # fp32 weights, gradients, two AdamW moments; no master copy


def test_bad_combinations_are_refused():
    with pytest.raises(ValueError, match="ZeRO-3"):
        model_state_bytes(1, 1, 1, precision="bf16", zero_stage=2, ranks=1, ranks_per_node=1, offload_params=True)
    with pytest.raises(ValueError, match="ZeRO 1, 2 or 3"):
        model_state_bytes(1, 1, 1, precision="bf16", zero_stage=0, ranks=1, ranks_per_node=1, offload_optimizer=True)
