"""Parameters of a denoiser, and the share T-GATE no longer touches after the gate.

After the gate every cross-attention output is reused, so its projections (``to_q``, ``to_k``,
``to_v``, ``to_out``) sit idle, and so does the ``norm2`` that feeds cross-attention in each
transformer block. The seed document's "params w/ T-GATE" column leaves out the cross-attention
projections only; both numbers are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParamsCount:
    total: int
    cross_attention: int
    cross_attention_norms: int

    @property
    def after_gate_seed_convention(self) -> int:
        """Parameters still used after the gate when only cross-attention is taken out."""
        return self.total - self.cross_attention

    @property
    def after_gate(self) -> int:
        """Parameters still used after the gate (cross-attention and its ``norm2`` taken out)."""
        return self.total - self.cross_attention - self.cross_attention_norms


def denoiser_params(denoiser: torch.nn.Module) -> ParamsCount:
    cross = 0
    norms = 0
    for module in denoiser.modules():
        if hasattr(module, "processor") and getattr(module, "is_cross_attention", False):
            cross += _count(module)
        attn2 = getattr(module, "attn2", None)
        norm2 = getattr(module, "norm2", None)
        if getattr(attn2, "is_cross_attention", False) and isinstance(norm2, torch.nn.Module):
            norms += _count(norm2)
    return ParamsCount(total=_count(denoiser), cross_attention=cross, cross_attention_norms=norms)
