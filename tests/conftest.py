"""Helpers every test module shares: one way to generate, one way to compare, the reference.

The tiny pipelines themselves live in ``tests/fixtures``.
"""

import functools
import importlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

from fixtures.tiny_pipelines import TINY_PIPELINES, tiny_generation_kwargs, tiny_sd  # noqa: E402

PROMPTS = ["a photo of a cat", "a red car in the snow"]
NEGATIVE = ["blurry", "low quality"]

REFERENCE_LOADERS = {
    # pipeline: (reference loader, settings only the reference's `pipe.tgate` takes)
    "sd": ("TgateSDLoader", {}),
    "sdxl": ("TgateSDXLLoader", {}),
    "lcm-sdxl": ("TgateSDXLLoader", {"lcm": True}),
    "pixart-alpha": ("TgatePixArtAlphaLoader", {}),
    "pixart-sigma": ("TgatePixArtSigmaLoader", {}),
    "svd": ("TgateSVDLoader", {}),
}

FACTORIES = {name: TINY_PIPELINES[name] for name in REFERENCE_LOADERS}
"""The tiny pipelines the reference also runs, by name."""

DEEPCACHE_LOADERS = {"sd": "TgateSDDeepCacheLoader", "sdxl": "TgateSDXLDeepCacheLoader"}

TINY_ARCHITECTURES = str(Path(__file__).parent / "fixtures" / "configs" / "benchmarks.json")
"""Tiny architectures for the benchmark tests, in the manifest format ``--architectures`` reads."""


def tiny_architecture(name):
    from tgate_kernels.tools.benchmarking.architectures import architecture

    return architecture(name, (TINY_ARCHITECTURES,))


def generate(pipe, method=None, *, steps=6, seed=0, prompt=PROMPTS, negative=NEGATIVE, **kwargs):
    """One short generation with a fixed seed; ``method`` is ``pipe`` itself or ``pipe.tgate``."""
    method = method or pipe
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    if negative is not None:
        kwargs["negative_prompt"] = negative
    return method(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs).images


def output_of(result) -> np.ndarray:
    """The images, frames or audio of a pipeline result (or an array or tensor), as float64."""
    for name in ("frames", "images", "audios"):
        if hasattr(result, name):
            result = getattr(result, name)
            break
    if isinstance(result, torch.Tensor):
        result = result.detach().cpu().double().numpy()
    return np.asarray(result, dtype=np.float64)


def first_changed_step(pipe, baseline_pipe, call_kwargs) -> tuple[int | None, object]:
    """Runs ``pipe`` and ``baseline_pipe`` on ``call_kwargs()`` and returns the index of the
    first scheduler step whose latents differ between the two (``None``: none differs), and
    ``pipe``'s result. T-GATE leaves every step before its gate bit for bit as it was."""
    outputs = []
    for runner in (baseline_pipe, pipe):
        latents, step = [], runner.scheduler.step

        @functools.wraps(step)  # pipelines read its signature (whether it takes a `generator`)
        def recording(*args, _step=step, _latents=latents, **kwargs):
            result = _step(*args, **kwargs)
            _latents.append((result[0] if isinstance(result, tuple) else result.prev_sample).clone())
            return result

        runner.scheduler.step = recording
        try:
            result = runner(**call_kwargs())
        finally:
            del runner.scheduler.step
        outputs.append((latents, result))
    (plain, _), (gated, result) = outputs
    assert len(plain) == len(gated)
    changed = next((index for index, (a, b) in enumerate(zip(plain, gated)) if not torch.equal(a, b)), None)
    return changed, result


def accelerate_launch(argv: list[str], processes: int = 2) -> subprocess.CompletedProcess:
    """``accelerate launch -m tgate_kernels ARGV`` with ``processes`` CPU processes over gloo."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "tgate_kernels", *argv],
        capture_output=True, text=True, env=env, timeout=600,
    )


def hooked_modules(pipe) -> tuple:
    """Every module T-GATE attached a hook to on ``pipe``."""
    from tgate_kernels.engine.installation import controller_of

    return tuple(module for module, _ in controller_of(pipe).hooks)


def compiled_graph_count() -> int:
    """Graphs dynamo compiled in this process so far (its ``unique_graphs`` counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def max_abs_diff(a, b) -> float:
    return float(np.abs(output_of(a) - output_of(b)).max())


@pytest.fixture(scope="session")
def reference():
    """The reference ``tgate`` package (1.0.0). Missing, it fails the tests that compare against
    it when ``TGATE_KERNELS_REQUIRE_REFERENCE=1`` (as the README's test command sets), and skips
    them otherwise."""
    try:
        return importlib.import_module("tgate")
    except ImportError as error:
        message = f"the reference `tgate==1.0.0` is not installed ({error})"
        if os.environ.get("TGATE_KERNELS_REQUIRE_REFERENCE") == "1":
            pytest.fail(message + " and TGATE_KERNELS_REQUIRE_REFERENCE=1")
        pytest.skip(message)


def reference_generation(tgate, name, call_kwargs, *, loader_kwargs=None, loader=None, **settings):
    """The reference's ``pipe.tgate`` on a fresh tiny pipeline (its caches outlive calls)."""
    loader_name, reference_only = REFERENCE_LOADERS[name]
    pipe = getattr(tgate, loader or loader_name)(FACTORIES[name](), **(loader_kwargs or {}))
    return pipe.tgate(**settings, **(reference_only if loader is None else {}), **call_kwargs)


def tiny_call(name, steps=5, **overrides):
    """Keyword arguments of one guided call of the tiny pipeline ``name``."""
    kwargs = tiny_generation_kwargs(name, num_inference_steps=steps)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture(scope="session")
def saved_tiny_sd(tmp_path_factory):
    """A tiny Stable Diffusion pipeline saved with ``save_pretrained``: what ``--model`` loads."""
    folder = tmp_path_factory.mktemp("tiny-sd-pipeline")
    tiny_sd().save_pretrained(folder)
    return str(folder)
