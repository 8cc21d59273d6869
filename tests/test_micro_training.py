"""``train-micro``'s trainers: repeatable given the seed, different for another seed, and what they
write loads with ``from_pretrained`` and runs gated (a few steps each: the shipped weights took
the full runs, see tgate_kernels/tools/micro/weights/*/README.md)."""

import numpy as np
import pytest
import torch

import tgate_kernels
from tgate_kernels.tools.micro import train
from tgate_kernels.tools.micro.adherence import MICRO_CALL, WITHOUT

FEW = dict(steps=2, batch_size=4, samples=32)


def _weights(*modules):
    return [tensor.detach().clone() for module in modules for tensor in module.state_dict().values()]


def _same(left, right):
    return len(left) == len(right) and all(torch.equal(a, b) for a, b in zip(left, right))


@pytest.fixture(scope="module")
def vae():
    return train.train_vae(0, **FEW)[0]


def test_vae_training_repeats_given_its_seed(vae):
    again, report = train.train_vae(0, **FEW)
    assert _same(_weights(vae), _weights(again))
    assert not _same(_weights(vae), _weights(train.train_vae(1, **FEW)[0]))
    assert report.steps == 2 and np.isfinite(report.final_loss) and vae.config.scaling_factor > 0


@pytest.mark.parametrize("name", ["sd", "pixart", "sd3", "flux"])
def test_denoiser_training_repeats_and_saves_a_pipeline_that_runs_gated(name, vae, tmp_path):
    from diffusers import DiffusionPipeline

    trainer = {"sd": train.train_sd, "pixart": train.train_pixart, "sd3": train.train_sd3, "flux": train.train_flux}[name]
    pipe, report = trainer(vae, 0, **FEW)
    again, _ = trainer(vae, 0, **FEW)
    denoiser = "unet" if name == "sd" else "transformer"
    assert _same(_weights(getattr(pipe, denoiser), pipe.text_encoder), _weights(getattr(again, denoiser), again.text_encoder))
    assert np.isfinite(report.final_loss)

    train.save_pipeline(pipe, tmp_path / name)
    loaded = DiffusionPipeline.from_pretrained(tmp_path / name, **WITHOUT.get(name, {}))
    loaded.set_progress_bar_config(disable=True)
    call = {**MICRO_CALL[name], "num_inference_steps": 4}
    ungated = loaded(["a small red circle on the left"], generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    tgate_kernels.enable(loaded, gate_step=2)
    with tgate_kernels.view(loaded).record() as record:
        gated = loaded(["a small red circle on the left"], generator=torch.Generator().manual_seed(0), output_type="np", **call).images
    assert record.reused(3, cross=True) > 0
    assert gated.shape == ungated.shape and not np.array_equal(gated, ungated)
