"""Every use of another library's private parts, in one place.

T-GATE sits on diffusers' hook registry, beside accelerate's offloading wrappers, inside
diffusers' blocks, and drives torch's compiler. Where that needs an attribute those libraries do
not promise to keep, it is read or written here and nowhere else, each function saying which
upstream behaviour it works around. Each is checked where it is used, so what does not need a
private attribute (the ops, the config, the schedule) keeps working when one moves; what does
fails with a clear message naming the versions this was checked with, instead of misbehaving.
"""

from __future__ import annotations

from typing import Callable

import torch

CHECKED_WITH = "diffusers 0.35-0.42.1, accelerate 0.30-1.15"


def _missing(what: list[str]) -> ImportError:
    import diffusers

    return ImportError(
        f"tgate_kernels relies on diffusers internals that diffusers {diffusers.__version__} no longer has "
        f"({', '.join(what)}); it was checked with {CHECKED_WITH}."
    )


# --------------------------------------------------------------------------------------------
# diffusers' HookRegistry
# --------------------------------------------------------------------------------------------
# The registry keeps its chain in `_hook_order`/`_fn_refs` and lives on the module as
# `_diffusers_hook`; none of these is public, yet removing a hook correctly needs them (below).


_REGISTRY_INTERNALS = ("_hook_order", "_fn_refs", "_module_ref")


def check_hook_registry(registry) -> None:
    """Raise ``ImportError`` if diffusers' registry no longer keeps its chain where T-GATE reads it."""
    missing = [f"HookRegistry.{name}" for name in _REGISTRY_INTERNALS if not hasattr(registry, name)]
    if missing:
        raise _missing(missing)


def diffusers_hook(cls, *, stateful: bool):
    """Make ``cls`` (a ``ModelHook``) one diffusers treats as T-GATE needs: ``stateful`` hooks get
    ``reset_state`` calls and ``cache_context`` names (diffusers reads the private flag
    ``_is_stateful``), and every hook hears of its removal through the callback diffusers spells
    ``deinitalize_hook``, which calls the hook's ``detached(module)``."""
    cls._is_stateful = stateful

    def deinitalize_hook(self, module):
        self.detached(module)
        return module

    cls.deinitalize_hook = deinitalize_hook
    return cls


def is_stateful(hook) -> bool:
    """Whether diffusers treats ``hook`` as stateful (its caches: FasterCache, FirstBlockCache, ...)."""
    return bool(getattr(hook, "_is_stateful", False))


def registry_of(module: torch.nn.Module):
    """The module's diffusers ``HookRegistry``, or ``None`` (diffusers stores it as ``_diffusers_hook``)."""
    return module.__dict__.get("_diffusers_hook")


def hook_names(registry) -> list[str]:
    """Names of the registry's hooks, innermost first."""
    return list(registry._hook_order)


def delete_registry(module: torch.nn.Module) -> None:
    """Take an empty registry off ``module``, so it is as it was before T-GATE created it."""
    module.__dict__.pop("_diffusers_hook", None)


def invalidate_child_registries(root: torch.nn.Module) -> None:
    """diffusers (0.42) caches, on each registry, the list of registries below it
    (``_child_registries_cache``) and uses it to deliver ``cache_context`` to stateful hooks.
    Adding or deleting registries under ``root`` makes that list stale, so it is dropped."""
    registry = registry_of(root)
    if registry is not None and hasattr(registry, "invalidate_child_registries_cache"):
        registry.invalidate_child_registries_cache()
    for module in root.modules():
        child = registry_of(module)
        if child is not None and getattr(child, "_child_registries_cache", None) is not None:
            child._child_registries_cache = None


def remove_hook_from_chain(registry, name: str) -> None:
    """Remove hook ``name``, wherever it is in the chain, keeping every other hook running.

    diffusers' ``remove_hook`` on a hook that others were registered after overwrites the next
    hook's ``forward``, which for a hook with its own ``new_forward`` is that hook itself, so the
    next hook silently stops running. Here the next hook's ``original_forward`` is pointed past
    the removed hook instead."""
    order = registry._hook_order
    index = order.index(name)
    if index == len(order) - 1:
        registry.remove_hook(name, recurse=False)
        return
    removed, following = registry._fn_refs[index], registry._fn_refs[index + 1]
    below = removed.original_forward if removed.original_forward is not None else removed.forward
    if following.original_forward is not None:
        following.original_forward = below
    else:
        following.forward = below
    hook = registry.hooks.pop(name)
    order.pop(index)
    registry._fn_refs.pop(index)
    deinitialize(hook, registry._module_ref)


def repair_hook_chain(registry, name: str, own_forward: Callable) -> bool:
    """Put hook ``name`` back in the chain if diffusers cut it out; ``True`` if it had to.

    When a hook registered *before* ours is removed, diffusers' ``remove_hook`` writes the removed
    hook's inner forward into our ``fn_ref.forward``, which replaces our ``new_forward``: ours stops
    running, and removing ours later restores the removed hook's forward. Repairing points our
    ``original_forward`` at that inner forward and puts our ``new_forward`` back."""
    index = registry._hook_order.index(name)
    reference = registry._fn_refs[index]
    if reference.forward is own_forward:
        return False
    reference.original_forward = reference.forward
    reference.forward = own_forward
    return True


