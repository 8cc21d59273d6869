"""A generate folder is one job: what identifies it, what a resume repairs, what eval and compare
refuse, and the options people expect of a diffusers command line."""

import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from tgate_kernels.tools import cli

from conftest import accelerate_launch

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow star"]


def _prompts(tmp_path, prompts=PROMPTS, name="prompts.txt"):
    path = tmp_path / name
    path.write_text("\n".join(prompts) + "\n")
    return path


def _job(model, out, prompts, *extra):
    return ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--steps", "3",
            "--gate-step", "2", "--device", "cpu", *extra]


def _rows(folder):
    return [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines() if line.strip()]


def _pixels(folder):
    return {name: np.asarray(Image.open(folder / name)).tolist() for name in sorted(os.listdir(folder))
            if name.endswith((".png", ".jpg", ".webp"))}


def test_a_rerun_with_another_prompts_file_is_another_job_and_is_refused(saved_tiny_sd, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_job(saved_tiny_sd, out, _prompts(tmp_path))) == 0
    other = _prompts(tmp_path, ["a purple hexagon"] + PROMPTS[1:], "other.txt")
    before = _pixels(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(_job(saved_tiny_sd, out, other))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "holds another job's images" in err and "prompts" in err and "usage: tgate-kernels generate" in err
    assert _pixels(out) == before
    for changed in (["--batch-size", "2"], ["--negative-prompt", "blurry"]):
        with pytest.raises(SystemExit):
            cli.main(_job(saved_tiny_sd, out, _prompts(tmp_path), *changed))
        assert "holds another job's images" in capsys.readouterr().err


def test_equal_jobs_spelled_differently_are_one_job(saved_tiny_sd, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = _prompts(tmp_path)
    argv = _job(saved_tiny_sd, out, prompts)
    argv[argv.index("--steps") + 1] = "5"
    assert cli.main(argv) == 0  # gate 2 of 5
    same = _job(str(saved_tiny_sd) + "/", out, prompts)
    same[same.index("--steps") + 1] = "5"
    same[same.index("--gate-step") + 1] = "0.4"  # 0.4 of 5 steps is step 2
    capsys.readouterr()
    assert cli.main(same) == 0
    assert "0 images written (4 already there)" in capsys.readouterr().out


def test_a_job_written_before_a_setting_existed_resumes_at_that_settings_default(saved_tiny_sd, tmp_path, capsys):
    out = tmp_path / "out"
    prompts = _prompts(tmp_path)
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    run_file = out / "run.json"
    written = json.loads(run_file.read_text())
    for setting in ("gate_cache", "guidance_after_gate"):
        del written["tgate"][setting]  # as a version without the settings wrote it
    run_file.write_text(json.dumps(written))
    capsys.readouterr()
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    assert "0 images written (4 already there)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(_job(saved_tiny_sd, out, prompts, "--gate-cache", "kept-part"))
    assert "gate_cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_job(saved_tiny_sd, out, prompts, "--guidance-after-gate", "kept"))
    assert "guidance_after_gate" in capsys.readouterr().err


def test_a_row_cut_short_by_a_crash_is_repaired_on_resume_and_the_folder_stays_valid(saved_tiny_sd, tmp_path, capsys):
    prompts = _prompts(tmp_path)
    complete, out = tmp_path / "complete", tmp_path / "out"
    assert cli.main(_job(saved_tiny_sd, complete, prompts)) == 0
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    metadata = out / "metadata.jsonl"
    lines = metadata.read_text().splitlines(keepends=True)
    metadata.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # the third row cut mid-line
    capsys.readouterr()
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    assert "2 images written (2 already there)" in capsys.readouterr().out
    rows = _rows(out)
    assert sorted(row["file"] for row in rows) == sorted(_pixels(complete)) and len(rows) == 4
    assert _pixels(out) == _pixels(complete)
    assert cli.main(["eval", str(complete), str(out), "--out", str(tmp_path / "report")]) == 0


def test_a_deleted_image_is_remade_with_one_row(saved_tiny_sd, tmp_path, capsys):
    prompts = _prompts(tmp_path)
    out = tmp_path / "out"
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    expected = _pixels(out)
    os.remove(out / "000002_00.png")
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    assert _pixels(out) == expected
    assert sorted(row["file"] for row in _rows(out)) == sorted(expected)
    assert cli.main(["eval", str(out), str(out), "--out", str(tmp_path / "report")]) == 0


def test_a_job_that_ends_with_images_missing_says_so_and_fails(saved_tiny_sd, tmp_path, capsys, monkeypatch):
    from tgate_kernels.tools.jobs.folder import OutputFolder

    original = OutputFolder.save

    def lose_one(self, image, file, row):
        if file != "000001_00.png":
            original(self, image, file, row)

    monkeypatch.setattr(OutputFolder, "save", lose_one)
    assert cli.main(_job(saved_tiny_sd, tmp_path / "out", _prompts(tmp_path))) == 1
    assert "1 images of the job are missing: run the same command again" in capsys.readouterr().out


def test_two_processes_resume_from_one_reading_of_the_folder(saved_tiny_sd, tmp_path):
    prompts = _prompts(tmp_path)
    out = tmp_path / "out"
    assert cli.main(_job(saved_tiny_sd, out, prompts)) == 0
    expected = _pixels(out)
    os.remove(out / "000000_00.png")
    os.remove(out / "000003_00.png")
    metadata = out / "metadata.jsonl"
    metadata.write_text(metadata.read_text() + '{"file": "000001_00.png", "ind')  # and a cut row
    done = accelerate_launch(_job(saved_tiny_sd, out, prompts))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 images written (2 already there) by 2 process(es)" in done.stdout
    assert "missing" not in done.stdout
    assert _pixels(out) == expected and sorted(row["file"] for row in _rows(out)) == sorted(expected)


def test_eval_refuses_folders_of_different_prompts_and_names_the_settings_that_differ(saved_tiny_sd, tmp_path, capsys):
    plain, gated, other = tmp_path / "plain", tmp_path / "gated", tmp_path / "other"
    prompts = _prompts(tmp_path)
    assert cli.main(_job(saved_tiny_sd, plain, prompts, "--no-tgate")) == 0
    assert cli.main(_job(saved_tiny_sd, gated, prompts)) == 0
    assert cli.main(_job(saved_tiny_sd, other, _prompts(tmp_path, list(reversed(PROMPTS)), "reversed.txt"))) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(plain), str(other)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "different prompts" in err and repr(PROMPTS[0]) in err and repr(PROMPTS[-1]) in err
    assert cli.main(["eval", str(plain), str(gated), "--out", str(tmp_path / "report"), "--fid-features", "micro"]) == 0
    printed = capsys.readouterr().out
    assert "the runs differ in tgate: null in A" in printed
    assert "fid_features" not in printed and "clip_model=" not in printed, "notes name command-line flags"
    report = (tmp_path / "report" / "eval.md").read_text()
    assert "mean SSIM" in report and "FID: " in report and "FID: -" not in report


@pytest.mark.parametrize("damage", ["not an image", "cut"])
def test_eval_names_an_unreadable_image_instead_of_a_traceback(saved_tiny_sd, tmp_path, capsys, damage):
    prompts = _prompts(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(_job(saved_tiny_sd, a, prompts)) == 0
    assert cli.main(_job(saved_tiny_sd, b, prompts)) == 0
    target = b / "000002_00.png"
    data = target.read_bytes()
    target.write_bytes(b"hello" if damage == "not an image" else data[: len(data) // 2])
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(a), str(b)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "000002_00.png is not a readable image" in err and "Traceback" not in err


def test_a_missing_optional_package_is_one_line_naming_the_extra(saved_tiny_sd, tmp_path, capsys, monkeypatch):
    prompts = _prompts(tmp_path)
    assert cli.main(_job(saved_tiny_sd, tmp_path / "a", prompts)) == 0
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.metrics", None)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        cli.main(["eval", str(tmp_path / "a"), str(tmp_path / "a")])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("this needs scikit-image, which is not installed: pip install 'tgate_kernels[bench]'"), err
    assert "Traceback" not in err


@pytest.mark.parametrize("out", ["folder", "grid.gif"])
def test_compare_refuses_an_out_that_is_not_an_image_file(saved_tiny_sd, tmp_path, capsys, out):
    (tmp_path / "folder").mkdir()
    with pytest.raises(SystemExit) as info:
        cli.main(["compare", "--model", str(saved_tiny_sd), "--prompt", "a", "--steps", "2", "--gate-steps", "1",
                  "--out", str(tmp_path / out)])
    assert info.value.code == 2
    assert "argument --out" in capsys.readouterr().err


def test_the_options_people_expect(saved_tiny_sd, tmp_path, capsys):
    prompts = _prompts(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.startswith("tgate-kernels 0.")

    # the default gate follows the steps (40 %), so a short run needs no --gate-step
    out = tmp_path / "default"
    assert cli.main(["generate", "--model", str(saved_tiny_sd), "--prompt", "a cat", "--steps", "2", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["tgate"]["gate_step"] == 1

    # a slice of the prompts file, in jpg, quietly, with another scheduler and guidance rescale
    out = tmp_path / "slice"
    capsys.readouterr()
    assert cli.main(_job(saved_tiny_sd, out, prompts, "--start", "1", "--limit", "2", "--image-format", "jpg", "--quiet",
                         "--scheduler", "DDIMScheduler", "--eta", "0.5", "--guidance-rescale", "0.3")) == 0
    printed = capsys.readouterr()
    assert printed.out == "" and "generate" not in printed.err
    assert sorted(_pixels(out)) == ["000001_00.jpg", "000002_00.jpg"]
    run = json.loads((out / "run.json").read_text())
    assert (run["scheduler"], run["eta"], run["guidance_rescale"], run["image_format"]) == ("DDIMScheduler", 0.5, 0.3, "jpg")
    assert [row["seed"] for row in _rows(out)] == [1, 2], "seeds follow each prompt's place in the file"

    # PNGs carry their prompt and seed
    png = tmp_path / "png"
    assert cli.main(_job(saved_tiny_sd, png, prompts, "--limit", "1")) == 0
    assert Image.open(png / "000000_00.png").text == {"prompt": PROMPTS[0], "seed": "0"}

    with pytest.raises(SystemExit):
        cli.main(_job(saved_tiny_sd, tmp_path / "bad", prompts, "--scheduler", "NoSuchScheduler"))
    err = capsys.readouterr().err
    assert "argument --scheduler: 'NoSuchScheduler'" in err and "DDIMScheduler" in err


def test_a_row_with_zero_steps_is_refused_like_steps(saved_tiny_sd, tmp_path, capsys):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b", "num_inference_steps": 0}\n')
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "--model", str(saved_tiny_sd), "--prompts", str(path), "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    assert 'line 2: "num_inference_steps" must be an int >= 1' in capsys.readouterr().err


def test_lora_weights_with_a_scale_are_loaded_and_part_of_the_job(saved_tiny_sd, tmp_path, capsys):
    import torch
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(saved_tiny_sd)
    torch.manual_seed(2)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    prompts = _prompts(tmp_path, PROMPTS[:1])
    plain, half, tiled = tmp_path / "plain", tmp_path / "half", tmp_path / "tiled"
    assert cli.main(_job(saved_tiny_sd, plain, prompts)) == 0
    assert cli.main(_job(saved_tiny_sd, half, prompts, "--lora", f"{tmp_path / 'lora'}:0.5")) == 0
    assert _pixels(half) != _pixels(plain)
    assert json.loads((half / "run.json").read_text())["lora"] == [[str(tmp_path / "lora"), 0.5]]
    assert cli.main(_job(saved_tiny_sd, tiled, prompts, "--vae-tiling")) == 0
    assert json.loads((tiled / "run.json").read_text())["vae_tiling"] is True
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli.main(_job(saved_tiny_sd, tmp_path / "bad", prompts, "--lora", str(tmp_path / "no-such-lora")))
    assert "argument --lora" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(_job(saved_tiny_sd, tmp_path / "bad", prompts, "--cpu-offload"))
    assert "argument --cpu-offload" in capsys.readouterr().err
