"""Train the micro world's models on the CPU, deterministically given a seed.

``tgate-kernels train-micro --out DIR [--seed S] [--what sd,pixart,sd3,flux,classifier]``
writes up to five folders into ``DIR``:

* ``sd``: a :class:`diffusers.StableDiffusionPipeline`: a small ``UNet2DConditionModel`` with
  cross-attention at its 8x8 and 4x4 levels, a small ``CLIPTextModel`` trained jointly with it,
  a word-level ``CLIPTokenizer`` and a DDIM scheduler for sampling;
* ``pixart``: a :class:`diffusers.PixArtAlphaPipeline`: a small ``PixArtTransformer2DModel``
  (``ada_norm_single``) trained jointly with a small ``T5EncoderModel``, a word-level T5-style
  ``PreTrainedTokenizerFast`` and a DDIM scheduler;
* ``sd3``: a :class:`diffusers.StableDiffusion3Pipeline`: a small ``SD3Transformer2DModel``
  (dual-stream joint attention) trained jointly with its two small ``CLIPTextModelWithProjection``
  encoders (no T5: the pipeline feeds zeros in its place), as a rectified flow sampled by
  ``FlowMatchEulerDiscreteScheduler``;
* ``flux``: a :class:`diffusers.FluxPipeline`: a small ``FluxTransformer2DModel`` (dual-stream
  blocks, then single-stream blocks on the joined sequence) trained jointly with a small
  ``CLIPTextModel`` (pooled) and ``T5EncoderModel`` (the sequence), without a guidance embedding:
  with 10% empty captions, true CFG (a negative prompt and ``true_cfg_scale``) works;
* ``classifier``: the attribute classifier of :mod:`tgate_kernels.tools.micro.adherence`.

The pipelines share one ``AutoencoderKL`` trained first to reconstruct the 32x32 images from
16x16x4 latents (each pipeline run trains it again from the same seed, so both folders hold the
same weights; ``--vae FOLDER`` takes a trained one instead).  The UNet and PixArt denoisers predict noise, are trained with a DDPM noise schedule (Stable
Diffusion's) and min-SNR loss weighting, and see 10% empty captions so that classifier-free
guidance works.  Denoisers and VAEs are stored in float16 (diffusers loads them as float32), text
encoders in float32 (transformers would keep float16).

Every random draw comes from generators seeded by ``seed``, so a run is repeatable bit for bit
with the same seed, thread count and library versions; the thread count matters because CPU
kernels split their reductions by thread.  Each folder gets a README.md with the command,
training time, final loss and parameter counts.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import world
from .adherence import IGNORE, AttributeClassifier, as_model_input, classify, save_classifier

__all__ = [
    "WHAT",
    "TrainingReport",
    "clip_tokenizer",
    "main",
    "save_pipeline",
    "t5_tokenizer",
    "train_classifier",
    "train_flux",
    "train_pixart",
    "train_sd",
    "train_sd3",
    "train_vae",
]

#: What ``--what`` can name.
WHAT: tuple[str, ...] = ("sd", "pixart", "sd3", "flux", "classifier")

# Token positions of the text encoders, BOS/EOS included; captions have at most 9 tokens.
TEXT_LENGTH = 16
TEXT_HIDDEN = 64
LATENT_SIZE = world.IMAGE_SIZE // 2
LATENT_CHANNELS = 4
CAPTION_DROPOUT = 0.1
# Min-SNR-gamma weighting (Hang et al. 2023) of the noise-prediction loss: keeps the nearly clean
# timesteps from dominating the gradient, so the few steps a CPU affords go to the noisy ones
# where layout, shape and colour are decided.
MIN_SNR_GAMMA = 5.0
WARMUP_STEPS = 200

_CLIP_BOS, _CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
_T5_PAD, _T5_EOS, _T5_UNK = "<pad>", "</s>", "<unk>"
# The byte-level symbol of a space, which starts every word of a T5-style byte-level BPE.
_BYTE_LEVEL_SPACE = "\u0120"

# Offsets that give every model its own data and initialisation streams for one ``seed``.
_STREAMS = {"vae": 1, "sd": 2, "pixart": 3, "classifier": 4, "held-out": 5, "sd3": 6, "flux": 7}


def _stream(seed: int, part: str) -> int:
    return 1000 * seed + _STREAMS[part]


@dataclass
class TrainingReport:
    """What a training run did, for the README written next to the weights."""

    name: str
    seconds: float
    steps: int
    batch_size: int
    final_loss: float
    parameters: dict[str, int]
    notes: dict[str, Any] = field(default_factory=dict)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Tokenizers: every word of the captions' grammar is one token
# --------------------------------------------------------------------------------------------


def _grammar_words() -> list[str]:
    phrases = ["a", *world.SIZES, *world.COLOURS, *world.SHAPES, *world.POSITIONS.values(), *world.RELATIONS]
    return sorted({word for phrase in phrases for word in phrase.split()})


def _bpe(symbols: Sequence[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word: merge the best-ranked adjacent pair until none applies."""
    tokens = list(symbols)
    while len(tokens) > 1:
        rank, index = min((ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(tokens, tokens[1:])))
        if rank == math.inf:
            break
        tokens[index : index + 2] = [tokens[index] + tokens[index + 1]]
    return tokens


