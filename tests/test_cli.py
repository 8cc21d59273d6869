"""The ``tgate-kernels`` command line, end to end, offline, on tiny architectures."""

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from tgate_kernels.tools import cli
from tgate_kernels.tools.benchmarking.fidelity import tile_size

from conftest import TINY_ARCHITECTURES

TINY_BENCH = [
    "bench",
    "--architectures", TINY_ARCHITECTURES,
    "--models", "tiny-sd,tiny-pixart",
    "--latency-models", "tiny-sd",
    "--resolution", "64",
    "--resolutions", "64,128",
    "--dtype", "float32",
    "--steps", "4",
    "--repeats", "1",
    "--python-calls-model", "tiny-sd",
    "--throughput", "1,2",
    "--throughput-model", "tiny-sd",
    "--device", "cpu",
]


def _fails(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_bench_end_to_end_on_tiny_architectures(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main([*TINY_BENCH, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    progress = [line for line in captured.err.replace("\r", "\n").splitlines() if line.startswith("bench")]
    done, total = progress[-1].split("|")[2].split()[0].split("/")
    assert done == total, "the progress bar ends where its total says"
    assert "tiny SD (test)" in printed and "Python function calls per denoising step" in printed

    results = json.loads((out / "bench.json").read_text())
    by_key = {(r["model"], r["variant"]): r for r in results["macs"]}
    for model in ("tiny-sd", "tiny-pixart"):
        baseline, gated = by_key[(model, "baseline")], by_key[(model, "tgate")]
        assert baseline["macs_ratio"] == 1.0
        assert 0 < gated["macs"] < baseline["macs"]
        assert gated["macs_with_attention_scores"] - gated["macs"] > 0
        assert gated["params"] < baseline["params"]
    variants = {r["variant"]: r for r in results["latency"]}
    assert {"baseline", "tgate"} <= set(variants)
    assert all(r["median_s"] > 0 and len(r["seconds"]) == 1 for r in variants.values() if not r["error"])
    assert variants["tgate"]["gate_step"] == 2  # the published-style 3-of-6 gate scaled to 4 steps
    assert [r["variant"] for r in results["python_calls"]] == ["baseline", "tgate", "reference"]
    assert results["python_calls"][0]["calls_per_step"] > 100
    sweep = [r for r in results["macs_sweep"] if r["model"] == "tiny-sd"]
    assert [r["gate_step"] for r in sweep] == list(range(7))
    assert {"baseline", "tgate-eager", "tgate", "reference"} == set(variants)
    assert all(0 < r["macs_ratio"] < 1 for r in variants.values() if r["variant"] != "baseline")
    sizes = results["resolutions"]
    assert [r["resolution"] for r in sizes] == [64, 128]
    assert sizes[0]["baseline_s"] == variants["baseline"]["median_s"], "the main run's numbers at its own size"
    assert all(r["latency_ratio"] > 0 and 0 < r["macs_ratio"] < 1 for r in sizes)

    with open(out / "bench.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {r["table"] for r in rows} == {"macs", "macs_sweep", "latency", "resolutions", "python_calls", "throughput"}
    throughput = results["throughput"]
    assert [r["prompts"] for r in throughput] == [1, 2] and all(r["gate_step"] == 2 for r in throughput)
    for row in throughput:
        assert row["baseline_images_per_s"] > 0 and row["tgate_images_per_s"] > 0 and 0 < row["macs_ratio"] < 1
        assert row["latency_ratio"] == pytest.approx(row["baseline_images_per_s"] / row["tgate_images_per_s"])
    assert "Throughput of the denoiser alone" in printed
    assert Image.open(out / "bench.png").size[0] > 500
    assert "tiny PixArt (test)" in (out / "bench.txt").read_text()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["bench", "--models", "sd15,nope"], "argument --models: unknown model 'nope'; choose from sd15"),
        (["bench", "--python-calls-model", "all"], "argument --python-calls-model: 'all' is not one model"),
        (["bench", "--architectures", "missing.json"], "argument --architectures: "),
        (["bench", "--resolution", "100"], "argument --resolution: 100 is not allowed; expected a multiple of 64"),
        (["bench", "--repeats", "0"], "argument --repeats: 0 is not allowed; expected an integer >= 1"),
        (["bench", "--steps", "4", "--gate-steps", "2,9"], "argument --gate-steps: 9 is larger than --steps 4"),
        (["bench", "--gate-steps", "a,b"], "argument --gate-steps: 'a' is not an integer"),
        (["bench", "--dtype", "float64"], "argument --dtype: invalid choice: 'float64'"),
        (["bench", "--resolutions", "64,100"], "argument --resolutions: 100 is not allowed; expected a multiple of 64"),
        (["bench", "--device", "tpu"], "argument --device: 'tpu'"),
        (["bench", "--throughput", "0,4"], "argument --throughput: [0, 4] has a batch below 1 prompt"),
        (["bench", "--throughput", "4", "--throughput-model", "nope"], "argument --throughput-model: 'nope' is not one model"),
        (["bench", "--latency-models", "sdxl-deepcache"], "argument --latency-models: 'sdxl-deepcache' is a MACs-only row"),
        (["generate", "--model", "x", "--prompt", "p", "--deepcache", "3"], "argument --deepcache: '3' is not INTERVAL,BRANCH"),
        (["generate", "--prompt", "p"], "the following arguments are required: --model"),
        (["generate", "--model", "m"], "one of the arguments --prompt --prompts is required"),
        (["generate", "--model", "m", "--prompt", "p", "--gate-step", "1.5"], "argument --gate-step: 1.5 is not allowed"),
    ],
)
def test_bad_arguments_name_the_argument_the_value_and_what_is_allowed(argv, expected, capsys):
    assert expected in _fails(argv, capsys)


def test_no_arguments_prints_help():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "tgate_kernels"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0
    assert "usage: tgate-kernels" in done.stdout and "bench" in done.stdout and "compare" in done.stdout


def _pipeline_image(folder: str, gate_step: int | None, steps: int = 4):
    """What ``generate`` should have written: the saved pipeline's image at seed 0, gated or not."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    import tgate_kernels

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    if gate_step is not None:
        tgate_kernels.enable(pipe, gate_step=gate_step)
    image = pipe(prompt="a red fox", num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(0)).images[0]
    return np.asarray(image, dtype=np.int16)


def test_generate_loads_a_saved_pipeline_by_path(saved_tiny_sd, tmp_path, capsys):
    import numpy as np

    image_path = tmp_path / "out" / "image.png"
    argv = ["generate", "--model", saved_tiny_sd, "--prompt", "a red fox", "--steps", "4", "--gate-step", "2", "--out", str(image_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "T-GATE (gate_step=2, 4 steps)" in printed and " s -> " in printed
    written = np.asarray(Image.open(image_path), dtype=np.int16)
    assert written.shape == (32, 32, 3)
    assert np.array_equal(written, _pipeline_image(saved_tiny_sd, gate_step=2)), "the gated image was written"
    assert not np.array_equal(written, _pipeline_image(saved_tiny_sd, gate_step=None)), "gating changed the image"


def test_compare_writes_a_labelled_grid_and_fidelity(saved_tiny_sd, tmp_path, capsys):
    grid_path = tmp_path / "grid.png"
    argv = ["compare", "--model", saved_tiny_sd, "--prompt", "a red fox", "--steps", "4", "--gate-steps", "1,2", "--out", str(grid_path)]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "PSNR dB" in printed and "SSIM" in printed
    rows = [line.split() for line in printed.splitlines() if line.startswith("T-GATE")]
    assert [row[1] for row in rows] == ["1", "2"]
    for row in rows:
        psnr, ssim = float(row[3]), float(row[4])
        assert 0 < psnr < 100 and -1 <= ssim <= 1, "T-GATE changed the image (an unchanged one has infinite PSNR)"
    psnr_gate_1, psnr_gate_2 = (float(row[3]) for row in rows)
    assert psnr_gate_1 < psnr_gate_2, "a later gate stays closer to the ungated image"
    tile_width, tile_height = tile_size((32, 32))
    assert Image.open(grid_path).size == (3 * tile_width, tile_height)
