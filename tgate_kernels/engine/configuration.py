"""What one pipeline runs with: ``enable``'s config for its plain calls, and a loader's defaults
for ``pipe.tgate``.

``enable`` sets what plain ``pipe(...)`` calls run with; a loader sets the defaults of
``pipe.tgate`` (its config and ``num_inference_steps``) and leaves plain calls as they were.
Without a loader, ``pipe.tgate`` runs with ``enable``'s config. The options that decide how the
hooks are built or what they cache (``kernels``, ``kept_part``, ``compile``, ``gate_cache``) are the pipeline's, whichever of the
two set them last, so both configs always hold the same ones.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import TgateConfig
from .deepcache import DeepCacheCoordinator

_PIPELINE_WIDE = ("kernels", "kept_part", "compile", "gate_cache")


@dataclass(frozen=True)
class Configuration:
    config: TgateConfig
    """``enable``'s config (or, before any ``enable``, the pipeline-wide options a loader found)."""
    gates_plain_calls: bool = False
    loader: TgateConfig | None = None
    """The defaults of ``pipe.tgate`` a loader was given (``None``: no loader ran)."""
    default_steps: int | None = None
    """``num_inference_steps`` a loader was given: the default of ``pipe.tgate``."""
    deepcache: DeepCacheCoordinator | None = None
    """DeepCache for ``config``'s calls."""
    loader_deepcache: DeepCacheCoordinator | None = None
    """DeepCache for ``loader``'s calls."""

    @property
    def tgate_call(self) -> tuple[TgateConfig, DeepCacheCoordinator | None]:
        """What ``pipe.tgate`` runs with when its call gives no setting."""
        if self.loader is not None:
            return self.loader, self.loader_deepcache
        return self.config, self.deepcache

    def coordinators(self) -> tuple[DeepCacheCoordinator, ...]:
        return tuple(c for c in (self.deepcache, self.loader_deepcache) if c is not None)


def _coordinator(pipe, config: TgateConfig, current: DeepCacheCoordinator | None) -> DeepCacheCoordinator | None:
    """The DeepCache coordinator ``config`` asks for (the current one when it asks for the same)."""
    if config.deepcache is None:
        return None
    if current is not None and current.options == config.deepcache:
        return current
    return DeepCacheCoordinator(pipe, config.deepcache)


def enabled_with(pipe, current: Configuration | None, config: TgateConfig) -> Configuration:
    """``current`` with plain calls gated by ``config`` (its pipeline-wide options also the loader's)."""
    if current is None:
        return Configuration(config, True, deepcache=_coordinator(pipe, config, None))
    loader = current.loader
    if loader is not None:
        loader = replace(loader, **{name: getattr(config, name) for name in _PIPELINE_WIDE})
    return replace(current, config=config, gates_plain_calls=True, loader=loader,
                   deepcache=_coordinator(pipe, config, current.deepcache))


def loaded_with(pipe, current: Configuration | None, loader: TgateConfig, default_steps: int | None) -> Configuration:
    """``current`` with ``pipe.tgate``'s defaults set by a loader (the pipeline-wide options kept)."""
    base = current.config if current is not None else TgateConfig()
    loader = replace(loader, **{name: getattr(base, name) for name in _PIPELINE_WIDE})
    if current is None:
        return Configuration(base, loader=loader, default_steps=default_steps,
                             loader_deepcache=_coordinator(pipe, loader, None))
    return replace(current, loader=loader, default_steps=default_steps,
                   loader_deepcache=_coordinator(pipe, loader, current.loader_deepcache))
