"""Triton kernel for ``tgate::post_gate_residual_norm`` (the CUDA backend).

One program handles one row of D elements, as in Triton's layer-norm tutorial: the
row is loaded once from each input, summed and normalised in registers, and both
outputs are stored once.  The row length of every supported model (D <= 1280) fits a
single block, so there is no loop over D.

Importing this module imports triton; ``_library`` does so lazily, on the first CUDA
call.  The launcher also runs on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported), which is how the
kernel is tested on machines without a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from ._reference import check_inputs, modulation_rows

# One block covers the whole row; beyond this a looped kernel would be needed.
MAX_ROW_LENGTH = 16384


@triton.jit
def _post_gate_residual_norm_kernel(
    hidden_ptr,
    attn_ptr,
    cross_ptr,
    gate_ptr,
    weight_ptr,
    bias_ptr,
    scale_ptr,
    shift_ptr,
    h_out_ptr,
    n_out_ptr,
    rows_per_batch,
    d,
    hidden_stride_b,
    hidden_stride_n,
    hidden_stride_d,
    attn_stride_b,
    attn_stride_n,
    attn_stride_d,
    cross_stride_b,
    cross_stride_n,
    cross_stride_d,
    gate_row_stride,
    scale_row_stride,
    shift_row_stride,
    eps,
    HAS_GATE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MODULATION: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch = row // rows_per_batch
    token = row % rows_per_batch
    cols = tl.arange(0, BLOCK_D)
    mask = cols < d
    out_offsets = row * d + cols

    # hidden/attn/cross are read exactly once, through their own strides (no copy is made of a
    # non-contiguous input): don't let them displace the small per-channel operands that every
    # row reuses.
    x = tl.load(
        hidden_ptr + batch * hidden_stride_b + token * hidden_stride_n + cols * hidden_stride_d,
        mask=mask, other=0.0, eviction_policy="evict_first",
    ).to(tl.float32)
    a = tl.load(
        attn_ptr + batch * attn_stride_b + token * attn_stride_n + cols * attn_stride_d,
        mask=mask, other=0.0, eviction_policy="evict_first",
    ).to(tl.float32)
    c = tl.load(
        cross_ptr + batch * cross_stride_b + token * cross_stride_n + cols * cross_stride_d,
        mask=mask, other=0.0, eviction_policy="evict_first",
    ).to(tl.float32)
    if HAS_GATE:
        g = tl.load(gate_ptr + batch * gate_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        a = g * a
    h = (x + a) + c

    # Normalise the h that is returned (rounded to the output dtype), so that
    # n == layer_norm(h) holds for the tensors the caller sees; same as the C++ kernel.
    h_rounded = h.to(h_out_ptr.dtype.element_ty)
    tl.store(h_out_ptr + out_offsets, h_rounded, mask=mask)
    h = h_rounded.to(tl.float32)

    mean = tl.sum(h, axis=0) / d
    centred = tl.where(mask, h - mean, 0.0)
    var = tl.sum(centred * centred, axis=0) / d
    rstd = 1.0 / tl.sqrt(var + eps)
    n = centred * rstd
    if HAS_WEIGHT:
        n = n * tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        n = n + tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_MODULATION:
        s = tl.load(scale_ptr + batch * scale_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(shift_ptr + batch * shift_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
        n = n * (1.0 + s) + t
    tl.store(n_out_ptr + out_offsets, n.to(n_out_ptr.dtype.element_ty), mask=mask)


def _unit_stride(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``t`` with consecutive channels adjacent in memory (already so for the views blocks pass)."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _row_stride(t: Optional[torch.Tensor], name: str, hidden: torch.Tensor) -> int:
    """Elements between consecutive batch items' modulation rows (0 when shared)."""
    if t is None:
        return 0
    return t.stride(0) if modulation_rows(t, name, hidden) > 1 else 0


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, channel) strides of a (B, N, D) tensor; a (rows, D) one is one batch."""
    if t.dim() == 3:
        return t.stride(0), t.stride(1), t.stride(2)
    return 0, t.stride(0), t.stride(1)


def post_gate_residual_norm_triton(
    hidden: torch.Tensor,
    attn_out: torch.Tensor,
    cross: torch.Tensor,
    gate: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel; same positional signature as the operator schema.

    Every input is read through its strides (PixArt's modulation rows are views into one
    table); only a per-channel operand whose channels are not adjacent is copied. Outputs are
    contiguous.
    """
    check_inputs(hidden, attn_out, cross, gate, weight, bias, scale, shift)
    d = hidden.shape[-1]
    if d > MAX_ROW_LENGTH:
        raise RuntimeError(
            f"tgate::post_gate_residual_norm: the Triton kernel supports rows of at most "
            f"{MAX_ROW_LENGTH} elements; `hidden` has D = {d}"
        )
    rows = hidden.numel() // d
    rows_per_batch = hidden.shape[1] if hidden.dim() == 3 else rows
    gate, weight, bias, scale, shift = (_unit_stride(t) for t in (gate, weight, bias, scale, shift))
    gate_row_stride = _row_stride(gate, "gate", hidden)
    scale_row_stride = _row_stride(scale, "scale", hidden)
    shift_row_stride = _row_stride(shift, "shift", hidden)
    h_out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    n_out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if rows == 0:
        return h_out, n_out

    block_d = triton.next_power_of_2(d)
    num_warps = min(max(block_d // 256, 1), 8)
    # Absent operands are never dereferenced (their HAS_* flag is off), but every
    # pointer argument needs a tensor.
    placeholder = h_out
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _post_gate_residual_norm_kernel[(rows,)](
            hidden,
            attn_out,
            cross,
            gate if gate is not None else placeholder,
            weight if weight is not None else placeholder,
            bias if bias is not None else placeholder,
            scale if scale is not None else placeholder,
            shift if shift is not None else placeholder,
            h_out,
            n_out,
            rows_per_batch,
            d,
            *_strides(hidden),
            *_strides(attn_out),
            *_strides(cross),
            gate_row_stride,
            scale_row_stride,
            shift_row_stride,
            float(eps),
            HAS_GATE=gate is not None,
            HAS_WEIGHT=weight is not None,
            HAS_BIAS=bias is not None,
            HAS_MODULATION=scale is not None,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return h_out, n_out
