"""Attaching hooks to modules through diffusers' ``HookRegistry``, and removing them cleanly.

diffusers' registry composes with its own caches and offloading hooks. Two things need care on
removal, so that a module after ``disable()`` is what it was before ``enable()``:

* removing the last hook leaves an instance ``forward`` and an empty registry behind: both go;
* a hook registered after ours (a diffusers cache, say) must keep running: ours is taken out of
  the middle of the chain;
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
    if registry._hook_order[-1] != name:
        _remove_from_inside_the_chain(registry, name)
        return
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


def _remove_from_inside_the_chain(registry: HookRegistry, name: str) -> None:
    """Take out a hook that others were registered after. diffusers' ``remove_hook`` would
    overwrite the next hook's ``forward``, which for a hook with its own ``new_forward`` is that
    hook itself; the next hook's ``original_forward`` is what must point past ours."""
    index = registry._hook_order.index(name)
    ours, following = registry._fn_refs[index], registry._fn_refs[index + 1]
    below = ours.original_forward if ours.original_forward is not None else ours.forward
    if following.original_forward is not None:
        following.original_forward = below
    else:
        following.forward = below
    hook = registry.hooks.pop(name)
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)
    hook.deinitalize_hook(registry._module_ref)


def attached(module: torch.nn.Module, name: str) -> ModelHook | None:
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(name)
