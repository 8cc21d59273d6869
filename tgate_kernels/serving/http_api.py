"""An OpenAI-style image endpoint over a step batcher.

``POST /v1/images/generations`` takes ``prompt``, ``n``, ``size`` and ``response_format``
(``b64_json`` only: nothing is stored to link to), plus ``negative_prompt``, ``seed``,
``num_inference_steps``, ``guidance_scale`` and ``gate_step`` as extensions; image ``i`` of a
request is generated with seed ``seed + i``. A malformed request gets 400 with what is wrong; a
replica whose queue is full answers 429 rather than queueing without bound. ``GET /health`` and
``GET /metrics`` (Prometheus text) tell how the replica is doing.
"""

from __future__ import annotations

import asyncio
import base64
import io
import threading
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from .requests import ImageRequest
from .step_batcher import Overloaded, StepBatcher

MAX_IMAGES_PER_REQUEST = 8
_FIELDS = {"prompt", "n", "size", "response_format", "negative_prompt", "seed", "num_inference_steps",
           "guidance_scale", "gate_step", "model", "user"}


class BadRequest(ValueError):
    """A request body the endpoint refuses (answered 400)."""


class Metrics:
    """Counters of one replica, in Prometheus' text format."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"requests": 0, "images": 0, "bad_requests": 0, "overloaded": 0, "failed": 0}
        self.seconds = 0.0

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[name] += amount

    def text(self, load: dict[str, int]) -> str:
        lines = []
        for name, value in self.counts.items():
            lines += [f"# TYPE tgate_{name}_total counter", f"tgate_{name}_total {value}"]
        lines += ["# TYPE tgate_generation_seconds_total counter", f"tgate_generation_seconds_total {self.seconds:.6f}"]
        for name, value in load.items():
            lines += [f"# TYPE tgate_{name} gauge", f"tgate_{name} {value}"]
        return "\n".join(lines) + "\n"


def image_requests(
    body: Any, batcher: StepBatcher, default_steps: int, default_gate: int | float | None, default_guidance: float,
) -> list[ImageRequest]:
    """The image requests of one ``/v1/images/generations`` body (:class:`BadRequest` when it is not one)."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; allowed: {sorted(_FIELDS)}")
    count = body.get("n", 1)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_IMAGES_PER_REQUEST:
        raise BadRequest(f"`n` must be an integer from 1 to {MAX_IMAGES_PER_REQUEST}, got {count!r}")
    size = body.get("size", f"{batcher.width}x{batcher.height}")
    if size != f"{batcher.width}x{batcher.height}":
        raise BadRequest(f"`size` must be {batcher.width}x{batcher.height} on this server, got {size!r}")
    if body.get("response_format", "b64_json") != "b64_json":
        raise BadRequest(f"`response_format` must be b64_json, got {body.get('response_format')!r}")
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise BadRequest(f"`seed` must be a non-negative integer, got {seed!r}")
    try:
        return [
            ImageRequest(
                prompt=body.get("prompt"), negative_prompt=body.get("negative_prompt"),
                num_inference_steps=body.get("num_inference_steps", default_steps),
                guidance_scale=body.get("guidance_scale", default_guidance), seed=seed + index,
                gate_step=body.get("gate_step", default_gate), output_type="pil",
            )
            for index in range(count)
        ]
    except ValueError as error:
        raise BadRequest(str(error)) from None


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def create_app(
    batcher: StepBatcher, *, default_steps: int = 25, default_gate: int | float | None = 0.4, default_guidance: float = 7.5,
):
    """The FastAPI application serving ``batcher``; a body without ``num_inference_steps``,
    ``gate_step`` or ``guidance_scale`` gets the defaults given here."""
    app = FastAPI(title="tgate-kernels", description="T-GATE image generation with step-level batching")
    metrics = Metrics()

    def error(status: int, message: str, kind: str) -> JSONResponse:
        return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})

    @app.post("/v1/images/generations")
    async def generations(request: Request):
        metrics.add("requests")
        try:
            body = await request.json()
        except ValueError:
            metrics.add("bad_requests")
            return error(400, "the body is not JSON", "invalid_request_error")
        try:
            wanted = image_requests(body, batcher, default_steps, default_gate, default_guidance)
            futures = []
            for item in wanted:
                futures.append(batcher.submit(item))
        except BadRequest as refused:
            metrics.add("bad_requests")
            return error(400, str(refused), "invalid_request_error")
        except (ValueError, TypeError) as refused:  # a gate the steps cannot hold, found by the batcher
            metrics.add("bad_requests")
            return error(400, str(refused), "invalid_request_error")
        except Overloaded as full:
            for future in futures:
                future.cancel()
            metrics.add("overloaded")
            return error(429, f"the server is busy: {full}; retry later", "overloaded")
        start = time.perf_counter()
        try:
            images = await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
        except Exception as failed:  # noqa: BLE001
            metrics.add("failed")
            return error(500, f"generation failed: {failed}", "server_error")
        finally:
            metrics.seconds += time.perf_counter() - start
        metrics.add("images", len(images))
        return {"created": int(time.time()), "data": [{"b64_json": png_base64(image)} for image in images]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **batcher.load}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.text(batcher.load))

    return app
