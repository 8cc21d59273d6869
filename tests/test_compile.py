"""``enable(pipe, compile=...)``: the step plan never reaches a compiled graph, so a schedule adds
no graph and no recompilation; a compile failure runs eagerly with one warning; disable restores
the uncompiled modules. Most tests compile with dynamo's ``eager`` backend (the same graphs, no
code generation), which keeps them fast; one runs what ``compile=True`` runs, inductor with
freezing, which folds every tensor it does not see as an input."""

import warnings

import numpy as np
import pytest
import torch

import tgate_kernels
from fixtures.tiny_pipelines import tiny_pixart_alpha, tiny_sd

from conftest import generate, max_abs_diff, compiled_graph_count

EAGER_BACKEND = {"backend": "eager"}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return compiled_graph_count()


@pytest.mark.parametrize("factory, extra", [(tiny_sd, {}), (tiny_pixart_alpha, {"clean_caption": False, "height": 256, "width": 256})])
def test_schedules_add_no_graph_and_the_result_is_eager_t_gates(factory, extra):
    schedules = [
        dict(gate_step=3, sp_interval=2, warm_up=1),
        dict(gate_step=5, sp_interval=3, fi_interval=2, warm_up=0),
        dict(gate_step=0.5, sp_interval=1, warm_up=2),
    ]
    pipe = tgate_kernels.enable(factory(), compile=EAGER_BACKEND, **schedules[0])
    assert tgate_kernels.view(pipe).fast_blocks == (), "under compile inductor fuses the plain ops"
    first = generate(pipe, steps=6, **extra)
    graphs = _graphs()
    assert graphs > 0
    for steps, schedule in zip((6, 10, 8), schedules):
        tgate_kernels.enable(pipe, compile=EAGER_BACKEND, **schedule)
        compiled = generate(pipe, steps=steps, **extra)
        assert _graphs() == graphs, f"{schedule} compiled {_graphs() - graphs} more graphs"
        eager = generate(tgate_kernels.enable(factory(), kernels="off", **schedule), steps=steps, **extra)
        assert max_abs_diff(compiled, eager) <= 1e-5
    assert np.array_equal(generate(tgate_kernels.enable(pipe, compile=EAGER_BACKEND, **schedules[0]), steps=6, **extra), first)


@pytest.mark.slow
def test_inductor_with_freezing_gives_eager_t_gates_images_over_every_phase_and_call():
    from tgate_kernels.engine.installation import controller_of

    # 7 steps: warm-up (0), self-attention cached (1, 2) and reused (3) before the gate, the gate
    # step (4), cross-attention reused with self-attention reused (5) and cached (6) after it
    schedule = dict(gate_step=5, sp_interval=2, fi_interval=2, warm_up=1)
    eager = generate(tgate_kernels.enable(tiny_sd(), kernels="off", **schedule), steps=7)
    pipe = tgate_kernels.enable(tiny_sd(), compile=True, **schedule)
    assert tgate_kernels.view(pipe).compile.backend == "inductor"
    graphs = _graphs()
    plan_data = controller_of(pipe).state.context.plan_data
    for call in range(3):
        compiled = generate(pipe, steps=7)
        assert max_abs_diff(compiled, eager) <= 1e-4, f"call {call}"
        assert plan_data.bound is None and not plan_data._tensors, "the caches go with the generation"
    assert _graphs() - graphs == 2, "one graph before the gate, one after"
    plain = generate(tiny_sd(), steps=7)
    assert max_abs_diff(compiled, plain) > 1e-3, "T-GATE changed the images"


def test_many_compiled_pipelines_in_one_process_each_keep_their_graphs():
    """dynamo counts graphs against its recompile limit (8) per code object: a compiled denoiser
    must not share that budget with the others, or the ninth graph of a process runs eagerly."""
    expected = generate(tgate_kernels.enable(tiny_sd(), gate_step=2, kernels="off"), steps=4)
    pipes = [tgate_kernels.enable(tiny_sd(), gate_step=2, compile=EAGER_BACKEND) for _ in range(5)]
    for pipe in pipes:
        graphs = _graphs()
        generate(pipe, steps=4)
        assert _graphs() - graphs == 2, "one graph before the gate, one after, for every pipeline"
        assert max_abs_diff(generate(pipe, steps=4), expected) <= 1e-5


def test_disable_restores_the_uncompiled_denoiser():
    baseline = generate(tiny_sd())
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, compile=EAGER_BACKEND)
    generate(pipe)
    tgate_kernels.disable(pipe)
    graphs = _graphs()
    assert np.array_equal(generate(pipe), baseline)
    assert _graphs() == graphs, "nothing runs compiled after disable"
    assert not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in pipe.unet.modules())


def test_switching_compile_off_and_on_rebuilds_the_hooks():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, compile=EAGER_BACKEND)
    compiled = generate(pipe)
    tgate_kernels.enable(pipe, gate_step=2)
    graphs = _graphs()
    eager = generate(pipe)
    assert _graphs() == graphs and tgate_kernels.view(pipe).fast_blocks
    assert max_abs_diff(eager, compiled) <= 1e-5


