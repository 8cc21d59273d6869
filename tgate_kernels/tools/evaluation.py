"""Comparing two folders of generated images, e.g. T-GATE's against the baseline's.

A folder is what ``tgate-kernels generate`` writes: PNG images and a ``metadata.jsonl`` holding
one JSON object per image with at least

    {"file": "000003_01.png", "index": 3, "image": 1, "seed": 1234, "prompt": "a photo of a cat"}

``file`` is relative to the folder, ``index`` is the prompt's position in the prompts file and
``image`` which image of that prompt (0-based). Other keys are ignored, as are empty lines.
Images are paired across the two folders by (index, image, seed), that is the same prompt from
the same starting noise; an image in one folder only is reported and left out of every metric.

The metrics, all from maintained implementations, each on the paired images only:

- PSNR and SSIM of each pair (scikit-image on 8-bit RGB, as
  :func:`tgate_kernels.tools.benchmarking.fidelity.fidelity`): how far B strays from A, image by image.
  Identical images have an infinite PSNR, so the mean PSNR is over the finite values.
- FID between the two sets (torchmetrics' ``FrechetInceptionDistance``, A as the real set):
  whether B's images, as a whole, look like A's. The default InceptionV3 comes from
  torch-fidelity, which downloads its weights on first use; an own feature extractor can be
  given instead (see :func:`evaluate`).
- CLIP score of each set against its own prompts (torchmetrics' ``CLIPScore``), with a CLIP
  model already on this machine: whether B follows the prompts as well as A does.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .benchmarking.fidelity import fidelity
from .benchmarking.report import format_table

METADATA = "metadata.jsonl"
INCEPTION_FEATURES = (64, 192, 768, 2048)
"""The InceptionV3 layers torchmetrics can take features from (``feature=`` as an int)."""
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
"""The file torch-fidelity downloads into torch hub's ``checkpoints`` folder on first use."""

_FIELDS = {"file": str, "index": int, "image": int, "seed": int, "prompt": str}


@dataclass(frozen=True)
class PairScore:
    key: str
    """``f"{index:06d}_{image:02d}"``, as in the generated file names."""
    index: int
    image: int
    seed: int
    prompt: str
    file_a: str
    file_b: str
    psnr: float
    """dB; infinite for identical images."""
    ssim: float


@dataclass
class EvalReport:
    dir_a: str
    dir_b: str
    pairs: list[PairScore]
    mean_psnr: float
    """Over the finite PSNRs; infinite when every pair is identical."""
    mean_ssim: float
    fid: float | None
    fid_note: str | None
    """Why ``fid`` is None, and what to do about it; None when it was computed."""
    clip_score_a: float | None
    clip_score_b: float | None
    clip_note: str | None
    only_in_a: list[str]
    """Images of A without a partner in B, as ``"<key> (seed <seed>)"``."""
    only_in_b: list[str]
    settings_note: str | None = None
    """The job settings (``run.json``) in which B differs from A; None when they agree or are unknown."""


@dataclass(frozen=True)
class _Entry:
    index: int
    image: int
    seed: int
    prompt: str
    path: str

    @property
    def key(self) -> str:
        return f"{self.index:06d}_{self.image:02d}"

    @property
    def label(self) -> str:
        # The key alone would hide a seed mismatch, the commonest reason for a missing partner.
        return f"{self.key} (seed {self.seed})"


