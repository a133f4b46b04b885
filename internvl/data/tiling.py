"""Image tiling and tensor transforms, with the same output as the official InternVL preprocessing.

``dynamic_preprocess`` cuts an image into a grid of square tiles whose aspect ratio best matches the image (plus a
whole-image thumbnail, placed last); ``build_transform`` turns each tile into a normalised tensor.
"""

from __future__ import annotations

import io
import random

import torchvision.transforms as T
from PIL import Image
from torchvision.transforms.functional import InterpolationMode

from internvl.constants import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, SIGLIP_MEAN, SIGLIP_STD

NORMALIZATIONS = {
    "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
    "clip": (CLIP_MEAN, CLIP_STD),
    "siglip": (SIGLIP_MEAN, SIGLIP_STD),
}
# Train-time augmentation re-encodes each image as JPEG with a quality drawn from this range.
JPEG_QUALITY_RANGE = (75, 100)


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (columns, rows) grids with ``min_num <= columns * rows <= max_num``, by tile count.

    Grids with the same tile count keep the iteration order of a Python set filled in this order: that is the
    tie-breaking the official checkpoints were trained with, and it decides which grid wins an exact tie in
    ``find_closest_aspect_ratio``.
    """
    grids = {
        (columns, rows)
        for n in range(min_num, max_num + 1)
        for columns in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_num <= columns * rows <= max_num
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def find_closest_aspect_ratio(
    aspect_ratio: float, target_ratios: list[tuple[int, int]], width: int, height: int, image_size: int
) -> tuple[int, int]:
    """The grid whose columns/rows ratio is closest to ``aspect_ratio``.

    On an exact tie the later (larger) grid wins only if the image has more than half the pixels that grid's
    tiles hold, so big images get more tiles and small ones are not blown up.
    """
    best_diff = float("inf")
    best = (1, 1)
    area = width * height
    for columns, rows in target_ratios:
        diff = abs(aspect_ratio - columns / rows)
        if diff < best_diff:
            best_diff, best = diff, (columns, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * columns * rows:
            best = (columns, rows)
    return best


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 6, image_size: int = 448, use_thumbnail: bool = False
) -> list[Image.Image]:
    """Resize ``image`` to the best grid of ``image_size`` tiles and return the tiles in row-major order.

    With ``use_thumbnail`` and more than one tile, the whole image resized to one tile is appended last.
    """
    width, height = image.size
    columns, rows = find_closest_aspect_ratio(
        width / height, candidate_grids(min_num, max_num), width, height, image_size
    )
    resized = image.resize((image_size * columns, image_size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for index in range(columns * rows):
        left, top = (index % columns) * image_size, (index // columns) * image_size
        tiles.append(resized.crop((left, top, left + image_size, top + image_size)))
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def _to_rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


class RandomJPEGQuality:
    """Re-encode an image as JPEG at a random quality in ``JPEG_QUALITY_RANGE`` (inclusive)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=random.randint(*JPEG_QUALITY_RANGE))
        buffer.seek(0)
        return Image.open(buffer)


class ExpandToSquare:
    """Pad an image to a square, centred, with ``fill`` (the normalisation mean as 0..255 RGB)."""

    def __init__(self, fill: tuple[int, int, int]):
        self.fill = fill

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        if width == height:
            return image
        side = max(width, height)
        square = Image.new(image.mode, (side, side), self.fill)
        square.paste(image, ((side - width) // 2, (side - height) // 2))
        return square


def build_transform(
    is_train: bool, input_size: int = 448, pad2square: bool = False, normalize_type: str = "imagenet"
) -> T.Compose:
    """PIL image -> normalised float tensor ``[3, input_size, input_size]`` (bicubic resize).

    ``is_train`` (the meta file's ``data_augment``) adds random JPEG re-compression, the only augmentation of the
    official recipe. ``pad2square`` first pads the image to a square with the mean colour.
    """
    try:
        mean, std = NORMALIZATIONS[normalize_type]
    except KeyError:
        raise ValueError(f"normalize_type must be one of {sorted(NORMALIZATIONS)}, got {normalize_type!r}") from None
    steps = [T.Lambda(_to_rgb)]
    if pad2square:
        steps.append(ExpandToSquare(tuple(int(x * 255) for x in mean)))
    if is_train:
        steps.append(RandomJPEGQuality())
    steps += [
        T.Resize((input_size, input_size), interpolation=InterpolationMode.BICUBIC),
        T.ToTensor(),
        T.Normalize(mean=mean, std=std),
    ]
    return T.Compose(steps)
