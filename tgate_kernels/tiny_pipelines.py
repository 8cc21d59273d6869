"""Tiny, deterministic, random-weight diffusers pipelines that are built entirely offline.

These pipelines exist so that tests, the README demo and the CLI can exercise every code path of
the T-GATE integration (self/cross attention in UNets and DiTs, classifier-free guidance, ControlNet
residuals, video UNets, LCM guidance embeddings) in well under a second per generation, without
touching the Hugging Face Hub.  The component configurations follow the ``get_dummy_components``
helpers of diffusers' own pipeline tests, scaled so that every generation stays cheap on one CPU
core while keeping the structure of the real checkpoints (e.g. SD-style cross-attention at the
highest resolution, SDXL's two text encoders and ``text_time`` conditioning, PixArt's
``ada_norm_single`` DiT with a T5 encoder).

Every factory:

* seeds each component independently with ``seed`` (inside a forked RNG, so the caller's global
  torch RNG state is left untouched), hence two calls with the same seed give bit-identical
  weights and different seeds give different weights;
* returns a float32 pipeline on the CPU, in eval mode, with the progress bar disabled;
* scales the query/key projections of the denoiser's attention layers so that attention maps are
  peaked as in trained checkpoints (with default initialisation they are almost uniform, which
  would make T-GATE's cached attention indistinguishable from recomputed attention);
* produces tokenizers from files written once per process into a temporary directory, so the
  pipelines also survive ``save_pretrained`` / ``DiffusionPipeline.from_pretrained``.

Default output sizes (``height``/``width`` left to the pipeline):

================  ===========  ==================================================================
name              image size   notes
================  ===========  ==================================================================
sd                32 x 32      DDIM scheduler, as in diffusers' Stable Diffusion fast tests
sdxl              32 x 32      Euler scheduler (``timestep_spacing="leading"``), as in SDXL tests
lcm-sdxl          32 x 32      LCM scheduler, UNet with ``time_cond_proj_dim`` (no CFG batch)
pixart-alpha      256 x 256    DDIM; factor-8 VAE so the 256px aspect-ratio bins apply
pixart-sigma      256 x 256    DDIM; factor-8 VAE so the 256px aspect-ratio bins apply
svd               32 x 32      4 frames; Karras-sigma Euler v-prediction scheduler as in SVD
sd-controlnet     32 x 32      DDIM; control image at the output resolution
sdxl-controlnet   32 x 32      Euler; control image at the output resolution
================  ===========  ==================================================================

The PixArt transformers use ``sample_size=32`` because the PixArt pipelines only have
aspect-ratio bins for sample sizes 32/64/128 (and 256 for Sigma) and raise for any other size
while ``use_resolution_binning=True`` (their default).  Binning snaps every requested size to the
nearest aspect ratio of the 256px table (256x256 for square images), which with the factor-8 VAE
is a 32x32 latent, i.e. 256 transformer tokens.  Pass ``use_resolution_binning=False`` to generate
at other sizes (multiples of 16 pixels).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "SCHEDULERS",
    "TINY_IMAGE_SIZE",
    "TINY_PIPELINES",
    "TINY_PIXART_IMAGE_SIZE",
    "TINY_SVD_NUM_FRAMES",
    "make_scheduler",
    "tiny_generation_kwargs",
    "tiny_image",
    "tiny_lcm_sdxl",
    "tiny_pipeline",
    "tiny_pixart_alpha",
    "tiny_pixart_sigma",
    "tiny_sd",
    "tiny_sd_controlnet",
    "tiny_sdxl",
    "tiny_sdxl_controlnet",
    "tiny_svd",
]

# Side length in pixels of the images produced by the UNet-based tiny pipelines and of the
# conditioning images they expect.  The VAEs of those pipelines downsample by 2, so latents are
# 16 x 16 and the second UNet level runs at 8 x 8.
TINY_IMAGE_SIZE = 32
# PixArt pipelines snap sizes to 256px aspect-ratio bins by default (see module docstring).
TINY_PIXART_IMAGE_SIZE = 256
TINY_SVD_NUM_FRAMES = 4

# CLIP text encoders need as many position embeddings as the tokenizer pads to.
_CLIP_MAX_LENGTH = 77
_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_TEXT_HIDDEN = 32
_SDXL_ADDITION_TIME_EMBED_DIM = 8
# SDXL's UNet receives 6 micro-conditioning scalars (original size, crop offset, target size),
# each Fourier-embedded to `addition_time_embed_dim`, concatenated with the pooled text embedding
# of the second text encoder (its projection dim).
_SDXL_PROJECTION_INPUT_DIM = 6 * _SDXL_ADDITION_TIME_EMBED_DIM + _CLIP_TEXT_HIDDEN
_LCM_TIME_COND_PROJ_DIM = 32

# Multiplies query and key projections of the denoisers' attention layers, i.e. the attention
# logits by its square (see `_sharpen_attention`).
_ATTENTION_QK_GAIN = 4.0

_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"
_T5_MAX_LENGTH = 512
_T5_HIDDEN = 32


# --------------------------------------------------------------------------------------------
# Schedulers
# --------------------------------------------------------------------------------------------


def _scheduler_classes() -> dict[str, type]:
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        HeunDiscreteScheduler,
        KDPM2DiscreteScheduler,
        LCMScheduler,
        PNDMScheduler,
        UniPCMultistepScheduler,
    )

    return {
        "ddim": DDIMScheduler,
        "ddpm": DDPMScheduler,
        "dpm": DPMSolverMultistepScheduler,
        "euler": EulerDiscreteScheduler,
        "euler-ancestral": EulerAncestralDiscreteScheduler,
        "heun": HeunDiscreteScheduler,
        "kdpm2": KDPM2DiscreteScheduler,
        "lcm": LCMScheduler,
        "pndm": PNDMScheduler,
        "unipc": UniPCMultistepScheduler,
    }


#: Scheduler names accepted by the ``scheduler=`` option of the factories.
SCHEDULERS: tuple[str, ...] = (
    "ddim",
    "ddpm",
    "dpm",
    "euler",
    "euler-ancestral",
    "heun",
    "kdpm2",
    "lcm",
    "pndm",
    "unipc",
)


# Settings the released checkpoints use but the scheduler classes do not default to.
_SCHEDULER_OVERRIDES: dict[str, dict[str, Any]] = {
    # Stable Diffusion ships PNDM without the Runge-Kutta warm-up, which would also fail for
    # fewer than four inference steps and change the number of UNet calls per step.
    "pndm": {"skip_prk_steps": True},
}


def make_scheduler(name: str, config: Any) -> Any:
    """Build the scheduler called ``name`` (see :data:`SCHEDULERS`) from another scheduler's config.

    ``config`` is a scheduler config (or a scheduler, whose ``config`` is used); the noise schedule
    (betas, prediction type, timestep spacing) carries over, as with diffusers' ``from_config``.
    """
    classes = _scheduler_classes()
    key = name.lower().replace("_", "-")
    if key not in classes:
        raise ValueError(f"Unknown scheduler {name!r}; expected one of: {', '.join(SCHEDULERS)}")
    config = getattr(config, "config", config)
    return classes[key].from_config(config, **_SCHEDULER_OVERRIDES.get(key, {}))


def _choose_scheduler(default: Any, name: str | None) -> Any:
    return default if name is None else make_scheduler(name, default.config)


def _sd_ddim_scheduler():
    from diffusers import DDIMScheduler

    # The noise schedule of the Stable Diffusion 1.x/2.x checkpoints.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _sdxl_euler_scheduler():
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )


# --------------------------------------------------------------------------------------------
# Offline tokenizers
# --------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP byte-to-character table: every byte gets a visible vocabulary symbol."""
    byte_values = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code_points = byte_values[:]
    # Whitespace and control bytes are mapped past 255 so that no token is invisible.
    shifted = 0
    for byte in range(256):
        if byte not in byte_values:
            byte_values.append(byte)
            code_points.append(256 + shifted)
            shifted += 1
    return dict(zip(byte_values, (chr(c) for c in code_points)))


