"""The loaders users of the ``tgate`` package know, each a few lines over the engine.

``TgateSDXLLoader(pipe, gate_step=10, num_inference_steps=25)`` (the documented usage) and
``TgateSDXLLoader(pipe)`` (the 1.0.0 usage) both return ``pipe`` with a ``pipe.tgate(...)``
method; the values given to the loader are the defaults of ``pipe.tgate``. A loader leaves the
ordinary ``pipe(...)`` call as it was unless the pipeline was also ``enable``-d.
"""

from __future__ import annotations

from .api import attach_controller
from .schedule import TgateSettings


def _load(pipe, defaults: TgateSettings, gate_step, num_inference_steps, sp_interval, fi_interval, warm_up, lcm):
    settings = defaults.updated(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)
    if num_inference_steps is not None:
        settings.resolve_gate_step(num_inference_steps)
    controller = attach_controller(pipe, settings)
    controller.settings = settings
    if num_inference_steps is not None:
        controller.num_inference_steps = num_inference_steps
    return pipe


def _make_loader(name: str, defaults: TgateSettings, family: str):
    def loader(
        pipe,
        gate_step: int | float | None = None,
        num_inference_steps: int | None = None,
        sp_interval: int | None = None,
        fi_interval: int | None = None,
        warm_up: int | None = None,
        lcm: bool | None = None,
    ):
        return _load(pipe, defaults, gate_step, num_inference_steps, sp_interval, fi_interval, warm_up, lcm)

    loader.__name__ = loader.__qualname__ = name
    loader.__doc__ = (
        f"Attach T-GATE to a {family} pipeline and give it ``pipe.tgate(...)``; returns ``pipe``.\n\n"
        f"Defaults: gate_step={defaults.gate_step}, sp_interval={defaults.sp_interval}, "
        f"fi_interval={defaults.fi_interval}, warm_up={defaults.warm_up}. Values given here become the "
        f"defaults of ``pipe.tgate``; values given to ``pipe.tgate`` win."
    )
    return loader


_STANDARD = TgateSettings()

TgateSDLoader = _make_loader("TgateSDLoader", _STANDARD, "Stable Diffusion 1.x/2.x")
TgateSDXLLoader = _make_loader("TgateSDXLLoader", _STANDARD, "Stable Diffusion XL")
TgatePixArtLoader = _make_loader("TgatePixArtLoader", _STANDARD, "PixArt")
TgatePixArtAlphaLoader = _make_loader("TgatePixArtAlphaLoader", _STANDARD, "PixArt-α")
TgatePixArtSigmaLoader = _make_loader("TgatePixArtSigmaLoader", _STANDARD, "PixArt-Σ")
TgateSVDLoader = _make_loader("TgateSVDLoader", _STANDARD, "Stable Video Diffusion")

__all__ = [
    "TgateSDLoader",
    "TgateSDXLLoader",
    "TgatePixArtLoader",
    "TgatePixArtAlphaLoader",
    "TgatePixArtSigmaLoader",
    "TgateSVDLoader",
]
