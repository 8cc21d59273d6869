"""Registration of ``tgate::post_gate_residual_norm`` with the PyTorch dispatcher.

The operator schema is written here and nowhere else.  The C++ extension
(``tgate_kernels._C``, built from ``csrc/``) only registers a CPU *implementation*
(``TORCH_LIBRARY_IMPL(tgate, CPU, m)``); when both are loaded the dispatcher checks
that the C++ function's signature matches this schema and refuses to load a kernel
that does not, so the two cannot silently disagree.  Defining the schema in Python
also means the operator exists, with the same signature, when the extension is not
built at all.

Backends, in dispatch order for each device:

* CPU: the C++ kernel if the extension imports, otherwise the PyTorch reference.
* CUDA: the Triton kernel (``_triton.py``, imported on first use), otherwise the
  PyTorch reference.
* Meta / FakeTensor (``torch.compile``): shape-only implementation below.

Every fallback to the reference emits one :class:`KernelFallbackWarning` per backend
per process.
"""

from __future__ import annotations

import importlib.util
import threading
import warnings
from typing import Any, Callable, Optional

import torch

from . import _reference
from ._reference import OP_NAME

#: The operator's signature; the C++ kernel in csrc/ must match it.
POST_GATE_RESIDUAL_NORM_SCHEMA = (
    "(Tensor hidden, Tensor attn_out, Tensor cross, Tensor? gate, Tensor? weight, Tensor? bias, "
    "float eps, Tensor? scale, Tensor? shift) -> (Tensor, Tensor)"
)


class KernelFallbackWarning(RuntimeWarning):
    """A fused kernel is unavailable and the unfused PyTorch reference runs instead."""


_warned_backends: set[str] = set()
_warned_lock = threading.Lock()


def warn_fallback_once(backend: str, reason: str) -> None:
    """Warn, once per process for ``backend``, that the reference implementation is used."""
    with _warned_lock:
        if backend in _warned_backends:
            return
        _warned_backends.add(backend)
    warnings.warn(
        f"{OP_NAME}: {reason}; using the unfused PyTorch reference implementation instead "
        "(correct, but slower).",
        KernelFallbackWarning,
        stacklevel=3,
    )


def _op_is_defined() -> bool:
    try:
        torch.ops.tgate.post_gate_residual_norm.default
    except (AttributeError, RuntimeError):
        return False
    return True


# --- C++ extension -----------------------------------------------------------------

try:
    # Importing the module runs its static TORCH_LIBRARY_IMPL registration.
    from .. import _C  # noqa: F401

    extension_error: Optional[str] = None
except ImportError as exc:
    _C = None
    extension_error = f"{type(exc).__name__}: {exc}"


def extension_loaded() -> bool:
    return _C is not None


# --- Triton (CUDA) ---------------------------------------------------------------

_triton_launcher: Optional[Callable[..., Any]] = None
triton_error: Optional[str] = None
_triton_lock = threading.Lock()


def triton_installed() -> bool:
    """Whether triton can be found, without importing it (importing it is slow)."""
    return importlib.util.find_spec("triton") is not None


def load_triton_launcher() -> Optional[Callable[..., Any]]:
    """Import the Triton kernel on first use; ``None`` (and ``triton_error`` set) if that fails."""
    global _triton_launcher, triton_error
    with _triton_lock:
        if _triton_launcher is None and triton_error is None:
            try:
                from ._triton import post_gate_residual_norm_triton
            except ImportError as exc:
                triton_error = f"{type(exc).__name__}: {exc}"
            else:
                _triton_launcher = post_gate_residual_norm_triton
    return _triton_launcher


# --- Implementations -------------------------------------------------------------


def _reference_impl(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift):
    return _reference.reference_post_gate_residual_norm(
        hidden, attn_out, cross, gate=gate, weight=weight, bias=bias, eps=eps, scale=scale, shift=shift
    )


def _cpu_fallback(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift):
    warn_fallback_once(
        "cpu",
        f"the C++ extension tgate_kernels._C is not available ({extension_error}); "
        "build it with `pip install --no-build-isolation .`",
    )
    return _reference_impl(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift)


def _cuda_impl(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift):
    launch = load_triton_launcher()
    if launch is None:
        warn_fallback_once("cuda", f"the Triton kernel is not available ({triton_error})")
        return _reference_impl(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift)
    return launch(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift)


def _fake_impl(hidden, attn_out, cross, gate, weight, bias, eps, scale, shift):
    _reference.check_inputs(hidden, attn_out, cross, gate, weight, bias, scale, shift)
    return hidden.new_empty(hidden.shape), hidden.new_empty(hidden.shape)


def _backward(ctx, grad_h, grad_n):
    raise RuntimeError(
        f"{OP_NAME} is an inference kernel and has no backward. Run the model under "
        "torch.no_grad() / torch.inference_mode(), or use "
        "tgate_kernels.ops.reference_post_gate_residual_norm where gradients are needed."
    )


if not _op_is_defined():
    torch.library.define(OP_NAME, POST_GATE_RESIDUAL_NORM_SCHEMA)
    torch.library.register_fake(OP_NAME, _fake_impl)
    torch.library.register_autograd(OP_NAME, _backward)
    torch.library.impl(OP_NAME, "cuda", _cuda_impl)
    if _C is None:
        torch.library.impl(OP_NAME, "cpu", _cpu_fallback)


# --- Introspection ---------------------------------------------------------------


def kernel_status() -> dict[str, Any]:
    """Which backends of ``post_gate_residual_norm`` are present in this process.

    Does not import triton; ``triton_error`` is only known once a CUDA call tried it.
    """
    cuda = torch.cuda.is_available()
    triton = triton_installed() and triton_error is None
    return {
        "cpu_extension": extension_loaded(),
        "cpu_extension_error": extension_error,
        "triton": triton,
        "triton_error": triton_error,
        "cuda": cuda,
        "fallback_warned": sorted(_warned_backends),
        "backends": {
            "cpu": "c++" if extension_loaded() else "reference",
            "cuda": ("triton" if triton else "reference") if cuda else "unavailable",
        },
    }


def kernels_available(device: torch.device | str = "cpu") -> bool:
    """Whether ``post_gate_residual_norm`` runs a fused kernel (not the reference) on ``device``."""
    device_type = torch.device(device).type
    if device_type == "cpu":
        return extension_loaded()
    if device_type == "cuda":
        return torch.cuda.is_available() and triton_installed() and triton_error is None
    return False