@functools.lru_cache(maxsize=None)
def _tokenizer_dir() -> str:
    """Write the tokenizer files once per process; the directory is removed at interpreter exit."""
    root = tempfile.mkdtemp(prefix="tgate-tiny-tokenizers-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    _write_clip_tokenizer_files(os.path.join(root, "clip"))
    _write_t5_tokenizer_file(os.path.join(root, "t5"))
    return root


def _write_clip_tokenizer_files(directory: str) -> None:
    # Without merges the BPE model emits one token per byte, so the vocabulary needs each byte
    # both mid-word and word-final ("</w>"), laid out like the first 512 entries of real CLIP.
    os.makedirs(directory, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab_tokens = symbols + [s + "</w>" for s in symbols] + [_CLIP_BOS, _CLIP_EOS]
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as handle:
        json.dump(vocab, handle, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as handle:
        handle.write("#version: 0.2\n")


def _write_t5_tokenizer_file(directory: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    # A byte-level BPE without merges: every prompt maps to distinct ids (no <unk> collapse that
    # would make different prompts indistinguishable) and the special-token ids follow T5
    # (pad=0, eos=1, unk=2), which T5EncoderModel's config relies on.
    os.makedirs(directory, exist_ok=True)
    vocab = {_T5_PAD: 0, _T5_EOS: 1, _T5_UNK: 2}
    for symbol in _bytes_to_unicode().values():
        vocab[symbol] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=_T5_UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    # T5 appends </s> to every sequence when add_special_tokens=True.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {_T5_EOS}",
        pair=f"$A {_T5_EOS} $B {_T5_EOS}",
        special_tokens=[(_T5_EOS, vocab[_T5_EOS])],
    )
    tokenizer.save(os.path.join(directory, "tokenizer.json"))


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(
        os.path.join(_tokenizer_dir(), "clip"), model_max_length=_CLIP_MAX_LENGTH
    )


def _t5_tokenizer():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(_tokenizer_dir(), "t5", "tokenizer.json"),
        pad_token=_T5_PAD,
        eos_token=_T5_EOS,
        unk_token=_T5_UNK,
        model_max_length=_T5_MAX_LENGTH,
        padding_side="right",
    )


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    # Forking leaves the caller's global RNG stream untouched; the weights depend on `seed` only.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _clip_text_config(tokenizer: Any):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_CLIP_TEXT_HIDDEN,
        intermediate_size=37,
        projection_dim=_CLIP_TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=_CLIP_MAX_LENGTH,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        # The pooled output is taken at the first EOS position, which must be the tokenizer's id.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_encoder(seed: int, tokenizer: Any, with_projection: bool = False):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    config = _clip_text_config(tokenizer)
    return _seeded(seed, lambda: model_class(config).eval())


def _t5_text_encoder(seed: int, tokenizer: Any):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_T5_HIDDEN,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return _seeded(seed, lambda: T5EncoderModel(config).eval())


def _tiny_vae(seed: int):
    from diffusers import AutoencoderKL

    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=TINY_IMAGE_SIZE,
        ),
    )


