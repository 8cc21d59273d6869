"""``gate_step="auto"``: the gate chosen per generation from the cross-attention outputs, between
its bounds, the slowest sample deciding, and bad input refused before anything is modified."""

import pytest
import torch

import tgate_kernels
from tgate_kernels.engine.autogate import GateChooser
from tgate_kernels.config import AutoGate
from fixtures.tiny_pipelines import tiny_sd

from conftest import generate, max_abs_diff

STEPS = 10


@pytest.mark.parametrize("threshold, expected", [(1e3, "earliest"), (1e-9, "latest")])
def test_the_gate_falls_between_its_bounds(threshold, expected):
    options = dict(threshold=threshold, min_fraction=0.3, max_fraction=0.7, patience=1)
    pipe = tgate_kernels.enable(tiny_sd(), gate_step="auto", auto_gate=options)
    with tgate_kernels.view(pipe).record() as record:
        generate(pipe, steps=STEPS)
    earliest, latest = AutoGate(**options).window(STEPS)
    last = tgate_kernels.view(pipe).last_generation
    assert last.gate_step == {"earliest": earliest, "latest": latest}[expected] and (earliest, latest) == (3, 7)
    assert len(last.cross_attention_changes) == last.gate_step - 1, "one change per step from the second to the gate"
    assert all(c > 0 for c in last.cross_attention_changes)
    assert all(record.computed(step, cross=True) > 0 for step in range(last.gate_step))
    assert all(record.computed(step, cross=True) == 0 for step in range(last.gate_step, STEPS))
    assert [record.rows_run(step) for step in (last.gate_step - 1, last.gate_step)] == [[4], [2]]


def test_a_chosen_gate_gives_what_that_fixed_gate_gives():
    """With self-attention computed at every step before the gate, the window's steps are the
    fixed gate's steps exactly."""
    pipe = tgate_kernels.enable(tiny_sd(), gate_step="auto", sp_interval=1, warm_up=0,
                                auto_gate=dict(threshold=0.5, min_fraction=0.2, max_fraction=0.8, patience=2))
    auto = generate(pipe, steps=STEPS)
    chosen = tgate_kernels.view(pipe).last_generation.gate_step
    changes = tgate_kernels.view(pipe).last_generation.cross_attention_changes
    assert 2 <= chosen <= 8
    fixed = generate(tgate_kernels.enable(tiny_sd(), gate_step=chosen, sp_interval=1, warm_up=0), steps=STEPS)
    assert max_abs_diff(auto, fixed) == 0.0
    below = [change < 0.5 for change in changes]
    assert chosen == 8 or below[-2:] == [True, True], (chosen, changes)


def test_the_slowest_sample_of_the_batch_decides():
    chooser = GateChooser(AutoGate(threshold=0.1, min_fraction=0.1, max_fraction=0.9, patience=1), num_steps=10)
    still, moving = torch.ones(1, 4, 8), torch.ones(1, 4, 8)
    for step in range(4):
        moving = moving * 2  # sample 1 changes by 100% at every step
        chooser.observe("layer", ("negative", "prompt"), torch.cat([still, moving]))
        assert chooser.step_done(step) is None or step == 8
    assert chooser.history == [pytest.approx(1.0)] * 3
    for step in range(4, 6):
        chooser.observe("layer", ("negative", "prompt"), torch.cat([still, moving]))
        chooser.step_done(step)
    assert chooser.chosen == 5, "at step 4 both samples stopped changing: the gate falls right after it"


@pytest.mark.parametrize(
    "options, error, words",
    [
        (dict(threshold=0), ValueError, ["threshold", "> 0", "0"]),
        (dict(threshold=-0.1), ValueError, ["threshold", "-0.1"]),
        (dict(min_fraction=0.0), ValueError, ["min_fraction", "(0, 1)"]),
        (dict(max_fraction=1.5), ValueError, ["max_fraction", "1.5"]),
        (dict(min_fraction=0.7, max_fraction=0.3), ValueError, ["min_fraction", "must not exceed", "max_fraction"]),
        (dict(patience=0), ValueError, ["patience", ">= 1"]),
        (dict(threshold="low"), TypeError, ["threshold", "'low'"]),
        (dict(window=3), ValueError, ["unknown keys", "window"]),
    ],
)
def test_bad_auto_gate_options_are_refused_before_anything_is_modified(options, error, words):
    pipe = tiny_sd()
    with pytest.raises(error) as info:
        tgate_kernels.enable(pipe, gate_step="auto", auto_gate=options)
    assert all(word in str(info.value) for word in words), str(info.value)
    assert tgate_kernels.view(pipe) is None and "_diffusers_hook" not in pipe.unet.__dict__


def test_auto_is_refused_where_it_cannot_work():
    with pytest.raises(ValueError, match="not available through the tgate loaders"):
        tgate_kernels.TgateSDLoader(tiny_sd(), gate_step="auto")
    pipe = tgate_kernels.TgateSDLoader(tiny_sd())
    with pytest.raises(ValueError, match="not available through the tgate loaders and `pipe.tgate`"):
        generate(pipe, pipe.tgate, gate_step="auto")
    for extra in ({"deepcache": {"cache_interval": 2, "cache_branch_id": 0}}, {"compile": True}):
        with pytest.raises(ValueError, match=f"`gate_step='auto'` does not combine with `{next(iter(extra))}`"):
            tgate_kernels.enable(tiny_sd(), gate_step="auto", **extra)
    with pytest.raises(TypeError, match="'automatic'"):
        tgate_kernels.enable(tiny_sd(), gate_step="automatic")
    pipe = tiny_sd()
    with pytest.raises(ValueError, match=r"`auto_gate` tells how `gate_step='auto'` chooses; it was given with `gate_step=4`"):
        tgate_kernels.enable(pipe, gate_step=4, auto_gate={"threshold": 0.1})
    assert tgate_kernels.view(pipe) is None
