"""Round a tensor to a narrower floating dtype exactly once, on every machine.

Why this exists: bake and merge accumulate W + Σ s·ΔW in fp64 and then store the result in the checkpoint's dtype
(fp16, bf16, fp8 …). torch converts fp64 to those dtypes *through fp32* (c10's Half/BFloat16/Float8 types are
built from a float), so the value is rounded twice: first to fp32's 24 bits, then to the target. Double rounding
is wrong whenever the first rounding lands exactly on a halfway point of the target — the second then breaks the
tie to even, away from the true value — and whether that happens depends on the accumulated fp64 bits, which can
differ between CPUs (FMA, BLAS kernels). So the same bake could differ by an ulp from one machine to another.

The fix is the classic round-to-odd step: round fp64 → fp32 toward zero and set the last bit when anything was
lost ("sticky" bit). fp32 has at least two more bits than fp16, bf16 and the fp8 kinds, and then the ordinary
round-to-nearest-even conversion fp32 → target gives exactly the correctly rounded result of the fp64 value
(Boldo & Melquiond, "When double rounding is odd", 2005). fp64 → fp32 itself is a single hardware rounding.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

_NARROW = frozenset(
    getattr(torch, name)
    for name in ("float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def fp32_round_to_odd(x: Tensor) -> Tensor:
    """fp64 → fp32 rounded toward zero with a sticky last bit (the exact value's rounding is preserved)."""
    y = x.to(torch.float32)  # round to nearest even
    back = y.to(torch.float64)
    inexact = (back != x) & torch.isfinite(x)
    bits = y.view(torch.int32)  # sign-magnitude: one less in the low 31 bits is one ulp toward zero
    bits = torch.where(inexact & (back.abs() > x.abs()), bits - 1, bits)
    bits = torch.where(inexact, bits | 1, bits)
    return bits.view(torch.float32)


def round_to(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, rounded once from its exact value (see the module docstring)."""
    if x.dtype == torch.float64 and dtype in _NARROW:
        return fp32_round_to_odd(x).to(dtype)
    return x.to(dtype)


def needs_odd_step(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether a plain ``copy_`` from ``src`` to ``dst`` would round twice."""
    return src == torch.float64 and dst in _NARROW
