"""``tgate_kernels.tools.evaluation``: comparing two folders of generated images, offline on the CPU.

The folders are written here: a few 32x32 RGB PNGs and their ``metadata.jsonl``. FID runs with a
tiny fixed feature extractor (torchmetrics' custom-module option), the CLIP score with a tiny
random CLIP model saved to a temporary folder, so nothing is downloaded.
"""

import csv
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torchmetrics")
pytest.importorskip("skimage")
pytest.importorskip("matplotlib")

from tgate_kernels.tools.evaluation import evaluate, render, write_report  # noqa: E402

SIZE = 32


def random_images(count, seed=0, high=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(count)]


def keyed(images, seeds=None):
    """Two images per prompt: image i is (index i // 2, image i % 2), seed i unless overridden."""
    seeds = seeds or {}
    return {(i // 2, i % 2, seeds.get(i, i)): image for i, image in enumerate(images)}


def write_folder(folder, images):
    """A folder as `tgate-kernels generate` writes it, from {(index, image, seed): HxWx3 uint8}."""
    folder.mkdir(parents=True)
    lines = []
    for (index, image, seed), pixels in images.items():
        name = f"{index:06d}_{image:02d}_{seed}.png"
        Image.fromarray(pixels).save(folder / name)
        # Keys beyond the five the format requires must be ignored.
        lines.append(json.dumps({"file": name, "index": index, "image": image, "seed": seed,
                                 "prompt": f"prompt number {index}", "model": "tiny", "seconds": 0.5}))
        lines.append("")  # empty lines are skipped
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


class ChannelStats(torch.nn.Module):
    """Per-channel mean and standard deviation: six features, no weights; records its inputs."""

    num_features = 6

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, images):
        self.inputs.append(images)
        return torch.cat([images.mean(dim=(2, 3)), images.std(dim=(2, 3))], dim=1)


def test_identical_folders_score_perfectly_and_fid_is_zero(tmp_path):
    images = keyed(random_images(6))
    a = write_folder(tmp_path / "a", images)
    b = write_folder(tmp_path / "b", images)
    extractor = ChannelStats()

    report = evaluate(str(a), str(b), fid_features=extractor, batch_size=4)

    assert [p.key for p in report.pairs] == ["000000_00", "000000_01", "000001_00", "000001_01", "000002_00",
                                             "000002_01"]
    assert all(math.isinf(p.psnr) for p in report.pairs)
    assert all(p.ssim == 1.0 for p in report.pairs)
    assert math.isinf(report.mean_psnr) and report.mean_ssim == 1.0
    assert report.fid is not None and abs(report.fid) < 1e-6, report.fid_note
    assert report.fid_note is None
    assert report.only_in_a == [] and report.only_in_b == []
    assert report.pairs[0].file_a == str(a / "000000_00_0.png")
    # The documented contract: float32 batches in [0, 1], at the images' size.
    assert {x.dtype for x in extractor.inputs} == {torch.float32}
    assert all(x.shape[1:] == (3, SIZE, SIZE) and 0 <= x.min() and x.max() <= 1 for x in extractor.inputs)
    assert sum(x.shape[0] for x in extractor.inputs) == 12  # both folders, batches of 4 + 2


def test_known_offset_gives_the_psnr_of_its_mse(tmp_path):
    # A stays below 246, so B = A + 10 clips nowhere: the MSE is exactly 100.
    reference = random_images(4, high=246)
    a = write_folder(tmp_path / "a", keyed(reference))
    b = write_folder(tmp_path / "b", keyed([image + 10 for image in reference]))

    report = evaluate(str(a), str(b), fid_features=ChannelStats())

    expected = 10 * math.log10(255**2 / 100)
    assert [p.psnr for p in report.pairs] == pytest.approx([expected] * 4, rel=1e-12)
    assert report.mean_psnr == pytest.approx(expected, rel=1e-12)
    assert all(0 < p.ssim < 1 for p in report.pairs)
    # Shifting every channel mean by 10/255 moves the feature means by that much.
    assert report.fid == pytest.approx(3 * (10 / 255) ** 2, rel=1e-3)


def test_a_module_without_num_features_is_probed(tmp_path):
    reference = random_images(3)
    a = write_folder(tmp_path / "a", keyed(reference))
    b = write_folder(tmp_path / "b", keyed(random_images(3, seed=1)))
    pooled = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

    report = evaluate(str(a), str(b), fid_features=pooled)

    assert report.fid is not None and report.fid > 0


def test_images_pair_up_by_index_image_and_seed(tmp_path):
    reference = random_images(4)
    a = write_folder(tmp_path / "a", keyed(reference))
    # Image 2 is drawn from another seed and image 4 exists in B only: both unlike anything in A,
    # so counting them would pull the means below a perfect score.
    others = random_images(2, seed=7)
    b_images = keyed(reference[:2] + [others[0], reference[3], others[1]], seeds={2: 99})
    b = write_folder(tmp_path / "b", b_images)

    report = evaluate(str(a), str(b))

    assert [p.key for p in report.pairs] == ["000000_00", "000000_01", "000001_01"]
    assert report.only_in_a == ["000001_00 (seed 2)"]
    assert report.only_in_b == ["000001_00 (seed 99)", "000002_00 (seed 4)"]
    assert math.isinf(report.mean_psnr) and report.mean_ssim == 1.0
    text = render(report)
    assert "only in A (1" in text and "only in B (2" in text and "000002_00 (seed 4)" in text


def test_folders_without_a_single_pair_are_an_error(tmp_path):
    a = write_folder(tmp_path / "a", keyed(random_images(2)))
    b = write_folder(tmp_path / "b", keyed(random_images(2), seeds={0: 10, 1: 11}))
    with pytest.raises(ValueError, match="no image of folder A"):
        evaluate(str(a), str(b))


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None,
                    reason="torch-fidelity is installed: the default FID may load (or download) its weights")
