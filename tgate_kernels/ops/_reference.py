"""Plain-PyTorch definition of ``post_gate_residual_norm`` and its input rules.

This module is the ground truth the fused kernels are tested against, the fallback
when no fused kernel is available, and the shape/dtype logic the fake (meta)
implementation uses under ``torch.compile``.  Error messages match the C++ kernel's
(``csrc/post_gate_residual_norm.cpp``) word for word, so a bad argument reads the
same whichever backend catches it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

OP_NAME = "tgate::post_gate_residual_norm"

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


_C10_DTYPE_NAMES = {
    torch.float32: "Float",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.float64: "Double",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.bool: "Bool",
}


def _shape_str(shape) -> str:
    shape = tuple(shape)
    return "(" + ", ".join(str(s) for s in shape) + (",)" if len(shape) == 1 else ")")


def _dtype_str(dtype: torch.dtype) -> str:
    # Spelled like c10's ScalarType names so Python and C++ messages agree.
    return _C10_DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _check_same_dtype_and_device(t: torch.Tensor, name: str, hidden: torch.Tensor) -> None:
    if t.dtype != hidden.dtype:
        raise RuntimeError(
            f"{OP_NAME}: `{name}` has dtype {_dtype_str(t.dtype)} but `hidden` has dtype "
            f"{_dtype_str(hidden.dtype)}; all tensor arguments must share one dtype"
        )
    if t.device != hidden.device:
        raise RuntimeError(
            f"{OP_NAME}: `{name}` is on device {t.device} but `hidden` is on device "
            f"{hidden.device}; all tensor arguments must be on one device"
        )


def modulation_rows(t: torch.Tensor, name: str, hidden: torch.Tensor) -> int:
    """Number of distinct rows in a gate/scale/shift tensor: 1 (shared) or B (per batch item).

    Accepted shapes are (B, 1, D), (1, 1, D) or (D,) for a 3-D ``hidden`` and (1, D) or (D,)
    for a 2-D one; anything else raises, naming the argument and the allowed shapes.
    """
    _check_same_dtype_and_device(t, name, hidden)
    d = hidden.shape[-1]
    is_3d = hidden.dim() == 3
    batch = hidden.shape[0] if is_3d else 1
    if is_3d and tuple(t.shape) == (batch, 1, d):
        return batch
    if (t.dim() == 1 and t.shape[0] == d) or (
        t.dim() == hidden.dim() and t.shape[-1] == d and t.numel() == d
    ):
        return 1
    allowed = (
        f"(B, 1, D) = {_shape_str((batch, 1, d))}, (1, 1, D) or (D,)"
        if is_3d
        else f"(1, D) = {_shape_str((1, d))} or (D,)"
    )
    raise RuntimeError(
        f"{OP_NAME}: `{name}` must have shape {allowed} to broadcast over `hidden` of shape "
        f"{_shape_str(hidden.shape)}; got {_shape_str(t.shape)}"
    )


def check_inputs(
    hidden: torch.Tensor,
    attn_out: torch.Tensor,
    cross: torch.Tensor,
    gate: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
) -> None:
    """Raise ``RuntimeError`` naming the offending argument if the inputs are not valid.

    Uses only shapes, dtypes and devices, so it also runs on fake and meta tensors.
    """
    if hidden.dim() not in (2, 3):
        raise RuntimeError(
            f"{OP_NAME}: `hidden` must be 3-D (B, N, D) or 2-D (rows, D); got shape "
            f"{_shape_str(hidden.shape)}"
        )
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise RuntimeError(
            f"{OP_NAME}: `hidden` has dtype {_dtype_str(hidden.dtype)}; supported dtypes are "
            "float32, float16 and bfloat16"
        )
    if hidden.shape[-1] == 0:
        raise RuntimeError(
            f"{OP_NAME}: `hidden` must have a non-empty last dimension to normalise over; got shape "
            f"{_shape_str(hidden.shape)}"
        )
    for t, name in ((attn_out, "attn_out"), (cross, "cross")):
        _check_same_dtype_and_device(t, name, hidden)
        if t.shape != hidden.shape:
            raise RuntimeError(
                f"{OP_NAME}: `{name}` must have the same shape as `hidden` {_shape_str(hidden.shape)}; "
                f"got {_shape_str(t.shape)}"
            )
    d = hidden.shape[-1]
    for t, name in ((weight, "weight"), (bias, "bias")):
        if t is not None:
            _check_same_dtype_and_device(t, name, hidden)
            if t.dim() != 1 or t.shape[0] != d:
                raise RuntimeError(
                    f"{OP_NAME}: `{name}` must have shape (D,) = ({d},) to match the last dimension "
                    f"of `hidden`; got {_shape_str(t.shape)}"
                )
    if (scale is None) != (shift is None):
        given = "scale" if scale is not None else "shift"
        raise RuntimeError(
            f"{OP_NAME}: `scale` and `shift` must be given together (adaLN modulation "
            f"n * (1 + scale) + shift); got only `{given}`"
        )
    for t, name in ((gate, "gate"), (scale, "scale"), (shift, "shift")):
        if t is not None:
            modulation_rows(t, name, hidden)


def _per_row(t: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """View a validated gate/scale/shift so it broadcasts against ``hidden``."""
    return t.reshape(-1, 1, hidden.shape[-1]) if hidden.dim() == 3 else t.reshape(-1, hidden.shape[-1])


def reference_post_gate_residual_norm(
    hidden: torch.Tensor,
    attn_out: torch.Tensor,
    cross: torch.Tensor,
    *,
    gate: Optional[torch.Tensor] = None,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfused ``post_gate_residual_norm`` in plain PyTorch.

    Computes in ``compute_dtype`` (float32, like the kernels; the tests pass float64) and
    returns contiguous tensors in the input dtype.  ``n`` is the normalisation of the
    returned ``h`` after rounding to the input dtype, which is what the fused kernels do.
    """
    check_inputs(hidden, attn_out, cross, gate, weight, bias, scale, shift)
    out_dtype = hidden.dtype

    def up(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(compute_dtype)

    attn = up(attn_out)
    if gate is not None:
        attn = up(_per_row(gate, hidden)) * attn
    h = (up(hidden) + attn + up(cross)).to(out_dtype)
    n = F.layer_norm(up(h), (hidden.shape[-1],), up(weight), up(bias), eps)
    if scale is not None:
        n = n * (1 + up(_per_row(scale, hidden))) + up(_per_row(shift, hidden))
    return h.contiguous(), n.to(out_dtype).contiguous()