def _tiny_factor8_vae(seed: int):
    from diffusers import AutoencoderKL

    # Four levels give the factor-8 spatial compression of real SD/PixArt VAEs; the channel
    # counts stay tiny so decoding 256x256 images remains cheap.
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            block_out_channels=(8, 8, 16, 16),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=TINY_PIXART_IMAGE_SIZE,
        ),
    )


def _sd_unet_kwargs() -> dict[str, Any]:
    # Like SD 1.x: attention at the high-resolution level(s) and in the mid block, a plain
    # ResNet level at the lowest resolution, two layers per block (DeepCache's branch ids
    # assume three modules per down block: two layers plus the downsampler).
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        cross_attention_dim=_CLIP_TEXT_HIDDEN,
        # UNet2DConditionModel's `attention_head_dim` is historically the number of heads.
        attention_head_dim=4,
        norm_num_groups=32,
    )


def _sdxl_unet_kwargs() -> dict[str, Any]:
    # Like SDXL: no attention at the highest resolution, linear projections, several transformer
    # layers at the deeper level, and `text_time` micro-conditioning from the second encoder.
    return dict(
        block_out_channels=(32, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=_SDXL_ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=_SDXL_PROJECTION_INPUT_DIM,
        cross_attention_dim=2 * _CLIP_TEXT_HIDDEN,
        norm_num_groups=32,
    )


def _unet(seed: int, time_cond_proj_dim: int | None = None, **kwargs: Any):
    from diffusers import UNet2DConditionModel

    up_block_types = tuple(
        "CrossAttnUpBlock2D" if block == "CrossAttnDownBlock2D" else "UpBlock2D"
        for block in reversed(kwargs["down_block_types"])
    )
    return _seeded(
        seed,
        lambda: UNet2DConditionModel(
            sample_size=TINY_IMAGE_SIZE // 2,
            in_channels=4,
            out_channels=4,
            up_block_types=up_block_types,
            time_cond_proj_dim=time_cond_proj_dim,
            **kwargs,
        ),
    )


def _controlnet(seed: int, **unet_kwargs: Any):
    from diffusers import ControlNetModel

    def build():
        controlnet = ControlNetModel(
            in_channels=4,
            # Two stages downsample the control image by 2, matching the tiny VAE.
            conditioning_embedding_out_channels=(16, 32),
            **unet_kwargs,
        )
        # A freshly initialised ControlNet has zero-initialised convolutions where the control
        # image enters and where residuals leave, so the control image would have no effect;
        # small random weights make ControlNet code paths observable in outputs.
        zero_initialised = [
            controlnet.controlnet_cond_embedding.conv_out,
            *controlnet.controlnet_down_blocks,
            controlnet.controlnet_mid_block,
        ]
        for conv in zero_initialised:
            torch.nn.init.normal_(conv.weight, std=0.05)
            torch.nn.init.zeros_(conv.bias)
        return controlnet

    return _seeded(seed, build)


def _pixart_transformer(seed: int):
    from diffusers import PixArtTransformer2DModel

    return _seeded(
        seed,
        lambda: PixArtTransformer2DModel(
            sample_size=TINY_PIXART_IMAGE_SIZE // 8,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=_T5_HIDDEN,
            in_channels=4,
            cross_attention_dim=24,
            # Learned-sigma output (noise + variance channels) as in the released checkpoints.
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ),
    )


def _sharpen_attention(model: torch.nn.Module) -> None:
    """Scale query/key projections so attention maps are peaked, as in trained checkpoints.

    With default initialisation the attention logits have a standard deviation of about 0.3, so
    attention is nearly uniform: cross-attention then returns almost the mean of the text values
    whatever the query, and reusing a cached cross-attention output (what T-GATE does) would be
    indistinguishable from recomputing it.  Peaked attention keeps caching and reuse errors
    visible in the outputs of these tiny models.
    """
    from diffusers.models.attention_processor import Attention

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Attention):
                for projection in (module.to_q, module.to_k):
                    projection.weight.mul_(_ATTENTION_QK_GAIN)
                    if projection.bias is not None:
                        projection.bias.mul_(_ATTENTION_QK_GAIN)


