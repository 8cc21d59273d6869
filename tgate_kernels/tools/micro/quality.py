"""How good T-GATE's images are, measured offline on the micro world's trained pipelines.

For one shipped micro pipeline, the same prompts and seeds are generated without T-GATE and with
each variant: fixed gate steps, fixed gates with DeepCache (UNet pipelines), and
``gate_step="auto"``. Each variant gets

- prompt adherence: the fraction of images in which the micro world's classifier reads every
  attribute the prompt asked for, and the mean fraction of the attributes it reads (partial
  credit, which separates a model that gets the colour and place right but the shape wrong);
- PSNR and SSIM against the ungated image of the same prompt and seed (scikit-image);
- FID between the variant's images and the ungated ones (torchmetrics'
  ``FrechetInceptionDistance`` on the classifier's penultimate features, since InceptionV3 knows
  nothing of 32x32 shapes and would have to be downloaded);
- the MACs ratio: the denoiser's multiply-accumulates over all its images, counted by
  ``torch.utils.flop_counter.FlopCounterMode`` while they are generated, over the ungated count.

Beside T-GATE, CFG truncation (guidance dropped at the same steps, nothing cached:
:mod:`.cfg_truncation`) and, on the transformers, diffusers' own caches
(:mod:`.diffusers_caches`) are measured the same way: what T-GATE has to beat at equal MACs.

Attention runs through PyTorch's math backend while counting, so the attention scores are
counted too (the CPU's fused attention kernel has no FLOP formula); every variant, the ungated one
included, runs the same way, so the comparisons are like for like.

An ungated run with other seeds gives the floor of FID and the sampling noise of adherence: a
variant is indistinguishable from the ungated pipeline when it is as close as a second ungated
sample is.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ... import api
from ...config import AutoGate, TgateConfig
from ...engine.autogate import GateChooser
from ..benchmarking.fidelity import fidelity
from .cfg_truncation import CFGTruncation
from .diffusers_caches import DIFFUSERS_CACHES, applies_to
from .adherence import MICRO_CALL, AttributeClassifier, adherence_scores, load_classifier, load_micro_pipeline, micro_call
from .world import EVAL_PROMPTS

DEFAULT_GATES: tuple[int, ...] = (2, 4, 6, 8, 10, 12, 14, 16)
"""Fixed gate steps of the sweep, out of the micro pipelines' 20 steps."""
OTHER_SEEDS_OFFSET = 1_000_003
"""Offset of the second ungated sample's seeds."""


@dataclass(frozen=True)
class QualityRow:
    model: str
    variant: str
    """``ungated``, ``ungated, other seeds``, ``gate N``, ``gate N, prompt's own``, ``gate N, guidance kept``,
    ``gate N + DeepCache``, ``auto``,
    ``CFG truncated at N`` or a diffusers cache's setting (``FirstBlockCache 0.1``, ...)."""
    kind: str
    """``ungated``, ``floor``, ``fixed``, ``prompt-part``, ``guidance-kept``, ``deepcache``, ``auto``,
    ``cfg-truncation`` or ``diffusers-cache``."""
    gate_step: float | None
    """The fixed gate, or the mean of the gates ``auto`` chose (``None`` ungated)."""
    adherence: float
    psnr: float | None
    """Mean over the images whose PSNR is finite (``None`` when every image is identical)."""
    ssim: float
    fid: float
    macs_ratio: float
    images: int
    gates_chosen: tuple[int, ...] = ()
    """``auto``: the gate chosen for each batch."""
    attribute_adherence: float | None = None
    """The mean fraction of each prompt's attributes shown (partial credit per image)."""


@dataclass(frozen=True)
class AutoOverhead:
    """Time spent choosing the gate (``GateChooser.observe`` and ``step_done``) over the time of
    the generations it ran in, with the ordinary attention backend and nothing counted."""

    model: str
    steps: int
    generation_seconds: float
    chooser_seconds: float

    @property
    def fraction(self) -> float:
        return self.chooser_seconds / self.generation_seconds


@dataclass(frozen=True)
class QualitySettings:
    gates: tuple[int, ...] = DEFAULT_GATES
    images_per_prompt: int = 4
    batch_size: int = 8
    seed: int = 0
    deepcache: bool = True
    cfg_truncation: bool = True
    prompt_part: bool = True
    """Also T-GATE keeping the prompt's part after the gate with its own cached outputs
    (``kept_part="conditional", gate_cache="kept-part"``) instead of the reference's mean."""
    guidance_kept: bool = True
    """Also the text frozen at the gate with the guidance kept after it (``guidance_after_gate="kept"``):
    what freezing costs without dropping the guidance."""
    diffusers_caches: bool = True
    auto_gate: AutoGate | None = None
    prompts: tuple[str, ...] = EVAL_PROMPTS
    sp_interval: int = 5
    """T-GATE's self-attention (and joint-attention) schedule in every T-GATE variant."""
    warm_up: int = 2


