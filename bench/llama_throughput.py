"""Throughput of `llava.model.Llama` against `transformers.LlamaForCausalLM` on the same weights, in one run.

Measures, on CPU fp32 by default:
- training step (forward + cross-entropy + backward) tokens/s, as a ratio to transformers and as a fraction of the
  fp32 matmul peak measured here (MFU: 6·N + 12·L·d·T FLOPs per token, N = non-embedding parameters + lm_head);
- greedy decode tokens/s at batch 1 (ours: `llava.generate.generate`; theirs: `model.generate` with its KV cache,
  `min_new_tokens = max_new_tokens`), as a ratio and as a fraction of the bandwidth roofline
  (bandwidth of a matrix-vector product over a matrix as large as the weights / weight bytes read per token).

Ours and theirs alternate in every repeat and medians are reported, so load from other processes hits both alike.

    python bench/llama_throughput.py            # ~2-4 minutes on 2 cores
    python bench/llama_throughput.py --quick    # fewer repeats, for a smoke run
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from llava.generate import GenerationConfig, generate
from llava.model import Llama, LlamaConfig

# ~27M parameters, LLaMA-2 shape (multi-head attention, SwiGLU 2.75x), a small vocabulary.
BENCH_CONFIG = LlamaConfig(dim=512, n_layers=6, n_heads=8, n_kv_heads=8, ffn_hidden=1408, vocab_size=8192,
                           max_seq_len=1024, eos_id=None, bos_id=1)


def build_models(config: LlamaConfig, seed: int = 0):
    """A random transformers model and ours loaded from its save_pretrained directory (same weights)."""
    import transformers

    torch.manual_seed(seed)
    hf_config = transformers.LlamaConfig(
        hidden_size=config.dim, num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads, intermediate_size=config.ffn_hidden, vocab_size=config.vocab_size,
        max_position_embeddings=config.max_seq_len, rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0, attn_implementation="sdpa")
    theirs = transformers.LlamaForCausalLM(hf_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = Llama.from_hf(tmp)
    ours.config.eos_id = None  # decode runs the full length, as theirs does with min_new_tokens
    return ours, theirs


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = min(timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def matvec_bandwidth_gbs(n_bytes: int, cols: int = 4096, repeats: int = 10) -> float:
    """Bytes/s streaming a matrix of `n_bytes` through a matrix-vector product (the decode access pattern)."""
    rows = max(1, n_bytes // (4 * cols))
    m, x = torch.randn(rows, cols), torch.randn(cols)
    torch.mv(m, x)
    best = min(timed(lambda: torch.mv(m, x)) for _ in range(repeats))
    return rows * cols * 4 / best / 1e9


def train_step(model, tokens, hf: bool) -> None:
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    logits = model(input_ids=inputs).logits if hf else model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    for p in model.parameters():
        p.grad = None


def decode_ours(model, prompt, n_new: int) -> int:
    out = generate(model, [prompt], config=GenerationConfig(max_new_tokens=n_new))
    return len(out[0])


def decode_theirs(model, prompt, n_new: int) -> int:
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new, min_new_tokens=n_new,
                         do_sample=False, pad_token_id=0)
    return out.shape[1] - ids.shape[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256, help="training sequence length")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps per repeat")
    parser.add_argument("--prompt", type=int, default=16, help="decode prompt length")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 train step, 32 new tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.train_steps, args.new_tokens = 2, 1, 32
    if args.threads:
        torch.set_num_threads(args.threads)

    config = BENCH_CONFIG
    ours, theirs = build_models(config)
    tokens = torch.randint(3, config.vocab_size, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - theirs(input_ids=tokens).logits).abs().max().item()
    n_embed = config.vocab_size * config.dim
    n_params = ours.num_params()
    n_flop_params = n_params - n_embed  # embedding lookups are not matmuls; lm_head is
    weight_bytes = n_flop_params * 4  # decode reads every weight but the embedding table once per token
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; config dim={config.dim} "
          f"layers={config.n_layers} heads={config.n_heads}/{config.n_kv_heads} ffn={config.ffn_hidden} "
          f"vocab={config.vocab_size}: {n_params / 1e6:.1f}M params; max |logit diff| vs transformers {diff:.1e}")

    train_times = {"ours": [], "theirs": []}
    decode_times = {"ours": [], "theirs": []}
    prompt = tokens[0, :args.prompt].tolist()
    peaks, bandwidths = [], []
    for model, hf in ((ours, False), (theirs, True)):  # warm up both paths once
        model.train()
        train_step(model, tokens, hf)
        model.eval()
    decode_ours(ours, prompt, 8)
    decode_theirs(theirs, prompt, 8)
    for r in range(args.repeats):
        peaks.append(matmul_peak_gflops())
        bandwidths.append(matvec_bandwidth_gbs(weight_bytes))
        order = (("ours", ours, False), ("theirs", theirs, True))
        for name, model, hf in order if r % 2 == 0 else order[::-1]:
            model.train()
            train_times[name].append(timed(lambda: [train_step(model, tokens, hf) for _ in range(args.train_steps)])
                                     / args.train_steps)
            model.eval()
        for name, model, hf in order if r % 2 == 0 else order[::-1]:
            decode = decode_theirs if hf else decode_ours
            n = []
            decode_times[name].append(timed(lambda: n.append(decode(model, prompt, args.new_tokens))) / n[0])

    peak, bandwidth = statistics.median(peaks), statistics.median(bandwidths)
    train_tokens = args.batch * args.seq
    flops_per_token = 6 * n_flop_params + 12 * config.n_layers * config.dim * args.seq
    roofline = bandwidth * 1e9 / weight_bytes
    print(f"fp32 matmul peak (2048^3 mm): {peak:.1f} GFLOP/s; matrix-vector bandwidth: {bandwidth:.1f} GB/s; "
          f"decode roofline {roofline:.0f} tok/s ({weight_bytes / 1e6:.0f} MB of weights per token)")
    print(f"{'':26}{'ours':>10}{'transformers':>14}{'ratio':>8}{'(best)':>8}   fraction of the physical limit")
    for label, times, work, limit, limit_name in (
            ("train tokens/s (fwd+bwd)", train_times, train_tokens, peak * 1e9 / flops_per_token, "matmul peak (MFU)"),
            ("greedy decode tokens/s", decode_times, 1, roofline, "bandwidth roofline")):
        speed = {k: work / statistics.median(v) for k, v in times.items()}
        best = {k: work / min(v) for k, v in times.items()}
        print(f"{label:26}{speed['ours']:10.1f}{speed['theirs']:14.1f}{speed['ours'] / speed['theirs']:7.2f}x"
              f"{best['ours'] / best['theirs']:7.2f}x   ours {speed['ours'] / limit:.0%}, "
              f"transformers {speed['theirs'] / limit:.0%} of the {limit_name}")
    print(f"(batch {args.batch} x {args.seq} tokens per training step; decode batch 1, prompt {args.prompt}, "
          f"{args.new_tokens} new tokens; medians of {args.repeats} interleaved repeats, (best) = ratio of the fastest runs)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
