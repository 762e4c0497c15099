"""PEFT adapters side by side on one language model, against full fine-tuning in the same run.

Table (always):
- trainable parameters, as a count and as % of the base model's parameters;
- model bytes: parameters + buffers of the adapted model (LoftQ's quantised base shows here);
- training memory, exact: gradients + AdamW state, and the activations autograd saves for backward (distinct
  storages seen by `saved_tensors_hooks`, weights excluded);
- peak training memory, measured: in a fresh process per method, the peak resident set size (Linux VmHWM, reset
  through /proc/self/clear_refs right before training) above the RSS at that moment, over `--memory-steps` training
  steps — everything above plus transient buffers and allocator slack (on CUDA: torch.cuda.max_memory_allocated above
  the allocation then);
- step time (forward + cross-entropy + backward + AdamW step + the adapter's hooks) relative to full fine-tuning:
  every model lives in one process and they take turns step by step (interleaved repeats); each run's fastest step is
  reported. On CPU the clock is the process's CPU time (use `--threads 1`), which other processes on a shared
  machine barely disturb; on CUDA it is wall time after synchronising.
  Prompt methods also pay for their virtual tokens' positions.

Quality (with --model-dir pointing at a LlavaModel directory and --data at LLaVA instruction JSON): every method and
full fine-tuning start from that model, train the same `--steps` stage-2 steps on the same batches (the projector
trains alongside, as in LLaVA's LoRA recipe) at the method's learning rate (`--lr method=value` to change one), and
are scored on the last `--eval-samples` samples of the data, held out: answer-token loss and next-token accuracy.

    python bench/adapters.py                                  # tiny LLaMA, CPU, ~2 minutes on 2 cores
    python bench/adapters.py --quick                          # a smoke run
    python bench/adapters.py --model-dir runs/demo/align --data runs/demo/data/train.json \
        --image-folder runs/demo/scenes/train/images        # --model-dir: stage 1's output (or a LlavaModel dir)
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llava.adapters import after_optimizer_step, apply_adapter, extra_loss, trainable_parameters  # noqa: E402
from llava.model import Llama, LlamaConfig  # noqa: E402

BENCH_CONFIG = LlamaConfig(dim=256, n_layers=4, n_heads=8, n_kv_heads=4, ffn_hidden=688, vocab_size=2048,
                           max_seq_len=512)

# name -> (method or None for full fine-tuning, options, learning rate for the quality run)
RUNS: dict[str, tuple[str | None, dict, float]] = {
    "full": (None, {}, 2e-5),
    "lora": ("lora", dict(r=8, alpha=16), 2e-4),
    "adalora": ("adalora", dict(init_r=12, target_r=8, alpha=16), 5e-4),
    "loftq": ("loftq", dict(r=8, alpha=16, bits=4), 2e-4),
    "oft": ("oft", dict(block_size=32), 2e-4),
    "ia3": ("ia3", {}, 3e-3),
    "krona": ("krona", {}, 2e-4),
    "krona_ffn_res": ("krona", dict(variant="ffn_res"), 2e-4),
    "prompt_tuning": ("prompt_tuning", dict(num_tokens=20), 3e-2),
    "p_tuning": ("p_tuning", dict(num_tokens=20), 1e-3),
    "prefix_tuning": ("prefix_tuning", dict(num_tokens=20), 1e-3),
    "prefix_tuning_v2": ("prefix_tuning_v2", dict(num_tokens=20), 1e-3),
}


# ---- building and stepping -----------------------------------------------------------------------------------------

def base_llama(model_dir: str | None, device: str) -> Llama:
    if model_dir is None:
        return Llama(BENCH_CONFIG).init_weights(seed=0).to(device)
    path = Path(model_dir)
    if (path / "model_config.json").is_file():  # a stage-1 (align) output: its LLM is where the config says
        from stages.common import read_model_config

        return Llama.from_hf(read_model_config(path / "model_config.json")[0].llm_path, device=device)
    return Llama.from_hf(path / "llm" if (path / "llm" / "config.json").is_file() else path, device=device)


def load_llava(model_dir: str, device: str):
    """A LlavaModel directory (LlavaModel.save, e.g. a full stage-2 `final/`), or a stage-1 output directory: the
    model stage 2 starts from (pretrained LLM and tower, trained projector, vicuna_v1 template)."""
    from llava.model.llava import LlavaModel

    path = Path(model_dir)
    if (path / "model_config.json").is_file():  # exactly what stage 2 starts from, through its own loader
        from stages import instruct
        from stages.common import bind_stage

        cfg = bind_stage(instruct.SCHEMA, {"output_dir": str(path / "unused"), "data": "unused", "align_dir": str(path),
                                           "train": {"precision": "fp32"}},
                         name="bench", train_sections=instruct.TRAIN_SECTIONS)
        return instruct.starting_model(cfg)[0].to(device)
    return LlavaModel.load(path).to(device)


def prepare(model: torch.nn.Module, run: str, extra_trainable: tuple[str, ...] = ()) -> list[torch.nn.Parameter]:
    """Apply the run's adapter (or unfreeze everything but a vision tower for full fine-tuning); the trained params."""
    method, options, _ = RUNS[run]
    if method is None:
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith("vision."))
        return [p for p in model.parameters() if p.requires_grad]
    apply_adapter(model, method, extra_trainable=extra_trainable, **options)
    return [p for _, p in trainable_parameters(model)]


