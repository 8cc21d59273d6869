"""tgate_kernels: training-free T-GATE acceleration for diffusers pipelines.

``tgate_kernels.enable(pipe)`` makes the ordinary ``pipe(...)`` call cache cross-attention after
a gate step, drop classifier-free guidance after it and cache self-attention on a schedule.
"""

from .api import disable, enable, enabled, is_enabled, view
from .config import AutoGate, CompileOptions, DeepCacheOptions, GateCache, GuidanceAfterGate, KernelMode, KeptPart, TgateConfig
from .engine.generation import ConcurrentGenerationError
from .engine.guidance import GuidanceNotRecognised
from .loaders import (
    TgatePixArtAlphaLoader,
    TgatePixArtLoader,
    TgatePixArtSigmaLoader,
    TgateSDDeepCacheLoader,
    TgateSDLoader,
    TgateSDXLDeepCacheLoader,
    TgateSDXLLoader,
    TgateSVDLoader,
)
from .schedule import AttentionAction, StepPlan, plan_generation, plan_step
from .view import TgateView

TgateSettings = TgateConfig
"""The former name of :class:`TgateConfig`."""

__version__ = "0.1.0"

__all__ = [
    "enable",
    "disable",
    "enabled",
    "is_enabled",
    "view",
    "TgateView",
    "TgateConfig",
    "AutoGate",
    "CompileOptions",
    "DeepCacheOptions",
    "KernelMode",
    "GateCache",
    "GuidanceAfterGate",
    "KeptPart",
    "GuidanceNotRecognised",
    "ConcurrentGenerationError",
    "TgateSDLoader",
    "TgateSDXLLoader",
    "TgatePixArtLoader",
    "TgatePixArtAlphaLoader",
    "TgatePixArtSigmaLoader",
    "TgateSVDLoader",
    "TgateSDDeepCacheLoader",
    "TgateSDXLDeepCacheLoader",
    "AttentionAction",
    "StepPlan",
    "plan_step",
    "plan_generation",
]
