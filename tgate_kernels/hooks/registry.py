"""Attaching T-GATE's hooks through diffusers' ``HookRegistry``, keeping them in the chain, and
taking them out so the module is what it was before.

Other libraries wrap the same ``forward``: diffusers' own cache hooks (in the same registry),
accelerate's offloading (which wraps whatever ``forward`` it finds, and puts back what it wrapped
when its hooks are removed, as ``enable_model_cpu_offload`` does after every call). So a hook
can fall out of the chain without T-GATE doing anything: :func:`ensure_in_chain` notices and
puts it back, and :func:`detach` takes it out from wherever it is.
"""

from __future__ import annotations

import torch
from diffusers.hooks import HookRegistry

from .. import _compat
from .base import InstallRecord, TgateHook


def attach(module: torch.nn.Module, hook: TgateHook, had_registry: bool | None = None) -> None:
    """Register ``hook`` on ``module`` (``had_registry``: whether the module had a registry before
    T-GATE first attached this hook, when re-attaching it)."""
    if had_registry is None:
        had_registry = _compat.registry_of(module) is not None
    had_forward = "forward" in module.__dict__
    registry = HookRegistry.check_if_exists_or_initialize(module)
    try:
        _compat.check_hook_registry(registry)
    except ImportError:
        if not had_registry:
            _compat.delete_registry(module)
        raise
    registry.register_hook(hook, hook.name)
    own = _compat.hook_forward_reference(registry, hook.name).forward
    hook.installed = InstallRecord(had_registry, had_forward, module.forward, own)


def attached(module: torch.nn.Module, name: str) -> TgateHook | None:
    registry = _compat.registry_of(module)
    return None if registry is None else registry.get_hook(name)


def detach(module: torch.nn.Module, name: str) -> None:
    """Take hook ``name`` off ``module``; a no-op when it is not there."""
    registry = _compat.registry_of(module)
    hook = None if registry is None else registry.get_hook(name)
    if hook is None:
        return
    record = hook.installed
    # a hook removed from under ours left its forward in our place: point past it first, so that
    # taking ours out does not bring it back
    _compat.repair_hook_chain(registry, name, record.own)
    forward = module.__dict__.get("forward")
    if _compat.hook_names(registry)[-1] != name:
        _compat.remove_hook_from_chain(registry, name)
        return
    if forward is record.forward:
        registry.remove_hook(name, recurse=False)
        if not registry.hooks and not record.had_forward:
            module.__dict__.pop("forward", None)
    elif _compat.wrapped_by_accelerate(module, record.forward):
        # accelerate wrapped ours: take ours out from under its wrapper
        module.forward = record.forward
        registry.remove_hook(name, recurse=False)
        _compat.replace_under_accelerate(module, module.forward)
        module.forward = forward
    else:
        # someone already put back the forward ours wrapped: forget ours, touch nothing else
        _compat.forget_hook(registry, name)
        _compat.deinitialize(hook, module)
    if not registry.hooks and not record.had_registry:
        _compat.delete_registry(module)


def ensure_in_chain(module: torch.nn.Module, hook: TgateHook) -> bool:
    """Make sure ``hook`` runs when ``module`` is called; ``True`` if it had to be put back.

    Two ways out of the chain are known: accelerate putting back the forward it wrapped (ours is
    gone from ``module.forward``), and diffusers removing a hook registered before ours (which
    overwrites our ``new_forward``)."""
    registry = _compat.registry_of(module)
    had_registry = hook.installed.had_registry
    if registry is None or registry.get_hook(hook.name) is not hook:
        attach(module, hook, had_registry)
        return True
    repaired = _compat.repair_hook_chain(registry, hook.name, hook.installed.own)
    if _compat.hook_names(registry)[-1] != hook.name:
        return repaired  # hooks registered after ours wrap it
    forward = module.__dict__.get("forward")
    if forward is hook.installed.forward or _compat.wrapped_by_accelerate(module, hook.installed.forward):
        return repaired
    _compat.forget_hook(registry, hook.name)
    attach(module, hook, had_registry)
    return True


def foreign_caches(root: torch.nn.Module) -> list[str]:
    """``"module: hook"`` for every stateful hook of another library under ``root`` (diffusers'
    caches: Pyramid Attention Broadcast, FasterCache, FirstBlockCache, ...)."""
    found = []
    for name, module in root.named_modules():
        registry = _compat.registry_of(module)
        if registry is None:
            continue
        for hook_name, hook in registry.hooks.items():
            if _compat.is_stateful(hook) and not isinstance(hook, TgateHook):
                found.append(f"{name or type(root).__name__}: {hook_name}")
    return found
