"""The modules T-GATE hooks in a pipeline, and the pipeline's guidance as its family knows it.

Every component with separate cross-attention is a denoiser T-GATE hooks: a UNet or transformer,
a second expert, a ControlNet (whose own cross-attention is gated too). What else differs
between pipelines is the family's (:mod:`tgate_kernels.families`).
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

import torch

from .attention_modules import AttentionKind, HookableAttention, adds_own_residual, hookable_attentions, is_attention, is_joint_attention
from ..config import KeptPart
from ..families.registry import Conditioning, Family, batched_parts, family_of, says_guided
from .guidance import GuidanceTracker

SUPPORTED_PIPELINES = (
    "any pipeline whose denoisers have separate cross-attention layers: Stable Diffusion 1.x/2.x and SDXL "
    "(text-to-image, img2img, inpaint, ControlNet, IP-Adapter, LoRA, LCM, PAG, InstructPix2Pix), Kolors, PixArt-α/Σ, "
    "Sana, Hunyuan-DiT, Lumina-Next, Stable Video Diffusion, AnimateDiff, Latte, Allegro, LTX-Video, Wan 2.1/2.2, "
    "SkyReels-V2, Cosmos, Kandinsky 5, Stable Audio; and of the joint-attention families, Stable Diffusion 3/3.5 "
    "(text-to-image, img2img, inpaint, ControlNet), FLUX.1 (with img2img, inpaint, Fill, Kontext, Control, ControlNet), "
    "FLUX.2, Chroma, AuraFlow, Qwen-Image (with img2img, inpaint), HunyuanVideo, CogVideoX, Mochi, HiDream-I1 and Lumina 2"
)


@dataclass(frozen=True)
class Denoiser:
    """A pipeline component T-GATE hooks. ``main`` denoisers predict the noise; auxiliary ones
    (ControlNets) feed them."""

    attribute: str
    module: torch.nn.Module
    main: bool
    attentions: tuple[HookableAttention, ...]


@dataclass(frozen=True)
class PipelineParts:
    """The modules T-GATE hooks in one pipeline."""

    denoisers: tuple[Denoiser, ...]
    family: Family

    def components(self) -> dict[str, torch.nn.Module]:
        return {d.attribute: d.module for d in self.denoisers}


def components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's modules by attribute (its registered components, or its attributes)."""
    found = getattr(pipe, "components", None)
    if not isinstance(found, dict):
        found = vars(pipe)
    return {name: value for name, value in found.items() if isinstance(value, torch.nn.Module)}


def check_pipeline(pipe, *, runs: bool = False) -> None:
    """A ``TypeError`` naming ``pipe`` unless it is an object with components T-GATE could hook
    (and, with ``runs``, a ``progress_bar`` T-GATE can follow its steps by); a ``ValueError`` for
    a pipeline whose loop or guidance T-GATE would read wrongly."""
    if not hasattr(pipe, "__dict__") or (runs and not callable(getattr(pipe, "progress_bar", None))):
        raise TypeError(
            f"`pipe` must be a diffusers pipeline (an object with a `progress_bar` method and a denoiser such as "
            f"`unet` or `transformer`), got {reprlib.repr(pipe)} of type {type(pipe).__name__}."
        )
    refused = family_of(pipe).refused
    if refused is not None:
        raise ValueError(f"T-GATE does not support {type(pipe).__name__}: {refused}. Nothing was changed.")


def check_settings(pipe, config) -> None:
    """A ``ValueError`` naming what ``config`` lacks for ``pipe``'s family, if it lacks anything."""
    needs = family_of(pipe).needs
    lacking = needs(config) if needs is not None else None
    if lacking is not None:
        raise ValueError(f"T-GATE on {type(pipe).__name__} needs {lacking}. Nothing was changed.")


def pipeline_parts(pipe) -> PipelineParts:
    """The denoisers of ``pipe``; a ``ValueError`` saying what the pipeline has otherwise."""
    modules = components(pipe)
    conventional = next((modules[a] for a in ("unet", "transformer") if a in modules), None)
    family = family_of(pipe, conventional)
    joint = family.conditioning is Conditioning.JOINT_ATTENTION
    denoisers = []
    for attribute, module in modules.items():
        attentions = tuple(hookable_attentions(module, text_streams=joint))
        if any(a.cross for a in attentions):
            denoisers.append(Denoiser(attribute, module, not attribute.startswith("controlnet"), attentions))
    if not any(d.main for d in denoisers):
        raise ValueError(_refusal(pipe, modules))
    denoisers.sort(key=lambda d: not d.main)
    return PipelineParts(tuple(denoisers), family)


def _refusal(pipe, components: dict[str, torch.nn.Module]) -> str:
    name = type(pipe).__name__
    conventional = [components[a] for a in ("unet", "transformer") if a in components]
    if not conventional:
        return (
            f"`pipe` ({name}) has no `unet` or `transformer` denoiser with separate cross-attention layers. "
            f"T-GATE supports {SUPPORTED_PIPELINES}."
        )
    denoiser = conventional[0]
    attentions = [m for m in denoiser.modules() if is_attention(m)]
    if not attentions:
        what = "no attention layers at all"
    elif any(adds_own_residual(m) and getattr(m, "is_cross_attention", False) for m in attentions):
        what = "cross-attention that adds its own residual (as in DeepFloyd IF), whose output cannot be cached alone"
    elif any(is_joint_attention(m) for m in attentions):
        what = ("joint attention, where image and text tokens attend together (as in FLUX and QwenImage), in a family "
                "T-GATE does not support yet")
    else:
        what = (
            f"{len(attentions)} attention layers, none of them a separate cross-attention: each attends within one "
            f"sequence (Lumina2's joins image and text tokens: joint attention)"
        )
    return (
        f"`pipe` ({name}) has a denoiser ({type(denoiser).__name__}) without separate cross-attention layers: it has "
        f"{what}. T-GATE caches cross-attention, so it supports {SUPPORTED_PIPELINES}."
    )


def guidance_tracker(pipe, parts: PipelineParts, kept: KeptPart) -> GuidanceTracker:
    family = parts.family
    return GuidanceTracker(
        type(pipe).__name__,
        lambda k: batched_parts(pipe, family, k),
        family.kept,
        kept,
        calls_per_step=lambda: int(getattr(getattr(pipe, "scheduler", None), "order", 1) or 1),
        guided_now=lambda: says_guided(pipe),
    )
