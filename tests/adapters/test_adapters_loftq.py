"""LoftQ: NF4/int8 block quantisation in plain torch, the alternating init beating plain quantisation, and the memory
that quantised storage really saves."""
from __future__ import annotations

import pytest
import torch

from adapter_cases import batch, tiny_llama
from llava.adapters import apply_adapter
from llava.adapters.loftq import LoftQLinear, loftq_init
from llava.adapters.quant import dequantize, nf4_code_book, quantize

# bitsandbytes' NF4 table (functional.py, `get_4bit_type("nf4")`), as published with QLoRA.
BNB_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
           -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
           0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023,
           1.0]


def test_nf4_code_book_is_bitsandbytes():
    torch.testing.assert_close(nf4_code_book(), torch.tensor(BNB_NF4), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_roundtrip_is_nearest_code(bits):
    w = torch.randn(37, 23)  # 851 values: not a multiple of the block, so the last block is padded
    q = quantize(w, bits=bits, block_size=64)
    assert q.codes.dtype == torch.uint8
    back = dequantize(q)
    assert back.shape == w.shape
    blocks = torch.nn.functional.pad(w.flatten(), (0, 64 * 14 - 851)).view(14, 64)
    absmax = blocks.abs().amax(1)
    torch.testing.assert_close(q.absmax, absmax)
    # every value is within half the widest code gap (times its block's absmax) of the original
    gap = (nf4_code_book().diff().max() if bits == 4 else torch.tensor(1 / 127)) / 2
    bound = (absmax[:, None] * gap).expand(14, 64).flatten()[:851].view_as(w)
    assert ((back - w).abs() <= bound + 1e-6).all()
    expected_bytes = 64 * 14 // 2 if bits == 4 else 64 * 14  # whole blocks, two 4-bit codes per byte
    assert q.codes.numel() == expected_bytes and q.absmax.numel() == 14


@pytest.mark.parametrize("bits", [4, 8])
def test_loftq_error_is_below_plain_quantisation(bits):
    w = torch.randn(96, 64) * 0.02
    plain = (w - dequantize(quantize(w, bits))).norm()
    errors = []
    for iterations in (1, 4):
        q, left, right = loftq_init(w, bits, 64, r=8, iterations=iterations)
        errors.append((w - dequantize(q) - left @ right).norm())
    assert errors[0] < plain * 0.95, (errors, plain)
    assert errors[1] <= errors[0] * 1.01
    print(f"\n{bits}-bit: plain {plain:.4g}, LoftQ(1) {errors[0]:.4g}, LoftQ(4) {errors[1]:.4g}")


def test_loftq_model_is_closer_to_full_precision_and_stores_less():
    ids = batch()
    with torch.no_grad():
        full = tiny_llama()(ids)
        loftq = apply_adapter(tiny_llama(), "loftq", r=8, alpha=8, iterations=2)
        qlora = apply_adapter(tiny_llama(), "loftq", r=8, alpha=8, iterations=0)
        err_loftq = (loftq(ids) - full).norm()
        err_plain = (qlora(ids) - full).norm()
    assert err_loftq < err_plain, (err_loftq, err_plain)

    layers = [m for m in loftq.modules() if isinstance(m, LoftQLinear)]
    assert len(layers) == 2 * 7
    assert not any(name.endswith("proj.weight") for name, _ in loftq.named_parameters())  # float weights are gone
    quantised = sum(m.quant_codes.nbytes + m.quant_absmax.nbytes for m in layers)
    full_bytes = sum(4 * m.in_features * m.out_features for m in layers)
    assert quantised < 0.35 * full_bytes, quantised / full_bytes
    int8 = apply_adapter(tiny_llama(), "loftq", r=8, bits=8)
    int8_bytes = sum(m.quant_codes.nbytes + m.quant_absmax.nbytes for m in int8.modules() if isinstance(m, LoftQLinear))
    assert int8_bytes < 0.3 * full_bytes


def test_lora_scaling_is_honoured():
    """peft ignores alpha/r in LoftQ's init; here Q + s·B·A is the LoftQ approximation whatever alpha is."""
    linear = torch.nn.Linear(64, 32, bias=False)
    products = []
    for alpha in (4.0, 64.0):
        layer = LoftQLinear(linear, r=4, alpha=alpha, dropout=0.0, rslora=False, bits=4, block_size=64, iterations=1)
        products.append(layer.delta_weight())
    torch.testing.assert_close(products[0], products[1], rtol=1e-4, atol=1e-6)
    q, left, right = loftq_init(linear.weight, 4, 64, r=4, iterations=1)
    torch.testing.assert_close(products[0], left @ right, rtol=1e-4, atol=1e-6)
