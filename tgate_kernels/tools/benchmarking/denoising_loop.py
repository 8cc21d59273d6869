"""Driving a denoiser through a whole generation without a pipeline around it.

T-GATE's engine learns the step from a pipeline's ``progress_bar(total=n)``, the latent batch
from its ``prepare_latents`` and the guidance from its ``do_classifier_free_guidance`` property.
:class:`DenoisingLoop` offers exactly that and nothing else (no text encoder, VAE or scheduler), so a full-size denoiser can run a generation
on the ``meta`` device, where counting its MACs costs no compute. The pipeline's own work
between denoiser calls (scheduler update, guidance arithmetic) is elementwise and holds no MACs.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch

from .architectures import Architecture


class _SilentProgressBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    def update(self, n: int = 1) -> None:
        pass


def denoiser_inputs(
    arch: Architecture,
    batch: int,
    resolution: int | None = None,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float32,
) -> tuple[tuple, dict[str, Any]]:
    """Positional and keyword arguments of one denoiser call on a batch of ``batch`` latents,
    shaped as the architecture's pipeline builds them."""
    height, width = arch.latent_size(resolution)
    make = dict(device=device, dtype=dtype)
    text = torch.zeros(batch, arch.text_tokens, arch.text_dim, **make)
    mask = torch.ones(batch, arch.text_tokens, **make)
    timestep = torch.full((batch,), 500, device=device, dtype=torch.long)
    channels = arch.latent_channels
    if arch.is_unet:
        kwargs: dict[str, Any] = {"encoder_hidden_states": text}
        if arch.pooled_text_dim is not None:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.zeros(batch, arch.pooled_text_dim, **make),
                "time_ids": torch.zeros(batch, 6, **make),
            }
        if arch.time_cond_dim is not None:
            kwargs["timestep_cond"] = torch.zeros(batch, arch.time_cond_dim, **make)
        return (torch.zeros(batch, channels, height, width, **make), timestep), kwargs
    if arch.denoiser_class == "WanTransformer3DModel":
        sample = torch.zeros(batch, channels, arch.latent_frames, height, width, **make)
        return (sample,), {"encoder_hidden_states": text, "timestep": timestep}
    if arch.denoiser_class == "LTXVideoTransformer3DModel":
        frames = arch.latent_frames
        sample = torch.zeros(batch, frames * height * width, channels, **make)
        spatial, temporal = arch.latent_spatial_factor, arch.latent_temporal_factor
        return (sample,), {
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
            "timestep": timestep,
            "num_frames": frames,
            "height": height,
            "width": width,
            # what LTXPipeline passes at its default 25 frames per second
            "rope_interpolation_scale": (temporal / 25, spatial, spatial),
        }
    if arch.denoiser_class == "HunyuanVideoTransformer3DModel":
        sample = torch.zeros(batch, channels, arch.latent_frames, height, width, **make)
        kwargs = {
            "encoder_hidden_states": text,
            "encoder_attention_mask": mask,
            "pooled_projections": torch.zeros(batch, int(arch.denoiser_config["pooled_projection_dim"]), **make),
        }
        if arch.denoiser_config.get("guidance_embeds"):
            kwargs["guidance"] = torch.full((batch,), 6000.0, **make)  # the pipeline's default 6.0, times 1000
        return (sample, timestep), kwargs
    if arch.denoiser_class == "CogVideoXTransformer3DModel":
        return _cogvideox_inputs(arch, batch, height, width, text, make, timestep)
    if arch.denoiser_class in ("FluxTransformer2DModel", "QwenImageTransformer2DModel"):
        return _packed_latent_inputs(arch, batch, height, width, text, make, timestep)
    sample = torch.zeros(batch, channels, height, width, **make)
    if arch.denoiser_class == "SD3Transformer2DModel":
        pooled = torch.zeros(batch, int(arch.denoiser_config["pooled_projection_dim"]), **make)
        return (sample,), {"encoder_hidden_states": text, "pooled_projections": pooled, "timestep": timestep}
    kwargs = {"encoder_hidden_states": text, "encoder_attention_mask": mask, "timestep": timestep}
    if arch.denoiser_class == "PixArtTransformer2DModel":
        conditions = {"resolution": None, "aspect_ratio": None}
        if arch.uses_additional_conditions:
            conditions = {"resolution": torch.zeros(batch, 2, **make), "aspect_ratio": torch.zeros(batch, 1, **make)}
        kwargs["added_cond_kwargs"] = conditions
    return (sample,), kwargs


