import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

PROMPTS = ["a photo of a cat", "a red car in the snow"]
NEGATIVE = ["blurry", "low quality"]


def generate(pipe, method=None, *, steps=6, seed=0, prompt=PROMPTS, negative=NEGATIVE, **kwargs):
    """One short generation with a fixed seed; ``method`` is ``pipe`` itself or ``pipe.tgate``."""
    method = method or pipe
    kwargs.setdefault("output_type", "np")
    kwargs.setdefault("height", 32)
    kwargs.setdefault("width", 32)
    if negative is not None:
        kwargs["negative_prompt"] = negative
    return method(
        prompt,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    ).images


@pytest.fixture
def max_abs_diff():
    def diff(a, b):
        return float(abs(torch.as_tensor(a).double() - torch.as_tensor(b).double()).max())

    return diff