def _finish(pipe: Any) -> Any:
    # Components are created in float32 on the CPU; only the device is pinned here because a
    # dtype cast through `pipe.to` triggers diffusers warnings for no effect.
    for denoiser_name in ("unet", "controlnet", "transformer"):
        denoiser = getattr(pipe, denoiser_name, None)
        if denoiser is not None:
            _sharpen_attention(denoiser)
    # Match `from_pretrained`, which returns modules in eval mode: a few layers (e.g. the
    # `training`-dependent paths of some diffusers blocks) otherwise compute differently.
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.to("cpu")
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------
# Pipeline factories
# --------------------------------------------------------------------------------------------


def tiny_sd(*, seed: int = 0, scheduler: str | None = None):
    """Stable Diffusion 1.x-shaped pipeline producing 32x32 images.

    Uses a DDIM scheduler with SD's noise schedule by default (as diffusers' Stable Diffusion fast
    tests do); ``scheduler`` selects another one from :data:`SCHEDULERS`.  No safety checker.
    """
    from diffusers import StableDiffusionPipeline

    tokenizer = _clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(seed),
        text_encoder=_clip_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        unet=_unet(seed, **_sd_unet_kwargs()),
        scheduler=_choose_scheduler(_sd_ddim_scheduler(), scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def _sdxl_text_components(seed: int) -> dict[str, Any]:
    tokenizer = _clip_tokenizer()
    tokenizer_2 = _clip_tokenizer()
    return dict(
        text_encoder=_clip_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        # Offset the seed so the two encoders differ, as in the real model.
        text_encoder_2=_clip_text_encoder(seed + 1, tokenizer_2, with_projection=True),
        tokenizer_2=tokenizer_2,
    )


def tiny_sdxl(*, seed: int = 0, scheduler: str | None = None):
    """SDXL-shaped pipeline (two CLIP text encoders, ``text_time`` conditioning), 32x32 images.

    Default scheduler: Euler discrete with ``timestep_spacing="leading"`` (diffusers' SDXL tests).
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed),
        unet=_unet(seed, **_sdxl_unet_kwargs()),
        scheduler=_choose_scheduler(_sdxl_euler_scheduler(), scheduler),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
        **_sdxl_text_components(seed),
    )
    return _finish(pipe)


def tiny_lcm_sdxl(*, seed: int = 0, scheduler: str | None = None):
    """SDXL pipeline shaped like LCM-SDXL: UNet with ``time_cond_proj_dim`` and an LCMScheduler.

    With ``time_cond_proj_dim`` the guidance scale is embedded into the timestep instead of running
    a classifier-free-guidance batch, exactly like LCM-SDXL checkpoints.
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=_tiny_vae(seed),
        unet=_unet(seed, time_cond_proj_dim=_LCM_TIME_COND_PROJ_DIM, **_sdxl_unet_kwargs()),
        scheduler=make_scheduler(scheduler or "lcm", _sdxl_euler_scheduler().config),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
        **_sdxl_text_components(seed),
    )
    return _finish(pipe)