def test_default_fid_without_torch_fidelity_explains_and_the_rest_still_runs(tmp_path):
    reference = random_images(2, high=246)
    a = write_folder(tmp_path / "a", keyed(reference))
    b = write_folder(tmp_path / "b", keyed([image + 10 for image in reference]))

    report = evaluate(str(a), str(b))

    assert report.fid is None
    assert "pip install torch-fidelity" in report.fid_note and "--fid-features" in report.fid_note
    assert len(report.pairs) == 2 and math.isfinite(report.mean_psnr) and report.mean_ssim < 1
    assert report.fid_note in render(report)


def test_fid_needs_two_pairs_and_a_valid_feature_choice(tmp_path):
    images = keyed(random_images(1))
    a = write_folder(tmp_path / "a", images)
    b = write_folder(tmp_path / "b", images)

    report = evaluate(str(a), str(b), fid_features=ChannelStats())
    assert report.fid is None and "at least 2 images" in report.fid_note

    with pytest.raises(ValueError, match="fid_features .* got 100"):
        evaluate(str(a), str(b), fid_features=100)
    with pytest.raises(TypeError, match="fid_features"):
        evaluate(str(a), str(b), fid_features="inception")


def test_clip_model_that_is_not_here_is_skipped_with_a_note(tmp_path):
    images = keyed(random_images(2))
    a = write_folder(tmp_path / "a", images)
    b = write_folder(tmp_path / "b", images)
    missing = str(tmp_path / "no-such-clip")

    report = evaluate(str(a), str(b), clip_model=missing)

    assert report.clip_score_a is None and report.clip_score_b is None
    assert missing in report.clip_note and "does not exist" in report.clip_note
    assert len(report.pairs) == 2

    report = evaluate(str(a), str(b), clip_model="nobody/not-a-cached-clip-model")
    assert report.clip_score_a is None and "nobody/not-a-cached-clip-model" in report.clip_note
    assert "Hugging Face cache" in report.clip_note

    assert "not asked for" in evaluate(str(a), str(b)).clip_note


def tiny_clip(folder):
    """A CLIP model with random weights, saved like a downloaded one (tokenizer from the fixtures)."""
    from fixtures.tiny_pipelines import _clip_tokenizer
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=SIZE, patch_size=8),
        projection_dim=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(config).save_pretrained(folder)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def test_clip_score_with_a_local_model(tmp_path):
    reference = random_images(3)
    a = write_folder(tmp_path / "a", keyed(reference))
    b = write_folder(tmp_path / "b", keyed(reference[:2] + random_images(1, seed=5)))

    report = evaluate(str(a), str(b), clip_model=tiny_clip(tmp_path / "clip"), batch_size=2)

    assert report.clip_note is None
    assert isinstance(report.clip_score_a, float) and isinstance(report.clip_score_b, float)
    assert 0 <= report.clip_score_a <= 100 and 0 <= report.clip_score_b <= 100
    same = evaluate(str(a), str(a), clip_model=str(tmp_path / "clip"))
    assert same.clip_score_a == pytest.approx(same.clip_score_b)


