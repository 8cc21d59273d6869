"""A load generator for serving: Poisson arrivals at several rates against four ways to serve.

- **one at a time**: each request runs ``pipe(...)`` with T-GATE enabled, in arrival order;
- **request batching**: the server waits up to ``wait`` seconds after the first queued request
  for more (up to ``max_batch``), then runs ``pipe(prompt=[...])`` with T-GATE enabled; every
  request of the batch finishes with it;
- **step batching** without T-GATE, and **step batching with T-GATE**
  (:class:`tgate_kernels.serving.StepBatcher`): requests join the running batch at the next step.

Each request's latency runs from its arrival to its image; throughput is the images over the
time from the first arrival to the last image. The pipeline is the real SD-1.5 UNet (random
weights: cost does not depend on them) at a small latent size, fed by the shipped micro
pipeline's tokenizer and VAE and a random 768-wide CLIP text encoder, so nothing is downloaded.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from dataclasses import asdict, dataclass

import torch

MODES = ("one at a time", "request batching", "step batching", "step batching + T-GATE")


@dataclass(frozen=True)
class LoadSettings:
    rates: tuple[float, ...]
    """Arrival rates, requests per second."""
    requests: int = 12
    steps: int = 10
    gate_step: int = 4
    guidance_scale: float = 7.5
    latent_size: int = 8
    wait: float = 0.5
    """Request batching: how long the first queued request waits for others (seconds)."""
    max_batch: int = 4
    """Request batching: prompts per call; step batching: guided requests per call."""
    seed: int = 0


@dataclass(frozen=True)
class LoadResult:
    mode: str
    rate: float
    images_per_second: float
    p50_seconds: float
    p95_seconds: float
    requests: int


def sd15_serving_pipeline(latent_size: int = 8):
    """A StableDiffusionPipeline with the SD-1.5 UNet (random weights) serving
    ``latent_size``² latents; text of 77 tokens, 768 wide, as SD-1.5's."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..micro.adherence import load_micro_pipeline
    from .architectures import architecture

    micro = load_micro_pipeline("sd")
    torch.manual_seed(0)
    unet = architecture("sd15").build_denoiser("cpu")
    unet.register_to_config(sample_size=latent_size)
    tokenizer = micro.tokenizer
    tokenizer.model_max_length = 77
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=1024, num_hidden_layers=1, num_attention_heads=12,
        max_position_embeddings=77, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    pipe = StableDiffusionPipeline(
        vae=micro.vae, text_encoder=CLIPTextModel(text_config).eval(), tokenizer=tokenizer, unet=unet,
        scheduler=micro.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of ``count`` requests at ``rate`` per second."""
    chooser = random.Random(seed)
    times, now = [], 0.0
    for _ in range(count):
        times.append(now)
        now += chooser.expovariate(rate)
    return times


def _prompts(count: int, seed: int) -> list[str]:
    from ..micro.world import EVAL_PROMPTS

    chooser = random.Random(seed)
    return [chooser.choice(EVAL_PROMPTS) for _ in range(count)]


def _result(mode: str, rate: float, arrivals: list[float], finished: list[float]) -> LoadResult:
    latencies = sorted(done - arrived for arrived, done in zip(arrivals, finished))
    p95 = latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]
    return LoadResult(mode, rate, len(finished) / (max(finished) - arrivals[0]), statistics.median(latencies), p95, len(finished))


class _Clock:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def now(self) -> float:
        return time.perf_counter() - self.start

    def wait_until(self, moment: float) -> None:
        delay = moment - self.now()
        if delay > 0:
            time.sleep(delay)


def _image_size(pipe, settings: LoadSettings) -> int:
    """Pixels a side of images whose latents are ``latent_size`` a side (the micro VAE halves them)."""
    return settings.latent_size * pipe.vae_scale_factor


def _call(pipe, settings: LoadSettings, prompts: list[str], seeds: list[int]) -> dict:
    size = _image_size(pipe, settings)
    return dict(prompt=prompts, num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds], height=size, width=size, output_type="np")


def _one_at_a_time(pipe, settings, arrivals, prompts) -> list[float]:
    import tgate_kernels

    clock, finished = _Clock(), []
    tgate_kernels.enable(pipe, gate_step=settings.gate_step)
    try:
        for index, arrival in enumerate(arrivals):
            clock.wait_until(arrival)
            with torch.no_grad():
                pipe(**_call(pipe, settings, [prompts[index]], [index]))
            finished.append(clock.now())
    finally:
        tgate_kernels.disable(pipe)
    return finished


def _request_batching(pipe, settings, arrivals, prompts) -> list[float]:
    import tgate_kernels

    clock, finished, served = _Clock(), [0.0] * len(arrivals), 0
    tgate_kernels.enable(pipe, gate_step=settings.gate_step)
    try:
        while served < len(arrivals):
            clock.wait_until(arrivals[served])
            deadline = max(clock.now(), arrivals[served] + settings.wait)
            batch = [served]
            while len(batch) < settings.max_batch and batch[-1] + 1 < len(arrivals) and arrivals[batch[-1] + 1] <= deadline:
                clock.wait_until(arrivals[batch[-1] + 1])
                batch.append(batch[-1] + 1)
            if len(batch) < settings.max_batch:
                clock.wait_until(deadline)
            with torch.no_grad():
                pipe(**_call(pipe, settings, [prompts[i] for i in batch], batch))
            for index in batch:
                finished[index] = clock.now()
            served = batch[-1] + 1
    finally:
        tgate_kernels.disable(pipe)
    return finished


def _step_batching(pipe, settings, arrivals, prompts, gated: bool) -> list[float]:
    from ...serving import ImageRequest, StepBatcher

    size = _image_size(pipe, settings)
    clock, finished = _Clock(), [0.0] * len(arrivals)
    done = threading.Event()
    remaining = [len(arrivals)]
    lock = threading.Lock()

    def record(index):
        def callback(future):
            finished[index] = clock.now()
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()
        return callback

    with StepBatcher(pipe, max_rows=2 * settings.max_batch, max_queued=len(arrivals), height=size, width=size) as batcher:
        futures = []
        for index, arrival in enumerate(arrivals):
            clock.wait_until(arrival)
            request = ImageRequest(prompts[index], num_inference_steps=settings.steps, guidance_scale=settings.guidance_scale,
                                   seed=index, gate_step=settings.gate_step if gated else None, output_type="np")
            future = batcher.submit(request)
            future.add_done_callback(record(index))
            futures.append(future)
        done.wait()
        for future in futures:
            future.result()  # a failed request fails the measurement
    return finished


def measure_load(settings: LoadSettings, progress=None) -> list[LoadResult]:
    """Every mode at every rate, the same arrivals and prompts for each mode at a rate."""
    pipe = sd15_serving_pipeline(settings.latent_size)
    say = progress or (lambda message: None)
    with torch.no_grad():  # first-call allocations are nobody's
        pipe(**_call(pipe, settings, ["warm up"], [0]))
    results = []
    for position, rate in enumerate(settings.rates):
        arrivals = poisson_arrivals(rate, settings.requests, settings.seed + position)
        prompts = _prompts(settings.requests, settings.seed + position)
        runs = {
            "one at a time": lambda: _one_at_a_time(pipe, settings, arrivals, prompts),
            "request batching": lambda: _request_batching(pipe, settings, arrivals, prompts),
            "step batching": lambda: _step_batching(pipe, settings, arrivals, prompts, gated=False),
            "step batching + T-GATE": lambda: _step_batching(pipe, settings, arrivals, prompts, gated=True),
        }
        for mode in MODES:
            say(f"rate {rate}/s: {mode}")
            results.append(_result(mode, rate, arrivals, runs[mode]()))
    return results


def render(results: list[LoadResult], settings: LoadSettings) -> str:
    from .report import format_table

    head = (f"{settings.requests} requests per rate, Poisson arrivals (seed {settings.seed}); SD-1.5 UNet at "
            f"{settings.latent_size}x{settings.latent_size} latents, {settings.steps} steps, CFG {settings.guidance_scale}, "
            f"gate {settings.gate_step}; request batching waits {settings.wait:g} s for up to {settings.max_batch} prompts; "
            f"step batching runs up to {2 * settings.max_batch} rows a call.")
    table = format_table(
        ["rate (req/s)", "mode", "images/s", "p50 latency (s)", "p95 latency (s)"],
        [[f"{r.rate:g}", r.mode, f"{r.images_per_second:.3f}", f"{r.p50_seconds:.2f}", f"{r.p95_seconds:.2f}"] for r in results],
    )
    return head + "\n\n" + table + "\n"


def write_plot(results: list[LoadResult], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(11, 4))
    for mode in MODES:
        mine = [r for r in results if r.mode == mode]
        rates = [r.rate for r in mine]
        throughput.plot(rates, [r.images_per_second for r in mine], marker="o", label=mode)
        latency.plot(rates, [r.p95_seconds for r in mine], marker="o", label=mode)
    throughput.set(xlabel="arrival rate (requests/s)", ylabel="images/s", title="throughput")
    latency.set(xlabel="arrival rate (requests/s)", ylabel="p95 latency (s)", title="p95 latency")
    for axis in (throughput, latency):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def as_json(results: list[LoadResult], settings: LoadSettings) -> dict:
    return {"settings": asdict(settings), "results": [asdict(result) for result in results]}