def _word_merges(words: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """Merges that turn each word (a sequence of byte-level symbols) into a single token.

    Each new merge ranks last, so it only applies once no earlier merge does, and words already
    merged into one token keep their tokenization.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for symbols in words:
        while len(tokens := _bpe(symbols, ranks)) > 1:
            ranks[(tokens[0], tokens[1])] = len(merges)
            merges.append((tokens[0], tokens[1]))
    return merges


def _byte_symbols() -> list[str]:
    from tokenizers import pre_tokenizers

    # Every byte has a symbol, so any text tokenizes without unknown tokens.
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def clip_tokenizer():
    """A ``CLIPTokenizer`` (byte-level BPE) whose merges make each grammar word one token."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    # CLIP's BPE marks the last symbol of a word with "</w>".
    merges = _word_merges([*word[:-1], word[-1] + "</w>"] for word in _grammar_words())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(pair) for pair in merges), _CLIP_BOS, _CLIP_EOS]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=TEXT_LENGTH)


def t5_tokenizer():
    """A T5-style tokenizer (pad=0, eos=1, unk=2, ``</s>`` appended) with one token per grammar word."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    merges = _word_merges(_BYTE_LEVEL_SPACE + word for word in _grammar_words())
    tokens = [_T5_PAD, _T5_EOS, _T5_UNK, *_byte_symbols(), *("".join(pair) for pair in merges)]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=_T5_UNK))
    backend.normalizer = normalizers.Lowercase()
    # A space before every word, so a word is the same token first in a caption or later.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {_T5_EOS}", pair=f"$A {_T5_EOS} $B {_T5_EOS}", special_tokens=[(_T5_EOS, vocab[_T5_EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=_T5_PAD,
        eos_token=_T5_EOS,
        unk_token=_T5_UNK,
        model_max_length=TEXT_LENGTH,
        padding_side="right",
    )


def _tokenize(tokenizer: Any, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    # Exactly how the pipelines tokenize prompts (and the empty negative prompt).
    encoded = tokenizer(
        list(captions), padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    return encoded.input_ids, encoded.attention_mask


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def _vae():
    from diffusers import AutoencoderKL

    # One downsampling stage: 32x32x3 images, 16x16x4 latents.  No attention in the mid block:
    # the images are simple and 256-token attention would dominate the cost.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 32),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=world.IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def _unet():
    from diffusers import UNet2DConditionModel

    # SDXL-like: cross-attention at the 8x8 and 4x4 levels and in the mid block, plain ResNets at
    # 16x16, where self-attention over 256 tokens would double the training cost.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        # The number of heads (the argument's historical name): 16 channels per head.
        attention_head_dim=4,
        norm_num_groups=16,
    )


def _clip_config(tokenizer: Any, layers: int):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        projection_dim=TEXT_HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        # The pooled output is read at the first EOS, which must be this tokenizer's id.
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _clip_text_encoder(tokenizer: Any):
    from transformers import CLIPTextModel

    return CLIPTextModel(_clip_config(tokenizer, layers=2))


def _clip_text_encoder_with_projection(tokenizer: Any):
    from transformers import CLIPTextModelWithProjection

    # SD3 reads the penultimate layer's states and the last layer's pooled projection
    return CLIPTextModelWithProjection(_clip_config(tokenizer, layers=3))


def _pixart_transformer():
    from diffusers import PixArtTransformer2DModel

    # 2x2 patches of the 16x16 latents: 64 tokens.  Noise prediction only (no learned variance).
    return PixArtTransformer2DModel(
        sample_size=LATENT_SIZE,
        num_layers=8,
        patch_size=2,
        attention_head_dim=16,
        num_attention_heads=4,
        caption_channels=TEXT_HIDDEN,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        cross_attention_dim=64,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )


def _sd3_transformer():
    from diffusers import SD3Transformer2DModel

    # 2x2 patches of the 16x16 latents: 64 image tokens beside 32 text tokens (two CLIPs' 16
    # positions side by side along the features, then the 16 zero rows standing for T5).
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=6,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=2 * TEXT_HIDDEN,
        caption_projection_dim=64,
        pooled_projection_dim=2 * TEXT_HIDDEN,
        pos_embed_max_size=LATENT_SIZE // 2,
    )


def _flux_transformer():
    from diffusers import FluxTransformer2DModel

    # The 16x16x4 latents packed 2x2 (as FluxPipeline packs them): 64 image tokens of 16 channels
    # beside 16 T5 tokens; two dual-stream blocks, then four single-stream ones.  RoPE over
    # (text/image, row, column): 4 + 6 + 6 channels of each 16-channel head.
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=TEXT_HIDDEN,
        pooled_projection_dim=TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )


def _t5_text_encoder(tokenizer: Any):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=TEXT_HIDDEN,
        d_kv=16,
        d_ff=2 * TEXT_HIDDEN,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=TEXT_LENGTH,
        # Dropout would draw from the global RNG and is pointless for a grammar this small.
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _train_scheduler():
    from diffusers import DDPMScheduler

    # Stable Diffusion 1.x's noise schedule.
    return DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False
    )


def _sampling_scheduler(train_scheduler: Any):
    from diffusers import DDIMScheduler

    # "trailing" spacing starts sampling at the last training timestep, where the initial
    # latents (pure noise) belong.
    return DDIMScheduler.from_config(
        train_scheduler.config,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
        clip_sample=False,
        # Unused with "trailing" spacing, but diffusers warns about configs without it.
        steps_offset=1,
    )


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # No timestep shift: at 16x16 latents the noisy half of the schedule needs no extra steps.
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


# --------------------------------------------------------------------------------------------
# Training loops
# --------------------------------------------------------------------------------------------


def _optimiser(parameters: Iterable[torch.nn.Parameter], lr: float, steps: int):
    optimiser = torch.optim.AdamW(list(parameters), lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        # Linear warm-up, then cosine decay to zero: the last steps average out gradient noise.
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))

    return optimiser, torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def _run(
    name: str,
    loss_of_step: Callable[[int], torch.Tensor],
    modules: Sequence[torch.nn.Module],
    steps: int,
    lr: float,
) -> float:
    """Optimise ``modules`` for ``steps`` steps; returns the mean loss of the last 10% of steps."""
    parameters = [p for module in modules for p in module.parameters()]
    optimiser, schedule = _optimiser(parameters, lr, steps)
    for module in modules:
        module.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        loss = loss_of_step(step)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0 or step + 1 == steps:
            recent = np.mean(losses[-200:])
            _log(f"[{name}] step {step + 1}/{steps} loss {recent:.4f} ({time.perf_counter() - start:.0f} s)")
    for module in modules:
        module.eval()
    return float(np.mean(losses[-max(1, steps // 10) :]))


def train_vae(
    seed: int = 0, *, steps: int = 1500, batch_size: int = 64, samples: int = 20000, lr: float = 1e-3
) -> tuple[Any, TrainingReport]:
    """An ``AutoencoderKL`` (32x32x3 <-> 16x16x4) trained to reconstruct world images.

    The KL term is tiny, as in Stable Diffusion's VAE; ``scaling_factor`` is set so that the
    scaled latents of world images have unit standard deviation.
    """
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream(seed, "vae"))
        vae = _vae()
    images = as_model_input(world.dataset(samples, _stream(seed, "vae"))[0])
    generator = torch.Generator().manual_seed(_stream(seed, "vae"))

    def loss_of_step(step: int) -> torch.Tensor:
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        return F.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()

    final_loss = _run("vae", loss_of_step, [vae], steps, lr)
    with torch.no_grad():
        held_out = as_model_input(world.dataset(1000, _stream(seed, "held-out"))[0])
        latents = vae.encode(held_out).latent_dist.mean
        error = F.mse_loss(vae.decode(latents).sample.clamp(-1, 1), held_out).item()
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    _round_to_half(vae)
    # Pixel values span 2 (from -1 to 1).
    psnr = 10 * math.log10(4 / error)
    report = TrainingReport(
        "vae", time.perf_counter() - start, steps, batch_size, final_loss, {"vae": _parameters(vae)},
        {"held-out reconstruction PSNR (dB)": round(psnr, 2), "scaling_factor": round(vae.config.scaling_factor, 4)},
    )
    return vae, report


def _encode_latents(vae: Any, images: np.ndarray) -> torch.Tensor:
    with torch.no_grad():
        chunks = [
            vae.encode(as_model_input(images[i : i + 512])).latent_dist.mean for i in range(0, len(images), 512)
        ]
    return torch.cat(chunks) * vae.config.scaling_factor


def _train_denoiser(
    name: str,
    predict: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    modules: Sequence[torch.nn.Module],
    tokenizer: Any,
    vae: Any,
    seed: int,
    steps: int,
    batch_size: int,
    samples: int,
    lr: float,
) -> float:
    """Noise-prediction training of ``predict(noisy, timesteps, token_ids, attention_mask)``."""
    images, captions, _ = world.dataset(samples, _stream(seed, name))
    latents = _encode_latents(vae, images)
    token_ids, masks = _tokenize(tokenizer, captions)
    empty_ids, empty_mask = _tokenize(tokenizer, [""])
    scheduler = _train_scheduler()
    alphas_cumprod = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(_stream(seed, name))

    def loss_of_step(step: int) -> torch.Tensor:
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        dropped = (torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT)[:, None]
        ids = torch.where(dropped, empty_ids, token_ids[index])
        mask = torch.where(dropped, empty_mask, masks[index])
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
        prediction = predict(scheduler.add_noise(clean, noise, timesteps), timesteps, ids, mask)
        snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
        weight = snr.clamp(max=MIN_SNR_GAMMA) / snr
        return (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    return _run(name, loss_of_step, modules, steps, lr)


def _train_flow(
    name: str,
    predict: Callable[..., torch.Tensor],
    modules: Sequence[torch.nn.Module],
    tokenizers: Sequence[Any],
    vae: Any,
    seed: int,
    steps: int,
    batch_size: int,
    samples: int,
    lr: float,
) -> float:
    """Rectified-flow training of ``predict(noisy, timesteps, *token_ids)`` (the ids of each of
    ``tokenizers``): the velocity ``noise - clean`` at ``sigma``, drawn logit-normal as in SD3's
    training (most draws in the middle of the schedule, where the layout is decided)."""
    images, captions, _ = world.dataset(samples, _stream(seed, name))
    latents = _encode_latents(vae, images)
    token_ids = [_tokenize(tokenizer, captions)[0] for tokenizer in tokenizers]
    empty_ids = [_tokenize(tokenizer, [""])[0] for tokenizer in tokenizers]
    generator = torch.Generator().manual_seed(_stream(seed, name))

    def loss_of_step(step: int) -> torch.Tensor:
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        dropped = (torch.rand(batch_size, generator=generator) < CAPTION_DROPOUT)[:, None]
        ids = [torch.where(dropped, empty, every[index]) for empty, every in zip(empty_ids, token_ids)]
        clean = latents[index]
        noise = torch.randn(clean.shape, generator=generator)
        sigmas = torch.sigmoid(torch.randn(batch_size, generator=generator))
        noisy = (1 - sigmas)[:, None, None, None] * clean + sigmas[:, None, None, None] * noise
        prediction = predict(noisy, sigmas * 1000, *ids)
        return (prediction - (noise - clean)).pow(2).mean()

    return _run(name, loss_of_step, modules, steps, lr)


def _unshifted(vae: Any) -> Any:
    """A copy of ``vae`` for the flow pipelines (SD3, FLUX), which decode ``latents /
    scaling_factor + shift_factor``: the latents they were trained on were not shifted."""
    vae = copy.deepcopy(vae)
    vae.register_to_config(shift_factor=0.0)
    return vae


def _parameter_counts(**modules: torch.nn.Module) -> dict[str, int]:
    return {name: _parameters(module) for name, module in modules.items()}


def _round_to_half(*modules: torch.nn.Module) -> None:
    # The weights are shipped in float16: rounding them right after training means that whatever
    # is measured on the returned models holds for the shipped ones.
    for module in modules:
        module.half().float()


def train_sd(
    vae: Any, seed: int = 0, *, steps: int = 2400, batch_size: int = 128, samples: int = 80000, lr: float = 1e-3
) -> tuple[Any, TrainingReport]:
    """A ``StableDiffusionPipeline`` whose UNet and CLIP text encoder are trained jointly."""
    from diffusers import StableDiffusionPipeline

    start = time.perf_counter()
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream(seed, "sd"))
        unet = _unet()
        text_encoder = _clip_text_encoder(tokenizer)

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The pipeline passes no attention mask to CLIP (causal attention ignores later padding).
        return unet(noisy, timesteps, text_encoder(ids)[0]).sample

    final_loss = _train_denoiser("sd", predict, [unet, text_encoder], tokenizer, vae, seed, steps, batch_size, samples, lr)
    _round_to_half(unet)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_sampling_scheduler(_train_scheduler()),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    parameters = {"unet": _parameters(unet), "text_encoder": _parameters(text_encoder), "vae": _parameters(vae)}
    return pipe, TrainingReport("sd", time.perf_counter() - start, steps, batch_size, final_loss, parameters)


def train_pixart(
    vae: Any, seed: int = 0, *, steps: int = 3600, batch_size: int = 128, samples: int = 80000, lr: float = 1e-3
) -> tuple[Any, TrainingReport]:
    """A ``PixArtAlphaPipeline`` whose transformer and T5 text encoder are trained jointly."""
    from diffusers import PixArtAlphaPipeline

    start = time.perf_counter()
    tokenizer = t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream(seed, "pixart"))
        transformer = _pixart_transformer()
        text_encoder = _t5_text_encoder(tokenizer)
    # What PixArt pipelines pass when the transformer has no size conditioning (sample_size != 128).
    no_size_conditions = {"resolution": None, "aspect_ratio": None}

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        text = text_encoder(ids, attention_mask=mask)[0]
        return transformer(
            noisy,
            encoder_hidden_states=text,
            encoder_attention_mask=mask,
            timestep=timesteps,
            added_cond_kwargs=no_size_conditions,
        ).sample

    final_loss = _train_denoiser(
        "pixart", predict, [transformer, text_encoder], tokenizer, vae, seed, steps, batch_size, samples, lr
    )
    _round_to_half(transformer)
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=_sampling_scheduler(_train_scheduler()),
    )
    parameters = {
        "transformer": _parameters(transformer),
        "text_encoder": _parameters(text_encoder),
        "vae": _parameters(vae),
    }
    return pipe, TrainingReport("pixart", time.perf_counter() - start, steps, batch_size, final_loss, parameters)


def train_sd3(
    vae: Any, seed: int = 0, *, steps: int = 3600, batch_size: int = 128, samples: int = 80000, lr: float = 1e-3
) -> tuple[Any, TrainingReport]:
    """A ``StableDiffusion3Pipeline`` whose transformer and two CLIP text encoders are trained jointly."""
    from diffusers import StableDiffusion3Pipeline

    start = time.perf_counter()
    tokenizer = clip_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream(seed, "sd3"))
        transformer = _sd3_transformer()
        text_encoder = _clip_text_encoder_with_projection(tokenizer)
        text_encoder_2 = _clip_text_encoder_with_projection(tokenizer)

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # What StableDiffusion3Pipeline.encode_prompt builds without a T5 encoder.
        first, second = text_encoder(ids, output_hidden_states=True), text_encoder_2(ids, output_hidden_states=True)
        clip = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        text = torch.cat([clip, torch.zeros_like(clip)], dim=1)
        pooled = torch.cat([first.text_embeds, second.text_embeds], dim=-1)
        return transformer(noisy, encoder_hidden_states=text, pooled_projections=pooled, timestep=timesteps).sample

    final_loss = _train_flow(
        "sd3", predict, [transformer, text_encoder, text_encoder_2], [tokenizer], vae, seed, steps, batch_size, samples, lr
    )
    _round_to_half(transformer)
    vae = _unshifted(vae)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=None,
        tokenizer_3=None,
    )
    parameters = _parameter_counts(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae)
    return pipe, TrainingReport("sd3", time.perf_counter() - start, steps, batch_size, final_loss, parameters)


def train_flux(
    vae: Any, seed: int = 0, *, steps: int = 4200, batch_size: int = 128, samples: int = 80000, lr: float = 1e-3
) -> tuple[Any, TrainingReport]:
    """A ``FluxPipeline`` whose transformer, CLIP and T5 text encoders are trained jointly."""
    from diffusers import FluxPipeline

    start = time.perf_counter()
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream(seed, "flux"))
        transformer = _flux_transformer()
        text_encoder = _clip_text_encoder(tokenizer)
        text_encoder_2 = _t5_text_encoder(tokenizer_2)
    pixels = world.IMAGE_SIZE
    vae_scale_factor = world.IMAGE_SIZE // LATENT_SIZE
    image_ids = FluxPipeline._prepare_latent_image_ids(None, LATENT_SIZE // 2, LATENT_SIZE // 2, "cpu", torch.float32)
    text_ids = torch.zeros(TEXT_LENGTH, 3)

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> torch.Tensor:
        # What FluxPipeline builds: CLIP's pooled output, T5's states without a mask, the latents
        # packed 2x2 and the timestep as a fraction (the transformer multiplies it by 1000).
        pooled = text_encoder(clip_ids).pooler_output
        text = text_encoder_2(t5_ids)[0]
        packed = FluxPipeline._pack_latents(noisy, len(noisy), LATENT_CHANNELS, LATENT_SIZE, LATENT_SIZE)
        velocity = transformer(
            packed, encoder_hidden_states=text, pooled_projections=pooled, timestep=timesteps / 1000,
            img_ids=image_ids, txt_ids=text_ids,
        ).sample
        return FluxPipeline._unpack_latents(velocity, pixels, pixels, vae_scale_factor)

    final_loss = _train_flow(
        "flux", predict, [transformer, text_encoder, text_encoder_2], [tokenizer, tokenizer_2], vae, seed, steps,
        batch_size, samples, lr,
    )
    _round_to_half(transformer)
    vae = _unshifted(vae)
    pipe = FluxPipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    parameters = _parameter_counts(transformer=transformer, text_encoder=text_encoder, text_encoder_2=text_encoder_2, vae=vae)
    return pipe, TrainingReport("flux", time.perf_counter() - start, steps, batch_size, final_loss, parameters)


def _degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Blur, noise and colour shifts of the kind generated images show, so that the classifier
    reads those as reliably as rendered ones."""
    n = len(images)
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur = torch.rand(n, 1, 1, 1, generator=generator)
    noise = 0.08 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    shift = 0.05 * torch.randn(n, 3, 1, 1, generator=generator)
    return images + blur * (blurred - images) + noise + shift