def _pixart(pipeline_class: type, seed: int, scheduler: str | None):
    tokenizer = _t5_tokenizer()
    pipe = pipeline_class(
        tokenizer=tokenizer,
        text_encoder=_t5_text_encoder(seed, tokenizer),
        vae=_tiny_factor8_vae(seed),
        transformer=_pixart_transformer(seed),
        scheduler=_choose_scheduler(_sd_ddim_scheduler(), scheduler),
    )
    return _finish(pipe)


def tiny_pixart_alpha(*, seed: int = 0, scheduler: str | None = None):
    """PixArt-α-shaped pipeline (DiT with ``ada_norm_single``, T5 encoder), 256x256 images.

    Default scheduler: DDIM (as diffusers' PixArt tests).  See the module docstring for why the
    default size is 256 and how to generate at other sizes.
    """
    from diffusers import PixArtAlphaPipeline

    return _pixart(PixArtAlphaPipeline, seed, scheduler)


def tiny_pixart_sigma(*, seed: int = 0, scheduler: str | None = None):
    """PixArt-Σ-shaped pipeline (DiT with ``ada_norm_single``, T5 encoder), 256x256 images.

    Default scheduler: DDIM (as diffusers' PixArt tests).
    """
    from diffusers import PixArtSigmaPipeline

    return _pixart(PixArtSigmaPipeline, seed, scheduler)


def tiny_svd(*, seed: int = 0):
    """Stable-Video-Diffusion-shaped image-to-video pipeline: 4 frames of 32x32 by default.

    The CLIP vision encoder takes 224x224 inputs because the pipeline resizes PIL/numpy
    conditioning images to 224 before encoding them.  The scheduler is the Karras-sigma,
    v-prediction Euler scheduler of the SVD checkpoints; the pipeline relies on its sigmas, so
    no other scheduler is offered.
    """
    from diffusers import (
        AutoencoderKLTemporalDecoder,
        EulerDiscreteScheduler,
        StableVideoDiffusionPipeline,
        UNetSpatioTemporalConditionModel,
    )
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    image_embed_dim = 32
    unet = _seeded(
        seed,
        lambda: UNetSpatioTemporalConditionModel(
            sample_size=TINY_IMAGE_SIZE // 2,
            # Noisy latents concatenated with the conditioning image latents.
            in_channels=8,
            out_channels=4,
            block_out_channels=(32, 64),
            # One layer per block: each layer carries spatial and temporal sub-layers and runs on
            # frames x CFG batch entries, so two layers would put a generation near a second.
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
            cross_attention_dim=image_embed_dim,
            num_attention_heads=(4, 8),
            # Three micro-conditions (fps, motion bucket, noise augmentation), each embedded.
            addition_time_embed_dim=32,
            projection_class_embeddings_input_dim=3 * 32,
            num_frames=TINY_SVD_NUM_FRAMES,
        ),
    )
    vae = _seeded(
        seed,
        lambda: AutoencoderKLTemporalDecoder(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            latent_channels=4,
            sample_size=TINY_IMAGE_SIZE,
        ),
    )
    vision_config = CLIPVisionConfig(
        hidden_size=image_embed_dim,
        projection_dim=image_embed_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=224,
        patch_size=28,
    )
    image_encoder = _seeded(seed, lambda: CLIPVisionModelWithProjection(vision_config).eval())
    feature_extractor = CLIPImageProcessor(crop_size=224, size=224)
    scheduler = EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        interpolation_type="linear",
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )
    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    return _finish(pipe)


