"""Attaching hooks to modules through diffusers' ``HookRegistry``, and removing them cleanly.

diffusers' registry composes with its own caches and offloading hooks. Removing the last hook
leaves an instance ``forward`` and an empty registry behind; :func:`detach` takes both away too
so a module after ``disable()`` is what it was before ``enable()``.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook


def attach(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    had_registry = hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    hook._tgate_restore = (had_registry, had_forward)


def detach(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or registry.get_hook(name) is None:
        return
    hook = registry.get_hook(name)
    had_registry, had_forward = getattr(hook, "_tgate_restore", (True, True))
    registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    if not had_forward:
        module.__dict__.pop("forward", None)
    if not had_registry:
        del module._diffusers_hook


def attached(module: torch.nn.Module, name: str) -> ModelHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)
