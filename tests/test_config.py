"""One ``TgateConfig``: validated once, equal for equal settings, serialisable, and what ``enable``,
the loaders, the command line and ``run.json`` all hold."""

import dataclasses
import json
import subprocess
import sys

import pytest

import tgate_kernels
from tgate_kernels import AutoGate, CompileOptions, DeepCacheOptions, KernelMode, KeptPart, TgateConfig
from fixtures.tiny_pipelines import tiny_sd

from conftest import generate, max_abs_diff


def test_spellings_of_one_setting_make_equal_configs():
    assert TgateConfig(deepcache=True) == TgateConfig(deepcache={"cache_interval": 3, "cache_branch_id": 0})
    assert TgateConfig(deepcache=True).deepcache == DeepCacheOptions(3, 0)
    assert TgateConfig(kernels="off", kept_part="conditional") == TgateConfig(kernels=KernelMode.OFF, kept_part=KeptPart.CONDITIONAL)
    assert TgateConfig(compile=True) == TgateConfig(compile={}) == TgateConfig(compile=CompileOptions())
    assert TgateConfig(compile=False) == TgateConfig(compile=None) == TgateConfig()
    assert TgateConfig(gate_step="auto", auto_gate={"patience": 3}).auto_gate == AutoGate(patience=3)
    assert hash(TgateConfig(deepcache=True)) == hash(TgateConfig(deepcache={"cache_interval": 3}))


@pytest.mark.parametrize(
    "config",
    [
        TgateConfig(),
        TgateConfig(gate_step=0.4, sp_interval=3, fi_interval=2, warm_up=0, lcm=True, kernels="off", kept_part="conditional",
                    gate_cache="kept-part"),
        TgateConfig(gate_step=3, guidance_after_gate="kept"),
        TgateConfig(gate_step="auto", auto_gate={"threshold": 0.1, "min_fraction": 0.3}),
        TgateConfig(gate_step=7, deepcache={"cache_interval": 2, "cache_branch_id": 1}),
        TgateConfig(compile={"mode": "max-autotune", "freezing": False, "options": {"max_autotune": True}}),
    ],
)
def test_a_config_survives_json_and_back(config):
    text = json.dumps(config.to_dict())
    assert TgateConfig.from_dict(json.loads(text)) == config


@pytest.mark.parametrize(
    "options, error, words",
    [
        ({"gate_step": -1}, ValueError, ["gate_step", "-1", ">= 0"]),
        ({"gate_step": 1.5}, ValueError, ["gate_step", "1.5", "(0, 1)"]),
        ({"gate_step": "soon"}, TypeError, ["gate_step", "soon", "'auto'"]),
        ({"sp_interval": 0}, ValueError, ["sp_interval", ">= 1", "0"]),
        ({"kernels": "fast"}, ValueError, ["kernels", "fast", "'auto'", "'off'"]),
        ({"gate_cache": "prompt"}, ValueError, ["gate_cache", "prompt", "'mean'", "'kept-part'"]),
        ({"guidance_after_gate": "half"}, ValueError, ["guidance_after_gate", "half", "'dropped'", "'kept'"]),
        ({"guidance_after_gate": "kept", "gate_step": "auto"}, ValueError, ["guidance_after_gate='kept'", "gate_step", "'auto'"]),
        ({"guidance_after_gate": "kept", "compile": True}, ValueError, ["guidance_after_gate='kept'", "compile"]),
        ({"deepcache": {"cache_interval": 0}}, ValueError, ["cache_interval", ">= 1"]),
        ({"deepcache": {"interval": 3}}, ValueError, ["deepcache", "unknown keys", "interval", "cache_interval"]),
        ({"compile": {"backend": "nope"}}, ValueError, ["compile['backend']", "nope"]),
        ({"compile": True, "deepcache": True}, ValueError, ["compile", "deepcache", "does not combine"]),
        ({"gate_step": "auto", "compile": True}, ValueError, ["gate_step='auto'", "compile"]),
        ({"gate_step": 4, "auto_gate": {"threshold": 0.1}}, ValueError, ["auto_gate", "gate_step=4"]),
    ],
)
def test_a_bad_config_is_refused_when_it_is_built_naming_the_argument(options, error, words):
    with pytest.raises(error) as raised:
        TgateConfig(**options)
    assert all(word in str(raised.value) for word in words), str(raised.value)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ValueError, match="unknown keys.*gate"):
        TgateConfig.from_dict({"gate": 3})


def test_enable_with_a_config_is_enable_with_its_options():
    options = dict(gate_step=3, sp_interval=2, warm_up=1, kernels="off")
    by_options = generate(tgate_kernels.enable(tiny_sd(), **options))
    pipe = tgate_kernels.enable(tiny_sd(), config=TgateConfig(**options))
    assert tgate_kernels.view(pipe).config == TgateConfig(**options)
    assert max_abs_diff(generate(pipe), by_options) == 0.0


def test_options_given_beside_a_config_replace_its_values():
    pipe = tgate_kernels.enable(tiny_sd(), gate_step=4, config=TgateConfig(gate_step=2, sp_interval=3))
    assert tgate_kernels.view(pipe).config == TgateConfig(gate_step=4, sp_interval=3)
    with pytest.raises(TypeError, match="config"):
        tgate_kernels.enable(tiny_sd(), config={"gate_step": 3})


def test_a_loader_and_pipe_tgate_hold_configs_too():
    pipe = tgate_kernels.TgateSDDeepCacheLoader(tiny_sd(), cache_interval=2, gate_step=3, num_inference_steps=5)
    view = tgate_kernels.view(pipe)
    assert view.tgate_config == TgateConfig(gate_step=3, sp_interval=1, warm_up=0, deepcache=DeepCacheOptions(2, 0))
    assert not view.enabled


def test_the_config_a_generate_job_runs_with_is_in_its_run_json(saved_tiny_sd, tmp_path):
    from tgate_kernels.tools import cli

    out = tmp_path / "job"
    argv = ["generate", "--model", str(saved_tiny_sd), "--prompt", "a red circle", "--steps", "3", "--gate-step", "0.5",
            "--sp-interval", "2", "--deepcache", "2,0", "--out", str(out), "--local-files-only"]
    assert cli.main(argv) == 0
    stored = json.loads((out / "run.json").read_text())["tgate"]
    # the gate as the step it resolves to (half of 3 steps, rounded half up), so that an equal
    # job spelled with the step itself is the same job
    assert TgateConfig.from_dict(stored) == TgateConfig(gate_step=2, sp_interval=2, deepcache=DeepCacheOptions(2, 0))


def test_the_config_and_the_schedule_import_without_torch():
    code = ("import sys, importlib.util, tgate_kernels.config as c, tgate_kernels.schedule as s; "
            "c.TgateConfig(gate_step=3).to_dict(); s.plan_generation(c.TgateConfig(gate_step=3), 5); "
            "print('torch' in sys.modules)")
    # the package's __init__ imports the engine (and torch); the two modules on their own do not
    isolated = (f"import sys, types; sys.modules['tgate_kernels'] = types.ModuleType('tgate_kernels'); "
                f"sys.modules['tgate_kernels'].__path__ = [{str(tgate_kernels.__path__[0])!r}]; {code}")
    result = subprocess.run([sys.executable, "-c", isolated], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_config_fields_are_the_options_of_enable():
    import inspect

    fields = [f.name for f in dataclasses.fields(TgateConfig)]
    parameters = [name for name in inspect.signature(tgate_kernels.enable).parameters if name not in ("pipe", "config")]
    assert sorted(fields) == sorted(parameters)
