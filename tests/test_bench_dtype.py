"""``tgate-kernels bench --dtype auto`` on a CPU: bfloat16 only where it is measured faster."""

import pytest
import torch

from tgate_kernels.tools.benchmarking import dtype_choice
from tgate_kernels.tools.cli import arguments


def _fake_cpu(monkeypatch, capabilities, seconds):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setattr(dtype_choice, "_workload", lambda dtype: (lambda: seconds[dtype]))


@pytest.mark.parametrize(
    "capabilities, seconds, expected, words",
    [
        ({}, {}, torch.float32, "no native bfloat16"),
        ({"avx512_bf16": True}, {torch.float32: 1.0, torch.bfloat16: 1.5}, torch.float32, "1.50x slower"),
        ({"avx512_bf16": True, "amx_bf16": True}, {torch.float32: 3.0, torch.bfloat16: 1.0}, torch.bfloat16, "3.00x faster"),
    ],
)
def test_the_faster_dtype_is_chosen_and_the_reason_says_so(monkeypatch, capabilities, seconds, expected, words):
    _fake_cpu(monkeypatch, capabilities, seconds)
    choice = dtype_choice.fastest_cpu_dtype(rounds=3)
    assert choice.dtype is expected and words in choice.reason
    assert arguments.resolve_dtype_with_reason("auto", "cpu", fast_cpu_dtype=True) == (choice.dtype, choice.reason)


def test_this_cpu_gets_a_measured_choice():
    choice = dtype_choice.fastest_cpu_dtype(rounds=3)
    assert choice.dtype in (torch.float32, torch.bfloat16) and choice.reason.startswith(str(choice.dtype).replace("torch.", ""))


def test_an_asked_dtype_is_kept_without_measuring(monkeypatch):
    monkeypatch.setattr(dtype_choice, "fastest_cpu_dtype", lambda: pytest.fail("measured although a dtype was asked for"))
    assert arguments.resolve_dtype_with_reason("bfloat16", "cpu", fast_cpu_dtype=True) == (torch.bfloat16, "bfloat16: asked for")
