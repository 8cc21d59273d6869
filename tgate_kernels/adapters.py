"""Per-pipeline-family knowledge: data, not copies of pipelines.

What differs between the pipelines T-GATE supports is small: where the denoisers are (a UNet or
a transformer, plus any ControlNet, whose own cross-attention is gated too), which half of the
CFG batch the reference keeps after the gate (the negative-prompt half, except for SVD's
per-frame guidance, which keeps the conditional half), and how the pipeline says whether it
runs classifier-free guidance. Every pipeline built on the same denoisers (img2img, inpaint,
ControlNet, IP-Adapter, LoRA) needs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention

SUPPORTED_PIPELINES = (
    "Stable Diffusion 1.x/2.x and SDXL pipelines (text-to-image, img2img, inpaint, ControlNet, "
    "IP-Adapter, LoRA, LCM), PixArt-α/Σ (and PixArt-LCM), Stable Video Diffusion: any pipeline whose "
    "denoiser (`unet` or `transformer`) has separate cross-attention layers"
)


@dataclass(frozen=True)
class PipelineParts:
    """The modules T-GATE hooks in one pipeline."""

    denoiser: torch.nn.Module
    auxiliary_denoisers: tuple[torch.nn.Module, ...]
    cfg_half: str

    @property
    def denoisers(self) -> tuple[torch.nn.Module, ...]:
        return (self.denoiser, *self.auxiliary_denoisers)

    def attention_modules(self) -> list[torch.nn.Module]:
        seen: set[int] = set()
        found = []
        for denoiser in self.denoisers:
            for module in denoiser.modules():
                if is_cacheable_attention(module) and id(module) not in seen:
                    seen.add(id(module))
                    found.append(module)
        return found


def is_cacheable_attention(module: torch.nn.Module) -> bool:
    """An attention whose whole output can be cached: not one that adds its own residual or
    rescales (the UNets of DeepFloyd IF, UnCLIP, Kandinsky), where caching the output would
    freeze the residual stream too."""
    return (
        isinstance(module, (Attention, AttentionModuleMixin))
        and not getattr(module, "residual_connection", False)
        and getattr(module, "rescale_output_factor", 1.0) == 1.0
        and getattr(module, "spatial_norm", None) is None
        and getattr(module, "added_kv_proj_dim", None) is None
    )


def _keeps_conditional_half(denoiser: torch.nn.Module) -> bool:
    from diffusers import UNetSpatioTemporalConditionModel

    return isinstance(denoiser, UNetSpatioTemporalConditionModel)


def pipeline_parts(pipe) -> PipelineParts:
    """The denoisers of ``pipe``; raises a ``ValueError`` naming what is supported otherwise."""
    denoiser = None
    for attr in ("unet", "transformer"):
        candidate = getattr(pipe, attr, None)
        if isinstance(candidate, torch.nn.Module):
            denoiser = candidate
            break
    if denoiser is None:
        raise ValueError(
            f"`pipe` ({type(pipe).__name__}) has no `unet` or `transformer` denoiser module. "
            f"T-GATE supports {SUPPORTED_PIPELINES}."
        )
    attentions = [m for m in denoiser.modules() if is_cacheable_attention(m)]
    if not any(getattr(m, "is_cross_attention", False) for m in attentions):
        raise ValueError(
            f"`pipe` ({type(pipe).__name__}) has a denoiser ({type(denoiser).__name__}) without separate "
            f"cross-attention layers whose output can be cached (joint attention, as in SD3 or FLUX, and "
            f"attention that adds its own residual, as in DeepFloyd IF, cannot be gated). "
            f"T-GATE supports {SUPPORTED_PIPELINES}."
        )
    controlnet = getattr(pipe, "controlnet", None)
    auxiliary = (controlnet,) if isinstance(controlnet, torch.nn.Module) else ()
    cfg_half = "second" if _keeps_conditional_half(denoiser) else "first"
    return PipelineParts(denoiser=denoiser, auxiliary_denoisers=auxiliary, cfg_half=cfg_half)


def pipeline_uses_cfg(pipe) -> bool | None:
    """Whether the running generation uses a CFG batch, as the pipeline says; ``None`` when the
    pipeline does not say (then the first denoiser call decides)."""
    if not isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property):
        return None
    try:
        return bool(pipe.do_classifier_free_guidance)
    except (AttributeError, TypeError, RuntimeError):
        return None