class ClassifierFeatures(torch.nn.Module):
    """The attribute classifier's penultimate features of [0, 1] images, as FID's extractor."""

    def __init__(self, classifier: AttributeClassifier) -> None:
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.config["hidden"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float() * 2 - 1)


@dataclass
class _Generated:
    images: np.ndarray
    macs: int
    gates_chosen: list[int]


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer


def guidance_of(name: str) -> str | None:
    """How the micro pipeline ``name`` guides as :data:`MICRO_CALL` calls it: ``"batched"``
    (``[negative, prompt]`` in one denoiser call), ``"separate"`` (true CFG: the prompt's call,
    then the negative prompt's) or ``None`` (one unguided call a step)."""
    call = MICRO_CALL[name]
    if call.get("true_cfg_scale", 1.0) > 1 and call.get("negative_prompt") is not None:
        return "separate"
    if "guidance_scale" in call and call["guidance_scale"] > 1:
        return "batched"
    return None


def _generate(pipe, name: str, prompts: Sequence[str], seeds: Sequence[int], batch_size: int, before_call=None) -> _Generated:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    denoiser = type(_denoiser(pipe)).__name__
    images, macs, chosen = [], 0, []
    for start in range(0, len(prompts), batch_size):
        batch = slice(start, start + batch_size)
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds[batch]]
        if before_call is not None:
            before_call()
        call = micro_call(name, len(generators))
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            images.append(pipe(list(prompts[batch]), generator=generators, output_type="np", **call).images)
        macs += sum(counter.get_flop_counts().get(denoiser, {}).values()) // 2
        view = api.view(pipe)
        if view is not None and view.settings.auto:
            chosen.append(view.last_generation.gate_step)
    return _Generated(np.concatenate(images), macs, chosen)


def _pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))


def _closeness(reference: np.ndarray, images: np.ndarray) -> tuple[float | None, float]:
    scores = [fidelity(_pil(a), _pil(b)) for a, b in zip(reference, images)]
    finite = [psnr for psnr, _ in scores if np.isfinite(psnr)]
    return (statistics.fmean(finite) if finite else None), statistics.fmean(ssim for _, ssim in scores)


def _fid(features: ClassifierFeatures, reference: np.ndarray, images: np.ndarray) -> float:
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=features, normalize=True)
    as_tensor = lambda array: torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).float()  # noqa: E731
    metric.update(as_tensor(reference), real=True)
    metric.update(as_tensor(images), real=False)
    return float(metric.compute())


def _variants(settings: QualitySettings, steps: int, unet: bool, guided: bool = True) -> list[tuple[str, str, TgateConfig | int]]:
    """(name, kind, what runs it): a T-GATE configuration, or the step CFG truncation starts at.
    Unguided (``guided=False``), the series that differ from T-GATE only in what happens to the
    guidance are left out."""
    gates = [gate for gate in settings.gates if gate < steps]
    schedule = dict(sp_interval=settings.sp_interval, warm_up=settings.warm_up)
    variants: list[tuple[str, str, TgateConfig | int]] = [
        (f"gate {gate}", "fixed", TgateConfig(gate_step=gate, **schedule)) for gate in gates
    ]
    if guided and settings.prompt_part:
        own = dict(kept_part="conditional", gate_cache="kept-part", **schedule)
        variants += [(f"gate {gate}, prompt's own", "prompt-part", TgateConfig(gate_step=gate, **own)) for gate in gates]
    if guided and settings.guidance_kept:
        kept = dict(guidance_after_gate="kept", **schedule)
        variants += [(f"gate {gate}, guidance kept", "guidance-kept", TgateConfig(gate_step=gate, **kept)) for gate in gates]
    if settings.deepcache and unet:
        variants += [(f"gate {gate} + DeepCache", "deepcache", TgateConfig(gate_step=gate, deepcache=True, **schedule)) for gate in gates]
    variants.append(("auto", "auto", TgateConfig(gate_step="auto", auto_gate=settings.auto_gate, **schedule)))
    if guided and settings.cfg_truncation:
        variants += [(f"CFG truncated at {gate}", "cfg-truncation", gate) for gate in gates]
    return variants