class _TensorFeatures(torch.nn.Module):
    """A ``CLIPModel`` whose feature methods return the projected embeddings as tensors.

    torchmetrics 1.9's ``CLIPScore`` normalises whatever ``get_image_features`` and
    ``get_text_features`` return, but transformers 5 returns a ``BaseModelOutputWithPooling``
    holding the embeddings in ``pooler_output`` (Lightning-AI/torchmetrics#3428).
    """

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embeddings(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return _embeddings(self.model.get_text_features(*args, **kwargs))


def _embeddings(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _read_folder(directory: str, label: str) -> dict[tuple[int, int, int], _Entry]:
    """The images a folder's metadata lists, by (index, image, seed); every file checked."""
    if not os.path.isdir(directory):
        raise ValueError(f"folder {label} does not exist or is not a folder: {directory}")
    metadata = os.path.join(directory, METADATA)
    if not os.path.isfile(metadata):
        raise ValueError(f"folder {label} has no {METADATA}: {directory}")
    entries: dict[tuple[int, int, int], _Entry] = {}
    lines: dict[tuple[int, int, int], int] = {}
    with open(metadata, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"folder {label}: {metadata} line {number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON ({error.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where} is not a JSON object")
            for name, kind in _FIELDS.items():
                if name not in record:
                    raise ValueError(f"{where} lacks {name!r}")
                value = record[name]
                # bool is an int to Python, but never a valid index, image or seed.
                if not isinstance(value, kind) or isinstance(value, bool):
                    raise ValueError(f"{where} has {name!r} = {value!r}, not a {kind.__name__}")
            path = os.path.abspath(os.path.join(directory, record["file"]))
            if not os.path.isfile(path):
                raise ValueError(f"{where} names the image {record['file']!r}, which does not exist: {path}")
            key = (record["index"], record["image"], record["seed"])
            if key in lines:
                raise ValueError(f"{where} repeats index {key[0]}, image {key[1]}, seed {key[2]} of line {lines[key]}")
            lines[key] = number
            entries[key] = _Entry(*key, prompt=record["prompt"], path=path)
    if not entries:
        raise ValueError(f"folder {label}: {metadata} lists no images")
    return entries


def _settings_note(dir_a: str, dir_b: str) -> str | None:
    """Which job settings differ between two ``generate`` folders (their ``run.json``)."""
    runs = []
    for directory in (dir_a, dir_b):
        try:
            with open(os.path.join(directory, "run.json"), encoding="utf-8") as handle:
                runs.append(json.load(handle))
        except (OSError, ValueError):
            return None
    a, b = runs
    differ = sorted(key for key in set(a) | set(b) if a.get(key) != b.get(key))
    if not differ:
        return None
    shown = "; ".join(f"{key}: {json.dumps(a.get(key))} in A, {json.dumps(b.get(key))} in B" for key in differ)
    return f"the runs differ in {shown}"


def _fid_metric(fid_features: int | torch.nn.Module | None, pairs: int, image_size: tuple[int, int],
                device: torch.device, weights: str | None = None) -> tuple[Any, str | None]:
    """The FID metric to feed, or None and the reason."""
    feature = 2048 if fid_features is None else fid_features
    if isinstance(feature, bool) or not isinstance(feature, (int, torch.nn.Module)):
        raise TypeError(f"fid_features must be None, an int or a torch.nn.Module, got {fid_features!r}")
    if isinstance(feature, int) and feature not in INCEPTION_FEATURES:
        raise ValueError(f"fid_features must be one of {INCEPTION_FEATURES} as an int, got {feature}")
    if pairs < 2:
        return None, f"FID needs at least 2 images in each folder, and only {pairs} image pairs up"
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, "FID skipped: it needs torchmetrics: `pip install torchmetrics`"

    if isinstance(feature, torch.nn.Module):
        width, height = image_size
        # normalize=True: the module gets float images in [0, 1]; torchmetrics probes a module
        # without `num_features` with one random image of this size.
        metric = FrechetInceptionDistance(feature=feature, normalize=True, input_img_size=(3, height, width))
        return metric.to(device), None
    own = "or give --fid-features the weights file, or `micro` for the micro world's classifier features"
    try:
        metric = FrechetInceptionDistance(feature=feature, feature_extractor_weights_path=weights)
    except ImportError:
        return None, (f"FID skipped: InceptionV3 features need torch-fidelity: `pip install torch-fidelity` "
                      f"(or `pip install 'torchmetrics[image]'`), {own}")
    except (OSError, RuntimeError) as error:
        cache = os.path.join(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)
        return None, (f"FID skipped: the InceptionV3 weights could not be loaded ({_first_line(error)}); "
                      f"run once with internet access or copy {INCEPTION_WEIGHTS} to {cache}, {own}")
    return metric.to(device), None


def _clip_metrics(clip_model: str | None, device: torch.device) -> tuple[tuple[Any, Any] | None, str | None]:
    """One CLIPScore per folder, sharing one model, or None and the reason."""
    if clip_model is None:
        return None, "CLIP score not asked for: give --clip-model a local CLIP model folder or a cached model id"
    if not isinstance(clip_model, str) or not clip_model:
        raise TypeError(f"clip_model must be None or a CLIP model folder or id, got {clip_model!r}")
    if (os.path.isabs(clip_model) or clip_model.startswith(".")) and not os.path.isdir(clip_model):
        return None, f"CLIP score skipped: the CLIP model folder {clip_model!r} does not exist"
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
    except ImportError:
        return None, "CLIP score skipped: it needs torchmetrics: `pip install torchmetrics`"
    try:
        from transformers import CLIPModel, CLIPProcessor

        # torchmetrics would load a model id itself, but it takes only the ids it knows (no local
        # folder) and would download a missing model; local_files_only never downloads.
        model = CLIPModel.from_pretrained(clip_model, local_files_only=True).eval()
        processor = CLIPProcessor.from_pretrained(clip_model, local_files_only=True)
    except (ImportError, OSError, ValueError) as error:
        return None, (f"CLIP score skipped: CLIP model {clip_model!r} could not be loaded from this machine "
                      f"({_first_line(error)}); it must be a local folder or a model id already in the "
                      "Hugging Face cache, as nothing is downloaded (HF_HUB_OFFLINE applies)")
    loaded = (_TensorFeatures(model), processor)
    return (CLIPScore(model_name_or_path=lambda: loaded).to(device),
            CLIPScore(model_name_or_path=lambda: loaded).to(device)), None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _load(path: str) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as error:  # not an image, or a file cut short
        raise ValueError(f"{path} is not a readable image ({_first_line(error)})") from None


def _same_size_runs(images: list[np.ndarray]) -> list[list[np.ndarray]]:
    """Consecutive images of one size, so that each run stacks into one batch."""
    runs: list[list[np.ndarray]] = []
    for image in images:
        if runs and runs[-1][0].shape == image.shape:
            runs[-1].append(image)
        else:
            runs.append([image])
    return runs


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1)


def _score(entry_a: _Entry, entry_b: _Entry, image_a: np.ndarray, image_b: np.ndarray) -> PairScore:
    if image_a.shape != image_b.shape:
        (height_a, width_a), (height_b, width_b) = image_a.shape[:2], image_b.shape[:2]
        raise ValueError(f"pair {entry_a.label} differs in size: {entry_a.path} is {width_a}x{height_a}, "
                         f"{entry_b.path} is {width_b}x{height_b}")
    psnr, ssim = fidelity(Image.fromarray(image_a), Image.fromarray(image_b))
    return PairScore(key=entry_a.key, index=entry_a.index, image=entry_a.image, seed=entry_a.seed,
                     prompt=entry_a.prompt, file_a=entry_a.path, file_b=entry_b.path, psnr=psnr, ssim=ssim)


def evaluate(dir_a: str, dir_b: str, *, fid_features: int | torch.nn.Module | None = None,
             clip_model: str | None = None, device: str | torch.device = "cpu", batch_size: int = 16,
             fid_weights: str | None = None) -> EvalReport:
    """Compare the images of ``dir_b`` with those of ``dir_a`` (the reference), pair by pair and as sets.

    ``fid_features`` picks FID's feature extractor:

    - None: torchmetrics' default, InceptionV3's 2048 pooled features (needs torch-fidelity and
      its weights; without them ``fid`` is None and ``fid_note`` says what to install or cache);
    - an int: another InceptionV3 layer, one of 64, 192, 768, 2048;
    - a ``torch.nn.Module``: called (on ``device``, under ``torch.no_grad``) with float32 image
      batches of shape (N, 3, H, W), values in [0, 1], at the images' own size (nothing resized),
      it returns (N, d) features. An int ``num_features`` attribute gives d; without it torchmetrics
      calls the module once on the CPU with one random (1, 3, H, W) image to find it.

    ``fid_weights``: a local file of torch-fidelity's InceptionV3 weights, for the InceptionV3
    features without a download.

    ``clip_model`` (a local folder or a model id in the Hugging Face cache, loaded with
    ``local_files_only``) adds each folder's CLIP score against its prompts; None skips it.
    ``batch_size`` images of each folder are in memory at a time.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    entries_a = _read_folder(dir_a, "A")
    entries_b = _read_folder(dir_b, "B")
    matched = sorted(entries_a.keys() & entries_b.keys())
    other = [key for key in matched if entries_a[key].prompt != entries_b[key].prompt]
    if other:
        a, b = entries_a[other[0]], entries_b[other[0]]
        raise ValueError(
            f"folders A and B hold different prompts: {len(other)} of {len(matched)} pairs differ, e.g. {a.label} is "
            f"{a.prompt!r} in A ({dir_a}) and {b.prompt!r} in B ({dir_b}); compare runs of the same prompts file"
        )
    if not matched:
        raise ValueError(f"no image of folder A ({dir_a}, {len(entries_a)} images) pairs up with one of folder B "
                         f"({dir_b}, {len(entries_b)} images) by (index, image, seed)")
    device = torch.device(device)
    first = _load(entries_a[matched[0]].path)
    fid, fid_note = _fid_metric(fid_features, len(matched), (first.shape[1], first.shape[0]), device, fid_weights)
    clip, clip_note = _clip_metrics(clip_model, device)

    float_images = isinstance(fid_features, torch.nn.Module)
    pairs: list[PairScore] = []
    with torch.no_grad():
        for start in range(0, len(matched), batch_size):
            batch = [(entries_a[key], entries_b[key]) for key in matched[start:start + batch_size]]
            images_a = [_load(a.path) for a, _ in batch]
            images_b = [_load(b.path) for _, b in batch]
            pairs.extend(_score(a, b, image_a, image_b) for (a, b), image_a, image_b in zip(batch, images_a, images_b))
            if fid is not None:
                for real, images in ((True, images_a), (False, images_b)):
                    for run in _same_size_runs(images):
                        tensor = torch.stack([_chw(image) for image in run])
                        tensor = tensor.float() / 255 if float_images else tensor
                        fid.update(tensor.to(device), real=real)
            if clip is not None:
                for metric, images, side in ((clip[0], images_a, 0), (clip[1], images_b, 1)):
                    metric.update([_chw(image).to(device) for image in images], [pair[side].prompt for pair in batch])
        fid_value = None if fid is None else float(fid.compute())
        clip_a, clip_b = (None, None) if clip is None else (float(clip[0].compute()), float(clip[1].compute()))

    finite = [pair.psnr for pair in pairs if math.isfinite(pair.psnr)]
    return EvalReport(
        dir_a=os.path.abspath(dir_a),
        dir_b=os.path.abspath(dir_b),
        pairs=pairs,
        mean_psnr=statistics.fmean(finite) if finite else math.inf,
        mean_ssim=statistics.fmean(pair.ssim for pair in pairs),
        fid=fid_value,
        fid_note=fid_note,
        clip_score_a=clip_a,
        clip_score_b=clip_b,
        clip_note=clip_note,
        only_in_a=[entries_a[key].label for key in sorted(entries_a.keys() - entries_b.keys())],
        only_in_b=[entries_b[key].label for key in sorted(entries_b.keys() - entries_a.keys())],
        settings_note=_settings_note(dir_a, dir_b),
    )


def _db(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"


def _optional(value: float | None, digits: int) -> str:
    # Rounding first keeps a FID of -1e-9 (numerical noise around 0) from showing as "-0.000".
    return "-" if value is None else f"{round(value, digits) + 0.0:.{digits}f}"


def render(report: EvalReport) -> str:
    """A terminal table of the pairs, then the means, FID, CLIP scores and notes."""
    table = format_table(["key", "seed", "PSNR (dB)", "SSIM"],
                         [[p.key, p.seed, _db(p.psnr), f"{p.ssim:.4f}"] for p in report.pairs])
    identical = sum(math.isinf(p.psnr) for p in report.pairs)
    finite = len(report.pairs) - identical
    lines = [
        f"A: {report.dir_a}",
        f"B: {report.dir_b}",
        "",
        table,
        "",
        f"pairs: {len(report.pairs)} ({identical} identical)",
        f"mean PSNR: {_db(report.mean_psnr)} dB "
        + (f"(over the {finite} non-identical pairs)" if finite else "(every pair identical)"),
        f"mean SSIM: {report.mean_ssim:.4f}",
        f"FID: {_optional(report.fid, 3)}",
        f"CLIP score: A {_optional(report.clip_score_a, 2)}, B {_optional(report.clip_score_b, 2)}",
    ]
    for note in (report.settings_note, report.fid_note, report.clip_note):
        if note:
            lines.append(f"note: {note}")
    for side, keys in (("A", report.only_in_a), ("B", report.only_in_b)):
        if keys:
            lines.append(f"only in {side} ({len(keys)}, not compared): {', '.join(keys)}")
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    # JSON has no infinity: a non-finite float is written as text that float() reads back.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {name: _json_value(item) for name, item in value.items()}
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    return value


def write_report(report: EvalReport, out_dir: str, pairs_shown: int = 4) -> dict[str, str]:
    """Write eval.md (the table and notes), eval.json (everything), eval.csv (one row per pair) and
    eval.png (the ``pairs_shown`` pairs of lowest SSIM, and histograms of PSNR and SSIM) into
    ``out_dir``; return their paths."""
    if isinstance(pairs_shown, bool) or not isinstance(pairs_shown, int) or pairs_shown < 0:
        raise ValueError(f"pairs_shown must be an int >= 0, got {pairs_shown!r}")
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"eval.{kind}") for kind in ("md", "json", "csv", "png")}
    with open(paths["md"], "w", encoding="utf-8") as handle:
        handle.write(f"# eval\n\n```\n{render(report)}\n```\n")
    with open(paths["json"], "w", encoding="utf-8") as handle:
        json.dump(_json_value(dataclasses.asdict(report)), handle, indent=2, allow_nan=False)
        handle.write("\n")
    with open(paths["csv"], "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "index", "image", "seed", "psnr", "ssim", "prompt", "file_a", "file_b"])
        for p in report.pairs:
            writer.writerow([p.key, p.index, p.image, p.seed, p.psnr, p.ssim, p.prompt, p.file_a, p.file_b])
    _plot(report, paths["png"], pairs_shown)
    return paths


def _plot(report: EvalReport, path: str, pairs_shown: int) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    # The pairs that differ most are the ones worth looking at.
    shown = sorted(report.pairs, key=lambda p: p.ssim)[:pairs_shown]
    columns = max(len(shown), 2)
    figure = Figure(figsize=(max(10.0, 3.2 * columns), 7.0 if shown else 4.0), layout="constrained")
    figure.suptitle(f"A: {report.dir_a}\nB: {report.dir_b}", fontsize=9)
    top, bottom = figure.subfigures(2, 1, height_ratios=[1.1, 1]) if shown else (None, figure)
    if shown:
        top.suptitle(f"the {len(shown)} pair(s) of lowest SSIM, A | B", fontsize=10)
        for axes, pair in zip(top.subplots(1, len(shown), squeeze=False)[0], shown):
            image_a, image_b = _load(pair.file_a), _load(pair.file_b)
            gap = np.full((image_a.shape[0], max(2, image_a.shape[1] // 16), 3), 255, dtype=np.uint8)
            axes.imshow(np.concatenate([image_a, gap, image_b], axis=1), interpolation="nearest")
            axes.set_title(f"{pair.key} (seed {pair.seed})\nPSNR {_db(pair.psnr)} dB, SSIM {pair.ssim:.4f}", fontsize=9)
            axes.set_axis_off()
    psnr_axes, ssim_axes = bottom.subplots(1, 2)
    finite = [p.psnr for p in report.pairs if math.isfinite(p.psnr)]
    bins = min(20, max(5, len(report.pairs)))
    if finite:
        psnr_axes.hist(finite, bins=bins, color="tab:blue")
    else:
        psnr_axes.text(0.5, 0.5, "every pair identical\n(PSNR = inf)", ha="center", va="center",
                       transform=psnr_axes.transAxes)
    psnr_axes.set_title(f"PSNR (dB) of {len(finite)} non-identical pairs, mean {_db(report.mean_psnr)}", fontsize=10)
    ssim_axes.hist([p.ssim for p in report.pairs], bins=bins, color="tab:orange")
    ssim_axes.set_title(f"SSIM of {len(report.pairs)} pairs, mean {report.mean_ssim:.4f}", fontsize=10)
    for axes in (psnr_axes, ssim_axes):
        axes.set_ylabel("pairs")
        axes.yaxis.set_major_locator(MaxNLocator(integer=True))
        # SSIMs near 1 differ in the fourth digit: few ticks keep their long labels apart.
        axes.xaxis.set_major_locator(MaxNLocator(5))
    figure.savefig(path, dpi=100)
