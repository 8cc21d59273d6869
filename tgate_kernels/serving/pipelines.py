"""How the step batcher drives each kind of pipeline it serves: what a request's guidance rows
carry, how the denoiser is called on rows of many requests, how a prediction is guided and how
finished latents become images, each as the pipeline's own ``__call__`` does it for one prompt.

A request's conditioning is a dict of per-row tensors, ``[negative, prompt]`` with guidance
(``[prompt]`` without): after its gate the request runs the negative part's row alone, the part
T-GATE keeps for these pipelines (as the reference does).
"""

from __future__ import annotations

from typing import Any

import torch


class ServedPipeline:
    """One kind of pipeline: Stable Diffusion 1.x/2.x (the base class), SDXL, PixArt."""

    classes: tuple[str, ...] = ("StableDiffusionPipeline",)
    denoiser = "unet"

    def __init__(self, pipe) -> None:
        self.pipe = pipe

    @property
    def model(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser)

    @property
    def latent_channels(self) -> int:
        return self.model.config.in_channels

    def default_size(self) -> int:
        return self.model.config.sample_size * self.pipe.vae_scale_factor

    def conditioning(self, request, guided: bool, height: int, width: int) -> dict[str, torch.Tensor]:
        prompt, negative = self.pipe.encode_prompt(request.prompt, self.pipe._execution_device, 1, guided, request.negative_prompt)
        return {"encoder_hidden_states": torch.cat([negative, prompt]) if guided else prompt}

    def predict(self, sample: torch.Tensor, timesteps: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(sample, timesteps, encoder_hidden_states=rows["encoder_hidden_states"], return_dict=False)[0]

    def guide(self, noise: torch.Tensor, guidance_scale: float) -> torch.Tensor:
        """A request's prediction from its rows of the denoiser's output."""
        if noise.shape[0] == 2:
            unconditional, text = noise.chunk(2)
            noise = unconditional + guidance_scale * (text - unconditional)
        return noise

    def step_output(self, steps: int) -> int:
        """Which output of the scheduler's step is the next latents."""
        return 0

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Images of ``latents`` (-1..1) and the safety checker's verdicts (``None`` without one)."""
        pipe = self.pipe
        images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        return pipe.run_safety_checker(images, latents.device, latents.dtype)


class ServedSDXL(ServedPipeline):
    classes = ("StableDiffusionXLPipeline",)

    def conditioning(self, request, guided: bool, height: int, width: int) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
            request.prompt, device=pipe._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=guided,
            negative_prompt=request.negative_prompt,
        )
        projection = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
        time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=prompt.dtype,
                                          text_encoder_projection_dim=projection).to(prompt.device)
        if not guided:
            return {"encoder_hidden_states": prompt, "text_embeds": pooled, "time_ids": time_ids}
        return {
            "encoder_hidden_states": torch.cat([negative, prompt]),
            "text_embeds": torch.cat([negative_pooled, pooled]),
            "time_ids": torch.cat([time_ids, time_ids]),
        }

    def predict(self, sample, timesteps, rows):
        added = {"text_embeds": rows["text_embeds"], "time_ids": rows["time_ids"]}
        return self.model(sample, timesteps, encoder_hidden_states=rows["encoder_hidden_states"], added_cond_kwargs=added,
                          return_dict=False)[0]

    def decode(self, latents):
        pipe = self.pipe
        config = pipe.vae.config
        if getattr(config, "latents_mean", None) is not None and getattr(config, "latents_std", None) is not None:
            mean = torch.tensor(config.latents_mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
            latents = latents * std / config.scaling_factor + mean
        else:
            latents = latents / config.scaling_factor
        images = pipe.vae.decode(latents, return_dict=False)[0]
        if pipe.watermark is not None:
            images = pipe.watermark.apply_watermark(images)
        return images, None


class ServedPixArt(ServedPipeline):
    classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")
    denoiser = "transformer"

    def conditioning(self, request, guided: bool, height: int, width: int) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        # the pipeline call's defaults: "" as the negative prompt, captions cleaned where bs4 and ftfy are installed
        prompt, mask, negative, negative_mask = pipe.encode_prompt(
            request.prompt, guided, negative_prompt=request.negative_prompt or "", num_images_per_prompt=1,
            device=pipe._execution_device, clean_caption=True,
        )
        rows = {
            "encoder_hidden_states": torch.cat([negative, prompt]) if guided else prompt,
            "encoder_attention_mask": torch.cat([negative_mask, mask]) if guided else mask,
        }
        if self.model.config.sample_size == 128:  # PixArt-α 1024 px takes the size as a condition
            parts = 2 if guided else 1
            rows["resolution"] = torch.tensor([[height, width]] * parts, dtype=prompt.dtype, device=prompt.device)
            rows["aspect_ratio"] = torch.tensor([[height / width]] * parts, dtype=prompt.dtype, device=prompt.device)
        return rows

    def predict(self, sample, timesteps, rows):
        added = {"resolution": rows.get("resolution"), "aspect_ratio": rows.get("aspect_ratio")}
        return self.model(sample, encoder_hidden_states=rows["encoder_hidden_states"],
                          encoder_attention_mask=rows["encoder_attention_mask"], timestep=timesteps,
                          added_cond_kwargs=added, return_dict=False)[0]

    def guide(self, noise, guidance_scale):
        noise = super().guide(noise, guidance_scale)
        if self.model.config.out_channels // 2 == self.latent_channels:  # learned sigma: the mean alone
            noise = noise.chunk(2, dim=1)[0]
        return noise

    def step_output(self, steps: int) -> int:
        return 1 if steps == 1 else 0  # as PixArt's pipeline: a one-step generation takes the denoised sample

    def decode(self, latents):
        pipe = self.pipe
        return pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0], None


SERVED = (ServedPipeline, ServedSDXL, ServedPixArt)


def served_pipeline(pipe) -> ServedPipeline | None:
    """How the batcher drives ``pipe`` (a subclass of a served class is served as it), or ``None``."""
    names = [cls.__name__ for cls in type(pipe).__mro__]
    for name in names:
        for served in SERVED:
            if name in served.classes:
                return served(pipe)
    return None


def served_class_names() -> list[str]:
    return [name for served in SERVED for name in served.classes]
