"""Step-level batching with a gate per request.

Requests join the running batch at any step boundary and leave it when they finish. Each tick
runs one denoiser call (the UNet of Stable Diffusion 1.x/2.x and SDXL, PixArt's transformer:
:mod:`.pipelines`) over every active request: a request before its gate brings its two
guidance rows (``[negative, prompt]``), one after its gate a single row whose cross-attention is
its own cache (:mod:`.batched_attention`); each has its own scheduler, timestep and latents, so
requests at different steps, of different lengths, gates and guidance scales share a call.

The contract: a request's image is what ``pipe(...)`` with ``tgate_kernels.enable(pipe, ...)``
at its settings gives for that request alone (without T-GATE when its ``gate_step`` is
``None``), up to the float differences of running rows in a batch rather than alone, whatever
runs before, beside or after it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import api
from ..config import GateCache, GuidanceAfterGate, TgateConfig
from ..engine.attention_modules import hookable_attentions
from ..schedule import StepPlan, plan_generation, plan_step
from .batched_attention import BatchedAttention, BatchPlan, RowSegment
from .pipelines import ServedPipeline, served_class_names, served_pipeline
from .requests import ImageRequest



class BatcherClosed(RuntimeError):
    """The step batcher was closed before the request finished."""


@dataclass
class _Running:
    """A request admitted to the batch: its own generation state."""

    request: ImageRequest
    future: concurrent.futures.Future
    generator: torch.Generator
    scheduler: Any
    latents: torch.Tensor
    conditioning: dict[str, torch.Tensor]
    """Per-row inputs of the denoiser: ``[negative, prompt]`` with guidance, else ``[prompt]``."""
    guided: bool
    plans: list[StepPlan]
    gated: bool
    extra_step_kwargs: dict
    step: int = 0
    caches: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def plan(self) -> StepPlan:
        return self.plans[self.step]

    @property
    def rows(self) -> int:
        """Rows this request brings to the next call (none once it has run its last step)."""
        if self.step >= len(self.plans):
            return 0
        return 2 if self.guided and (not self.gated or self.plan.cfg_batch) else 1


class StepBatcher:
    """Runs image requests on ``pipe`` with step-level batching, each gated by its own T-GATE plan.

    ``config`` gives the T-GATE settings other than the gate (``sp_interval``, ``warm_up``,
    ``fi_interval``); each request brings its own ``gate_step``. ``max_rows`` bounds the
    denoiser rows of a call (a request before its gate with guidance takes two); ``max_queued``
    bounds the requests waiting for room (then :meth:`submit` raises :class:`Overloaded`). A
    request's future can be cancelled at any step: it leaves the batch at the next tick. Images
    are ``height`` x ``width`` (the pipeline's default size when not given).

    With ``start=True`` a worker thread runs the ticks; without, the caller runs them
    (:meth:`tick`, :meth:`run_until_idle`), which makes arrival patterns reproducible.
    """

    def __init__(
        self, pipe, *, config: TgateConfig | None = None, max_rows: int = 16, max_queued: int = 64,
        height: int | None = None, width: int | None = None, start: bool = True,
    ) -> None:
        self.served = _check_pipeline(pipe)
        config = config if config is not None else TgateConfig()
        if config.auto or config.deepcache is not None or config.compile is not None:
            raise ValueError(
                f"`config` of a step batcher takes fixed gates only, without DeepCache or compile; got {config!r}"
            )
        if config.gate_cache is not GateCache.MEAN:
            raise ValueError(
                f"`config.gate_cache` of a step batcher must be 'mean' (what its requests cache at their gates), got "
                f"{config.gate_cache.value!r}"
            )
        if config.guidance_after_gate is not GuidanceAfterGate.DROPPED:
            raise ValueError(
                f"`config.guidance_after_gate` of a step batcher must be 'dropped' (a request after its gate runs one "
                f"row), got {config.guidance_after_gate.value!r}"
            )
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 2:
            raise ValueError(f"`max_rows` must be an integer >= 2 (a guided request takes two rows), got {max_rows!r}")
        if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0:
            raise ValueError(f"`max_queued` must be a non-negative integer, got {max_queued!r}")
        self.height = height or self.served.default_size()
        self.width = width or self.served.default_size()
        factor = pipe.vae_scale_factor
        for name, value in (("height", self.height), ("width", self.width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % factor:
                raise ValueError(f"`{name}` must be a positive multiple of the VAE's factor {factor}, got {value!r}")
        self.pipe = pipe
        self.config = config
        self.max_rows = max_rows
        self.max_queued = max_queued
        attentions = hookable_attentions(self.served.model)
        taken = [attention.name for attention in attentions if "forward" in attention.module.__dict__]
        if taken:
            # another step batcher, T-GATE enabled through a pipeline sharing this denoiser, or a cache's hook
            raise ValueError(
                f"the attention modules {taken[:3]}{' ...' if len(taken) > 3 else ''} of this pipeline's "
                f"{self.served.denoiser} already have their forward replaced (by another step batcher, T-GATE "
                f"enabled on a pipeline sharing it, or another hook); close or disable that first. Nothing was changed."
            )
        self._batch = BatchPlan()
        self._attentions = [
            BatchedAttention(attention.module, attention.cross, self._batch) for attention in attentions
        ]
        self._waiting: deque[tuple[ImageRequest, concurrent.futures.Future]] = deque()
        self._running: list[_Running] = []
        self._lock = threading.Condition()
        self._closed = False
        self._worker: threading.Thread | None = None
        if start:
            self._worker = threading.Thread(target=self._work, name="tgate-step-batcher", daemon=True)
            self._worker.start()

    # -- clients ---------------------------------------------------------------------------

    def submit(self, request: ImageRequest) -> concurrent.futures.Future:
        """Queue ``request``; its future gives the image (as ``pipe(...).images[0]``)."""
        if not isinstance(request, ImageRequest):
            raise TypeError(f"`request` must be an ImageRequest, got {type(request).__name__}")
        self._plans(request)  # a gate the steps cannot hold is refused now, not in the batch
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise BatcherClosed("the step batcher is closed")
            if len(self._waiting) >= self.max_queued:
                raise Overloaded(f"{len(self._waiting)} requests are already waiting (max_queued={self.max_queued})")
            self._waiting.append((request, future))
            self._lock.notify()
        return future

    async def generate(self, request: ImageRequest):
        """The image of ``request``, awaited (the work runs on the batcher's worker)."""
        return await asyncio.wrap_future(self.submit(request))

    @property
    def load(self) -> dict[str, int]:
        """Requests running and waiting, and the rows of the next call."""
        with self._lock:
            return {"running": len(self._running), "waiting": len(self._waiting), "rows": sum(r.rows for r in self._running)}

    def close(self) -> None:
        """Stop: requests not finished fail with :class:`BatcherClosed`, and the pipeline's
        attention modules are given back as they were."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._worker is not None and self._worker is not threading.current_thread():
            self._worker.join()
        with self._lock:
            for running in self._running:
                _settle(running.future, error=BatcherClosed("the step batcher was closed before the request finished"))
            for _, future in self._waiting:
                _settle(future, error=BatcherClosed("the step batcher was closed before the request started"))
            self._running.clear()
            self._waiting.clear()
        for attention in self._attentions:
            attention.remove()

    def __enter__(self) -> StepBatcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the loop -----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not self._running and not self._waiting:
                    self._lock.wait()
                if self._closed:
                    return
            self.tick()

    def run_until_idle(self) -> int:
        """Run ticks until nothing is waiting or running (only without a worker); the ticks run."""
        if self._worker is not None:
            raise RuntimeError("this step batcher runs its own worker; wait on the futures instead")
        ticks = 0
        while self._running or self._waiting:
            self.tick()
            ticks += 1
        return ticks

    def tick(self) -> None:
        """Admit what fits, run one denoiser call over every active request, finish the done ones
        (nothing once the batcher is closed)."""
        if self._closed:
            return
        self._admit()
        running = [r for r in self._running if not r.future.cancelled()]
        self._running = running
        if not running:
            return
        with torch.no_grad():
            try:
                noise = self._denoise(running)
            except Exception as error:  # noqa: BLE001  (the call was everyone's: each of its requests fails)
                for state in running:
                    _settle(state.future, error=error)
                self._running = []
                return
            finished = []
            for index, (state, prediction) in enumerate(zip(running, noise)):
                try:
                    self._advance(state, prediction)
                except Exception as error:  # noqa: BLE001  (a request's failure is its own)
                    _settle(state.future, error=error)
                    continue
                if state.step == len(state.plans):
                    finished.append(state)
            self._running = [r for r in running if not r.future.done() and r not in finished]
            if finished:
                self._finish(finished)

    def _admit(self) -> None:
        with self._lock:
            rows = sum(r.rows for r in self._running)
            while self._waiting:
                request, future = self._waiting[0]
                needed = 2 if request.guidance_scale > 1 else 1
                if self._running and rows + needed > self.max_rows:
                    break
                self._waiting.popleft()
                if future.cancelled():
                    continue
                try:
                    state = self._start(request, future)
                except Exception as error:  # noqa: BLE001
                    _settle(future, error=error)
                    continue
                self._running.append(state)
                rows += state.rows

    def _plans(self, request: ImageRequest) -> tuple[list[StepPlan], bool]:
        steps = request.num_inference_steps
        if request.gate_step is None:
            return [plan_step(step, self.config, steps + 1) for step in range(steps)], False
        config = dataclasses.replace(self.config, gate_step=request.gate_step)
        return plan_generation(config, steps), True

    def _start(self, request: ImageRequest, future) -> _Running:
        pipe = self.pipe
        device = pipe._execution_device
        guided = request.guidance_scale > 1
        conditioning = self.served.conditioning(request, guided, self.height, self.width)
        scheduler = copy.deepcopy(pipe.scheduler)
        scheduler.set_timesteps(request.num_inference_steps, device=device)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        factor = pipe.vae_scale_factor
        shape = (1, self.served.latent_channels, self.height // factor, self.width // factor)
        dtype = conditioning["encoder_hidden_states"].dtype
        # as the pipeline's prepare_latents, scaled by this request's own scheduler
        latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma
        extra = pipe.prepare_extra_step_kwargs(generator, 0.0)
        plans, gated = self._plans(request)
        return _Running(request, future, generator, scheduler, latents, conditioning, guided, plans, gated, extra)

    def _denoise(self, running: list[_Running]) -> list[torch.Tensor]:
        """One denoiser call over every request; each request's guided noise prediction."""
        inputs, timesteps, conditioning = [], [], {}
        segments = []
        for state in running:
            rows = state.rows
            timestep = state.scheduler.timesteps[state.step]
            sample = state.scheduler.scale_model_input(torch.cat([state.latents] * rows), timestep)
            inputs.append(sample)
            timesteps.append(timestep.reshape(1).expand(rows))
            for name, tensor in state.conditioning.items():
                # after its gate a guided request runs the negative part's row, as T-GATE keeps it
                conditioning.setdefault(name, []).append(tensor[:rows])
            segments.append(RowSegment(state.caches, state.plan, rows, state.gated))
        self._batch.segments = segments
        try:
            output = self.served.predict(
                torch.cat(inputs), torch.cat(timesteps), {name: torch.cat(rows) for name, rows in conditioning.items()},
            )
        finally:
            self._batch.segments = []
        predictions, start = [], 0
        for state in running:
            predictions.append(self.served.guide(output[start: start + state.rows], state.request.guidance_scale))
            start += state.rows
        return predictions

    def _advance(self, state: _Running, noise: torch.Tensor) -> None:
        timestep = state.scheduler.timesteps[state.step]
        stepped = state.scheduler.step(noise, timestep, state.latents, **state.extra_step_kwargs, return_dict=False)
        state.latents = stepped[self.served.step_output(len(state.plans))]
        if state.request.callback_on_step_end is not None:
            state.request.callback_on_step_end(state.step, timestep, state.latents)
        state.step += 1

    def _finish(self, finished: list[_Running]) -> None:
        """Decode the finished requests' latents in one batch and hand out the images."""
        pipe = self.pipe
        latents = torch.cat([state.latents for state in finished])
        try:
            decoded, nsfw = latents, None
            if any(state.request.output_type != "latent" for state in finished):
                decoded, nsfw = self.served.decode(latents)
        except Exception as error:  # noqa: BLE001
            for state in finished:
                _settle(state.future, error=error)
            return
        for index, state in enumerate(finished):
            output_type = state.request.output_type
            if output_type == "latent":
                _settle(state.future, result=latents[index: index + 1])
                continue
            denormalize = [True] if nsfw is None else [not nsfw[index]]
            image = pipe.image_processor.postprocess(decoded[index: index + 1], output_type=output_type, do_denormalize=denormalize)
            _settle(state.future, result=image[0])


def _settle(future: concurrent.futures.Future, result: Any = None, error: BaseException | None = None) -> None:
    """Give ``future`` its outcome unless its client cancelled it meanwhile (a request's future
    stays pending while it runs, so that it can be cancelled at any step)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Overloaded(RuntimeError):
    """The step batcher's queue is full: try again later."""


def _check_pipeline(pipe) -> ServedPipeline:
    served = served_pipeline(pipe)
    if served is None:
        raise ValueError(
            f"the step batcher runs {', '.join(served_class_names())} (and subclasses); {type(pipe).__name__} is not "
            f"one yet. Nothing was changed."
        )
    if api.view(pipe) is not None:
        raise ValueError(
            "T-GATE is enabled on this pipeline: the step batcher gates each request itself. Call "
            "tgate_kernels.disable(pipe) first. Nothing was changed."
        )
    if getattr(served.model.config, "time_cond_proj_dim", None) is not None:
        raise ValueError("the step batcher does not run guidance-embedded UNets (LCM) yet. Nothing was changed.")
    if getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(
            f"the step batcher runs first-order schedulers (one denoiser call a step); {type(pipe.scheduler).__name__} "
            f"has order {pipe.scheduler.order}. Nothing was changed."
        )
    return served