def _cogvideox_inputs(arch: Architecture, batch: int, height: int, width: int, text, make, timestep):
    """CogVideoX's call: latents frames first; with RoPE, the (cos, sin) tables the pipeline
    computes for the video tokens (their values do not change the cost)."""
    config = arch.denoiser_config
    sample = torch.zeros(batch, arch.latent_frames, arch.latent_channels, height, width, **make)
    kwargs: dict[str, Any] = {"encoder_hidden_states": text, "timestep": timestep}
    if config.get("use_rotary_positional_embeddings"):
        patch = int(config["patch_size"])
        tokens = arch.latent_frames * (height // patch) * (width // patch)
        table = torch.zeros(tokens, int(config["attention_head_dim"]), **make)
        kwargs["image_rotary_emb"] = (table, table)
    return (sample,), kwargs


def _packed_latent_inputs(arch: Architecture, batch: int, height: int, width: int, text, make, timestep):
    """FLUX's and Qwen-Image's call: latents packed 2x2 into tokens, positions as their pipelines
    build them (FLUX: ids per token; Qwen-Image: the latent grid per image), the timestep as a
    fraction."""
    config = arch.denoiser_config
    rows, columns = height // 2, width // 2
    sample = torch.zeros(batch, rows * columns, arch.latent_channels, **make)
    timestep = timestep.to(make["dtype"]) / 1000
    if arch.denoiser_class == "QwenImageTransformer2DModel":
        return (sample,), {
            "encoder_hidden_states": text,
            "encoder_hidden_states_mask": torch.ones(batch, arch.text_tokens, **make),
            "timestep": timestep,
            "img_shapes": [[(1, rows, columns)]] * batch,
        }
    image_ids = torch.zeros(rows, columns, 3)
    image_ids[..., 1] += torch.arange(rows)[:, None]
    image_ids[..., 2] += torch.arange(columns)[None, :]
    kwargs = {
        "encoder_hidden_states": text,
        "pooled_projections": torch.zeros(batch, int(config["pooled_projection_dim"]), **make),
        "timestep": timestep,
        "img_ids": image_ids.reshape(rows * columns, 3).to(make["device"]),
        "txt_ids": torch.zeros(arch.text_tokens, 3, device=make["device"]),
    }
    if config.get("guidance_embeds"):
        kwargs["guidance"] = torch.full((batch,), 3.5, **make)
    return (sample,), kwargs


class DenoisingLoop:
    """A pipeline-shaped object holding only a denoiser: ``tgate_kernels.enable`` accepts it.

    Made through ``DenoisingLoop(arch, ...)``, it is an instance of a subclass named after the
    architecture's pipeline, so that T-GATE finds that pipeline's family for it."""

    def __new__(cls, arch: Architecture, *args, **kwargs):
        if cls is DenoisingLoop and arch.pipeline:
            cls = _named_loop(arch.pipeline)
        return super().__new__(cls)

    def __init__(self, arch: Architecture, denoiser: torch.nn.Module, cfg: bool) -> None:
        self.arch = arch
        self._cfg = cfg
        self.scheduler = SimpleNamespace(timesteps=torch.zeros(0, dtype=torch.long))
        setattr(self, arch.denoiser_attribute, denoiser)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self, self.arch.denoiser_attribute)

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._cfg

    def progress_bar(self, iterable=None, total=None):
        return _SilentProgressBar() if iterable is None else iterable

    def prepare_latents(self, sample: torch.Tensor) -> torch.Tensor:
        """The latents of the prompts: the first part of the (guided) sample."""
        return sample[: sample.shape[0] // (2 if self._cfg else 1)]

    @torch.no_grad()
    def run(self, steps: int, resolution: int | None = None, device: str | torch.device = "meta", dtype=torch.float32, on_step=None,
            prompts: int = 1) -> None:
        """One generation of ``prompts`` images in ``steps`` solver steps, one denoiser call each;
        ``on_step(step)`` runs after each call."""
        args, kwargs = denoiser_inputs(self.arch, prompts * (2 if self._cfg else 1), resolution, device, dtype)
        self.prepare_latents(args[0])
        # Step-aware helpers (DeepCache) find the step by looking the call's timestep up in the
        # scheduler's timesteps, as in a pipeline: UNets get the step's timestep as a 0-dim CPU
        # tensor, which they move to the sample's device themselves.
        self.scheduler.timesteps = torch.linspace(999, 0, steps).long()
        with self.progress_bar(total=steps) as bar:
            for step in range(steps):
                if self.arch.is_unet:
                    args = (args[0], self.scheduler.timesteps[step])
                self.denoiser(*args, **kwargs)
                if on_step is not None:
                    on_step(step)
                bar.update()


@functools.cache
def _named_loop(pipeline: str) -> type:
    return type(pipeline, (DenoisingLoop,), {"__doc__": f"A denoising loop standing for {pipeline}."})
