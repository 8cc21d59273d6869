"""Never silently wrong: T-GATE under offloading, other hooks and caches, threads, copies, swapped
components, schedules cut to nothing, and failures or interrupts at every point of enable,
disable, a call and DeepCache's wrap and unwrap."""

import copy
import threading

import numpy as np
import pytest
import torch

import tgate_kernels
from fixtures.families import FAMILIES
from fixtures.tiny_pipelines import tiny_pixart_alpha, tiny_sd, tiny_sdxl

from conftest import max_abs_diff

STEPS, GATE = 5, 2


def _call(pipe, **extra):
    kwargs = dict(prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=STEPS,
                  output_type="np", generator=torch.Generator().manual_seed(0))
    if not hasattr(pipe, "transformer"):
        kwargs.update(height=32, width=32)
    else:
        kwargs.update(clean_caption=False)
    return pipe(**(kwargs | extra))


def _clean(module: torch.nn.Module) -> bool:
    return not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in module.modules())


# ---------------------------------------------------------------- offloading, both orders, many calls

DEEPCACHE = {"cache_interval": 2, "cache_branch_id": 0}
OFFLOADED = {
    "sd": (tiny_sd, {}),
    "sdxl": (tiny_sdxl, {}),
    "pixart": (tiny_pixart_alpha, {}),
    "sd-deepcache": (tiny_sd, {"deepcache": DEEPCACHE}),
}


@pytest.mark.parametrize("name", sorted(OFFLOADED))
@pytest.mark.parametrize("order", ["offload-then-enable", "enable-then-offload"])
def test_model_cpu_offload_in_either_order_over_several_calls(name, order):
    """``maybe_free_model_hooks`` re-applies offloading after every call, which drops wrappers
    installed after offloading was set up: every call must still be gated."""
    factory, options = OFFLOADED[name]
    expected = _call(tgate_kernels.enable(factory(), gate_step=GATE, **options))
    baseline = _call(factory())
    pipe = factory()
    if order == "enable-then-offload":
        tgate_kernels.enable(pipe, gate_step=GATE, **options)
    pipe.enable_model_cpu_offload(device="cpu")
    if order == "offload-then-enable":
        tgate_kernels.enable(pipe, gate_step=GATE, **options)
    for call in range(3):
        assert max_abs_diff(_call(pipe), expected) == 0.0, f"call {call}"
    tgate_kernels.disable(pipe)
    for call in range(2):
        assert max_abs_diff(_call(pipe), baseline) == 0.0, f"plain call {call} after disable"


def test_group_offloading_over_several_calls():
    expected = _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE))
    pipe = tiny_sd()
    pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1)
    tgate_kernels.enable(pipe, gate_step=GATE)
    for _ in range(2):
        assert max_abs_diff(_call(pipe), expected) == 0.0


# ---------------------------------------------------------------- other caches


def test_another_libraries_cache_is_refused_at_enable_and_at_the_first_call():
    from diffusers import PyramidAttentionBroadcastConfig

    family = FAMILIES["wan21"]
    pipe = family.build()
    plain = pipe(**family.call_kwargs(4)).frames
    config = PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(0, 1000),
                                             current_timestep_callback=lambda: pipe.current_timestep)
    pipe.transformer.enable_cache(config)
    before = set(pipe.__dict__)
    with pytest.raises(ValueError, match="does not compose with other caches.*pyramid_attention_broadcast"):
        tgate_kernels.enable(pipe)
    assert set(pipe.__dict__) == before and tgate_kernels.view(pipe) is None
    pipe.transformer.disable_cache()
    tgate_kernels.enable(pipe, gate_step=2)
    gated = pipe(**family.call_kwargs(4)).frames
    pipe.transformer.enable_cache(config)
    with pytest.raises(RuntimeError, match="does not compose with other caches"):
        pipe(**family.call_kwargs(4))
    pipe.transformer.disable_cache()
    assert torch.equal(pipe(**family.call_kwargs(4)).frames, gated)
    tgate_kernels.disable(pipe)
    assert torch.equal(pipe(**family.call_kwargs(4)).frames, plain)


# ---------------------------------------------------------------- threads, copies, swaps


