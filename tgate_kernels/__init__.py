"""tgate_kernels: training-free T-GATE acceleration for diffusers pipelines.

``tgate_kernels.enable(pipe)`` makes the ordinary ``pipe(...)`` call cache cross-attention after
a gate step, drop classifier-free guidance after it and cache self-attention on a schedule.
"""

from ._compat import check_private_api
from .api import disable, enable, enabled, is_enabled, view
from .engine.guidance import GuidanceNotRecognised, KeptPart
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
from .config import KernelMode
from .schedule import AttentionAction, AutoGate, StepPlan, TgateSettings, plan_generation, plan_step
from .engine.generation import ConcurrentGenerationError
from .view import TgateView

check_private_api()

__version__ = "0.1.0"

__all__ = [
    "enable",
    "disable",
    "enabled",
    "is_enabled",
    "view",
    "TgateView",
    "KernelMode",
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
    "TgateSettings",
    "AutoGate",
    "AttentionAction",
    "StepPlan",
    "plan_step",
    "plan_generation",
]
