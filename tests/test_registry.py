"""The family registry, the engine apart from the tools, and private APIs checked where they are used."""

import ast
import pathlib
import subprocess
import sys

import pytest
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

import tgate_kernels
from tgate_kernels.families import registry
from tgate_kernels.families.registry import NEGATIVE, PERTURBED, PROMPT, Family, family_of
from fixtures.tiny_pipelines import tiny_sd

PACKAGE = pathlib.Path(tgate_kernels.__file__).parent


def _bare(cls):
    """An instance of ``cls`` without running its ``__init__`` (only its class is looked at)."""
    return cls.__new__(cls)


def test_a_family_is_found_by_the_pipeline_class_and_by_a_users_subclass_of_it():
    class MyStudioPipeline(StableDiffusionXLPipeline):
        pass

    for pipe in (_bare(StableDiffusionXLPipeline), _bare(MyStudioPipeline)):
        family = family_of(pipe)
        assert family.name == "stable-diffusion-xl"
        assert family.interleaved == {"added_cond_kwargs['time_ids']"}


def test_a_family_defined_by_its_denoiser_takes_any_pipeline_around_it():
    denoiser = _bare(UNetSpatioTemporalConditionModel)
    assert family_of(_bare(StableVideoDiffusionPipeline), denoiser).kept == PROMPT
    assert family_of(_bare(StableDiffusionPipeline), denoiser).kept == PROMPT
    assert family_of(_bare(StableDiffusionPipeline)) is registry.ORDINARY


def test_an_ordinary_pipeline_guides_in_negative_then_prompt_halves_and_pag_adds_its_part():
    assert registry.batched_parts(_bare(StableDiffusionPipeline), registry.ORDINARY, 2) == (NEGATIVE, PROMPT)
    assert registry.batched_parts(_bare(StableDiffusionPipeline), registry.ORDINARY, 3) is None
    from diffusers import StableDiffusionPAGPipeline

    pag = _bare(StableDiffusionPAGPipeline)
    vars(pag).update(_pag_scale=3.0, pag_applied_layers=["mid"])
    assert registry.uses_perturbed_attention(pag)
    assert registry.batched_parts(pag, registry.ORDINARY, 3) == (NEGATIVE, PROMPT, PERTURBED)
    vars(pag)["_pag_scale"] = 0.0  # PAG switched off: its pipeline guides as an ordinary one
    assert registry.batched_parts(pag, registry.ORDINARY, 2) == (NEGATIVE, PROMPT)


def test_a_new_family_is_one_entry(monkeypatch):
    class PromptFirstPipeline(StableDiffusionPipeline):
        pass

    monkeypatch.setattr(registry, "_BY_PIPELINE", dict(registry._BY_PIPELINE))
    family = registry.register(Family("prompt-first", pipelines=("PromptFirstPipeline",), batched=((PROMPT, NEGATIVE),)))
    assert family_of(_bare(PromptFirstPipeline)) is family
    assert registry.batched_parts(_bare(PromptFirstPipeline), family, 2) == (PROMPT, NEGATIVE)
    with pytest.raises(ValueError, match="PromptFirstPipeline already belongs to the 'prompt-first' family"):
        registry.register(Family("other", pipelines=("PromptFirstPipeline",)))


def test_a_refused_family_is_refused_at_enable_with_its_reason_and_nothing_changes(monkeypatch):
    monkeypatch.setattr(registry, "_BY_PIPELINE", dict(registry._BY_PIPELINE))
    pipe = tiny_sd()
    registry.register(Family("refused-here", pipelines=(type(pipe).__name__,), refused="its loop runs backwards"))
    forward = pipe.unet.forward
    with pytest.raises(ValueError, match="does not support StableDiffusionPipeline: its loop runs backwards"):
        tgate_kernels.enable(pipe)
    assert tgate_kernels.view(pipe) is None and pipe.unet.forward == forward


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of the modules ``path`` imports."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


# the layers above the engine: tools (benchmarks, jobs, the CLI, the micro world) and serving
ENGINE = [p for p in PACKAGE.rglob("*.py")
          if not {"tools", "serving"} & set(p.relative_to(PACKAGE).parts) and p.name != "__main__.py"]
SERVING = list((PACKAGE / "serving").rglob("*.py"))


def test_the_engine_imports_nothing_from_the_tools_or_serving():
    assert ENGINE
    leaks = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith(("tgate_kernels.tools", "tgate_kernels.serving")))
             for p in ENGINE}
    assert not {k: v for k, v in leaks.items() if v}


def test_serving_imports_nothing_from_the_tools():
    assert SERVING
    leaks = {str(p.relative_to(PACKAGE)): sorted(n for n in _imports(p) if n.startswith("tgate_kernels.tools")) for p in SERVING}
    assert not {k: v for k, v in leaks.items() if v}


def test_no_module_outside_the_families_names_a_pipeline_class():
    named = {}
    for path in ENGINE:
        if path.relative_to(PACKAGE).parts[0] == "families":
            continue
        strings = [node.value for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Constant) and isinstance(node.value, str)]
        hits = [s for s in strings if s.endswith("Pipeline") and s[:1].isupper() and " " not in s]
        if hits:
            named[str(path.relative_to(PACKAGE))] = hits
    assert not named


def test_private_attributes_of_other_libraries_are_read_in_compat_only():
    private = ("._hook_order", "._fn_refs", "._module_ref", "._is_stateful", "deinitalize_hook", "torch._inductor",
               "torch._dynamo", "diffusers.hooks.hooks", "_chunked_feed_forward", "._hf_hook", "._old_forward")
    found = {str(p.relative_to(PACKAGE)): [name for name in private if name in p.read_text()]
             for p in [*ENGINE, *SERVING] if p.name != "_compat.py"}
    assert not {k: v for k, v in found.items() if v}


def test_a_moved_diffusers_private_breaks_only_what_uses_it(monkeypatch):
    from tgate_kernels import _compat

    monkeypatch.setattr(_compat, "_REGISTRY_INTERNALS", (*_compat._REGISTRY_INTERNALS, "_moved_away"))
    pipe = tiny_sd()
    forward = pipe.unet.forward
    with pytest.raises(ImportError, match=r"HookRegistry\._moved_away.*checked with diffusers"):
        tgate_kernels.enable(pipe)
    assert tgate_kernels.view(pipe) is None and pipe.unet.forward == forward and "_diffusers_hook" not in vars(pipe.unet)
    # the schedule, the config and the ops need none of it
    code = ("import diffusers.models.attention as a; del a._chunked_feed_forward; "
            "import diffusers.hooks.hooks as h; h.HookRegistry._hook_order = property(lambda self: 1 / 0); "
            "import torch, tgate_kernels, tgate_kernels.ops; "
            "x = torch.randn(2, 8, 16); c = torch.randn(2, 8, 16); w = torch.ones(16); b = torch.zeros(16); "
            "print(tgate_kernels.plan_step(0, tgate_kernels.TgateConfig(), 10).step, "
            "tgate_kernels.ops.post_gate_residual_norm(x, c, x, weight=w, bias=b)[0].shape)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
