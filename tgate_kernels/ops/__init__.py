"""Fused kernels for what a transformer block does after the gate.

After the T-GATE gate step a ``BasicTransformerBlock``'s cross-attention output is a
cached tensor, so between self-attention and the feed-forward only this remains::

    h = hidden + (gate * attn_out if gate is given else attn_out) + cross
    n = layer_norm(h, weight, bias, eps)            # over the last dim; affine optional
    if scale is given: n = n * (1 + scale) + shift  # PixArt's adaLN modulation
    return h, n

:func:`post_gate_residual_norm` does it in one pass over memory
(``torch.ops.tgate.post_gate_residual_norm``): a C++ kernel on CPU, a Triton kernel on
CUDA, and the plain-PyTorch :func:`reference_post_gate_residual_norm` anywhere a fused
kernel is missing (with one :class:`KernelFallbackWarning` per backend).  Use
:func:`kernel_status` / :func:`kernels_available` to see which one runs.

Shapes: ``hidden``, ``attn_out``, ``cross`` are ``(B, N, D)`` or ``(rows, D)``;
``gate``, ``scale``, ``shift`` are ``(B, 1, D)`` (per batch item, broadcast over the N
tokens without being materialised), ``(1, 1, D)`` or ``(D,)``; ``weight``, ``bias`` are
``(D,)``.  All tensors share one dtype (float32, float16 or bfloat16) and device; the
kernels accumulate in float32 and return contiguous tensors in the input dtype.
Non-contiguous inputs are accepted: the C++ kernel compacts them first, the Triton kernel
reads them through their strides (copying only a tensor whose last dimension is strided).
``n`` is the normalisation of the returned ``h`` after rounding to the input dtype.
Inference only: the op has no backward.

Importing this module is cheap: it loads the C++ extension if built, never triton.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._library import (
    POST_GATE_RESIDUAL_NORM_SCHEMA,
    KernelFallbackWarning,
    kernel_status,
    kernels_available,
)
from ._reference import reference_post_gate_residual_norm

__all__ = [
    "POST_GATE_RESIDUAL_NORM_SCHEMA",
    "KernelFallbackWarning",
    "kernel_status",
    "kernels_available",
    "post_gate_residual_norm",
    "reference_post_gate_residual_norm",
]


def post_gate_residual_norm(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual additions + LayerNorm (+ adaLN modulation); returns ``(h, n)``.

    See the module docstring for the semantics and accepted shapes.  SD/SDXL blocks pass
    ``norm3``'s ``weight``, ``bias`` and ``eps``; PixArt blocks pass ``gate=gate_msa``,
    ``scale=scale_mlp``, ``shift=shift_mlp`` and ``norm2``'s ``eps`` (no affine).
    """
    return torch.ops.tgate.post_gate_residual_norm(
        hidden, attn_out, cross, gate, weight, bias, float(eps), scale, shift
    )
