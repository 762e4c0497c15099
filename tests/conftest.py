"""Fixtures every test folder may use: processor features that differ between machines of the same kind."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def fp16_training():
    """Lets DeepSpeed train in fp16 on any CPU; returns "native" or "portable".

    DeepSpeed's CPU accelerator allows fp16 only where oneDNN reports fp16 kernels, i.e. on processors with
    AVX512-FP16 or AMX-FP16. Elsewhere torch still runs every fp16 op on its portable kernels, so the same fp16
    training (DeepSpeed's dynamic loss scaler, overflow detection, skipped updates) runs for real once the capability
    gate is opened: the trainer's loss-scale bookkeeping, its named error and its console report are checked on every
    machine. The gate itself is checked by tests/trainer/test_trainer.py::test_fp16_is_refused_where_the_cpu_lacks_it.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" or accelerator.is_fp16_supported():
        yield "native"
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(accelerator), "is_fp16_supported", lambda self: True)
        yield "portable"
