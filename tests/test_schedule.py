"""The schedule layer: every phase boundary, parity with the reference's scheduler, settings."""

import itertools

import pytest

from tgate_kernels.config import TgateConfig
from tgate_kernels.schedule import AttentionAction, plan_generation, plan_step

COMPUTE, CACHE, REUSE = AttentionAction.COMPUTE, AttentionAction.CACHE, AttentionAction.REUSE


def _reference_actions(tgate, step, gate, sp, fi, warm_up):
    from tgate import tgate_utils

    ca, sa, keep_shape = tgate_utils.tgate_scheduler(
        cur_step=step, gate_step=gate, sp_interval=sp, fi_interval=fi, warm_up=warm_up
    )

    def action(flags):
        if flags["cache"]:
            return CACHE
        return REUSE if flags["reuse"] else COMPUTE

    return action(sa), action(ca), not keep_shape


@pytest.mark.parametrize("gate", [0, 1, 2, 3, 5, 10, 25])
def test_plans_match_the_reference_scheduler_exhaustively(gate, reference):
    for sp, fi, warm_up in itertools.product([1, 2, 3, 5], [1, 2, 3], [0, 1, 2, 4, 12]):
        settings = TgateConfig(gate_step=gate, sp_interval=sp, fi_interval=fi, warm_up=warm_up)
        for step in range(25):
            plan = plan_step(step, settings, gate)
            assert (plan.self_attention, plan.cross_attention, plan.average_cfg_halves) == _reference_actions(
                reference, step, gate, sp, fi, warm_up
            ), (step, gate, sp, fi, warm_up)
            assert plan.cfg_batch == (step < gate)


def test_phase_boundaries_at_default_settings():
    plans = plan_generation(TgateConfig(gate_step=10), 25)
    # warm-up: computed, no cache
    assert [p.self_attention for p in plans[:2]] == [COMPUTE, COMPUTE]
    # cached at warm_up, then on multiples of sp_interval=5, reused otherwise
    assert [p.self_attention for p in plans[2:9]] == [CACHE, REUSE, REUSE, CACHE, REUSE, REUSE, REUSE]
    assert all(p.cross_attention is COMPUTE and p.cfg_batch for p in plans[:9])
    gate = plans[9]
    assert (gate.self_attention, gate.cross_attention, gate.cfg_batch, gate.average_cfg_halves) == (CACHE, CACHE, True, True)
    after = plans[10:]
    assert all(p.cross_attention is REUSE and not p.cfg_batch and not p.average_cfg_halves for p in after)
    assert all(p.self_attention is CACHE for p in after)  # fi_interval=1
    assert len(plans) == 25 and [p.step for p in plans] == list(range(25))


def test_fidelity_interval_reuses_between_caches():
    plans = plan_generation(TgateConfig(gate_step=4, fi_interval=3), 10)
    assert [p.self_attention for p in plans[4:]] == [REUSE, REUSE, CACHE, REUSE, REUSE, CACHE]


def test_gate_at_first_step_and_at_last_step():
    first = plan_generation(TgateConfig(gate_step=1), 4)
    assert first[0].average_cfg_halves and first[0].cross_attention is CACHE
    assert [p.cfg_batch for p in first] == [True, False, False, False]
    last = plan_generation(TgateConfig(gate_step=4), 4)
    assert [p.cfg_batch for p in last] == [True] * 4
    assert last[3].average_cfg_halves and not any(p.average_cfg_halves for p in last[:3])


def test_gate_zero_drops_cfg_from_the_start_and_never_caches_cross_attention():
    plans = plan_generation(TgateConfig(gate_step=0), 5)
    assert not any(p.cfg_batch for p in plans)
    assert all(p.cross_attention is REUSE for p in plans)  # nothing cached: falls back to computing
    assert not any(p.cross_attention is CACHE for p in plans)


@pytest.mark.parametrize(
    "fraction, steps, expected", [(0.4, 25, 10), (0.5, 5, 3), (0.5, 7, 4), (0.01, 25, 1), (0.99, 4, 4), (0.3, 10, 3)]
)
def test_fractional_gate_step(fraction, steps, expected):
    assert TgateConfig(gate_step=fraction).resolve_gate_step(steps) == expected


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"gate_step": -1}, ValueError, ["gate_step", "-1", ">= 0"]),
        ({"gate_step": "10"}, TypeError, ["gate_step", "'10'", "str"]),
        ({"gate_step": True}, TypeError, ["gate_step", "True", "bool"]),
        ({"gate_step": None}, TypeError, ["gate_step", "None"]),
        ({"gate_step": 1.5}, ValueError, ["gate_step", "1.5", "(0, 1)"]),
        ({"gate_step": 0.0}, ValueError, ["gate_step", "0.0", "(0, 1)"]),
        ({"gate_step": float("nan")}, ValueError, ["gate_step", "nan"]),
        ({"sp_interval": 0}, ValueError, ["sp_interval", "0", ">= 1"]),
        ({"sp_interval": 2.0}, TypeError, ["sp_interval", "2.0", "float"]),
        ({"fi_interval": 0}, ValueError, ["fi_interval", "0", ">= 1"]),
        ({"fi_interval": -3}, ValueError, ["fi_interval", "-3"]),
        ({"warm_up": -1}, ValueError, ["warm_up", "-1", ">= 0"]),
        ({"warm_up": "2"}, TypeError, ["warm_up", "'2'"]),
        ({"lcm": "yes"}, TypeError, ["lcm", "'yes'"]),
    ],
)
def test_bad_settings_are_named_in_the_error(kwargs, error, words):
    with pytest.raises(error) as info:
        TgateConfig(**kwargs)
    for word in words:
        assert word in str(info.value)


def test_gate_step_beyond_the_steps_run_is_refused():
    settings = TgateConfig(gate_step=11)
    assert settings.resolve_gate_step(11) == 11
    with pytest.raises(ValueError, match=r"`gate_step` must be between 0 and the number of steps run \(10\), got 11"):
        settings.resolve_gate_step(10)
    with pytest.raises(ValueError, match="num_inference_steps"):
        settings.resolve_gate_step(0)


def test_updated_keeps_unspecified_values_and_revalidates():
    base = TgateConfig(gate_step=8, sp_interval=3)
    assert base.updated(gate_step=None, warm_up=0) == TgateConfig(gate_step=8, sp_interval=3, warm_up=0)
    with pytest.raises(ValueError, match="warm_up"):
        base.updated(warm_up=-2)
