"""Parameters of a denoiser, and the share T-GATE no longer touches after the gate.

After the gate every cross-attention output is reused, so its projections (``to_q``, ``to_k``,
``to_v``, ``to_out``) sit idle, and so does the ``norm2`` that feeds cross-attention in each
transformer block. The published table's "params w/ T-GATE" column leaves out the
cross-attention projections only; both numbers are given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...engine.attention_modules import hookable_attentions


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParamsCount:
    total: int
    cross_attention: int
    cross_attention_norms: int

    @property
    def after_gate_published_convention(self) -> int:
        """Parameters still used after the gate when only cross-attention is taken out."""
        return self.total - self.cross_attention

    @property
    def after_gate(self) -> int:
        """Parameters still used after the gate (cross-attention and its ``norm2`` taken out)."""
        return self.total - self.cross_attention - self.cross_attention_norms


def denoiser_params(denoiser: torch.nn.Module) -> ParamsCount:
    modules = dict(denoiser.named_modules())
    cross = norms = 0
    for attention in hookable_attentions(denoiser):
        if not attention.cross:
            continue
        cross += _count(attention.module)
        parent = modules[attention.name.rpartition(".")[0]]
        norm2 = getattr(parent, "norm2", None)
        if getattr(parent, "attn2", None) is attention.module and isinstance(norm2, torch.nn.Module):
            norms += _count(norm2)
    return ParamsCount(total=_count(denoiser), cross_attention=cross, cross_attention_norms=norms)