class Stepper:
    """One training step of a run: loss, backward, AdamW, the adapter's per-step hook."""

    def __init__(self, model, params, lr: float, total_steps: int, is_adapter: bool):
        self.model, self.total_steps, self.is_adapter, self.step = model, total_steps, is_adapter, 0
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def __call__(self, loss: torch.Tensor) -> float:
        extra = extra_loss(self.model) if self.is_adapter else None
        total = loss + extra if extra is not None else loss
        total.backward()
        self.optimizer.step()
        self.step += 1
        if self.is_adapter:
            after_optimizer_step(self.model, self.step, self.total_steps)
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


def lm_loss(model, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())


def tensor_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def tokens_for(vocab_size: int, batch: int, seq: int, device: str) -> torch.Tensor:
    return torch.randint(3, vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(0)).to(device)


# ---- memory: one fresh process per run -----------------------------------------------------------------------------

def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def saved_activation_bytes(model: torch.nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd keeps for backward in one training forward, parameters excluded."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = lm_loss(model, tokens)
    del loss
    return sum(saved.values())


def memory_worker(args) -> None:
    """Print the run's memory numbers as JSON (the child side of `measure_memory`)."""
    model = base_llama(args.model_dir, args.device).train()
    params = prepare(model, args.worker)
    stepper = Stepper(model, params, 1e-4, total_steps=1000, is_adapter=RUNS[args.worker][0] is not None)
    tokens = tokens_for(model.config.vocab_size, args.batch, args.seq, args.device)
    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
        before = _proc_status_kib("VmRSS") * 1024
    for _ in range(args.memory_steps):
        stepper(lm_loss(model, tokens))
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else _proc_status_kib("VmHWM") * 1024
    optimizer_state = sum(t.numel() * t.element_size() for state in stepper.optimizer.state.values()
                          for t in state.values() if torch.is_tensor(t))
    gradients = sum(p.numel() * p.element_size() for p in params)
    print(json.dumps({"model_bytes": tensor_bytes(model), "peak_bytes": peak - before,
                      "state_bytes": optimizer_state + gradients,
                      "activation_bytes": saved_activation_bytes(model, tokens)}))


def measure_memory(run: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", run, "--batch", str(args.batch), "--seq", str(args.seq),
               "--memory-steps", str(args.memory_steps), "--device", args.device]
    if args.model_dir:
        command += ["--model-dir", args.model_dir]
    if args.threads:
        command += ["--threads", str(args.threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker for {run} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---- step time: all runs in this process, interleaved --------------------------------------------------------------

def measure_step_times(runs: list[str], args) -> tuple[dict, dict]:
    models, steppers, counts = {}, {}, {}
    n_base = None
    for run in runs:
        model = base_llama(args.model_dir, args.device).train()
        n_base = n_base or model.num_params()
        params = prepare(model, run)
        counts[run] = sum(p.numel() for p in params)
        models[run] = model
        steppers[run] = Stepper(model, params, 1e-4, total_steps=10_000, is_adapter=RUNS[run][0] is not None)
    tokens = tokens_for(models[runs[0]].config.vocab_size, args.batch, args.seq, args.device)
    # CPU: process CPU time, which other processes on a shared machine barely disturb (wall time swings 2x there).
    clock = time.perf_counter if args.device == "cuda" else time.process_time
    times: dict[str, list[float]] = {run: [] for run in runs}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for run in runs:
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = clock()
            steppers[run](lm_loss(models[run], tokens))
            if args.device == "cuda":
                torch.cuda.synchronize()
            if repeat:
                times[run].append(clock() - start)
    return {run: min(t) for run, t in times.items()}, {run: (c, c / n_base) for run, c in counts.items()}


# ---- LoftQ: reconstruction error and storage ------------------------------------------------------------------------

def loftq_report(args) -> None:
    """Relative error ‖W − W_q‖/‖W‖ over all projection weights: plain quantisation vs LoftQ (rank 8 and 16), and the
    quantised storage as a fraction of float32."""
    from llava.adapters.base import select_linears
    from llava.adapters.loftq import loftq_init
    from llava.adapters.quant import dequantize

    weights = [linear.weight.detach().float() for _, linear in
               select_linears(base_llama(args.model_dir, args.device), ("q_proj", "k_proj", "v_proj", "o_proj",
                                                                          "gate_proj", "up_proj", "down_proj"))]
    total = sum(float(w.norm() ** 2) for w in weights) ** 0.5
    print("\n| quantisation | storage × fp32 | plain error | LoftQ r=8, 1 iter | r=8, 5 iters | r=16, 5 iters |")
    print("|---|---:|---:|---:|---:|---:|")
    for bits in (4, 8):
        errors, stored = [], 0
        for rank, iterations in ((0, 0), (8, 1), (8, 5), (16, 5)):
            squared = 0.0
            for w in weights:
                q, left, right = loftq_init(w, bits, 64, max(rank, 1), iterations)
                approx = dequantize(q) + (left @ right if left is not None else 0)
                squared += float((w - approx).norm() ** 2)
                stored += q.nbytes() if rank == 0 else 0
            errors.append(squared ** 0.5 / total)
        fp32 = sum(4 * w.numel() for w in weights)
        print(f"| {'NF4' if bits == 4 else 'int8'} (blocks of 64) | {stored / fp32:.3f} | "
              + " | ".join(f"{e:.4f}" for e in errors) + " |")


# ---- quality after the same number of stage-2 steps ----------------------------------------------------------------

def quality(runs: list[str], args, lrs: dict[str, float]) -> dict[str, tuple[float, float]]:
    """{run: (held-out answer-token loss, next-token accuracy)} after `args.steps` steps on the same batches."""
    from llava.constants import IGNORE_INDEX
    from llava.data.collate import Collator
    from llava.data.instruct import InstructDataset
    def load():
        return load_llava(args.model_dir, args.device)

    probe = load()
    tokenizer = probe.load_tokenizer()
    data = InstructDataset(args.data, tokenizer, image_folder=args.image_folder,
                           image_processor=probe.image_processor(), template=probe.config.template,
                           max_len=probe.config.max_len, num_image_tokens=probe.num_image_tokens)
    n_eval = min(args.eval_samples, len(data) // 2)
    n_train = len(data) - n_eval
    collate = Collator(pad_id=tokenizer.pad_id)
    order = torch.randint(n_train, (args.steps, args.batch), generator=torch.Generator().manual_seed(0))
    eval_batches = [list(range(i, min(i + args.batch, len(data)))) for i in range(n_train, len(data), args.batch)]
    del probe

    def to_device(batch):
        return {k: batch[k].to(args.device) if batch[k] is not None else None
                for k in ("input_ids", "labels", "attention_mask", "images")}

    results = {}
    for run in runs:
        model = load().train()
        params = prepare(model, run, extra_trainable=("projector",))
        stepper = Stepper(model, params, lrs[run], total_steps=args.steps, is_adapter=RUNS[run][0] is not None)
        for indices in order.tolist():
            stepper(model(**to_device(collate([data[i] for i in indices])))["loss"])
        model.eval()
        loss_sum = correct = total = 0.0
        with torch.no_grad():
            for indices in eval_batches:
                batch = to_device(collate([data[i] for i in indices]))
                out = model(**batch, return_logits=True)
                _, label_rows = model.prepare_inputs_embeds(batch["input_ids"], batch["images"],
                                                            batch["attention_mask"], batch["labels"],
                                                            model.config.max_len)
                targets = torch.nn.utils.rnn.pad_sequence(label_rows, batch_first=True,
                                                          padding_value=IGNORE_INDEX)[:, 1:]
                supervised = targets != IGNORE_INDEX
                predictions = out["logits"][:, :-1].argmax(-1)
                correct += float((predictions == targets)[supervised].sum())
                total += float(supervised.sum())
                loss_sum += float(out["loss"]) * float(out["num_tokens"])
        if total == 0:
            raise SystemExit(f"{args.data}: the held-out samples have no supervised tokens (answers cut off at the "
                             f"model's max_len {model.config.max_len}?)")
        results[run] = (loss_sum / total, correct / total)
        print(f"  {run}: loss {results[run][0]:.4f}, accuracy {results[run][1]:.3f}", flush=True)
    return results


# ---- main ----------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of: {', '.join(RUNS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed steps per run (interleaved)")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--model-dir", default=None,
                        help="a stage-1 (align) output directory or a LlavaModel directory (or a Hugging Face LLaMA directory "
                             "for the table only)")
    parser.add_argument("--data", default=None, help="LLaVA instruction JSON: adds the quality comparison")
    parser.add_argument("--image-folder", default=None)
    parser.add_argument("--steps", type=int, default=200, help="stage-2 steps per method for the quality comparison")
    parser.add_argument("--eval-samples", type=int, default=200)
    parser.add_argument("--lr", action="append", default=[], metavar="RUN=LR", help="learning rate for one run")
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 memory step, batch 4, seq 64")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        memory_worker(args)
        return 0
    if args.quick:
        args.repeats, args.memory_steps, args.batch, args.seq = 2, 1, 4, 64
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    if "full" not in runs:
        runs.insert(0, "full")  # the reference every ratio is taken against
    lrs = {run: lr for run, (_, _, lr) in RUNS.items()}
    for item in args.lr:
        run, _, value = item.partition("=")
        if run not in RUNS or not value:
            parser.error(f"--lr {item!r}: expected RUN=VALUE with RUN one of {', '.join(RUNS)}")
        lrs[run] = float(value)
    if args.data and not args.model_dir:
        parser.error("--data needs --model-dir (a LlavaModel directory to start every method from)")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.device}; batch {args.batch} x "
          f"seq {args.seq}; {'model ' + args.model_dir if args.model_dir else f'config {BENCH_CONFIG}'}", flush=True)
    step_times, counts = measure_step_times(runs, args)
    memory = {run: measure_memory(run, args) for run in runs}
    memory_kind = "CUDA max_memory_allocated" if args.device == "cuda" else "peak RSS"
    print(f"\n| run | trainable params | % of base | model MiB | grads + AdamW MiB | saved activations MiB "
          f"| training peak MiB ({memory_kind} above start) | peak × full | step time × full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    full_peak, full_time = memory["full"]["peak_bytes"], step_times["full"]
    for run in runs:
        count, share = counts[run]
        m = memory[run]
        print(f"| {run} | {count:,} | {100 * share:.3f} | {m['model_bytes'] / 2**20:.1f} | "
              f"{m['state_bytes'] / 2**20:.1f} | {m['activation_bytes'] / 2**20:.1f} | {m['peak_bytes'] / 2**20:.1f} | "
              f"{m['peak_bytes'] / full_peak:.2f} | {step_times[run] / full_time:.2f} |")
    print(f"\nfull fine-tuning step: {1000 * full_time:.1f} ms {'wall' if args.device == 'cuda' else 'CPU'} time "
          f"(fastest of {args.repeats})")
    loftq_report(args)

    if args.data:
        print(f"\nquality after {args.steps} stage-2 steps (batch {args.batch}), held-out {args.eval_samples} samples:")
        scores = quality(runs, args, lrs)
        print("\n| run | lr | held-out loss | answer-token accuracy |\n|---|---:|---:|---:|")
        for run in runs:
            print(f"| {run} | {lrs[run]:g} | {scores[run][0]:.4f} | {scores[run][1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