def test_write_report_writes_md_json_csv_and_png(tmp_path):
    reference = random_images(5, high=246)
    a = write_folder(tmp_path / "a", keyed(reference))
    b = write_folder(tmp_path / "b", keyed(reference[:2] + [image + 10 for image in reference[2:]]))
    report = evaluate(str(a), str(b), fid_features=ChannelStats())

    paths = write_report(report, str(tmp_path / "out"), pairs_shown=3)

    assert paths == {kind: str(tmp_path / "out" / f"eval.{kind}") for kind in ("md", "json", "csv", "png")}
    assert render(report) in (tmp_path / "out" / "eval.md").read_text()
    with open(paths["csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["key"] for row in rows] == [p.key for p in report.pairs]
    assert [float(row["psnr"]) for row in rows] == [p.psnr for p in report.pairs]  # "inf" reads back
    assert [float(row["ssim"]) for row in rows] == [p.ssim for p in report.pairs]
    with open(paths["json"], encoding="utf-8") as handle:
        saved = json.load(handle, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))
    assert saved["pairs"][0]["psnr"] == "inf" and float(saved["mean_psnr"]) == report.mean_psnr
    assert saved["fid"] == pytest.approx(report.fid) and saved["only_in_a"] == []
    with Image.open(paths["png"]) as png:
        assert 800 <= png.width <= 4000 and 300 <= png.height <= 2000


def test_render_lists_every_pair_then_the_summary(tmp_path):
    images = keyed(random_images(2))
    a = write_folder(tmp_path / "a", images)
    b = write_folder(tmp_path / "b", images)
    text = render(evaluate(str(a), str(b), fid_features=ChannelStats()))
    lines = text.splitlines()
    assert sum(line.startswith("000000_0") for line in lines) == 2
    assert "mean PSNR: inf dB" in text and "mean SSIM: 1.0000" in text and "FID: 0.000" in text


def test_missing_folders_and_metadata_name_the_folder(tmp_path):
    a = write_folder(tmp_path / "a", keyed(random_images(1)))
    missing = tmp_path / "missing"
    with pytest.raises(ValueError, match=f"folder B does not exist.*{missing}"):
        evaluate(str(a), str(missing))
    with pytest.raises(ValueError, match=f"folder A does not exist.*{missing}"):
        evaluate(str(missing), str(a))
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match=f"folder B has no metadata.jsonl.*{bare}"):
        evaluate(str(a), str(bare))


@pytest.mark.parametrize("line, message", [
    ("{not json", r"line 3 is not valid JSON"),
    ('["a", "list"]', r"line 3 is not a JSON object"),
    ('{"file": "000000_00_0.png", "index": 5, "image": 0, "prompt": "p"}', r"line 3 lacks 'seed'"),
    ('{"file": "000000_00_0.png", "index": "5", "image": 0, "seed": 1, "prompt": "p"}', r"line 3 has 'index' = '5'"),
    ('{"file": "gone.png", "index": 5, "image": 0, "seed": 1, "prompt": "p"}', r"line 3 names the image 'gone.png'"),
    ('{"file": "000000_00_0.png", "index": 0, "image": 0, "seed": 0, "prompt": "p"}', r"line 3 repeats .* of line 1"),
])
def test_bad_metadata_names_the_folder_and_the_line(tmp_path, line, message):
    a = write_folder(tmp_path / "a", keyed(random_images(1)))
    metadata = a / "metadata.jsonl"
    metadata.write_text(metadata.read_text(encoding="utf-8") + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"folder A: .*metadata.jsonl {message}"):
        evaluate(str(a), str(a))


def test_pairs_of_different_sizes_are_an_error(tmp_path):
    a = write_folder(tmp_path / "a", {(0, 0, 0): random_images(1)[0]})
    b = write_folder(tmp_path / "b", {(0, 0, 0): np.zeros((16, 16, 3), dtype=np.uint8)})
    with pytest.raises(ValueError, match="000000_00 .* differs in size"):
        evaluate(str(a), str(b))


def test_bad_arguments_are_named(tmp_path):
    a = write_folder(tmp_path / "a", keyed(random_images(1)))
    with pytest.raises(ValueError, match="batch_size .* got 0"):
        evaluate(str(a), str(a), batch_size=0)
    with pytest.raises(ValueError, match="pairs_shown"):
        write_report(evaluate(str(a), str(a)), str(tmp_path / "out"), pairs_shown=-1)
