"""Per-pipeline-family knowledge: data, not copies of pipelines.

What differs between the pipelines T-GATE supports is small: which components are denoisers
(every component with separate cross-attention: a UNet or transformer, a second expert, a
ControlNet, whose own cross-attention is gated too), what each part of a guided batch holds
(:mod:`.guidance`), which part the reference keeps after the gate, and how the pipeline says
whether it guides. Every pipeline built on the same denoisers (img2img, inpaint, ControlNet,
IP-Adapter, LoRA) needs nothing more.
"""

from __future__ import annotations

import reprlib
from dataclasses import dataclass

import torch

from ..engine.attention_modules import AttentionKind, HookableAttention, adds_own_residual, hookable_attentions, is_attention, is_joint_attention
from ..engine.guidance import NEGATIVE, PERTURBED, PROMPT, UNCONDITIONAL, GuidanceTracker, KeptPart

SUPPORTED_PIPELINES = (
    "any pipeline whose denoisers have separate cross-attention layers: Stable Diffusion 1.x/2.x and SDXL "
    "(text-to-image, img2img, inpaint, ControlNet, IP-Adapter, LoRA, LCM, PAG, InstructPix2Pix), Kolors, PixArt-α/Σ, "
    "Sana, Hunyuan-DiT, Lumina-Next, Stable Video Diffusion, AnimateDiff, Latte, Allegro, LTX-Video, Wan 2.1/2.2, "
    "SkyReels-V2, Cosmos, Kandinsky 5, Stable Audio"
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

    def components(self) -> dict[str, torch.nn.Module]:
        return {d.attribute: d.module for d in self.denoisers}


def components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's modules by attribute (its registered components, or its attributes)."""
    found = getattr(pipe, "components", None)
    if not isinstance(found, dict):
        found = vars(pipe)
    return {name: value for name, value in found.items() if isinstance(value, torch.nn.Module)}


_CANNOT_READ = {
    "Cosmos2_5_TransferPipeline": "one progress bar spans every chunk of the video, so a gate would fall inside the first "
                                  "chunk and the later chunks would reuse its cached cross-attention",
    "LEditsPPPipelineStableDiffusion": "its batch holds an unconditional part and one part per edit concept, not a "
                                       "negative prompt and a prompt: dropping that guidance after the gate drops the edits",
    "LEditsPPPipelineStableDiffusionXL": "its batch holds an unconditional part and one part per edit concept, not a "
                                         "negative prompt and a prompt: dropping that guidance after the gate drops the edits",
    "Kandinsky3Pipeline": "its UNet builds self-attention layers as cross-attention modules, which T-GATE would freeze "
                          "after the gate",
    "Kandinsky3Img2ImgPipeline": "its UNet builds self-attention layers as cross-attention modules, which T-GATE would "
                                 "freeze after the gate",
}
"""Pipelines with separate cross-attention whose loop or guidance T-GATE would read wrongly."""


def check_pipeline(pipe, *, runs: bool = False) -> None:
    """A ``TypeError`` naming ``pipe`` unless it is an object with components T-GATE could hook
    (and, with ``runs``, a ``progress_bar`` T-GATE can follow its steps by); a ``ValueError`` for
    a pipeline whose loop or guidance T-GATE would read wrongly."""
    if not hasattr(pipe, "__dict__") or (runs and not callable(getattr(pipe, "progress_bar", None))):
        raise TypeError(
            f"`pipe` must be a diffusers pipeline (an object with a `progress_bar` method and a denoiser such as "
            f"`unet` or `transformer`), got {reprlib.repr(pipe)} of type {type(pipe).__name__}."
        )
    for name, why in _CANNOT_READ.items():
        if _is_instance(pipe, name):
            raise ValueError(f"T-GATE does not support {type(pipe).__name__}: {why}. Nothing was changed.")


def pipeline_parts(pipe) -> PipelineParts:
    """The denoisers of ``pipe``; a ``ValueError`` saying what the pipeline has otherwise."""
    modules = components(pipe)
    denoisers = []
    for attribute, module in modules.items():
        attentions = tuple(hookable_attentions(module))
        if any(a.kind is AttentionKind.CROSS for a in attentions):
            denoisers.append(Denoiser(attribute, module, not attribute.startswith("controlnet"), attentions))
    if not any(d.main for d in denoisers):
        raise ValueError(_refusal(pipe, modules))
    denoisers.sort(key=lambda d: not d.main)
    return PipelineParts(tuple(denoisers))


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
        what = "joint attention, where image and text tokens attend together (as in SD3, FLUX and QwenImage)"
    else:
        what = (
            f"{len(attentions)} attention layers, none of them a separate cross-attention: each attends within one "
            f"sequence (Lumina2's joins image and text tokens: joint attention)"
        )
    return (
        f"`pipe` ({name}) has a denoiser ({type(denoiser).__name__}) without separate cross-attention layers: it has "
        f"{what}. T-GATE caches cross-attention, so it supports {SUPPORTED_PIPELINES}."
    )


def says_guided(pipe) -> bool | None:
    """Whether the running generation uses classifier-free guidance, as the pipeline says;
    ``None`` when the pipeline does not say."""
    return _flag(pipe, "do_classifier_free_guidance")


def _flag(pipe, name: str) -> bool | None:
    if not isinstance(getattr(type(pipe), name, None), property):
        return None
    try:
        return bool(getattr(pipe, name))
    except (AttributeError, TypeError, RuntimeError):
        return None


def _is_instance(pipe, *class_names: str) -> bool:
    import diffusers

    classes = tuple(c for c in (getattr(diffusers, n, None) for n in class_names) if isinstance(c, type))
    return bool(classes) and isinstance(pipe, classes)


def batched_parts(pipe, parts_per_latent: int) -> tuple[str, ...] | None:
    """What each part of a guided batch holds, in batch order, for this pipeline."""
    if _is_instance(pipe, "StableDiffusionInstructPix2PixPipeline", "StableDiffusionXLInstructPix2PixPipeline"):
        # [prompt + image, negative + image, negative without image]
        return (PROMPT, NEGATIVE, UNCONDITIONAL) if parts_per_latent == 3 else None
    if _flag(pipe, "do_perturbed_attention_guidance"):
        if parts_per_latent == 3:
            return (NEGATIVE, PROMPT, PERTURBED)
        return (PROMPT, PERTURBED) if parts_per_latent == 2 else None
    if parts_per_latent == 2:
        # Lumina-Next concatenates the prompt first
        return (PROMPT, NEGATIVE) if _is_instance(pipe, "LuminaPipeline", "LuminaText2ImgPipeline") else (NEGATIVE, PROMPT)
    return None


_INTERLEAVED_TIME_IDS = (
    # torch.cat([negative_add_time_ids, add_time_ids]).repeat(batch_size * num_images_per_prompt, 1)
    "StableDiffusionXLPipeline", "StableDiffusionXLControlNetPipeline", "StableDiffusionXLControlNetUnionPipeline",
    "StableDiffusionXLAdapterPipeline", "StableDiffusionXLControlNetXSPipeline", "StableDiffusionXLPAGPipeline",
    "StableDiffusionXLControlNetPAGPipeline", "StableDiffusionXLInstructPix2PixPipeline", "KolorsPipeline",
    "KolorsImg2ImgPipeline", "KolorsPAGPipeline", "AnimateDiffSDXLPipeline", "TextToVideoZeroSDXLPipeline",
    "LEditsPPPipelineStableDiffusionXL",
)
_INTERLEAVED_META = ("HunyuanDiTPipeline", "HunyuanDiTControlNetPipeline", "HunyuanDiTPAGPipeline")


def interleaved_arguments(pipe) -> frozenset[str]:
    """The denoiser arguments ``pipe`` builds with one row per guidance part for each image in
    turn (its guidance parts concatenated, then repeated per image) instead of one block of rows
    per part. With several images these rows do not line up with the latents' parts (diffusers'
    own layout), so after the gate each image takes the kept part's row, as the reference
    gives every image the kept part's conditioning."""
    if _is_instance(pipe, *_INTERLEAVED_TIME_IDS):
        return frozenset({"added_cond_kwargs['time_ids']"})
    if _is_instance(pipe, *_INTERLEAVED_META):
        return frozenset({"image_meta_size", "style"})
    return frozenset()


def default_kept(parts: PipelineParts) -> str:
    """The part the reference keeps after the gate: the negative prompt's, except for Stable
    Video Diffusion (and I2VGen-XL, built the same way), whose negative part is an empty image
    embedding."""
    from diffusers import I2VGenXLUNet, UNetSpatioTemporalConditionModel

    main = parts.denoisers[0].module
    return PROMPT if isinstance(main, (UNetSpatioTemporalConditionModel, I2VGenXLUNet)) else NEGATIVE


def guidance_tracker(pipe, parts: PipelineParts, kept: KeptPart) -> GuidanceTracker:
    return GuidanceTracker(
        type(pipe).__name__,
        lambda k: batched_parts(pipe, k),
        default_kept(parts),
        kept,
        calls_per_step=lambda: int(getattr(getattr(pipe, "scheduler", None), "order", 1) or 1),
        guided_now=lambda: says_guided(pipe),
    )
