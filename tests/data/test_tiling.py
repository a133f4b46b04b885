"""Tiling and transforms match the official InternVL preprocessing."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from internvl.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD
from internvl.data import build_transform, dynamic_preprocess
from internvl.data.tiling import candidate_grids, find_closest_aspect_ratio

# The official candidate order for max_num=12 (same-area ties in CPython set order).
OFFICIAL_ORDER_MAX_12 = [
    (1, 1),
    (1, 2),
    (2, 1),
    (3, 1),
    (1, 3),
    (2, 2),
    (4, 1),
    (1, 4),
    (5, 1),
    (1, 5),
    (1, 6),
    (6, 1),
    (3, 2),
    (2, 3),
    (7, 1),
    (1, 7),
    (4, 2),
    (2, 4),
    (1, 8),
    (8, 1),
    (1, 9),
    (3, 3),
    (9, 1),
    (2, 5),
    (5, 2),
    (10, 1),
    (1, 10),
    (11, 1),
    (1, 11),
    (12, 1),
    (3, 4),
    (4, 3),
    (1, 12),
    (6, 2),
    (2, 6),
]


def test_candidate_order_matches_official():
    assert candidate_grids(1, 12) == OFFICIAL_ORDER_MAX_12


@pytest.mark.parametrize(
    "size, max_num, grid, tiles",
    [
        ((448, 448), 12, (1, 1), 1),
        ((1000, 1000), 12, (3, 3), 10),
        ((640, 480), 12, (4, 3), 13),
        ((1920, 1080), 12, (4, 2), 9),
        ((500, 2000), 12, (1, 4), 5),
        ((3000, 1000), 12, (6, 2), 13),
        ((640, 480), 6, (3, 2), 7),
        ((1920, 1080), 6, (2, 1), 3),
    ],
)
def test_grid_and_tile_count(size, max_num, grid, tiles):
    width, height = size
    assert find_closest_aspect_ratio(width / height, candidate_grids(1, max_num), width, height, 448) == grid
    assert len(dynamic_preprocess(Image.new("RGB", size), 1, max_num, 448, use_thumbnail=True)) == tiles
    # Without the thumbnail a single-grid image gives exactly columns x rows tiles.
    assert len(dynamic_preprocess(Image.new("RGB", size), 1, max_num, 448)) == grid[0] * grid[1]


def test_tiles_are_row_major_and_thumbnail_is_last():
    # A 2x1-grid image: the left half red, the right half blue; tiles of 32 px.
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 32))
    tiles = dynamic_preprocess(image, 1, 6, image_size=32, use_thumbnail=True)
    assert len(tiles) == 3
    assert tiles[0].getpixel((16, 16)) == (255, 0, 0)
    assert tiles[1].getpixel((16, 16)) == (0, 0, 255)
    thumbnail = np.asarray(tiles[2])
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BICUBIC))
    assert np.array_equal(thumbnail, expected)


def test_four_quadrants_keep_their_order():
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    image = Image.new("RGB", (64, 64))
    for index, colour in enumerate(colours):
        left, top = (index % 2) * 32, (index // 2) * 32
        image.paste(colour, (left, top, left + 32, top + 32))
    # 64x64 with 32-px tiles is larger than half of a 2x2 grid, so the tie climbs to 2x2.
    tiles = dynamic_preprocess(image, 1, 4, image_size=32)
    assert [tile.getpixel((16, 16)) for tile in tiles] == colours


def _random_image(seed: int, size=(97, 61)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "normalize_type, mean, std",
    [("imagenet", IMAGENET_MEAN, IMAGENET_STD), ("clip", CLIP_MEAN, CLIP_STD), ("siglip", SIGLIP_MEAN, SIGLIP_STD)],
)
def test_eval_transform_equals_torchvision_reference(normalize_type, mean, std):
    reference = T.Compose(
        [
            T.Resize((448, 448), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
    image = _random_image(0)
    output = build_transform(False, 448, normalize_type=normalize_type)(image)
    assert output.shape == (3, 448, 448)
    assert torch.equal(output, reference(image))


def test_transform_converts_to_rgb():
    image = _random_image(1).convert("L")
    output = build_transform(False, 64)(image)
    reference = T.Compose(
        [
            T.Resize((64, 64), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    assert torch.equal(output, reference(image.convert("RGB")))


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer)


def test_train_transform_is_a_jpeg_recompression_in_the_official_quality_range():
    image = _random_image(2)
    resize_normalize = T.Compose(
        [
            T.Resize((64, 64), interpolation=InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    candidates = {quality: resize_normalize(_jpeg(image, quality)) for quality in range(75, 101)}
    transform = build_transform(True, 64)
    seen = set()
    for _ in range(12):
        output = transform(image)
        matches = [quality for quality, expected in candidates.items() if torch.equal(output, expected)]
        assert matches, "train output is not a JPEG re-compression at quality 75..100"
        seen.update(matches)
        assert not torch.equal(output, resize_normalize(image))
    assert len(seen) > 1, "the JPEG quality should vary from call to call"


def test_pad2square_fills_with_the_mean_colour():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    output = build_transform(False, 40, pad2square=True, normalize_type="imagenet")(image)
    # The padded band (top rows) normalises to ~0: it is the mean colour; the image itself (black) does not.
    assert output[:, :8, :].abs().max() < 0.03
    assert output[:, 20, 20].min() < -1.5


def test_unknown_normalization_is_rejected():
    with pytest.raises(ValueError, match="normalize_type"):
        build_transform(False, normalize_type="laion")