def forget_hook(registry, name: str) -> None:
    """Drop hook ``name`` from the registry's books without touching any ``forward``: for a hook
    whose forward someone else already took out of the module (accelerate restoring the
    ``forward`` it had wrapped)."""
    index = registry._hook_order.index(name)
    registry.hooks.pop(name)
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


def hook_forward_reference(registry, name: str):
    """The registry's ``HookFunctionReference`` of hook ``name``: what it calls, and through what."""
    return registry._fn_refs[registry._hook_order.index(name)]


def deinitialize(hook, module: torch.nn.Module) -> None:
    """diffusers' hook base class spells the removal callback ``deinitalize_hook``."""
    hook.deinitalize_hook(module)


# --------------------------------------------------------------------------------------------
# diffusers' cache contexts
# --------------------------------------------------------------------------------------------


def cache_context_receiver():
    """An object that, as an attribute of a stateful hook, receives the ``cache_context`` names
    diffusers delivers (a ``StateManager``, which diffusers finds among a hook's attributes)."""
    from diffusers.hooks.hooks import BaseState, StateManager

    class _NoState(BaseState):
        def reset(self, *args, **kwargs) -> None:
            pass

    return StateManager(_NoState)


def cache_context_name(manager) -> str | None:
    """The name of the ``cache_context`` the pipeline opened around the current denoiser call.

    diffusers delivers it only to stateful hooks, through the ``StateManager`` instances among
    their attributes (``_context``: a ``CacheContext`` in 0.42, a plain name before)."""
    context = getattr(manager, "_context", None)
    return getattr(context, "name", context)


def open_cache_context(module: torch.nn.Module, name: str) -> None:
    """What ``CacheMixin.cache_context(name)`` sets, for a denoiser class without ``CacheMixin``
    whose pipeline opens no context (diffusers' block caches need one)."""
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    _set_cache_context(module, CacheContext(name))


# --------------------------------------------------------------------------------------------
# accelerate's forward wrappers
# --------------------------------------------------------------------------------------------
# accelerate (cpu offload, device maps) replaces `module.forward` with a wrapper and keeps what it
# wrapped as `module._old_forward`; `remove_hook_from_module` puts `_old_forward` back.


def wrapped_by_accelerate(module: torch.nn.Module, inner: Callable) -> bool:
    """Whether accelerate wrapped ``inner``, the forward T-GATE's registry installed."""
    return module.__dict__.get("forward") is not inner and module.__dict__.get("_old_forward") is inner


def replace_under_accelerate(module: torch.nn.Module, inner: Callable) -> None:
    """Make accelerate's wrapper call ``inner`` instead of what it wrapped."""
    module._old_forward = inner


def has_accelerate_hook(module: torch.nn.Module) -> bool:
    return hasattr(module, "_hf_hook")


# --------------------------------------------------------------------------------------------
# diffusers' transformer blocks
# --------------------------------------------------------------------------------------------


def feed_forward(block: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """``block.ff`` as ``BasicTransformerBlock.forward`` runs it: in chunks when the user asked for
    chunked feed-forward (``enable_forward_chunking`` stores ``_chunk_size``/``_chunk_dim``)."""
    if getattr(block, "_chunk_size", None) is not None:
        try:
            from diffusers.models.attention import _chunked_feed_forward
        except ImportError:
            raise _missing(["diffusers.models.attention._chunked_feed_forward"]) from None

        return _chunked_feed_forward(block.ff, hidden_states, block._chunk_dim, block._chunk_size)
    return block.ff(hidden_states)


# --------------------------------------------------------------------------------------------
# torch's attention operators
# --------------------------------------------------------------------------------------------


def attention_score_ops() -> frozenset:
    """The aten operators ``scaled_dot_product_attention`` dispatches to (underscore ops: private
    to torch, and different per backend and release)."""
    aten = torch.ops.aten
    names = (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_cudnn_attention",
    )
    return frozenset(op for op in (getattr(aten, name, None) for name in names) if op is not None)


def efficient_attention(query, key, value, bias, dropout_p, is_causal, scale):
    """One call of the memory-efficient attention operator: the output only."""
    return torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, False, dropout_p, is_causal, scale=scale)[0]


# --------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------


def compile_backends(debugging: bool = True) -> list[str]:
    """The backend names ``torch.compile`` accepts (without ``debugging``: the ones meant for use)."""
    from torch._dynamo import list_backends

    return sorted(set(list_backends(exclude_tags=() if debugging else ("debug", "experimental"))) | {"inductor"})


def compile_modes() -> list[str]:
    """The ``mode`` names ``torch.compile`` accepts."""
    from torch._inductor import list_mode_options

    return list(list_mode_options())


def inductor_mode_settings(mode: str | None) -> dict:
    """Inductor's settings of a ``torch.compile`` mode (empty for ``None``)."""
    if mode is None:
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode))


def compiler_errors() -> tuple[type[BaseException], ...]:
    """What ``torch.compile`` raises when it cannot compile: dynamo's exception base (inductor's
    failures, a missing C++ compiler included, arrive wrapped in ``BackendCompilerFailed``)."""
    from torch._dynamo import exc

    return (exc.TorchDynamoException,)


def inductor_settings(settings: dict):
    """A context holding inductor's ``torch._inductor.config`` settings (a null context when none)."""
    import contextlib

    if not settings:
        return contextlib.nullcontext()
    from torch._inductor import config

    return config.patch(settings)