def _accuracies(model: AttributeClassifier, images: np.ndarray, scenes: Sequence[world.Scene]) -> dict[str, float]:
    """Held-out accuracy per head (over the scenes it applies to) and of whole scenes."""
    with torch.no_grad():
        logits = model(as_model_input(images))
    targets = [AttributeClassifier.targets(scene.attributes) for scene in scenes]
    accuracies = {}
    for name, values in logits.items():
        wanted = torch.tensor([t[name] for t in targets])
        applies = wanted != IGNORE
        accuracies[name] = float((values.argmax(dim=1)[applies] == wanted[applies]).float().mean())
    read = classify(images, model)
    accuracies["scene"] = float(np.mean([r == s.attributes for r, s in zip(read, scenes)]))
    return accuracies


def train_classifier(
    seed: int = 0, *, steps: int = 3000, batch_size: int = 128, samples: int = 40000, lr: float = 2e-3
) -> tuple[AttributeClassifier, TrainingReport]:
    """The attribute classifier of :mod:`~.adherence`, with its held-out accuracies in the report."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_stream(seed, "classifier"))
        model = AttributeClassifier()
    images, _, scenes = world.dataset(samples, _stream(seed, "classifier"))
    inputs = as_model_input(images)
    targets = {
        name: torch.tensor([AttributeClassifier.targets(scene.attributes)[name] for scene in scenes])
        for name in AttributeClassifier.HEADS
    }
    generator = torch.Generator().manual_seed(_stream(seed, "classifier"))

    def loss_of_step(step: int) -> torch.Tensor:
        index = torch.randint(len(inputs), (batch_size,), generator=generator)
        logits = model(_degrade(inputs[index], generator))
        return sum(F.cross_entropy(logits[name], targets[name][index], ignore_index=IGNORE) for name in logits)

    final_loss = _run("classifier", loss_of_step, [model], steps, lr)
    held_out_images, _, held_out_scenes = world.dataset(5000, _stream(seed, "held-out"))
    accuracies = _accuracies(model, held_out_images, held_out_scenes)
    report = TrainingReport(
        "classifier", time.perf_counter() - start, steps, batch_size, final_loss, {"classifier": _parameters(model)},
        {"held-out accuracy (5000 scenes)": {name: round(value, 4) for name, value in accuracies.items()}},
    )
    return model, report


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    "sd": "A micro Stable Diffusion pipeline (`diffusers.StableDiffusionPipeline`) for the micro world "
    "of `tgate_kernels.tools.micro.world`; load it with `tgate_kernels.tools.micro.adherence.load_micro_pipeline(\"sd\")` "
    "and call it with `MICRO_CALL[\"sd\"]`.",
    "pixart": "A micro PixArt-alpha pipeline (`diffusers.PixArtAlphaPipeline`) for the micro world "
    "of `tgate_kernels.tools.micro.world`; load it with `tgate_kernels.tools.micro.adherence.load_micro_pipeline(\"pixart\")` "
    "and call it with `MICRO_CALL[\"pixart\"]` (it needs `use_resolution_binning=False` and 32x32).",
    "sd3": "A micro Stable Diffusion 3 pipeline (`diffusers.StableDiffusion3Pipeline`, no T5 encoder) for the "
    "micro world of `tgate_kernels.tools.micro.world`; load it with "
    "`tgate_kernels.tools.micro.adherence.load_micro_pipeline(\"sd3\")` and call it with `MICRO_CALL[\"sd3\"]`.",
    "flux": "A micro FLUX.1 pipeline (`diffusers.FluxPipeline`, no guidance embedding) for the micro world of "
    "`tgate_kernels.tools.micro.world`; load it with `tgate_kernels.tools.micro.adherence.load_micro_pipeline(\"flux\")` "
    "and call it with `MICRO_CALL[\"flux\"]` (true CFG against the empty prompt) or `MICRO_CALL[\"flux-no-cfg\"]`.",
    "classifier": "The attribute classifier of `tgate_kernels.tools.micro.adherence` (a small CNN, "
    "`model.safetensors` + `config.json`); load it with `load_classifier()`.",
}


def save_pipeline(pipe: Any, folder: str | Path) -> None:
    """``pipe.save_pretrained(folder)`` with the denoiser and the VAE stored in float16."""
    halves = [getattr(pipe, name) for name in ("unet", "transformer", "vae") if getattr(pipe, name, None) is not None]
    for module in halves:
        module.half()
    try:
        pipe.save_pretrained(folder)
    finally:
        for module in halves:
            module.float()


def _folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def _write_readme(folder: Path, reports: Sequence[TrainingReport], command: str, threads: int) -> None:
    name = reports[-1].name
    lines = [f"# micro {name}", "", _DESCRIPTIONS[name], "", "Made with (CPU, deterministic given seed and thread count):", ""]
    lines += ["```", command, "```", "", f"Threads: {threads}; torch {torch.__version__}.", ""]
    for report in reports:
        parameters = ", ".join(f"{part} {count:,}" for part, count in report.parameters.items())
        if report.steps == 0:
            lines += [f"## {report.name} (not trained here)", "", f"- parameters: {parameters}"]
            lines += [f"- {key}: {value}" for key, value in report.notes.items()]
            lines.append("")
            continue
        lines += [
            f"## {report.name}",
            "",
            f"- training time: {report.seconds / 60:.1f} min ({report.steps} steps of batch {report.batch_size})",
            f"- final loss (mean of the last 10% of steps): {report.final_loss:.4f}",
            f"- parameters: {parameters}",
        ]
        lines += [f"- {key}: {value}" for key, value in report.notes.items()]
        lines.append("")
    lines.append(f"Folder size: {_folder_size(folder) / 1e6:.2f} MB.")
    (folder / "README.md").write_text("\n".join(lines) + "\n")


def _load_vae(folder: Path) -> tuple[Any, TrainingReport]:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(folder).float()
    return vae, TrainingReport("vae", 0.0, 0, 0, float("nan"), {"vae": _parameters(vae)}, {"loaded from": str(folder)})


def _what(text: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [name for name in names if name not in WHAT]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(WHAT)}, got {text!r}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    """``train-micro``: train the selected models into ``--out``/{sd,pixart,sd3,flux,classifier}."""
    parser = argparse.ArgumentParser(prog="tgate-kernels train-micro", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write sd/, pixart/, sd3/, flux/, classifier/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--what", type=_what, default=WHAT, help=f"comma-separated subset of {','.join(WHAT)}")
    # One thread per process: several trainings can share the cores, and OpenMP threads slow to a
    # crawl when other processes take their cores.
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (results depend on it)")
    parser.add_argument(
        "--vae", type=Path, default=None,
        help="an AutoencoderKL folder trained by an earlier run (e.g. the shipped sd/vae) instead of training one",
    )
    args = parser.parse_args(argv)
    if args.vae is not None and not (args.vae / "config.json").is_file():
        parser.error(f"argument --vae: {str(args.vae)!r} holds no config.json; give a folder with a saved AutoencoderKL")
    command = " ".join(["tgate-kernels train-micro", *(sys.argv[1:] if argv is None else argv)])
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    vae_report: TrainingReport | None = None
    vae = None
    for name in args.what:
        folder = args.out / name
        if name == "classifier":
            model, report = train_classifier(args.seed)
            save_classifier(model, folder)
            reports = [report]
        else:
            if vae is None:
                vae, vae_report = _load_vae(args.vae) if args.vae else train_vae(args.seed)
            trainer = {"sd": train_sd, "pixart": train_pixart, "sd3": train_sd3, "flux": train_flux}[name]
            pipe, report = trainer(vae, args.seed)
            save_pipeline(pipe, folder)
            reports = [vae_report, report]
        _write_readme(folder, reports, command, args.threads)
        _log(f"wrote {folder} ({_folder_size(folder) / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
