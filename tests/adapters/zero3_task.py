"""Run by test_adapters_zero3.py in its own process (one rank, DeepSpeed ZeRO-3 on the CPU): adapters under
partitioned parameters. Prints one line per check; the test reads them."""
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
import deepspeed.ops  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from adapter_cases import batch, tiny_llama  # noqa: E402
from llava.adapters import (AdapterError, adapter_state_dict, after_optimizer_step, apply_adapter,  # noqa: E402
                            load_adapter, save_adapter, trainable_parameters)
from llava.adapters.adalora import SVDLinear  # noqa: E402

deepspeed.ops.__compatible_ops__ = {}  # skip the CPU shared-memory op's JIT build (training talks through gloo)
os.environ["LOCAL_RANK"] = "0"
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{sys.argv[1]}", rank=0, world_size=1)
deepspeed.init_distributed(dist_backend="gloo")
out_dir = sys.argv[2]

model = apply_adapter(tiny_llama(), "adalora", init_r=4, target_r=2, tinit=0, tfinal=1, targets=["q_proj"])
params = [p for _, p in trainable_parameters(model)]
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=config)
module = engine.module
try:
    adapter_state_dict(module)
    print("outside-gather: no error")
except AdapterError as e:
    print("outside-gather: error" if "GatheredParameters" in str(e) else f"outside-gather: {e}")

ids = batch()
for step in (1, 2, 3):
    engine.backward(engine(ids).float().logsumexp(-1).mean())
    after_optimizer_step(module, step, 3, grad_of=deepspeed.utils.safe_get_full_grad)  # before engine.step()
    if step == 2:  # the final allocation: the zeroed λ must survive the end of the gather
        values = [m.lora_E for m in module.modules() if isinstance(m, SVDLinear)]
        with deepspeed.zero.GatheredParameters(values):
            print(f"kept after final allocation: {sum(int((v != 0).sum()) for v in values)}")
    engine.step()

live = [p for _, p in trainable_parameters(module)]
with deepspeed.zero.GatheredParameters(live):
    save_adapter(module, out_dir)
engine.eval()
with torch.no_grad():
    expected = engine(ids)
fresh = tiny_llama()
load_adapter(fresh, out_dir)
with torch.no_grad():
    print(f"reload max diff: {(fresh(ids) - expected).abs().max().item():.3g}")