def test_a_second_thread_calling_one_enabled_pipeline_is_refused_and_the_first_is_unaffected():
    expected = _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE))
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE)
    inside, release = threading.Event(), threading.Event()
    results, errors = {}, {}

    def wait_inside(pipe_, step, timestep, callback_kwargs):
        if step == 1:
            inside.set()
            release.wait(timeout=60)
        return callback_kwargs

    def first():
        results["first"] = _call(pipe, callback_on_step_end=wait_inside)

    def second(**extra):
        try:
            results["second"] = _call(pipe, **extra)
        except Exception as error:  # noqa: BLE001 - the error is what this test checks
            errors["second"] = error

    thread = threading.Thread(target=first)
    thread.start()
    assert inside.wait(timeout=60)
    second()
    release.set()
    thread.join(timeout=120)
    assert isinstance(errors.get("second"), tgate_kernels.ConcurrentGenerationError)
    assert "another thread" in str(errors["second"])
    assert max_abs_diff(results["first"], expected) == 0.0
    assert max_abs_diff(_call(pipe), expected) == 0.0, "the pipeline works after the refused call"


def test_two_enabled_pipelines_in_two_threads_are_independent():
    expected = _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE))
    pipes = [tgate_kernels.enable(tiny_sd(), gate_step=GATE) for _ in range(2)]
    results = [None, None]

    def run(index):
        results[index] = _call(pipes[index])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(max_abs_diff(result, expected) == 0.0 for result in results)


def test_deep_copying_an_enabled_pipeline_is_refused_clearly():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE)
    expected = _call(pipe)
    with pytest.raises(TypeError, match="cannot be deep-copied.*disable"):
        copy.deepcopy(pipe)
    assert max_abs_diff(_call(pipe), expected) == 0.0
    tgate_kernels.disable(pipe)
    clone = tgate_kernels.enable(copy.deepcopy(pipe), gate_step=GATE)
    assert max_abs_diff(_call(clone), expected) == 0.0


@pytest.mark.parametrize("name", ["sd", "pixart"])
def test_a_swapped_denoiser_is_followed_at_the_next_call(name):
    factory = OFFLOADED[name][0]
    pipe = tgate_kernels.enable(factory(), gate_step=GATE)
    attribute = "transformer" if name == "pixart" else "unet"
    old = getattr(pipe, attribute)
    new = getattr(factory(seed=1), attribute)
    setattr(pipe, attribute, new)
    pipe.register_modules(**{attribute: new})
    assert tgate_kernels.is_enabled(pipe)
    with tgate_kernels.view(pipe).record() as record:
        result = _call(pipe)
    assert tgate_kernels.view(pipe).denoisers[attribute] is new and _clean(old)
    assert record.reused(GATE, cross=True) > 0 and record.computed(GATE, cross=True) == 0
    fresh = factory()
    fresh.register_modules(**{attribute: getattr(factory(seed=1), attribute)})
    assert max_abs_diff(result, _call(tgate_kernels.enable(fresh, gate_step=GATE))) == 0.0
    tgate_kernels.disable(pipe)
    assert _clean(new)


def test_a_swapped_denoiser_without_cross_attention_disables_t_gate_with_a_clear_error():
    from diffusers import UNet2DConditionModel

    pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE)
    old = pipe.unet
    plain_unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        mid_block_type=None, cross_attention_dim=32, norm_num_groups=32,
    )
    pipe.register_modules(unet=plain_unet)
    with pytest.raises(ValueError, match="without separate cross-attention"):
        _call(pipe)
    assert not tgate_kernels.is_enabled(pipe) and _clean(old) and _clean(plain_unet)
    assert np.isfinite(_call(pipe).images).all()


# ---------------------------------------------------------------- schedules cut to nothing


def test_a_schedule_cut_to_zero_steps_runs_like_the_plain_pipeline():
    plain = _call(tiny_sdxl(), denoising_end=1e-4, output_type="latent").images
    pipe = tgate_kernels.enable(tiny_sdxl(), gate_step=GATE)
    assert torch.equal(_call(pipe, denoising_end=1e-4, output_type="latent").images, plain)


# ---------------------------------------------------------------- DeepCache


def test_deepcache_on_a_unet_without_a_mid_block_is_refused_and_the_pipeline_keeps_working():
    from diffusers import UNet2DConditionModel

    pipe = tiny_sd()
    config = {key: value for key, value in pipe.unet.config.items() if not key.startswith("_")}
    pipe.register_modules(unet=UNet2DConditionModel(**{**config, "mid_block_type": None}).eval())
    assert pipe.unet.mid_block is None
    plain = _call(pipe)
    before = set(pipe.__dict__)
    with pytest.raises(ValueError, match="without a mid block"):
        tgate_kernels.enable(pipe, deepcache=DEEPCACHE)
    assert set(pipe.__dict__) == before and _clean(pipe.unet)
    assert max_abs_diff(_call(pipe), plain) == 0.0


