"""``tgate-kernels generate`` as a job: prompt files, seeds, resuming, data-parallel runs under
accelerate, loading like diffusers, and bad input refused before any image is generated."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tgate_kernels.tools import cli
from tgate_kernels.tools.jobs.folder import OutputFolder

from conftest import accelerate_launch

PROMPTS = ["a red circle", "a blue square", "a green triangle", "a small yellow star", "two purple dots"]


def _job(saved, out, *extra, prompts_file):
    return ["generate", "--model", saved, "--prompts", str(prompts_file), "--out", str(out), "--steps", "3",
            "--gate-step", "2", "--device", "cpu", *extra]


def _text_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS[:2]) + "\n\n" + "\n".join(PROMPTS[2:]) + "\n")
    return path


def _images(folder) -> dict[str, np.ndarray]:
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder)) if name.endswith(".png")}


def _rows(folder) -> list[dict]:
    with open(os.path.join(folder, "metadata.jsonl")) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_a_text_prompts_file_makes_every_image_with_its_seed_and_metadata(saved_tiny_sd, tmp_path, capsys):
    out = tmp_path / "gated"
    assert cli.main(_job(saved_tiny_sd, out, "--images-per-prompt", "2", "--batch-size", "3", "--seed", "7",
                         prompts_file=_text_prompts(tmp_path))) == 0
    assert "10 images written (0 already there) by 1 process(es)" in capsys.readouterr().out
    images = _images(out)
    assert sorted(images) == [f"{i:06d}_{k:02d}.png" for i in range(5) for k in range(2)]
    rows = {row["file"]: row for row in _rows(out)}
    assert len(rows) == 10
    for i in range(5):
        for k in range(2):
            row = rows[f"{i:06d}_{k:02d}.png"]
            assert (row["index"], row["image"], row["seed"], row["prompt"]) == (i, k, 7 + 2 * i + k, PROMPTS[i])
            assert row["model"] == saved_tiny_sd and row["settings"]["tgate"]["gate_step"] == 2 and row["seconds"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"] == saved_tiny_sd and run["num_inference_steps"] == 3

    # one image made on its own, with the seed the metadata names, is that image
    from diffusers import DiffusionPipeline

    import tgate_kernels

    pipe = tgate_kernels.enable(DiffusionPipeline.from_pretrained(saved_tiny_sd), gate_step=2)
    pipe.set_progress_bar_config(disable=True)
    alone = pipe(prompt=PROMPTS[3], num_inference_steps=3, generator=torch.Generator().manual_seed(7 + 2 * 3 + 1)).images[0]
    assert np.abs(np.asarray(alone, dtype=int) - images["000003_01.png"].astype(int)).max() <= 1


def test_seeds_and_images_do_not_depend_on_the_batch_size(saved_tiny_sd, tmp_path):
    prompts = _text_prompts(tmp_path)
    cli.main(_job(saved_tiny_sd, tmp_path / "one", "--batch-size", "1", prompts_file=prompts))
    cli.main(_job(saved_tiny_sd, tmp_path / "four", "--batch-size", "4", prompts_file=prompts))
    one, four = _images(tmp_path / "one"), _images(tmp_path / "four")
    assert sorted(one) == sorted(four)
    assert all(np.abs(one[name].astype(int) - four[name].astype(int)).max() <= 1 for name in one)
    seeds = lambda folder: {row["file"]: row["seed"] for row in _rows(folder)}  # noqa: E731
    assert seeds(tmp_path / "one") == seeds(tmp_path / "four")


def test_json_lines_carry_negative_prompts_seeds_and_pipeline_arguments(saved_tiny_sd, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in [
        {"prompt": "a red circle", "seed": 123, "guidance_scale": 3.0},
        {"prompt": "a blue square", "negative_prompt": "blurry"},
    ]) + "\n")
    out = tmp_path / "out"
    assert cli.main(_job(saved_tiny_sd, out, prompts_file=path)) == 0
    rows = {row["index"]: row for row in _rows(out)}
    assert rows[0]["seed"] == 123 and rows[0]["arguments"] == {"guidance_scale": 3.0}
    assert rows[1]["negative_prompt"] == "blurry" and rows[1]["seed"] == 1


def test_a_rerun_makes_only_what_is_missing_and_a_crash_mid_write_is_not_taken_for_an_image(saved_tiny_sd, tmp_path, capsys, monkeypatch):
    prompts = _text_prompts(tmp_path)
    complete = tmp_path / "complete"
    cli.main(_job(saved_tiny_sd, complete, "--batch-size", "2", prompts_file=prompts))
    expected = _images(complete)

    out = tmp_path / "out"
    cli.main(_job(saved_tiny_sd, out, "--batch-size", "2", prompts_file=prompts))
    for name in ("000001_00.png", "000004_00.png"):
        os.remove(out / name)
    capsys.readouterr()
    assert cli.main(_job(saved_tiny_sd, out, "--batch-size", "2", prompts_file=prompts)) == 0
    assert "2 images written (3 already there)" in capsys.readouterr().out
    assert {n: a.tolist() for n, a in _images(out).items()} == {n: a.tolist() for n, a in expected.items()}
    assert sorted(row["file"] for row in _rows(out)) == sorted(expected), "one row per image, the remade ones too"
    assert cli.main(["eval", str(complete), str(out), "--out", str(tmp_path / "report")]) == 0

    # an interrupt after the third image's file was written but before it was renamed and recorded
    crashed = tmp_path / "crashed"
    original, saved = OutputFolder.save, []

    def crash_on_third(self, image, file, row):
        if len(saved) == 2:
            image.save(os.path.join(self.path, file + ".partial"), format="PNG")
            raise KeyboardInterrupt
        saved.append(file)
        return original(self, image, file, row)

    monkeypatch.setattr(OutputFolder, "save", crash_on_third)
    capsys.readouterr()
    assert cli.main(_job(saved_tiny_sd, crashed, prompts_file=prompts)) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"interrupted: 2 of 5 images are in {crashed}; run the same command again to make the rest"
    assert "Traceback" not in "".join(err)
    monkeypatch.setattr(OutputFolder, "save", original)
    assert len(_images(crashed)) == 2
    capsys.readouterr()
    assert cli.main(_job(saved_tiny_sd, crashed, prompts_file=prompts)) == 0
    assert "3 images written (2 already there)" in capsys.readouterr().out
    assert {n: a.tolist() for n, a in _images(crashed).items()} == {n: a.tolist() for n, a in expected.items()}


def test_two_processes_under_accelerate_make_the_single_process_run(saved_tiny_sd, tmp_path):
    prompts = _text_prompts(tmp_path)
    single = tmp_path / "single"
    cli.main(_job(saved_tiny_sd, single, "--batch-size", "2", prompts_file=prompts))
    parallel = tmp_path / "parallel"
    done = accelerate_launch(_job(saved_tiny_sd, parallel, "--batch-size", "2", prompts_file=prompts))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("images written") == 1, "the main process alone prints the summary"
    assert "5 images written (0 already there) by 2 process(es)" in done.stdout
    assert {n: a.tolist() for n, a in _images(parallel).items()} == {n: a.tolist() for n, a in _images(single).items()}
    rows = _rows(parallel)
    assert sorted(row["file"] for row in rows) == sorted(_images(single)) and {row["process"] for row in rows} == {0, 1}


@pytest.mark.parametrize(
    "setup, words",
    [
        (lambda tmp: ["--prompts", str(tmp / "none.txt")], ["--prompts", "none.txt", "no such file"]),
        (lambda tmp: ["--prompts", str(_write(tmp / "empty.txt", "\n\n"))], ["holds no prompt"]),
        (lambda tmp: ["--prompts", str(_write(tmp / "bad.jsonl", '{"prompt": "a"}\n{"prompt": "b",\n'))], ["line 2", "not valid JSON"]),
        (lambda tmp: ["--prompts", str(_write(tmp / "arg.jsonl", '{"prompt": "a", "strength": 0.5}\n'))], ["does not take ['strength']"]),
        (lambda tmp: ["--prompts", str(_write(tmp / "gen.jsonl", '{"prompt": "a", "generator": 1}\n'))], ["set by the job itself"]),
    ],
)
def test_bad_prompt_files_are_refused_before_any_image(saved_tiny_sd, tmp_path, capsys, setup, words):
    out = tmp_path / "out"
    argv = ["generate", "--model", saved_tiny_sd, "--out", str(out), "--steps", "2", "--gate-step", "1", *setup(tmp_path)]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err
    assert not out.exists() or not any(name.endswith(".png") for name in os.listdir(out))


def _write(path, text):
    path.write_text(text)
    return path


def test_a_folder_of_another_run_is_refused_and_left_untouched(saved_tiny_sd, tmp_path, capsys):
    prompts = _text_prompts(tmp_path)
    out = tmp_path / "out"
    cli.main(_job(saved_tiny_sd, out, prompts_file=prompts))
    before = {name: os.path.getmtime(out / name) for name in os.listdir(out)}
    for changed in (["--steps", "4"], ["--no-tgate"], ["--seed", "3"]):
        argv = _job(saved_tiny_sd, out, prompts_file=prompts)
        argv[argv.index("--steps"):argv.index("--steps") + 2] = []
        with pytest.raises(SystemExit):
            cli.main(argv + ["--steps", "3"] + changed if changed[0] != "--steps" else argv + changed)
        assert "holds another job's images" in capsys.readouterr().err
    assert {name: os.path.getmtime(out / name) for name in os.listdir(out)} == before


def test_models_are_loaded_like_diffusers_with_one_clear_message(tmp_path, capsys, monkeypatch):
    cases = [
        ([str(tmp_path / "missing-folder")], {}, "no such folder"),
        (["someone/some-model"], {"HF_HUB_OFFLINE": "1"}, "downloading is off: HF_HUB_OFFLINE=1"),
        (["someone/some-model", "--local-files-only"], {"HF_HUB_OFFLINE": "0"}, "downloading is off: --local-files-only"),
    ]
    for model, env, words in cases:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        with pytest.raises(SystemExit):
            cli.main(["generate", "--model", *model, "--prompt", "a cat", "--steps", "2", "--gate-step", "1",
                      "--out", str(tmp_path / "x.png")])
        err = capsys.readouterr().err
        assert words in err and model[0] in err, err
    assert not (tmp_path / "x.png").exists()


def test_the_baseline_set_and_the_gated_set_compare_image_by_image(saved_tiny_sd, tmp_path, capsys):
    prompts = _text_prompts(tmp_path)
    cli.main(_job(saved_tiny_sd, tmp_path / "plain", "--no-tgate", prompts_file=prompts))
    cli.main(_job(saved_tiny_sd, tmp_path / "gated", prompts_file=prompts))
    plain, gated = _images(tmp_path / "plain"), _images(tmp_path / "gated")
    assert sorted(plain) == sorted(gated) and any(not np.array_equal(plain[n], gated[n]) for n in plain)
    assert all(row["settings"]["tgate"] is None for row in _rows(tmp_path / "plain"))


def test_eval_compares_the_two_sets_and_writes_its_report(saved_tiny_sd, tmp_path, capsys):
    prompts = _text_prompts(tmp_path)
    cli.main(_job(saved_tiny_sd, tmp_path / "plain", "--no-tgate", prompts_file=prompts))
    cli.main(_job(saved_tiny_sd, tmp_path / "gated", prompts_file=prompts))
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "plain"), str(tmp_path / "gated"), "--out", str(tmp_path / "report")]) == 0
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "SSIM" in printed
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert len(report["pairs"]) == 5 and all(float(pair["psnr"]) < 100 for pair in report["pairs"])
    assert {"eval.json", "eval.csv", "eval.png"} <= set(os.listdir(tmp_path / "report"))
    with pytest.raises(SystemExit):
        cli.main(["eval", str(tmp_path / "plain"), str(tmp_path / "missing")])
    assert "folder B" in capsys.readouterr().err


def test_auto_gates_are_recorded_per_image(saved_tiny_sd, tmp_path):
    out = tmp_path / "auto"
    argv = _job(saved_tiny_sd, out, "--batch-size", "2", prompts_file=_text_prompts(tmp_path))
    argv[argv.index("--gate-step") + 1] = "auto"
    assert cli.main(argv + ["--steps", "6"]) == 0
    rows = _rows(out)
    assert len(rows) == 5 and all(2 <= row["gate_step_chosen"] <= 4 for row in rows)
    assert all(row["settings"]["tgate"]["gate_step"] == "auto" for row in rows)


@pytest.mark.parametrize(
    "options, words",
    [
        (["--gate-step", "4", "--auto-gate", "threshold=0.1"], ["--auto-gate", "--gate-step 4"]),
        (["--no-tgate", "--auto-gate", "threshold=0.1"], ["--auto-gate", "--no-tgate"]),
        (["--gate-step", "auto", "--deepcache", "3,0"], ["--gate-step", "auto does not combine with --deepcache"]),
        (["--gate-step", "auto", "--compile"], ["--gate-step", "auto does not combine with --compile"]),
        (["--compile", "--deepcache", "3,0"], ["--compile", "does not combine with --deepcache"]),
        (["--gate-step", "auto", "--auto-gate", "patience=1.5"], ["--auto-gate", "'1.5' is not an integer"]),
        (["--gate-step", "soon"], ["--gate-step", "'soon'", "or auto"]),
    ],
)
def test_option_conflicts_are_refused_before_the_model_is_loaded(tmp_path, capsys, options, words):
    out = tmp_path / "out"
    argv = ["generate", "--model", str(tmp_path / "no-such-model"), "--prompt", "a", "--out", str(out), "--steps", "12", *options]
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err
    assert "no-such-model" not in err, "refused before loading"
    assert not out.exists()
