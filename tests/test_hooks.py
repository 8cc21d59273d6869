"""Hook mechanics on a dummy module, the way diffusers' own ``tests/hooks/test_hooks.py`` tests its
registry: T-GATE's hooks taken out from the end and from the middle of a chain, under
accelerate's wrapper, and put back into the chain when someone else cut them out."""

import threading
import types

import pytest
import torch
from accelerate.hooks import ModelHook as AccelerateHook
from accelerate.hooks import add_hook_to_module, remove_hook_from_module
from diffusers.hooks import HookRegistry, ModelHook

from tgate_kernels.hooks.base import TgateHook
from tgate_kernels.hooks.registry import attach, attached, detach, ensure_in_chain

ALWAYS = types.SimpleNamespace(plan=object(), owner=threading.get_ident())
"""A generation running in this thread, as the hooks see one."""


class AddOurs(TgateHook):
    name = "tgate_test_add"

    def __init__(self, amount: float) -> None:
        super().__init__(ALWAYS)
        self.amount = amount

    def forward_in_generation(self, module, x):
        return self.original(x) + self.amount


class MultiplyTheirs(ModelHook):
    """Another library's hook in the same registry (a diffusers cache hook, say)."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def new_forward(self, module, x):
        return self.fn_ref.original_forward(x) * self.factor


class ScaleInputs(AccelerateHook):
    """An accelerate hook: wraps ``forward`` and keeps what it wrapped as ``_old_forward``."""

    def pre_forward(self, module, *args, **kwargs):
        return tuple(a * 10 for a in args), kwargs


def _module():
    torch.manual_seed(0)
    return torch.nn.Linear(3, 3, bias=False)


def _untouched(module) -> bool:
    return "forward" not in module.__dict__ and "_diffusers_hook" not in module.__dict__


X = torch.ones(1, 3)


def test_removing_the_only_hook_leaves_the_module_as_it_was():
    module = _module()
    plain = module(X)
    attach(module, AddOurs(1.0))
    assert torch.equal(module(X), plain + 1)
    detach(module, AddOurs.name)
    assert _untouched(module) and torch.equal(module(X), plain)
    detach(module, AddOurs.name)  # a second detach is a no-op


def test_removing_ours_from_the_middle_of_a_chain_keeps_the_hook_after_it_running():
    module = _module()
    plain = module(X)
    attach(module, AddOurs(1.0))
    HookRegistry.check_if_exists_or_initialize(module).register_hook(MultiplyTheirs(2.0), "theirs")
    assert torch.equal(module(X), (plain + 1) * 2)
    detach(module, AddOurs.name)
    assert torch.equal(module(X), plain * 2), "theirs still runs, ours does not"
    module._diffusers_hook.remove_hook("theirs", recurse=False)
    assert torch.equal(module(X), plain)


def test_a_hook_removed_from_under_ours_is_repaired_and_stays_removed_after_disable():
    """diffusers' remove_hook, on a hook registered before ours, overwrites ours in the chain."""
    module = _module()
    plain = module(X)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    registry.register_hook(MultiplyTheirs(2.0), "theirs")
    ours = AddOurs(1.0)
    attach(module, ours)
    assert torch.equal(module(X), plain * 2 + 1)
    registry.remove_hook("theirs", recurse=False)
    assert torch.equal(module(X), plain), "diffusers cut ours out of the chain"
    assert ensure_in_chain(module, ours)
    assert torch.equal(module(X), plain + 1), "ours runs again; theirs stays removed"
    assert not ensure_in_chain(module, ours), "nothing to repair twice"
    detach(module, AddOurs.name)
    assert torch.equal(module(X), plain), "removing ours does not bring theirs back"


def test_ours_under_accelerates_wrapper_comes_out_without_taking_accelerate_with_it():
    module = _module()
    plain = module(X)
    attach(module, AddOurs(1.0))
    add_hook_to_module(module, ScaleInputs())
    assert torch.allclose(module(X), plain * 10 + 1)
    detach(module, AddOurs.name)
    assert torch.allclose(module(X), plain * 10), "accelerate's hook still runs"
    assert "_diffusers_hook" not in module.__dict__
    remove_hook_from_module(module)
    assert torch.equal(module(X), plain)
    assert getattr(module.forward, "__func__", None) is torch.nn.Linear.forward


