"""The loaders users of the ``tgate`` package know, and ``pipe.tgate``, each a few lines over the engine.

``TgateSDXLLoader(pipe, gate_step=10, num_inference_steps=25)`` (the documented usage) and
``TgateSDXLLoader(pipe)`` (the 1.0.0 usage) both return ``pipe`` with a ``pipe.tgate(...)``
method; the values given to the loader are the defaults of ``pipe.tgate`` (a later loader
replaces them). A loader leaves the ordinary ``pipe(...)`` call as it was: not gated, or, on an
``enable``-d pipeline, gated with ``enable``'s settings and DeepCache.
"""

from __future__ import annotations

from dataclasses import replace

from .config import AUTO, DeepCacheOptions, TgateConfig
from .engine.configuration import loaded_with
from .engine.installation import configure, controller_of
from .engine.pipeline_parts import check_pipeline, check_settings


def _load(pipe, defaults: TgateConfig, deepcache: DeepCacheOptions | None, gate_step, num_inference_steps, **schedule):
    refuse_auto_gate(gate_step)
    config = replace(defaults.updated(gate_step=gate_step, **schedule), deepcache=deepcache)
    if num_inference_steps is not None:
        # defaults that contradict each other are a mistake; a call's own steps may still run
        # fewer steps than the gate (never reached, as with the reference)
        config.resolve_gate_step(num_inference_steps)
    check_pipeline(pipe)
    controller = controller_of(pipe)
    current = controller.configuration if controller is not None else None
    configuration = loaded_with(pipe, current, config, num_inference_steps)
    check_settings(pipe, configuration.loader)
    configure(pipe, configuration, tgate_call)
    return pipe


def refuse_auto_gate(gate_step) -> None:
    """The loaders and ``pipe.tgate`` keep the ``tgate`` package's API, whose gate is a step."""
    if gate_step == AUTO:
        raise ValueError(
            "`gate_step='auto'` is not available through the tgate loaders and `pipe.tgate` (the `tgate` package's "
            "API, whose gate is a step): use tgate_kernels.enable(pipe, gate_step='auto') and call the pipeline itself."
        )


def tgate_call(
    self,
    *args,
    gate_step: int | float | None = None,
    num_inference_steps: int | None = None,
    sp_interval: int | None = None,
    fi_interval: int | None = None,
    warm_up: int | None = None,
    lcm: bool | None = None,
    **kwargs,
):
    """``pipe.tgate``: the pipeline's ordinary call with T-GATE settings: ``pipe.tgate(prompt,
    gate_step=10, num_inference_steps=25, **any pipeline argument)``. Settings not given here come
    from the loader (or ``enable``); settings given here win."""
    controller = controller_of(self)
    if controller is None:
        raise RuntimeError("`pipe.tgate` was called on a pipeline that T-GATE is no longer attached to.")
    controller.state.check_can_open()
    defaults, _ = controller.configuration.tgate_call
    refuse_auto_gate(gate_step if gate_step is not None else defaults.gate_step)
    config = defaults.updated(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)
    steps = num_inference_steps if num_inference_steps is not None else controller.configuration.default_steps
    if steps is not None:
        # as with the reference, a gate beyond the steps is never reached (the call says so)
        config.resolve_gate_step(steps, beyond_allowed=True)
        kwargs["num_inference_steps"] = steps
    with controller.config_for_one_call(config):
        return self(*args, **kwargs)


def _make_loader(name: str, defaults: TgateConfig, family: str):
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
        return _load(pipe, defaults, None, gate_step, num_inference_steps, sp_interval=sp_interval,
                     fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)

    loader.__name__ = loader.__qualname__ = name
    loader.__doc__ = (
        f"Attach T-GATE to a {family} pipeline and give it ``pipe.tgate(...)``; returns ``pipe``.\n\n"
        f"Defaults: gate_step={defaults.gate_step}, sp_interval={defaults.sp_interval}, "
        f"fi_interval={defaults.fi_interval}, warm_up={defaults.warm_up}. Values given here become the "
        f"defaults of ``pipe.tgate``; values given to ``pipe.tgate`` win. T-GATE alone: DeepCache added by a "
        f"DeepCache loader is taken away."
    )
    return loader


_STANDARD = TgateConfig()

TgateSDLoader = _make_loader("TgateSDLoader", _STANDARD, "Stable Diffusion 1.x/2.x")
TgateSDXLLoader = _make_loader("TgateSDXLLoader", _STANDARD, "Stable Diffusion XL")
TgatePixArtLoader = _make_loader("TgatePixArtLoader", _STANDARD, "PixArt")
TgatePixArtAlphaLoader = _make_loader("TgatePixArtAlphaLoader", _STANDARD, "PixArt-α")
TgatePixArtSigmaLoader = _make_loader("TgatePixArtSigmaLoader", _STANDARD, "PixArt-Σ")
TgateSVDLoader = _make_loader("TgateSVDLoader", _STANDARD, "Stable Video Diffusion")

# The reference's DeepCache variants compute self-attention at every step before the gate.
_WITH_DEEPCACHE = TgateConfig(sp_interval=1, warm_up=0)


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
        deepcache = DeepCacheOptions(cache_interval=cache_interval, cache_branch_id=cache_branch_id)
        return _load(pipe, _WITH_DEEPCACHE, deepcache, gate_step, num_inference_steps, sp_interval=sp_interval,
                     fi_interval=fi_interval, warm_up=warm_up, lcm=lcm)

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
