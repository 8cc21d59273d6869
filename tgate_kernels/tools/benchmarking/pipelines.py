"""Real pipeline classes around a real-architecture denoiser, without text encoders or VAE.

The prompt embeddings are passed in with the shapes the text encoders produce, and the latents
come out (``output_type="latent"``): what runs is the pipeline's own input handling, scheduler,
guidance arithmetic and denoising loop, which is all T-GATE touches.
"""

from __future__ import annotations

import torch

from .architectures import Architecture


def _scheduler(arch: Architecture):
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler

    betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if arch.scheduler == "LCMScheduler":
        return LCMScheduler(**betas)
    return DPMSolverMultistepScheduler(**betas)


def build_timing_pipeline(arch: Architecture, denoiser: torch.nn.Module):
    """The architecture's pipeline class around ``denoiser``, without text encoders or VAE
    (prompt embeddings are passed in; latents come out)."""
    import diffusers

    pipeline_class = getattr(diffusers, arch.pipeline)
    components = {"scheduler": _scheduler(arch), arch.denoiser_attribute: denoiser}
    if arch.is_unet:
        components.update(vae=None, text_encoder=None, tokenizer=None, feature_extractor=None, image_encoder=None)
        if arch.pooled_text_dim is not None:
            components.update(text_encoder_2=None, tokenizer_2=None, add_watermarker=False)
        else:
            components.update(safety_checker=None, requires_safety_checker=False)
    else:
        components.update(vae=None, text_encoder=None, tokenizer=None)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_call_kwargs(arch: Architecture, resolution: int, steps: int, device, dtype, seed: int = 0) -> dict:
    """Arguments of one call: given prompt embeddings of the shapes the text encoders make."""
    make = dict(device=device, dtype=dtype)
    generator = torch.Generator("cpu").manual_seed(seed)
    embeds = torch.randn(1, arch.text_tokens, arch.text_dim, generator=generator).to(**make)
    negative = torch.randn(1, arch.text_tokens, arch.text_dim, generator=generator).to(**make)
    kwargs = dict(
        height=resolution,
        width=resolution,
        num_inference_steps=steps,
        output_type="latent",
        generator=torch.Generator("cpu").manual_seed(seed),
        prompt_embeds=embeds,
    )
    if arch.is_unet:
        kwargs["guidance_scale"] = 7.5 if arch.cfg else 1.0
        if arch.cfg:
            kwargs["negative_prompt_embeds"] = negative
        if arch.pooled_text_dim is not None:
            kwargs["pooled_prompt_embeds"] = torch.randn(1, arch.pooled_text_dim, generator=generator).to(**make)
            if arch.cfg:
                kwargs["negative_pooled_prompt_embeds"] = torch.randn(1, arch.pooled_text_dim, generator=generator).to(**make)
        return kwargs
    mask = torch.ones(1, arch.text_tokens, **make)
    kwargs.update(
        guidance_scale=4.5 if arch.cfg else 0.0,
        prompt_attention_mask=mask,
        use_resolution_binning=False,
        clean_caption=False,
    )
    if arch.cfg:
        # PixArt's default negative prompt is "", which may not be given along with embeddings.
        kwargs.update(negative_prompt=None, negative_prompt_embeds=negative, negative_prompt_attention_mask=mask)
    return kwargs
