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
    """What one replica has done and how loaded it is, in Prometheus' text format (prometheus_client,
    a registry of its own)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge

        self.registry = CollectorRegistry()
        self.requests = Counter("tgate_requests", "requests to /v1/images/generations", registry=self.registry)
        self.images = Counter("tgate_images", "images returned", registry=self.registry)
        self.refused = Counter("tgate_refused", "requests answered with an error", ["reason"], registry=self.registry)
        self.seconds = Counter("tgate_generation_seconds", "seconds spent waiting for images", registry=self.registry)
        self.load = Gauge("tgate_load", "requests running and waiting, and the rows of the next call", ["what"],
                          registry=self.registry)

    def text(self, load: dict[str, int]) -> str:
        from prometheus_client import generate_latest

        for what, value in load.items():
            self.load.labels(what).set(value)
        return generate_latest(self.registry).decode()


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
        metrics.requests.inc()
        try:
            body = await request.json()
        except ValueError:
            metrics.refused.labels("bad_request").inc()
            return error(400, "the body is not JSON", "invalid_request_error")
        try:
            wanted = image_requests(body, batcher, default_steps, default_gate, default_guidance)
            futures = []
            for item in wanted:
                futures.append(batcher.submit(item))
        except (BadRequest, ValueError, TypeError) as refused:  # ValueError: a gate the steps cannot hold
            metrics.refused.labels("bad_request").inc()
            return error(400, str(refused), "invalid_request_error")
        except Overloaded as full:
            for future in futures:
                future.cancel()
            metrics.refused.labels("overloaded").inc()
            return error(429, f"the server is busy: {full}; retry later", "overloaded")
        start = time.perf_counter()
        try:
            images = await asyncio.gather(*(asyncio.wrap_future(future) for future in futures))
        except Exception as failed:  # noqa: BLE001
            metrics.refused.labels("failed").inc()
            return error(500, f"generation failed: {failed}", "server_error")
        finally:
            metrics.seconds.inc(time.perf_counter() - start)
        metrics.images.inc(len(images))
        return {"created": int(time.time()), "data": [{"b64_json": png_base64(image)} for image in images]}

    @app.get("/health")
    async def health():
        return {"status": "ok", **batcher.load}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return PlainTextResponse(metrics.text(batcher.load), media_type=CONTENT_TYPE_LATEST)

    return app