def measure_quality(name: str, settings: QualitySettings = QualitySettings(), progress=None) -> list[QualityRow]:
    """The quality table of the shipped micro pipeline ``name`` (``"sd"`` or ``"pixart"``)."""
    pipe = load_micro_pipeline(name)
    classifier = load_classifier()
    features = ClassifierFeatures(classifier)
    steps = MICRO_CALL[name]["num_inference_steps"]
    prompts = [prompt for prompt in settings.prompts for _ in range(settings.images_per_prompt)]
    seeds = [settings.seed + index for index in range(len(prompts))]
    say = progress or (lambda message: None)

    say(f"{name}: ungated")
    ungated = _generate(pipe, name, prompts, seeds, settings.batch_size)
    whole, partial = adherence_scores(prompts, ungated.images, classifier)
    rows = [QualityRow(name, "ungated", "ungated", None, whole, None, 1.0, 0.0, 1.0, len(prompts), attribute_adherence=partial)]

    def row(variant: str, kind: str, gate: float | None, generated: _Generated) -> QualityRow:
        psnr, ssim = _closeness(ungated.images, generated.images)
        whole, partial = adherence_scores(prompts, generated.images, classifier)
        return QualityRow(
            name, variant, kind, gate, whole, psnr, ssim, _fid(features, ungated.images, generated.images),
            generated.macs / ungated.macs, len(prompts), tuple(generated.gates_chosen), partial,
        )

    say(f"{name}: ungated, other seeds")
    other = _generate(pipe, name, prompts, [seed + OTHER_SEEDS_OFFSET for seed in seeds], settings.batch_size)
    rows.append(row("ungated, other seeds", "floor", None, other))
    guidance = guidance_of(name)
    for variant, kind, config in _variants(settings, steps, getattr(pipe, "unet", None) is not None, guidance is not None):
        say(f"{name}: {variant}")
        if kind == "cfg-truncation":
            # the gate's step counted as T-GATE counts it: the steps after `gate` run unguided
            with CFGTruncation(_denoiser(pipe), config, separate_calls=guidance == "separate") as truncation:
                generated = _generate(pipe, name, prompts, seeds, settings.batch_size, truncation.new_generation)
            rows.append(row(variant, kind, config, generated))
            continue
        api.enable(pipe, config=config)
        try:
            generated = _generate(pipe, name, prompts, seeds, settings.batch_size)
        finally:
            api.disable(pipe)
        chosen = generated.gates_chosen
        gate = (statistics.fmean(chosen) if chosen else None) if kind == "auto" else config.gate_step
        rows.append(row(variant, kind, gate, generated))
    if settings.diffusers_caches and applies_to(pipe):
        for cache in DIFFUSERS_CACHES:
            refused = cache.refuses(pipe, guidance)
            if refused is not None:
                say(f"{name}: {cache.variant} left out: {refused}")
                continue
            say(f"{name}: {cache.variant}")
            cached = load_micro_pipeline(name)  # a cache's hooks stay on the model it was applied to
            cache.apply(cached)
            rows.append(row(cache.variant, "diffusers-cache", None, _generate(cached, name, prompts, seeds, settings.batch_size)))
    return rows


def measure_auto_overhead(name: str, settings: QualitySettings = QualitySettings(), generations: int = 3) -> AutoOverhead:
    """How much of ``gate_step="auto"``'s generations is spent deciding the gate."""
    pipe = load_micro_pipeline(name)
    prompts = list(settings.prompts[: settings.batch_size])
    spent = [0.0]

    def timed(method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - start

        return run

    def generate(seed: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            pipe(prompts, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **micro_call(name, len(prompts)))
        return time.perf_counter() - start

    originals = {attribute: getattr(GateChooser, attribute) for attribute in ("observe", "step_done")}
    api.enable(pipe, config=TgateConfig(gate_step="auto", auto_gate=settings.auto_gate))
    try:
        generate(settings.seed)  # first-call allocations are not the chooser's
        for attribute, method in originals.items():
            setattr(GateChooser, attribute, timed(method))
        total = sum(generate(settings.seed + 1 + generation) for generation in range(generations))
    finally:
        for attribute, method in originals.items():
            setattr(GateChooser, attribute, method)
        api.disable(pipe)
    return AutoOverhead(name, MICRO_CALL[name]["num_inference_steps"], total, spent[0])


def dominating(auto: QualityRow, rows: Sequence[QualityRow]) -> list[QualityRow]:
    """Fixed gates with both higher adherence and fewer MACs than ``auto`` (empty: auto is on or
    above the fixed-gate Pareto front)."""
    return [row for row in rows if row.kind == "fixed" and row.adherence > auto.adherence and row.macs_ratio < auto.macs_ratio]


def as_json(rows: Sequence[QualityRow], overheads: Sequence[AutoOverhead], settings: QualitySettings) -> dict[str, Any]:
    return {
        "settings": {**dataclasses.asdict(settings), "prompts": len(settings.prompts)},
        "rows": [dataclasses.asdict(row) for row in rows],
        "auto_overhead": [{**dataclasses.asdict(overhead), "fraction": overhead.fraction} for overhead in overheads],
    }