def tiny_sd_controlnet(*, seed: int = 0, scheduler: str | None = None):
    """Stable Diffusion + ControlNet pipeline; control images are 32x32 (see :func:`tiny_image`).

    Default scheduler: DDIM, as :func:`tiny_sd`.
    """
    from diffusers import StableDiffusionControlNetPipeline

    tokenizer = _clip_tokenizer()
    unet_kwargs = _sd_unet_kwargs()
    pipe = StableDiffusionControlNetPipeline(
        vae=_tiny_vae(seed),
        text_encoder=_clip_text_encoder(seed, tokenizer),
        tokenizer=tokenizer,
        unet=_unet(seed, **unet_kwargs),
        controlnet=_controlnet(seed, **unet_kwargs),
        scheduler=_choose_scheduler(_sd_ddim_scheduler(), scheduler),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    return _finish(pipe)


def tiny_sdxl_controlnet(*, seed: int = 0, scheduler: str | None = None):
    """SDXL + ControlNet pipeline; control images are 32x32 (see :func:`tiny_image`).

    Default scheduler: Euler, as :func:`tiny_sdxl`.
    """
    from diffusers import StableDiffusionXLControlNetPipeline

    unet_kwargs = _sdxl_unet_kwargs()
    pipe = StableDiffusionXLControlNetPipeline(
        vae=_tiny_vae(seed),
        unet=_unet(seed, **unet_kwargs),
        controlnet=_controlnet(seed, **unet_kwargs),
        scheduler=_choose_scheduler(_sdxl_euler_scheduler(), scheduler),
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
        **_sdxl_text_components(seed),
    )
    return _finish(pipe)


#: Factories by the names the CLI and the tests use.
TINY_PIPELINES: dict[str, Callable[..., Any]] = {
    "sd": tiny_sd,
    "sdxl": tiny_sdxl,
    "lcm-sdxl": tiny_lcm_sdxl,
    "pixart-alpha": tiny_pixart_alpha,
    "pixart-sigma": tiny_pixart_sigma,
    "svd": tiny_svd,
    "sd-controlnet": tiny_sd_controlnet,
    "sdxl-controlnet": tiny_sdxl_controlnet,
}


def tiny_pipeline(name: str, **kwargs: Any):
    """Build the tiny pipeline registered as ``name`` in :data:`TINY_PIPELINES`."""
    try:
        factory = TINY_PIPELINES[name]
    except KeyError:
        raise ValueError(
            f"Unknown tiny pipeline {name!r}; expected one of: {', '.join(TINY_PIPELINES)}"
        ) from None
    return factory(**kwargs)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def tiny_image(
    height: int = TINY_IMAGE_SIZE, width: int = TINY_IMAGE_SIZE, seed: int = 0
) -> Image.Image:
    """A deterministic RGB noise image, e.g. as ControlNet, img2img or SVD conditioning input."""
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def tiny_generation_kwargs(
    name: str,
    *,
    num_inference_steps: int = 4,
    seed: int = 0,
    output_type: str = "np",
    prompt: str = "a tiny red fox",
) -> dict[str, Any]:
    """Keyword arguments for one quick generation with the tiny pipeline called ``name``.

    Includes a fresh seeded ``generator`` and, where the pipeline needs one, a conditioning image
    of the right size; the result works for both ``pipe(**kwargs)`` and T-GATE entry points.
    """
    if name not in TINY_PIPELINES:
        raise ValueError(
            f"Unknown tiny pipeline {name!r}; expected one of: {', '.join(TINY_PIPELINES)}"
        )
    kwargs: dict[str, Any] = {
        "num_inference_steps": num_inference_steps,
        "generator": torch.Generator("cpu").manual_seed(seed),
        "output_type": output_type,
    }
    if name == "svd":
        kwargs.update(
            image=tiny_image(seed=seed),
            height=TINY_IMAGE_SIZE,
            width=TINY_IMAGE_SIZE,
            num_frames=TINY_SVD_NUM_FRAMES,
            decode_chunk_size=TINY_SVD_NUM_FRAMES,
        )
        return kwargs
    kwargs["prompt"] = prompt
    if name.startswith("pixart"):
        # Caption cleaning needs optional packages (bs4, ftfy) and only warns without them.
        kwargs["clean_caption"] = False
    if name.endswith("controlnet"):
        kwargs["image"] = tiny_image(seed=seed)
    return kwargs
