"""Serving T-GATE: step-level batching with a gate per request (:class:`StepBatcher`)."""

from .requests import ImageRequest
from .step_batcher import BatcherClosed, Overloaded, StepBatcher

__all__ = ["BatcherClosed", "ImageRequest", "Overloaded", "StepBatcher"]
