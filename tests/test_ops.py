"""Tests for the fused post-gate op ``tgate::post_gate_residual_norm``.

The C++ kernel is checked against a float64 evaluation of the same formula; the
Triton kernel runs under Triton's CPU interpreter in a subprocess (TRITON_INTERPRET
must be set before triton is imported, and other tests or the package itself may
import it first).  With ``TGATE_KERNELS_REQUIRE_EXTENSION=1`` a missing C++
extension fails the kernel tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from tgate_kernels import ops
from tgate_kernels.ops import _library

REPO_ROOT = Path(__file__).resolve().parents[1]
OP = torch.ops.tgate.post_gate_residual_norm.default

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODEL_ROW_LENGTHS = [320, 640, 768, 1024, 1152, 1280]
SMALL_ROW_LENGTHS = [1, 8, 32, 48, 100]

# (rtol, atol) for h and for n.  h is a rounded sum of inputs, so it is within half
# an ulp of the float64 value; n additionally carries float32 accumulation error.
H_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
N_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}

# Which optional operands each variant passes; "sd" is norm3 of SD/SDXL blocks,
# "pixart" is ada_norm_single (gate_msa, norm2 without affine, scale/shift_mlp).
VARIANTS = {
    "plain": (),
    "sd": ("weight", "bias"),
    "pixart": ("gate", "scale", "shift"),
    "weight_only": ("weight",),
    "everything": ("gate", "weight", "bias", "scale", "shift"),
}


def require_extension() -> None:
    if ops.kernels_available("cpu"):
        return
    reason = f"C++ extension tgate_kernels._C is not built: {ops.kernel_status()['cpu_extension_error']}"
    if os.environ.get("TGATE_KERNELS_REQUIRE_EXTENSION") == "1":
        pytest.fail(reason + " (TGATE_KERNELS_REQUIRE_EXTENSION=1)")
    pytest.skip(reason)


def make_inputs(shape, dtype, operands, *, per_batch=True, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*s, scale=1.0):
        return (torch.randn(*s, generator=gen, dtype=torch.float32) * scale).to(dtype)

    d = shape[-1]
    if len(shape) == 3 and per_batch:
        mod_shape = (shape[0], 1, d)
    elif len(shape) == 3:
        mod_shape = (1, 1, d)
    else:
        mod_shape = (1, d)
    kwargs = {}
    if "gate" in operands:
        kwargs["gate"] = randn(*mod_shape)
    if "weight" in operands:
        kwargs["weight"] = 1 + randn(d, scale=0.2)
    if "bias" in operands:
        kwargs["bias"] = randn(d, scale=0.2)
    if "scale" in operands:
        kwargs["scale"] = randn(*mod_shape, scale=0.3)
        kwargs["shift"] = randn(*mod_shape, scale=0.3)
    return (randn(*shape), randn(*shape), randn(*shape)), kwargs


def assert_matches_float64(h, n, args, kwargs, *, h_tol=None, n_tol=None):
    dtype = args[0].dtype
    h_expected, _ = ops.reference_post_gate_residual_norm(*args, **kwargs, compute_dtype=torch.float64)
    rtol, atol = h_tol or H_TOL[dtype]
    torch.testing.assert_close(h, h_expected, rtol=rtol, atol=atol)
    # n is defined as the normalisation of the returned (rounded) h, so judge it
    # against float64 LayerNorm of exactly that h: a one-ulp tie in h must not fail n.
    zeros = torch.zeros_like(h)
    norm_kwargs = {k: v for k, v in kwargs.items() if k != "gate"}
    _, n_expected = ops.reference_post_gate_residual_norm(
        h, zeros, zeros, **norm_kwargs, compute_dtype=torch.float64
    )
    rtol, atol = n_tol or N_TOL[dtype]
    torch.testing.assert_close(n, n_expected, rtol=rtol, atol=atol)
    assert h.dtype == n.dtype == dtype
    assert h.is_contiguous() and n.is_contiguous()


# --- C++ kernel ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("d", MODEL_ROW_LENGTHS + SMALL_ROW_LENGTHS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cpu_kernel_matches_float64(dtype, d, variant):
    require_extension()
    args, kwargs = make_inputs((3, 7, d), dtype, VARIANTS[variant], seed=d)
    h, n = ops.post_gate_residual_norm(*args, **kwargs, eps=1e-6)
    assert_matches_float64(h, n, args, {**kwargs, "eps": 1e-6})


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["2d", "shared_1x1xD", "shared_D"])
def test_cpu_kernel_layouts(dtype, layout):
    require_extension()
    shape = (21, 48) if layout == "2d" else (2, 5, 48)
    args, kwargs = make_inputs(shape, dtype, VARIANTS["everything"], per_batch=False)
    if layout == "shared_D":
        kwargs = {k: v.reshape(-1) for k, v in kwargs.items()}
    h, n = ops.post_gate_residual_norm(*args, **kwargs)
    assert_matches_float64(h, n, args, kwargs)


def test_cpu_kernel_uses_each_batch_items_modulation():
    require_extension()
    args, kwargs = make_inputs((2, 3, 32), torch.float32, VARIANTS["pixart"])
    h, n = ops.post_gate_residual_norm(*args, **kwargs)
    for b in range(2):
        item_args = [t[b : b + 1] for t in args]
        item_kwargs = {k: v[b : b + 1] for k, v in kwargs.items()}
        h_b, n_b = ops.post_gate_residual_norm(*item_args, **item_kwargs)
        torch.testing.assert_close(h[b : b + 1], h_b, rtol=0, atol=0)
        torch.testing.assert_close(n[b : b + 1], n_b, rtol=0, atol=0)
    # The two items have different modulation, so their rows must differ.
    assert not torch.allclose(n[0], n[1])


def test_cpu_kernel_non_contiguous_inputs():
    require_extension()
    args, kwargs = make_inputs((3, 7, 96), torch.float32, VARIANTS["everything"])
    strided = [t[..., ::2] for t in args]  # (3, 7, 48), stride 2 along D
    transposed = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in strided]
    small = {k: v[..., ::2] for k, v in kwargs.items()}
    assert not any(t.is_contiguous() for t in transposed)
    h, n = ops.post_gate_residual_norm(*transposed, **small)
    assert_matches_float64(h, n, [t.contiguous() for t in transposed], small)


def test_cpu_kernel_large_mean_is_accurate():
    # E[x^2] - mean^2 in float32 would lose every significant digit here.
    require_extension()
    args, kwargs = make_inputs((2, 4, 1024), torch.float32, VARIANTS["sd"])
    args = (args[0] * 0.1 + 300.0, args[1] * 0.1, args[2] * 0.1)
    h, n = ops.post_gate_residual_norm(*args, **kwargs)
    # Rounding the mean (~300) to float32 alone shifts n by ~1e-4 here.
    assert_matches_float64(h, n, args, kwargs, n_tol=(1e-3, 1e-3))


def test_cpu_kernel_multithreaded_matches_single_thread():
    require_extension()
    args, kwargs = make_inputs((2, 300, 640), torch.float32, VARIANTS["everything"])
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = ops.post_gate_residual_norm(*args, **kwargs)
        torch.set_num_threads(2)
        actual = ops.post_gate_residual_norm(*args, **kwargs)
    finally:
        torch.set_num_threads(previous)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_cpu_kernel_empty_rows():
    require_extension()
    args, kwargs = make_inputs((2, 0, 64), torch.float16, VARIANTS["pixart"])
    h, n = ops.post_gate_residual_norm(*args, **kwargs)
    assert h.shape == n.shape == (2, 0, 64)


def test_reference_float32_matches_float64():
    args, kwargs = make_inputs((3, 7, 320), torch.float32, VARIANTS["everything"])
    h, n = ops.reference_post_gate_residual_norm(*args, **kwargs)
    assert_matches_float64(h, n, args, kwargs)


def test_reference_matches_diffusers_pixart_sequence():
    # The unfused sequence BasicTransformerBlock(norm_type="ada_norm_single") runs.
    args, kwargs = make_inputs((2, 6, 64), torch.float32, VARIANTS["pixart"])
    hidden, attn, cross = args
    h = kwargs["gate"] * attn + hidden
    h = cross + h
    n = torch.nn.functional.layer_norm(h, (64,), eps=1e-6)
    n = n * (1 + kwargs["scale"]) + kwargs["shift"]
    h_ref, n_ref = ops.reference_post_gate_residual_norm(*args, **kwargs, eps=1e-6)
    torch.testing.assert_close(h_ref, h)
    torch.testing.assert_close(n_ref, n)


# --- Operator registration -------------------------------------------------------


OPCHECK_CASES = {
    "sd_fp32": ((2, 5, 32), torch.float32, VARIANTS["sd"]),
    "pixart_fp16": ((2, 5, 48), torch.float16, VARIANTS["pixart"]),
    "everything_bf16_2d": ((9, 8), torch.bfloat16, VARIANTS["everything"]),
    "plain_fp32": ((1, 3, 320), torch.float32, VARIANTS["plain"]),
}


@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    shape, dtype, operands = OPCHECK_CASES[case]
    args, kwargs = make_inputs(shape, dtype, operands)
    full = (*args, kwargs.get("gate"), kwargs.get("weight"), kwargs.get("bias"), 1e-5,
            kwargs.get("scale"), kwargs.get("shift"))
    torch.library.opcheck(OP, full)


def test_schema_is_the_python_constant():
    schema = str(OP._schema)
    assert schema == "tgate::post_gate_residual_norm" + ops.POST_GATE_RESIDUAL_NORM_SCHEMA


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()

    def block_tail(hidden, attn, cross, gate, scale, shift):
        h, n = ops.post_gate_residual_norm(hidden, attn, cross, gate=gate, scale=scale, shift=shift, eps=1e-6)
        return h + torch.relu(n)

    args, kwargs = make_inputs((2, 6, 64), torch.float32, VARIANTS["pixart"])
    inputs = (*args, kwargs["gate"], kwargs["scale"], kwargs["shift"])
    compiled = torch.compile(block_tail, fullgraph=True)
    torch.testing.assert_close(compiled(*inputs), block_tail(*inputs))


def test_fake_tensor_shapes_and_validation():
    meta = dict(device="meta", dtype=torch.float16)
    hidden = torch.empty(2, 4096, 1152, **meta)
    mod = torch.empty(2, 1, 1152, **meta)
    h, n = ops.post_gate_residual_norm(hidden, hidden, hidden, gate=mod, scale=mod, shift=mod)
    assert h.shape == n.shape == hidden.shape and h.dtype == torch.float16 and h.is_contiguous()
    with pytest.raises(RuntimeError, match=r"`gate` must have shape \(B, 1, D\) = \(2, 1, 1152\)"):
        ops.post_gate_residual_norm(hidden, hidden, hidden, gate=torch.empty(3, 1, 1152, **meta))


def test_backward_raises_clear_error():
    args, kwargs = make_inputs((1, 3, 16), torch.float32, VARIANTS["sd"])
    weight = kwargs["weight"].requires_grad_()
    _, n = ops.post_gate_residual_norm(*args, weight=weight, bias=kwargs["bias"])
    with pytest.raises(RuntimeError, match="inference kernel and has no backward"):
        n.sum().backward()


# --- Bad inputs --------------------------------------------------------------------


def _bad(**changes):
    def build():
        args, kwargs = make_inputs((2, 3, 16), torch.float32, VARIANTS["plain"])
        call = dict(zip(("hidden", "attn_out", "cross"), args), **kwargs)
        for key, value in changes.items():
            call[key] = value() if callable(value) else value
        return call

    return build


BAD_INPUTS = {
    "attn_out_shape": (_bad(attn_out=lambda: torch.randn(2, 4, 16)),
                       r"`attn_out` must have the same shape as `hidden` \(2, 3, 16\); got \(2, 4, 16\)"),
    "cross_dtype": (_bad(cross=lambda: torch.randn(2, 3, 16, dtype=torch.float16)),
                    r"`cross` has dtype Half but `hidden` has dtype Float"),
    "hidden_rank": (_bad(hidden=lambda: torch.randn(2, 3, 4, 16)),
                    r"`hidden` must be 3-D \(B, N, D\) or 2-D \(rows, D\); got shape \(2, 3, 4, 16\)"),
    "hidden_dtype": (_bad(hidden=lambda: torch.randn(2, 3, 16, dtype=torch.float64),
                          attn_out=lambda: torch.randn(2, 3, 16, dtype=torch.float64),
                          cross=lambda: torch.randn(2, 3, 16, dtype=torch.float64)),
                     r"`hidden` has dtype Double; supported dtypes are float32, float16 and bfloat16"),
    "weight_shape": (_bad(weight=lambda: torch.randn(17)),
                     r"`weight` must have shape \(D,\) = \(16,\) .*; got \(17,\)"),
    "bias_dtype": (_bad(bias=lambda: torch.randn(16, dtype=torch.bfloat16)),
                   r"`bias` has dtype BFloat16 but `hidden` has dtype Float"),
    "gate_shape": (_bad(gate=lambda: torch.randn(2, 16)),
                   r"`gate` must have shape \(B, 1, D\) = \(2, 1, 16\), \(1, 1, D\) or \(D,\) .*; got \(2, 16\)"),
    "scale_batch": (_bad(scale=lambda: torch.randn(3, 1, 16), shift=lambda: torch.randn(3, 1, 16)),
                    r"`scale` must have shape \(B, 1, D\) = \(2, 1, 16\)"),
    "scale_without_shift": (_bad(scale=lambda: torch.randn(2, 1, 16)),
                            r"`scale` and `shift` must be given together .*got only `scale`"),
    "shift_without_scale": (_bad(shift=lambda: torch.randn(2, 1, 16)),
                            r"`scale` and `shift` must be given together .*got only `shift`"),
    "empty_row": (_bad(hidden=lambda: torch.randn(2, 3, 0), attn_out=lambda: torch.randn(2, 3, 0),
                       cross=lambda: torch.randn(2, 3, 0)),
                  r"`hidden` must have a non-empty last dimension"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("path", ["op", "reference", "fake"])
def test_bad_inputs_raise_clear_errors(case, path):
    build, pattern = BAD_INPUTS[case]
    call = build()
    if path == "fake":
        call = {k: v.to("meta") for k, v in call.items()}
    fn = ops.reference_post_gate_residual_norm if path == "reference" else ops.post_gate_residual_norm
    hidden, attn_out, cross = call.pop("hidden"), call.pop("attn_out"), call.pop("cross")
    with pytest.raises(RuntimeError, match=pattern):
        fn(hidden, attn_out, cross, **call)


def test_device_mismatch_names_argument():
    hidden = torch.randn(2, 3, 16)
    with pytest.raises(RuntimeError, match=r"`weight` is on device meta but `hidden` is on device cpu"):
        ops.reference_post_gate_residual_norm(hidden, hidden, hidden, weight=torch.empty(16, device="meta"))


# --- Fallback and introspection ------------------------------------------------------


def test_warn_fallback_once_per_backend():
    backend = f"test-backend-{os.getpid()}-{id(warnings)}"
    assert backend not in ops.kernel_status()["fallback_warned"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _library.warn_fallback_once(backend, "no kernel here")
        _library.warn_fallback_once(backend, "no kernel here")
        _library.warn_fallback_once("another-" + backend, "nor here")
    messages = [str(w.message) for w in caught if issubclass(w.category, ops.KernelFallbackWarning)]
    assert len(messages) == 2
    assert "no kernel here" in messages[0] and "reference implementation" in messages[0]
    assert {backend, "another-" + backend} <= set(ops.kernel_status()["fallback_warned"])


def test_kernel_status_reports_backends():
    status = ops.kernel_status()
    assert status["cpu_extension"] == ops.kernels_available("cpu") == (status["cpu_extension_error"] is None)
    assert status["backends"]["cpu"] == ("c++" if status["cpu_extension"] else "reference")
    assert status["cuda"] == torch.cuda.is_available()
    assert ops.kernels_available("meta") is False


def _run_isolated(script: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` with tgate_kernels.ops importable but the package __init__ bypassed.

    The op module must stand on its own; skipping the package __init__ (which loads
    diffusers) also keeps the subprocess fast.  The script prints one JSON line last.
    """
    prelude = textwrap.dedent(
        f"""
        import json, sys, types
        package = types.ModuleType("tgate_kernels")
        package.__path__ = [{str(REPO_ROOT / "tgate_kernels")!r}]
        sys.modules["tgate_kernels"] = package
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_fallback_without_extension_warns_exactly_once():
    report = _run_isolated(
        """
        import warnings
        sys.modules["tgate_kernels._C"] = None  # as if the extension was never built
        import torch
        from tgate_kernels import ops
        x = torch.randn(2, 3, 16)
        w = torch.randn(16)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            h, n = ops.post_gate_residual_norm(x, x, x, weight=w)
            ops.post_gate_residual_norm(x, x, x)
        h_ref, n_ref = ops.reference_post_gate_residual_norm(x, x, x, weight=w)
        fallback = [str(w.message) for w in caught if issubclass(w.category, ops.KernelFallbackWarning)]
        print(json.dumps({
            "warnings": fallback,
            "matches": bool(torch.equal(h, h_ref) and torch.equal(n, n_ref)),
            "status": ops.kernel_status()["backends"]["cpu"],
            "available": ops.kernels_available("cpu"),
        }))
        """
    )
    assert len(report["warnings"]) == 1, report
    assert "tgate_kernels._C is not available" in report["warnings"][0]
    assert report["matches"] and report["status"] == "reference" and report["available"] is False


def test_import_is_cheap_and_does_not_import_triton():
    report = _run_isolated(
        """
        import torch
        from tgate_kernels import ops
        ops.kernel_status()
        print(json.dumps({"triton_imported": "triton" in sys.modules}))
        """
    )
    assert report == {"triton_imported": False}


# --- Triton kernel under the interpreter -------------------------------------------


def test_triton_kernel_under_interpreter_matches_float64():
    # The interpreter rounds float32 -> bfloat16 toward zero (the GPU rounds to
    # nearest even), so bfloat16 gets one more ulp of slack here than on CUDA.
    report = _run_isolated(
        f"""
        import torch
        sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        from test_ops import VARIANTS, make_inputs, assert_matches_float64
        from tgate_kernels.ops._triton import post_gate_residual_norm_triton

        interpreter_h_tol = {{torch.bfloat16: (1.6e-2, 1.6e-2)}}
        cases = 0
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            for shape in ((3, 7, 48), (2, 5, 320), (11, 8), (1, 2, 1280)):
                for variant, operands in VARIANTS.items():
                    args, kw = make_inputs(shape, dtype, operands, seed=shape[-1])
                    if cases % 2:
                        # strided inputs (a transposed view, a slice) are read in place
                        args = tuple(torch.cat([a, a], -1)[..., : a.shape[-1]] for a in args)
                        assert not args[0].is_contiguous()
                    h, n = post_gate_residual_norm_triton(
                        *args, kw.get("gate"), kw.get("weight"), kw.get("bias"), 1e-6,
                        kw.get("scale"), kw.get("shift"))
                    assert_matches_float64(h, n, args, dict(kw, eps=1e-6),
                                           h_tol=interpreter_h_tol.get(dtype))
                    cases += 1
        print(json.dumps({{"cases": cases}}))
        """,
        env={"TRITON_INTERPRET": "1"},
    )
    assert report == {"cases": 3 * 4 * len(VARIANTS)}
