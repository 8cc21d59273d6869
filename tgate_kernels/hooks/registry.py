"""Attaching hooks to modules through diffusers' ``HookRegistry``, and removing them cleanly.

diffusers' registry composes with its own caches and offloading hooks. Two things need care on
removal, so that a module after ``disable()`` is what it was before ``enable()``:

* removing the last hook leaves an instance ``forward`` and an empty registry behind: both go;
* accelerate (``enable_model_cpu_offload``, ``enable_sequential_cpu_offload``) wraps whatever
  ``forward`` it finds and keeps it as ``module._old_forward``. When it wrapped ours, the
  registry must not overwrite accelerate's wrapper: ours is taken out from under it instead.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry, ModelHook


def attach(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    had_registry = hasattr(module, "_diffusers_hook")
    had_forward = "forward" in module.__dict__
    HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
    hook._tgate_restore = (had_registry, had_forward, module.forward)


def detach(module: torch.nn.Module, name: str) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(name)
    if hook is None:
        return
    had_registry, had_forward, our_forward = hook._tgate_restore
    wrapped_by_accelerate = module.__dict__.get("forward") is not our_forward and (
        module.__dict__.get("_old_forward") is our_forward
    )
    if wrapped_by_accelerate:
        outer = module.__dict__["forward"]
        module.forward = our_forward
        registry.remove_hook(name, recurse=False)
        module._old_forward = module.forward
        module.forward = outer
    else:
        registry.remove_hook(name, recurse=False)
    if registry.hooks:
        return
    if not had_forward and not wrapped_by_accelerate:
        module.__dict__.pop("forward", None)
    if not had_registry:
        del module._diffusers_hook


def attached(module: torch.nn.Module, name: str) -> ModelHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)
