"""``enable``, ``disable``, the loaders and ``pipe.tgate`` in any order: ``enable`` decides what
plain calls run with, a loader what ``pipe.tgate`` runs with by default, neither changes the
other's; and the reference's ``pipe.tgate`` answers where it has the same API."""

import itertools
import pickle

import pytest
import torch

import tgate_kernels
from fixtures.tiny_pipelines import tiny_sd

from conftest import generate, max_abs_diff

ENABLE = dict(gate_step=3, sp_interval=2, warm_up=1)
LOADER = dict(gate_step=2, sp_interval=3, warm_up=0)
DEEPCACHE = dict(cache_interval=2, cache_branch_id=0)

OPERATIONS = {
    "enable": lambda pipe: tgate_kernels.enable(pipe, kernels="off", **ENABLE),
    "enable+deepcache": lambda pipe: tgate_kernels.enable(pipe, kernels="off", deepcache=DEEPCACHE, **ENABLE),
    "loader": lambda pipe: tgate_kernels.TgateSDLoader(pipe, **LOADER),
    "deepcache-loader": lambda pipe: tgate_kernels.TgateSDDeepCacheLoader(pipe, **DEEPCACHE, **LOADER),
    "disable": tgate_kernels.disable,
}


def _expected(operations):
    """What plain calls and ``pipe.tgate`` run with after ``operations``, as the README says."""
    plain, loader, enabled_with = None, None, None
    for name in operations:
        if name == "disable":
            plain, loader, enabled_with = None, None, None
        elif name.startswith("enable"):
            deepcache = DEEPCACHE if name == "enable+deepcache" else (plain or {}).get("deepcache")
            plain = enabled_with = dict(ENABLE, deepcache=deepcache)
        else:
            loader = dict(LOADER, deepcache=DEEPCACHE if name == "deepcache-loader" else None)
    return plain, loader or enabled_with


def _plain(settings):
    """A plain call of a fresh pipeline enabled with ``settings`` (``None``: never enabled)."""
    pipe = tiny_sd()
    if settings is not None:
        tgate_kernels.enable(pipe, kernels="off", **{k: v for k, v in settings.items() if v is not None})
    return generate(pipe, steps=5)


@pytest.mark.slow
@pytest.mark.parametrize("operations", [
    *itertools.permutations(["enable", "loader", "deepcache-loader"], 2),
    *itertools.permutations(["enable+deepcache", "loader"]),
    ("loader", "enable", "loader"),
    ("enable", "loader", "disable", "deepcache-loader"),
    ("deepcache-loader", "disable", "enable"),
], ids="-then-".join)
def test_enable_and_the_loaders_in_any_order(operations):
    pipe = tiny_sd()
    for name in operations:
        OPERATIONS[name](pipe)
    plain_settings, tgate_settings = _expected(operations)
    assert max_abs_diff(generate(pipe, steps=5), _plain(plain_settings)) == 0.0, "plain calls"
    if tgate_settings is None:
        assert not hasattr(pipe, "tgate")
        return
    deepcache = tgate_settings.pop("deepcache")
    expected_pipe = tgate_kernels.enable(tiny_sd(), kernels="off", deepcache=deepcache, **tgate_settings)
    # a loader alone keeps kernels="auto": the fused op rounds differently
    assert max_abs_diff(generate(pipe, pipe.tgate, steps=5), generate(expected_pipe, steps=5)) <= 1e-5, "pipe.tgate"


def test_a_loader_leaves_the_plain_calls_of_an_enabled_pipeline_as_they_were(reference):
    pipe = tgate_kernels.enable(tiny_sd(), kernels="off", gate_step=3)
    expected_plain = generate(tgate_kernels.enable(tiny_sd(), kernels="off", gate_step=3))
    tgate_kernels.TgateSDLoader(pipe)
    assert tgate_kernels.view(pipe).config.gate_step == 3 and tgate_kernels.view(pipe).tgate_config.gate_step == 10
    assert max_abs_diff(generate(pipe), expected_plain) == 0.0
    expected_tgate = reference.TgateSDLoader(tiny_sd()).tgate(
        prompt="a cat", num_inference_steps=12, gate_step=10, generator=torch.Generator().manual_seed(0), output_type="np",
        height=32, width=32,
    ).images
    tgate_kernels.enable(pipe, kernels="off", gate_step=3)  # enable again: pipe.tgate keeps the loader's defaults
    ours = pipe.tgate(prompt="a cat", num_inference_steps=12, generator=torch.Generator().manual_seed(0), output_type="np",
                      height=32, width=32).images
    assert max_abs_diff(ours, expected_tgate) <= 1e-5