class _FailOnce:
    """Replaces ``owner.name`` by a function that raises ``error`` at its ``at``-th call, once."""

    def __init__(self, owner, name, at, error=KeyboardInterrupt):
        self.owner, self.name, self.at, self.error = owner, name, at, error
        self.original = getattr(owner, name)
        self.calls = 0

    def __enter__(self):
        original = self.original

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                raise self.error(f"injected at call {self.at}")
            return original(*args, **kwargs)

        setattr(self.owner, self.name, failing)
        return self

    def __exit__(self, *exc):
        setattr(self.owner, self.name, self.original)
        return False


def _count_calls(owner, name, work) -> int:
    with _FailOnce(owner, name, at=0) as counter:
        work()
    return counter.calls


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_an_interrupt_while_deepcache_wraps_leaves_nothing_behind(where):
    from DeepCache import DeepCacheSDHelper

    expected = _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE))
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE)
    wraps = _count_calls(DeepCacheSDHelper, "wrap_block_forward", lambda: _call(pipe))
    at = {"first": 1, "middle": wraps // 2, "last": wraps}[where]
    forwards = [m.__dict__.get("forward") for m in pipe.unet.modules()]
    with _FailOnce(DeepCacheSDHelper, "wrap_block_forward", at):
        with pytest.raises(KeyboardInterrupt):
            _call(pipe)
    assert [m.__dict__.get("forward") for m in pipe.unet.modules()] == forwards, "no DeepCache wrapper is left"
    assert max_abs_diff(_call(pipe), expected) == 0.0
    tgate_kernels.disable(pipe)
    assert _clean(pipe.unet)


def test_an_interrupt_while_deepcache_unwraps_is_completed_by_disable():
    from tgate_kernels.engine.snapshot import InstanceAttributes

    baseline = _call(tiny_sd())
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE)
    with _FailOnce(InstanceAttributes, "restore", 1):
        with pytest.raises(KeyboardInterrupt):
            _call(pipe)
    tgate_kernels.disable(pipe)
    assert _clean(pipe.unet)
    assert max_abs_diff(_call(pipe), baseline) == 0.0


# ---------------------------------------------------------------- faults at every point of enable / disable


def _every_point(owner, name, work) -> range:
    return range(1, _count_calls(owner, name, work) + 1)


def test_a_failure_at_any_point_of_enable_leaves_the_pipeline_as_it_was():
    import tgate_kernels.engine.installation as controller

    baseline = _call(tiny_sd())
    points = _every_point(controller, "attach", lambda: tgate_kernels.enable(tiny_sd(), deepcache=DEEPCACHE))
    assert len(points) > 10
    for at in list(points)[:: max(1, len(points) // 12)] + [points[-1]]:
        pipe = tiny_sd()
        before = set(pipe.__dict__)
        with _FailOnce(controller, "attach", at):
            with pytest.raises(KeyboardInterrupt):
                tgate_kernels.enable(pipe, deepcache=DEEPCACHE)
        assert set(pipe.__dict__) == before and _clean(pipe.unet), at
        assert max_abs_diff(_call(pipe), baseline) == 0.0, at


def test_a_failure_at_any_point_of_disable_is_completed_by_a_second_disable():
    import tgate_kernels.engine.installation as controller

    baseline = _call(tiny_sd())
    points = _every_point(controller, "detach", lambda: tgate_kernels.disable(tgate_kernels.enable(tiny_sd())))
    for at in list(points)[:: max(1, len(points) // 12)] + [points[-1]]:
        pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE)
        _call(pipe)
        with _FailOnce(controller, "detach", at):
            with pytest.raises(KeyboardInterrupt):
                tgate_kernels.disable(pipe)
        tgate_kernels.disable(pipe)
        assert _clean(pipe.unet) and "tgate" not in pipe.__dict__ and "progress_bar" not in pipe.__dict__, at
        assert max_abs_diff(_call(pipe), baseline) == 0.0, at


@pytest.mark.parametrize("step", [0, GATE - 1, GATE, STEPS - 1])
def test_an_interrupt_in_any_step_of_a_call_leaves_the_next_call_unaffected(step):
    expected = _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE))
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE)

    def interrupt(pipe_, index, timestep, callback_kwargs):
        if index == step:
            raise KeyboardInterrupt
        return callback_kwargs

    with pytest.raises(KeyboardInterrupt):
        _call(pipe, callback_on_step_end=interrupt)
    assert max_abs_diff(_call(pipe), expected) == 0.0


class _InterruptAtLine:
    """Raises ``KeyboardInterrupt`` at the ``at``-th line run in ``files`` (0: never), counting."""

    def __init__(self, files, at=0):
        self.files, self.at, self.lines, self.where = files, at, 0, None

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.at:
                self.where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
                raise KeyboardInterrupt(f"injected at {self.where}")
        return self._local

    def _global(self, frame, event, arg):
        return self._local if frame.f_code.co_filename.endswith(self.files) else None

    def __enter__(self):
        import sys

        sys.settrace(self._global)
        return self

    def __exit__(self, *exc):
        import sys

        sys.settrace(None)
        return False


