"""The image endpoint on Ray Serve: one replica per GPU (or per CPU machine), each a pipeline
with its own step batcher. More machines joining the Ray cluster take more replicas; that is
how the service scales out."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ServerOptions:
    """What each replica loads and how it batches (see ``tgate-kernels serve --help``)."""

    model: str
    """A diffusers pipeline folder (Stable Diffusion 1.x/2.x, SDXL, PixArt) or Hub id."""
    replicas: int = 1
    max_rows: int = 16
    max_queued: int = 64
    steps: int = 25
    guidance_scale: float = 7.5
    gate_step: int | float | None = 0.4
    sp_interval: int = 5
    warm_up: int = 2
    dtype: str = "float32"


def load_served_pipeline(model: str, dtype: str = "float32"):
    """The pipeline a replica serves, on the GPU when there is one."""
    import torch
    from diffusers import DiffusionPipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def replica_app(options: ServerOptions):
    """What one replica serves: its pipeline, step batcher and FastAPI application."""
    from ..config import TgateConfig
    from .http_api import create_app
    from .step_batcher import StepBatcher

    pipe = load_served_pipeline(options.model, options.dtype)
    batcher = StepBatcher(
        pipe, config=TgateConfig(sp_interval=options.sp_interval, warm_up=options.warm_up),
        max_rows=options.max_rows, max_queued=options.max_queued,
    )
    return create_app(batcher, default_steps=options.steps, default_gate=options.gate_step,
                      default_guidance=options.guidance_scale)


def application(options: ServerOptions):
    """The Ray Serve application of ``options`` (``serve.run`` it)."""
    import torch
    from ray import serve

    @serve.ingress()
    class TgateImages:
        def __init__(self, settings: dict) -> None:
            self.options = ServerOptions(**settings)

        def __serve_build_asgi_app__(self):
            return replica_app(self.options)

    gpus = 1 if torch.cuda.is_available() else 0
    deployment = serve.deployment(
        TgateImages, name="tgate-images", num_replicas=options.replicas,
        ray_actor_options={"num_gpus": gpus, "num_cpus": 0 if gpus else 1},
        # the batcher queues and answers 429 itself: let Serve hand it every request
        max_ongoing_requests=options.max_queued + options.max_rows + 8,
    )
    return deployment.bind(asdict(options))