def test_ours_dropped_by_accelerate_is_put_back_on_top_of_its_new_wrapper():
    """Offloading set up first and re-applied after every call (``maybe_free_model_hooks``):
    accelerate puts back the forward it had wrapped, dropping ours, then wraps again."""
    module = _module()
    plain = module(X)
    add_hook_to_module(module, ScaleInputs())
    ours = AddOurs(1.0)
    attach(module, ours)
    assert torch.allclose(module(X), plain * 10 + 1)
    remove_hook_from_module(module)
    add_hook_to_module(module, ScaleInputs())
    assert torch.allclose(module(X), plain * 10), "ours fell out of the chain"
    assert ensure_in_chain(module, ours)
    assert torch.allclose(module(X), plain * 10 + 1)
    detach(module, AddOurs.name)
    assert torch.allclose(module(X), plain * 10) and "_diffusers_hook" not in module.__dict__
    remove_hook_from_module(module)
    assert _untouched(module) or getattr(module.forward, "__func__", None) is torch.nn.Linear.forward
    assert torch.equal(module(X), plain)


def test_attached_finds_ours_only_while_attached():
    module = _module()
    assert attached(module, AddOurs.name) is None
    hook = AddOurs(1.0)
    attach(module, hook)
    assert attached(module, AddOurs.name) is hook
    detach(module, AddOurs.name)
    assert attached(module, AddOurs.name) is None


def test_a_module_with_our_hooks_refuses_to_be_deep_copied():
    import copy

    module = _module()
    attach(module, AddOurs(1.0))
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(module)


def _generation(plan):
    """The little of a running generation the attention cache hook reads."""
    from tgate_kernels.engine.generation import CallContext

    return types.SimpleNamespace(owner=threading.get_ident(), step=plan.step, plan=plan, context=CallContext(),
                                 reuse_fills_cache=False, config=None)


def test_the_attention_cache_caches_the_mean_of_the_text_pair_at_the_gate_and_reuses_it_after():
    from tgate_kernels.engine.guidance import MERGED, NEGATIVE, PROMPT, DenoiserCall
    from tgate_kernels.hooks.attention_cache import AttentionCacheHook
    from tgate_kernels.schedule import AttentionAction, StepPlan

    module = _module()
    gate = StepPlan(3, AttentionAction.CACHE, AttentionAction.CACHE, cfg_batch=True, average_cfg_halves=True)
    after = StepPlan(4, AttentionAction.CACHE, AttentionAction.REUSE, cfg_batch=False, average_cfg_halves=False)
    state = _generation(gate)
    hook = AttentionCacheHook(state, "unet", cross=True)
    attach(module, hook)
    batch = torch.randn(2, 5, 3)  # [negative, prompt]
    state.context.call = DenoiserCall("unet", (NEGATIVE, PROMPT), (NEGATIVE, PROMPT))
    at_gate = module(batch)
    assert torch.equal(at_gate, batch @ module.weight.T)  # computed at the gate
    state.plan, state.step = after, 4
    state.context.call = DenoiserCall("unet", (NEGATIVE, PROMPT), (MERGED,))
    reused = module(torch.full((1, 5, 3), 7.0))
    assert torch.equal(reused, (at_gate[:1] + at_gate[1:]) / 2)  # the mean, whatever the input
    hook.reset_state(module)
    recomputed = module(torch.ones(1, 5, 3))
    assert torch.equal(recomputed, torch.ones(1, 5, 3) @ module.weight.T)  # nothing cached: computed
    detach(module, hook.name)
    assert _untouched(module)


def test_the_attention_cache_passes_through_outside_a_generation():
    from tgate_kernels.hooks.attention_cache import AttentionCacheHook

    module = _module()
    hook = AttentionCacheHook(types.SimpleNamespace(plan=None, owner=None), "unet", cross=True)
    attach(module, hook)
    assert torch.equal(module(X), X @ module.weight.T)
    detach(module, hook.name)
    assert _untouched(module)
