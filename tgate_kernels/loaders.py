"""The loaders users of the ``tgate`` package know, each a few lines over the controller.

``TgateSDXLLoader(pipe, gate_step=10, num_inference_steps=25)`` (the documented usage) and
``TgateSDXLLoader(pipe)`` (the 1.0.0 usage) both return ``pipe`` with a ``pipe.tgate(...)``
method; the values given to the loader are the defaults of ``pipe.tgate`` (a later loader
replaces them). A loader leaves the ordinary ``pipe(...)`` call as it was: not gated, or, on an
``enable``-d pipeline, gated with ``enable``'s settings and DeepCache.
"""

from __future__ import annotations

from dataclasses import replace

from .families import registry as adapters
from .api import deepcache_option
from .engine.installation import Configuration, configure, controller_of, refuse_auto_in_tgate_api
from .schedule import TgateSettings


def _load(pipe, defaults: TgateSettings, gate_step, num_inference_steps, sp_interval, fi_interval, warm_up, lcm, deepcache):
    refuse_auto_in_tgate_api(gate_step)
    settings = defaults.updated(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)
    if num_inference_steps is not None:
        # defaults that contradict each other are a mistake; a call's own steps may still run
        # fewer steps than the gate (never reached, as with the reference)
        settings.resolve_gate_step(num_inference_steps)
    adapters.check_pipeline(pipe)
    controller = controller_of(pipe)
    current = controller.configuration if controller is not None else Configuration(settings)
    configure(
        pipe,
        replace(
            current,
            loader_settings=settings,
            loader_deepcache=deepcache_option(pipe, deepcache, current.loader_deepcache),
            default_steps=num_inference_steps,
        ),
    )
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
        # a plain loader is T-GATE alone: it takes away DeepCache a DeepCache loader added
        return _load(pipe, defaults, gate_step, num_inference_steps, sp_interval, fi_interval, warm_up, lcm, False)

    loader.__name__ = loader.__qualname__ = name
    loader.__doc__ = (
        f"Attach T-GATE to a {family} pipeline and give it ``pipe.tgate(...)``; returns ``pipe``.\n\n"
        f"Defaults: gate_step={defaults.gate_step}, sp_interval={defaults.sp_interval}, "
        f"fi_interval={defaults.fi_interval}, warm_up={defaults.warm_up}. Values given here become the "
        f"defaults of ``pipe.tgate``; values given to ``pipe.tgate`` win. T-GATE alone: DeepCache added by a "
        f"DeepCache loader is taken away."
    )
    return loader


_STANDARD = TgateSettings()

TgateSDLoader = _make_loader("TgateSDLoader", _STANDARD, "Stable Diffusion 1.x/2.x")
TgateSDXLLoader = _make_loader("TgateSDXLLoader", _STANDARD, "Stable Diffusion XL")
TgatePixArtLoader = _make_loader("TgatePixArtLoader", _STANDARD, "PixArt")
TgatePixArtAlphaLoader = _make_loader("TgatePixArtAlphaLoader", _STANDARD, "PixArt-α")
TgatePixArtSigmaLoader = _make_loader("TgatePixArtSigmaLoader", _STANDARD, "PixArt-Σ")
TgateSVDLoader = _make_loader("TgateSVDLoader", _STANDARD, "Stable Video Diffusion")

# The reference's DeepCache variants compute self-attention at every step before the gate.
_WITH_DEEPCACHE = TgateSettings(sp_interval=1, warm_up=0)


def _make_deepcache_loader(name: str, family: str):
    def loader(
        pipe,
        cache_interval: int = 3,
        cache_branch_id: int = 0,
        gate_step: int | float | None = None,
        num_inference_steps: int | None = None,
        sp_interval: int | None = None,
        fi_interval: int | None = None,
        warm_up: int | None = None,
        lcm: bool | None = None,
    ):
        deepcache = {"cache_interval": cache_interval, "cache_branch_id": cache_branch_id}
        return _load(pipe, _WITH_DEEPCACHE, gate_step, num_inference_steps, sp_interval, fi_interval, warm_up, lcm, deepcache)

    loader.__name__ = loader.__qualname__ = name
    loader.__doc__ = (
        f"Attach T-GATE and DeepCache to a {family} pipeline and give it ``pipe.tgate(...)``; returns ``pipe``.\n\n"
        f"DeepCache reuses deep UNet features on all but every ``cache_interval``-th step, branching at "
        f"``cache_branch_id``. T-GATE defaults here: gate_step={_WITH_DEEPCACHE.gate_step}, "
        f"sp_interval={_WITH_DEEPCACHE.sp_interval}, fi_interval={_WITH_DEEPCACHE.fi_interval}, "
        f"warm_up={_WITH_DEEPCACHE.warm_up}. Both act only during ``pipe.tgate`` calls (and plain calls of an "
        f"``enable``-d pipeline)."
    )
    return loader


TgateSDDeepCacheLoader = _make_deepcache_loader("TgateSDDeepCacheLoader", "Stable Diffusion 1.x/2.x")
TgateSDXLDeepCacheLoader = _make_deepcache_loader("TgateSDXLDeepCacheLoader", "Stable Diffusion XL")

__all__ = [
    "TgateSDLoader",
    "TgateSDXLLoader",
    "TgatePixArtLoader",
    "TgatePixArtAlphaLoader",
    "TgatePixArtSigmaLoader",
    "TgateSVDLoader",
    "TgateSDDeepCacheLoader",
    "TgateSDXLDeepCacheLoader",
]
