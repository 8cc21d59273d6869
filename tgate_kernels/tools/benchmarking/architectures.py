"""The real architectures the benchmarks run, from the configs shipped in ``tgate_kernels/tools/benchmarking/configs``.

Each denoiser config is the published diffusers ``config.json`` of the checkpoint; weights are
random, because neither MACs nor latency depend on their values. ``benchmarks.json`` holds, per
architecture, the settings of the published T-GATE benchmark (resolution, steps, gate step, CFG,
DeepCache) and the numbers of its table. More manifests of the same format (``--architectures``
of ``tgate-kernels bench``) add architectures of one's own; their configs are found beside them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ...config import TgateConfig

_CONFIG_PACKAGE = "tgate_kernels.tools.benchmarking.configs"
_MANIFEST_NAME = "benchmarks.json"


@dataclass(frozen=True)
class PublishedRow:
    """One row of the published T-GATE table (``None`` where it gives no number)."""

    macs: float | None
    params: float | None
    latency_s: float | None


@dataclass(frozen=True)
class Architecture:
    name: str
    label: str
    denoiser_class: str
    denoiser_config: dict
    pipeline: str
    reference_loader: str
    resolution: int
    text_tokens: int
    steps: int
    gate_step: int
    cfg: bool
    sp_interval: int = 5
    warm_up: int = 2
    deepcache: dict | None = None
    scheduler: str | None = None
    width: int | None = None
    frames: int | None = None
    latent_spatial_factor: int = 8
    latent_temporal_factor: int = 1
    timeable: bool = True
    """Whether ``bench`` can time it in its pipeline (else it is a MACs/params row only)."""
    published_baseline: PublishedRow | None = None
    published_tgate: PublishedRow | None = None

    @property
    def latent_frames(self) -> int | None:
        """Frames of the latent video (a causal video VAE keeps the first frame apart)."""
        return None if self.frames is None else (self.frames - 1) // self.latent_temporal_factor + 1

    def latent_size(self, resolution: int | None = None) -> tuple[int, int]:
        """(height, width) of the latents; ``resolution`` replaces the height and keeps the aspect."""
        height = resolution or self.resolution
        width = (self.width or self.resolution) * height // self.resolution
        return height // self.latent_spatial_factor, width // self.latent_spatial_factor

    @property
    def text_streams(self) -> bool:
        """Whether T-GATE caches the text stream of this denoiser's joint-attention blocks."""
        from ...families.registry import Conditioning, family_of_pipeline

        return family_of_pipeline(self.pipeline).conditioning is Conditioning.JOINT_ATTENTION

    @property
    def is_unet(self) -> bool:
        return self.denoiser_class == "UNet2DConditionModel"

    @property
    def denoiser_attribute(self) -> str:
        return "unet" if self.is_unet else "transformer"

    @property
    def latent_channels(self) -> int:
        return int(self.denoiser_config.get("in_channels", 4))

    @property
    def text_dim(self) -> int:
        """Width of the text-encoder states the pipeline feeds the denoiser."""
        config = self.denoiser_config
        if self.is_unet:
            return int(config["cross_attention_dim"])
        return int(
            config.get("caption_channels") or config.get("text_dim") or config.get("text_embed_dim")
            or config["joint_attention_dim"]
        )

    @property
    def pooled_text_dim(self) -> int | None:
        """SDXL's pooled text embedding: what the micro-conditioning projection takes besides the
        six Fourier-embedded size/crop scalars."""
        if self.denoiser_config.get("addition_embed_type") != "text_time":
            return None
        config = self.denoiser_config
        return int(config["projection_class_embeddings_input_dim"]) - 6 * int(config["addition_time_embed_dim"])

    @property
    def time_cond_dim(self) -> int | None:
        value = self.denoiser_config.get("time_cond_proj_dim")
        return int(value) if value else None

    @property
    def uses_additional_conditions(self) -> bool:
        """PixArt-α at 1024 px takes resolution and aspect-ratio conditions (the model decides
        from its sample size when the config leaves it unset)."""
        if self.is_unet:
            return False
        value = self.denoiser_config.get("use_additional_conditions")
        return bool(value) if value is not None else self.denoiser_config.get("sample_size") == 128

    def tgate_config(self, gate_step: int | None = None, deepcache: bool = True) -> TgateConfig:
        """The published setting of this row (its DeepCache too, unless ``deepcache=False``)."""
        return TgateConfig(
            gate_step=self.gate_step if gate_step is None else gate_step,
            sp_interval=self.sp_interval,
            warm_up=self.warm_up,
            deepcache=self.deepcache if deepcache else None,
        )

    def build_denoiser(self, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """The denoiser with random weights (on ``meta`` it costs neither memory nor time)."""
        import diffusers

        model_class = getattr(diffusers, self.denoiser_class)
        config = {k: v for k, v in self.denoiser_config.items() if not k.startswith("_")}
        previous_dtype = torch.get_default_dtype()
        # Building in the target dtype avoids a cast (and diffusers' warning about casting).
        torch.set_default_dtype(dtype if dtype.is_floating_point else previous_dtype)
        try:
            with torch.device(device):
                model = model_class(**config)
        finally:
            torch.set_default_dtype(previous_dtype)
        return model.eval().requires_grad_(False)


def _published_row(data: dict | None) -> PublishedRow | None:
    if data is None:
        return None
    return PublishedRow(macs=data.get("macs"), params=data.get("params"), latency_s=data.get("latency_s"))


def _read_manifest(manifest: str, read_beside) -> dict[str, Architecture]:
    """Architectures of one manifest (its text); ``read_beside(filename)`` reads a config beside it."""
    found: dict[str, Architecture] = {}
    for name, entry in json.loads(manifest)["models"].items():
        config = json.loads(read_beside(entry["denoiser_config"]))
        published = entry.get("published") or {}
        found[name] = Architecture(
            name=name,
            label=entry["label"],
            denoiser_class=config["_class_name"],
            denoiser_config=config,
            pipeline=entry["pipeline"],
            reference_loader=entry["reference_loader"],
            resolution=int(entry["resolution"]),
            text_tokens=int(entry["text_tokens"]),
            steps=int(entry["steps"]),
            gate_step=int(entry["gate_step"]),
            cfg=bool(entry["cfg"]),
            sp_interval=int(entry.get("sp_interval", 5)),
            warm_up=int(entry.get("warm_up", 2)),
            deepcache=entry.get("deepcache"),
            scheduler=entry.get("scheduler"),
            width=entry.get("width"),
            frames=entry.get("frames"),
            latent_spatial_factor=int(entry.get("latent_spatial_factor", 8)),
            latent_temporal_factor=int(entry.get("latent_temporal_factor", 1)),
            timeable=bool(entry.get("timeable", entry.get("deepcache") is None)),
            published_baseline=_published_row(published.get("baseline")),
            published_tgate=_published_row(published.get("tgate")),
        )
    return found


@functools.lru_cache(maxsize=None)
def architectures(extra_manifests: tuple[str, ...] = ()) -> dict[str, Architecture]:
    """Every architecture by its CLI name: the shipped ones, then those of ``extra_manifests``
    (paths of ``benchmarks.json`` files), in manifest order."""
    package = resources.files(_CONFIG_PACKAGE)

    def shipped(filename: str) -> str:
        return package.joinpath(filename).read_text(encoding="utf-8")

    found = _read_manifest(shipped(_MANIFEST_NAME), shipped)
    for manifest in map(Path, extra_manifests):
        found.update(_read_manifest(manifest.read_text(encoding="utf-8"), lambda name, folder=manifest.parent: (folder / name).read_text(encoding="utf-8")))
    return found


def architecture(name: str, extra_manifests: tuple[str, ...] = ()) -> Architecture:
    known = architectures(extra_manifests)
    try:
        return known[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(known)}") from None
