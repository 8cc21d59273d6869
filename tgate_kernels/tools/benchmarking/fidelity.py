"""How close a T-GATE image is to the image of the same prompt and seed without it, and a
labelled side-by-side grid of such images."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

LABEL_LINE_HEIGHT = 14
LABEL_LINES = 2
MIN_TILE_WIDTH = 220
"""Tiles are at least this wide so that their labels fit, whatever the image size."""
MIN_DISPLAY_SIDE = 128
"""Smaller images are enlarged (nearest neighbour, integer factor) so that they can be seen."""


def fidelity(reference: Image.Image, image: Image.Image) -> tuple[float, float]:
    """PSNR (dB) and SSIM of ``image`` against ``reference`` (8-bit RGB, scikit-image)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    a = np.asarray(reference.convert("RGB"))
    b = np.asarray(image.convert("RGB"))
    psnr = float(peak_signal_noise_ratio(a, b, data_range=255)) if not np.array_equal(a, b) else float("inf")
    # SSIM's window must fit the image; tiny test images are smaller than the default 7.
    window = min(7, *(side if side % 2 else side - 1 for side in a.shape[:2]))
    ssim = float(structural_similarity(a, b, channel_axis=2, data_range=255, win_size=window))
    return psnr, ssim


def display_size(image_size: tuple[int, int]) -> tuple[int, int]:
    width, height = image_size
    factor = max(1, -(-MIN_DISPLAY_SIDE // min(width, height)))
    return width * factor, height * factor


def tile_size(image_size: tuple[int, int]) -> tuple[int, int]:
    width, height = display_size(image_size)
    return max(width, MIN_TILE_WIDTH), height + LABEL_LINES * LABEL_LINE_HEIGHT


def labelled_grid(tiles: list[tuple[Image.Image, str, str]]) -> Image.Image:
    """One row of images, each with two label lines above it (settings; seconds and fidelity)."""
    tile_width, tile_height = tile_size(tiles[0][0].size)
    grid = Image.new("RGB", (tile_width * len(tiles), tile_height), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for index, (image, first_line, second_line) in enumerate(tiles):
        left = index * tile_width
        draw.text((left + 2, 1), first_line, fill="black", font=font)
        draw.text((left + 2, 1 + LABEL_LINE_HEIGHT), second_line, fill="black", font=font)
        image = image.convert("RGB").resize(display_size(tiles[0][0].size), Image.NEAREST)
        grid.paste(image, (left + (tile_width - image.width) // 2, LABEL_LINES * LABEL_LINE_HEIGHT))
    return grid