_AROUND_DEEPCACHE = (
    "tgate_kernels/engine/deepcache.py", "tgate_kernels/engine/generation.py", "tgate_kernels/engine/snapshot.py",
    "tgate_kernels/engine/installation.py", "tgate_kernels/engine/guards.py", "tgate_kernels/hooks/pipeline_loop.py",
    "DeepCache/extension/deepcache.py",
)


@pytest.mark.slow
def test_an_interrupt_at_any_line_run_around_a_deepcache_generation_leaves_the_pipeline_usable():
    """Every line T-GATE and DeepCache run to open, step, wrap, unwrap and close a generation,
    interrupted in turn (a sample of the points spread over the whole call): the next call,
    ``disable()`` and a plain call afterwards are all correct."""
    baseline = _call(tiny_sd())
    expected = _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE))
    # everything around the generation, then the undo of DeepCache's wrappers and the loop's
    # opening and closing more densely
    for files, points in ((_AROUND_DEEPCACHE, 45), (("tgate_kernels/engine/snapshot.py", "tgate_kernels/hooks/pipeline_loop.py"), 15)):
        pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE)
        with _InterruptAtLine(files) as counter:
            _call(pipe)
        assert counter.lines > 100
        for at in range(1, counter.lines + 1, max(1, counter.lines // points)):
            pipe = tgate_kernels.enable(tiny_sd(), gate_step=GATE, deepcache=DEEPCACHE)
            with pytest.raises(KeyboardInterrupt):
                with _InterruptAtLine(files, at) as fault:
                    _call(pipe)
            assert max_abs_diff(_call(pipe), expected) == 0.0, fault.where
            tgate_kernels.disable(pipe)
            assert _clean(pipe.unet) and max_abs_diff(_call(pipe), baseline) == 0.0, fault.where


def test_nothing_of_a_generation_outlives_it():
    """The caches, the auto gate's saved outputs and the compiled path's tensors go with the
    generation, whether it ends or raises."""
    from tgate_kernels.engine.installation import controller_of

    for options in (dict(gate_step="auto"), dict(gate_step=GATE, compile={"backend": "eager"})):
        pipe = tgate_kernels.enable(tiny_sd(), **options)
        state = controller_of(pipe).state

        def interrupt(pipe_, index, timestep, callback_kwargs):
            assert state.context.observer is not None or state.context.plan_data.bound is not None or state.context.plan_data._tensors
            raise KeyboardInterrupt

        for extra in ({}, {"callback_on_step_end": interrupt}):
            try:
                _call(pipe, **extra)
            except KeyboardInterrupt:
                pass
            assert state.context.observer is None and state.context.plan_data.bound is None and not state.context.plan_data._tensors, options
            assert all(not getattr(hook, "caches", None) for _, hook in controller_of(pipe).hooks), options


# ---------------------------------------------------------------- LoRA and processors changed while enabled


def test_lora_added_and_removed_while_enabled():
    from peft import LoraConfig

    def with_lora(pipe):
        torch.manual_seed(2)
        pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                         init_lora_weights=False))
        return pipe

    before = _call(tgate_kernels.enable(with_lora(tiny_sd()), gate_step=GATE))
    pipe = with_lora(tgate_kernels.enable(tiny_sd(), gate_step=GATE))
    assert max_abs_diff(_call(pipe), before) == 0.0
    pipe.unet.fuse_lora()
    assert max_abs_diff(_call(pipe), before) <= 1e-5, "fused into the weights: the same image"
    pipe.unet.unfuse_lora()
    assert max_abs_diff(_call(pipe), before) <= 1e-5
    pipe.unet.delete_adapters(list(pipe.unet.peft_config))
    assert max_abs_diff(_call(pipe), _call(tgate_kernels.enable(tiny_sd(), gate_step=GATE))) <= 1e-5, "fusing and unfusing rounds the weights"


def test_attention_processors_changed_while_enabled():
    from diffusers.models.attention_processor import AttnProcessor

    def plain_processors(pipe):
        pipe.unet.set_attn_processor(AttnProcessor())
        return pipe

    expected = _call(tgate_kernels.enable(plain_processors(tiny_sd()), gate_step=GATE))
    pipe = plain_processors(tgate_kernels.enable(tiny_sd(), gate_step=GATE))
    with tgate_kernels.view(pipe).record() as record:
        result = _call(pipe)
    assert max_abs_diff(result, expected) == 0.0
    assert record.reused(GATE, cross=True) > 0