def test_a_compile_failure_falls_back_to_eager_with_one_warning():
    def broken_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler here")

    expected = generate(tgate_kernels.enable(tiny_sd(), gate_step=2, kernels="off"))
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, compile={"backend": broken_backend})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = generate(pipe)
        second = generate(pipe)
    messages = [str(w.message) for w in caught if "torch.compile of unet failed" in str(w.message)]
    assert len(messages) == 1 and "no C++ compiler here" in messages[0]
    assert max_abs_diff(first, expected) == 0.0 and max_abs_diff(second, expected) == 0.0


@pytest.mark.parametrize(
    "option, error, words",
    [
        ("yes", TypeError, ["compile", "'yes'", "True, False or a dict"]),
        ({"mode": "fast", "bogus": 1}, ValueError, ["compile", "bogus", "allowed"]),
        ({"freezing": "always"}, TypeError, ["compile['freezing']", "'always'", "None, True or False"]),
        ({"backend": "no-such-backend"}, ValueError, ["compile['backend']", "'no-such-backend'", "inductor"]),
        ({"mode": "fast"}, ValueError, ["compile['mode']", "'fast'", "max-autotune"]),
    ],
)
def test_bad_compile_options_are_refused_before_anything_is_modified(option, error, words):
    pipe = tiny_sd()
    with pytest.raises(error) as info:
        tgate_kernels.enable(pipe, compile=option)
    assert all(word in str(info.value) for word in words)
    assert tgate_kernels.view(pipe) is None and "_diffusers_hook" not in pipe.unet.__dict__


def test_compile_with_deepcache_or_offloading_is_refused():
    with pytest.raises(ValueError, match="`compile` does not combine with `deepcache`"):
        tgate_kernels.enable(tiny_sd(), compile=True, deepcache={"cache_interval": 2, "cache_branch_id": 0})
    pipe = tiny_sd()
    pipe.enable_model_cpu_offload(device="cpu")
    tgate_kernels.enable(pipe, compile=EAGER_BACKEND)
    with pytest.raises(RuntimeError, match="does not combine with accelerate's offloading"):
        generate(pipe)


def test_a_switch_to_compile_that_fails_keeps_the_previous_hooks(monkeypatch):
    from tgate_kernels.engine.installation import TgateController

    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2)
    expected = generate(pipe)
    original, installs = TgateController.install, []

    def interrupted_once(self):
        installs.append(self.configuration.config.compile)
        if len(installs) == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(TgateController, "install", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        tgate_kernels.enable(pipe, gate_step=2, compile=EAGER_BACKEND)
    monkeypatch.undo()
    assert installs[0] is not None and installs[1] is None, "the compiled install failed, the eager one came back"
    view = tgate_kernels.view(pipe)
    assert view is not None and view.fast_blocks and pipe.tgate is not None
    assert max_abs_diff(generate(pipe), expected) == 0.0


def test_the_loaders_refuse_what_enable_refuses():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2, compile=EAGER_BACKEND)
    with pytest.raises(ValueError, match="`compile` does not combine with `deepcache`"):
        tgate_kernels.TgateSDDeepCacheLoader(pipe)
    assert tgate_kernels.view(pipe).config.gate_step == 2 and tgate_kernels.view(pipe).compile is not None


@pytest.mark.parametrize(
    "name, schedule, compile_options",
    [
        (name, schedule, {"backend": "eager"})
        for name in ("kandinsky5", "qwenimage")
        for schedule in (dict(gate_step=1), dict(gate_step=3, sp_interval=2, warm_up=0, fi_interval=2))
    ] + [
        # the path a user runs: inductor with freezing
        ("qwenimage", dict(gate_step=3, sp_interval=2, warm_up=0, fi_interval=2), True),
    ],
)
def test_compile_with_one_call_per_part_over_texts_of_different_lengths_gives_eager_t_gates_latents(name, schedule, compile_options):
    """Guidance as two calls a step, the negative prompt's text longer than the prompt's: a module
    over the text (Kandinsky 5's text blocks, Qwen-Image's text stream) gives outputs of two shapes,
    so no mean exists at the gate and the prompt's own stands, as eager T-GATE keeps it."""
    from fixtures.families import FAMILIES

    family = FAMILIES[name]

    def latents(pipe):
        call = {**family.call_kwargs(4), "negative_prompt": "blurry, low quality, dark, ugly"}
        with torch.no_grad():
            output = pipe(**call)
        return output.frames if hasattr(output, "frames") else output.images

    eager = latents(tgate_kernels.enable(family.build(), **schedule))
    torch._dynamo.reset()
    pipe = tgate_kernels.enable(family.build(), **schedule, compile=compile_options)
    # inductor's fused kernels round differently from eager's; the eager backend runs eager's ops
    tolerance = dict(rtol=1e-4, atol=1e-5) if compile_options is True else dict(rtol=0, atol=1e-6)
    for _ in range(2):
        torch.testing.assert_close(latents(pipe), eager, **tolerance)