def test_a_default_gate_beyond_the_steps_of_a_call_runs_as_the_reference_does(reference):
    call = dict(prompt="a cat", negative_prompt="blurry", num_inference_steps=4, height=32, width=32, output_type="np")
    expected = reference.TgateSDLoader(tiny_sd()).tgate(**call, generator=torch.Generator().manual_seed(0)).images
    pipe = tgate_kernels.TgateSDLoader(tiny_sd(), gate_step=10, num_inference_steps=25)
    with pytest.warns(UserWarning, match="beyond the 4 steps"):
        ours = pipe.tgate(**call, generator=torch.Generator().manual_seed(0)).images
    assert max_abs_diff(ours, expected) <= 1e-5
    with pytest.warns(UserWarning, match="beyond the 4 steps"):
        assert max_abs_diff(pipe.tgate(**call, gate_step=6, generator=torch.Generator().manual_seed(0)).images, expected) <= 1e-5


# ---------------------------------------------------------------- one pipeline used from inside itself, or saved


def test_a_call_from_inside_a_step_callback_is_refused_before_it_changes_the_outer_generation():
    expected = generate(tgate_kernels.enable(tiny_sd(), gate_step=3))
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3)
    refusals = []

    def nested(pipe_, step, timestep, callback_kwargs):
        if step in (1, 3):
            for method in (pipe_, pipe_.tgate):
                try:
                    generate(pipe_, method, steps=2)
                except tgate_kernels.ConcurrentGenerationError as error:
                    refusals.append(str(error))
        return callback_kwargs

    assert max_abs_diff(generate(pipe, callback_on_step_end=nested), expected) == 0.0
    assert len(refusals) == 4 and all("called again while its T-GATE generation runs" in r for r in refusals)
    assert max_abs_diff(generate(pipe), expected) == 0.0


def test_settings_cannot_change_while_a_generation_runs():
    expected = generate(tgate_kernels.enable(tiny_sd(), gate_step=3))
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=3)
    refusals = []

    def reconfigure(pipe_, step, timestep, callback_kwargs):
        for change in (lambda: tgate_kernels.enable(pipe_, gate_step=1), lambda: tgate_kernels.disable(pipe_),
                       lambda: tgate_kernels.TgateSDLoader(pipe_, gate_step=1)):
            try:
                change()
            except tgate_kernels.ConcurrentGenerationError as error:
                refusals.append(str(error))
        return callback_kwargs

    assert max_abs_diff(generate(pipe, callback_on_step_end=reconfigure), expected) == 0.0
    assert len(refusals) == 18 and all("while a T-GATE generation runs on it" in r for r in refusals)
    assert tgate_kernels.view(pipe).config.gate_step == 3


def test_pickling_an_enabled_pipeline_is_refused_clearly_and_saving_its_weights_works(tmp_path):
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=2)
    expected = generate(pipe)
    for target in (pipe, pipe.unet, pipe.unet.down_blocks[0]):
        with pytest.raises(TypeError, match="cannot be pickled or saved whole with torch.save"):
            pickle.dumps(target)
    with pytest.raises(TypeError, match="disable"):
        torch.save(pipe.unet, tmp_path / "unet.pt")
    torch.save(pipe.unet.state_dict(), tmp_path / "weights.pt")
    pipe.save_pretrained(tmp_path / "pipe")
    assert max_abs_diff(generate(pipe), expected) == 0.0
    tgate_kernels.disable(pipe)
    assert isinstance(pickle.loads(pickle.dumps(pipe.unet)), type(pipe.unet))
