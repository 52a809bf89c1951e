"""The built-in "shapes" data set: ten classes of drawn shapes, written as real PNG files, so that the whole
training pipeline runs offline (as torchvision keeps ``FakeData`` apart from the real data sets).

``python shapes.py DIR`` writes it; ``--data-set SHAPES --data-path DIR`` writes it on first use. With
``--image-size W H --jpeg-quality Q`` it writes JPEGs of ImageNet's size and kind instead (for example 500 x 375 px,
quality 90), on which the data pipeline's speed can be measured without ImageNet.
"""
import argparse
import colorsys
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Optional, Sequence, Union

import numpy as np
import torch.distributed as dist
from PIL import Image, ImageDraw

TRAIN_SPLIT, VAL_SPLIT = 'train', 'val'

SHAPES_NUM_CLASSES = 10
SHAPES_TRAIN_PER_CLASS = 26
SHAPES_VAL_PER_CLASS = 10
SHAPES_IMAGE_SIZE = 64
# Below this the shapes are only a few pixels wide and no longer tell apart.
MIN_SHAPES_IMAGE_SIZE = 16
# Pillow's JPEG quality scale.
JPEG_QUALITY_RANGE = (1, 100)
FILE_SUFFIXES = {'PNG': '.png', 'JPEG': '.jpg'}
SHAPE_NAMES = (
    'circle', 'square', 'triangle', 'cross', 'ring',
    'stripes', 'star', 'diamond', 'hexagon', 'crescent',
)
# Shape radius and position are drawn relative to the image side.
SHAPE_RADIUS_RANGE = (0.2, 0.36)
SHAPE_MARGIN = 0.04
# Golden-ratio hue spacing keeps the base colours of any number of classes far apart.
HUE_STEP = 0.618033988749895
HUE_JITTER = 0.03
SATURATION_RANGE = (0.55, 1.0)
VALUE_RANGE = (0.65, 1.0)
BACKGROUND_LEVEL_RANGE = (30.0, 200.0)
BACKGROUND_TINT = 25.0
PIXEL_NOISE_STD = 18.0
MAX_PIXEL = 255


def _regular_polygon(num_vertices: int, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * np.pi * np.arange(num_vertices) / num_vertices
    return np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _star(num_points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer = _regular_polygon(2 * num_points, phase=-np.pi / 2)
    scale = np.where(np.arange(2 * num_points) % 2 == 0, 1.0, inner)
    return outer * scale[:, None]


# Polygons in unit coordinates (radius 1, centred at the origin), drawn after rotation.
_CROSS_ARM = 0.3
_STRIPE_HALF_WIDTH = 0.14
_STRIPE_CENTRES = (-0.6, 0.0, 0.6)
_POLYGONS: dict[str, list[np.ndarray]] = {
    'square': [_regular_polygon(4, phase=np.pi / 4)],
    'triangle': [_regular_polygon(3, phase=-np.pi / 2)],
    'cross': [_rectangle(-1, -_CROSS_ARM, 1, _CROSS_ARM), _rectangle(-_CROSS_ARM, -1, _CROSS_ARM, 1)],
    'stripes': [_rectangle(c - _STRIPE_HALF_WIDTH, -1, c + _STRIPE_HALF_WIDTH, 1) for c in _STRIPE_CENTRES],
    'star': [_star()],
    'diamond': [np.array([[1.0, 0.0], [0.0, 0.55], [-1.0, 0.0], [0.0, -0.55]])],
    'hexagon': [_regular_polygon(6)],
}
_RING_INNER = 0.55
_CRESCENT_OFFSET = 0.45
_CRESCENT_CUT = 0.85


ImageSize = Union[int, Sequence[int]]  # a side, (side,) or (width, height)


def _width_height(image_size: ImageSize) -> tuple[int, ...]:
    """``(width, height)`` from a side or from one or two numbers; a longer sequence comes back as it is, for the
    caller's check."""
    size = (image_size,) if isinstance(image_size, int) else tuple(image_size)
    return size * 2 if len(size) == 1 else size


def _shape_mask(shape: str, size: tuple[int, int], cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    mask = Image.new('L', size, 0)
    draw = ImageDraw.Draw(mask)

    def disc(x: float, y: float, r: float, fill: int) -> None:
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)

    if shape == 'circle':
        disc(cx, cy, radius, MAX_PIXEL)
    elif shape == 'ring':
        disc(cx, cy, radius, MAX_PIXEL)
        disc(cx, cy, radius * _RING_INNER, 0)
    elif shape == 'crescent':
        disc(cx, cy, radius, MAX_PIXEL)
        shift = radius * _CRESCENT_OFFSET
        disc(cx + shift * math.cos(angle), cy + shift * math.sin(angle), radius * _CRESCENT_CUT, 0)
    else:
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        for polygon in _POLYGONS[shape]:
            points = polygon @ rotation.T * radius + np.array([cx, cy])
            draw.polygon([tuple(p) for p in points.tolist()], fill=MAX_PIXEL)
    return mask


def _shapes_class_names(num_classes: int) -> list[str]:
    width = max(2, len(str(num_classes - 1)))
    names = []
    for idx in range(num_classes):
        shape = SHAPE_NAMES[idx % len(SHAPE_NAMES)]
        # Beyond the distinct shapes, classes reuse a shape with a different colour.
        suffix = f"_c{idx // len(SHAPE_NAMES)}" if num_classes > len(SHAPE_NAMES) else ''
        names.append(f"{idx:0{width}d}_{shape}{suffix}")
    return names


def _render_shape(rng: np.random.Generator, class_idx: int, size: tuple[int, int]) -> Image.Image:
    """One image of ``size`` (width, height); a square one draws exactly what it always drew for its seed."""
    shape = SHAPE_NAMES[class_idx % len(SHAPE_NAMES)]
    width, height = size
    side = min(size)
    radius = rng.uniform(*SHAPE_RADIUS_RANGE) * side
    margin = SHAPE_MARGIN * side
    cx, cy = rng.uniform(radius + margin, np.array(size) - radius - margin, size=2)
    angle = rng.uniform(0.0, 2 * np.pi)
    mask = np.asarray(_shape_mask(shape, size, cx, cy, radius, angle), dtype=np.float32)[..., None] / MAX_PIXEL

    hue = (class_idx * HUE_STEP + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE)))
    foreground = (colour * MAX_PIXEL).astype(np.float32)
    background = rng.uniform(*BACKGROUND_LEVEL_RANGE) + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    noise = rng.normal(0.0, PIXEL_NOISE_STD, size=(height, width, 3))
    pixels = background * (1.0 - mask) + foreground * mask + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, MAX_PIXEL).astype(np.uint8), mode='RGB')


def make_shapes_dataset(
        root: str,
        num_classes: int = SHAPES_NUM_CLASSES,
        train_per_class: int = SHAPES_TRAIN_PER_CLASS,
        val_per_class: int = SHAPES_VAL_PER_CLASS,
        image_size: ImageSize = SHAPES_IMAGE_SIZE,
        seed: int = 0,
        jpeg_quality: Optional[int] = None,
) -> str:
    """Write the synthetic shapes dataset as PNGs under ``root/{train,val}/<class>/``; returns ``root``.

    Each class is a distinct shape with its own base hue, drawn at a random position, size,
    rotation and colour jitter on a noisy background. Output is byte-identical for a given seed.
    ``image_size`` is a side or ``(width, height)``; with ``jpeg_quality`` the images are JPEGs of that quality.
    Splits that already exist are kept: each split is written to a temporary folder and renamed
    into place, so concurrent callers never see a half-written split.
    """
    size = _width_height(image_size)
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("num_classes, train_per_class and val_per_class must all be >= 1")
    if len(size) != 2 or min(size) < MIN_SHAPES_IMAGE_SIZE:
        raise ValueError(f"image_size must be a side or a width and a height, each >= {MIN_SHAPES_IMAGE_SIZE}, "
                         f"got {image_size}")
    low, high = JPEG_QUALITY_RANGE
    if jpeg_quality is not None and not low <= jpeg_quality <= high:
        raise ValueError(f"jpeg_quality must be in [{low}, {high}], got {jpeg_quality}")
    image_format, save_options = ('PNG', {}) if jpeg_quality is None else ('JPEG', {'quality': jpeg_quality})
    os.makedirs(root, exist_ok=True)
    class_names = _shapes_class_names(num_classes)
    splits = [(split_id, split, per_class) for split_id, (split, per_class)
              in enumerate(((TRAIN_SPLIT, train_per_class), (VAL_SPLIT, val_per_class)))]

    tmp_dir = tempfile.mkdtemp(prefix='.shapes-tmp-', dir=root)
    try:
        for split_id, split, per_class in splits:
            target = os.path.join(root, split)
            if os.path.isdir(target):
                continue
            for class_idx, class_name in enumerate(class_names):
                class_dir = os.path.join(tmp_dir, split, class_name)
                os.makedirs(class_dir)
                for img_idx in range(per_class):
                    # Per-image seeds keep every image independent of the split sizes.
                    rng = np.random.default_rng([seed, split_id, class_idx, img_idx])
                    _render_shape(rng, class_idx, size).save(
                        os.path.join(class_dir, f"{img_idx:04d}{FILE_SUFFIXES[image_format]}"), format=image_format,
                        **save_options)
            try:
                os.rename(os.path.join(tmp_dir, split), target)
            except OSError:
                if not os.path.isdir(target):
                    raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return root


def has_splits(root: str) -> bool:
    return all(os.path.isdir(os.path.join(root, split)) for split in (TRAIN_SPLIT, VAL_SPLIT))


def ensure_shapes(root: str) -> None:
    """Generate the data set in ``root`` once, even when several processes start together."""
    distributed = dist.is_available() and dist.is_initialized()
    # One generator per node (LOCAL_RANK) also covers node-local disks; on a shared disk the rename in
    # make_shapes_dataset settles the race between nodes.
    is_local_main = not distributed or int(os.environ.get('LOCAL_RANK', dist.get_rank())) == 0
    if is_local_main and not has_splits(root):
        make_shapes_dataset(root)
    if distributed:
        dist.barrier()


def main(argv: Optional[Sequence[str]] = None) -> None:
    """``python shapes.py DIR``: write the data set into DIR (kept as it is when DIR already has it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('root', metavar='DIR', help='folder to write the data set to')
    parser.add_argument('--num-classes', type=int, default=SHAPES_NUM_CLASSES)
    parser.add_argument('--train-per-class', type=int, default=SHAPES_TRAIN_PER_CLASS)
    parser.add_argument('--val-per-class', type=int, default=SHAPES_VAL_PER_CLASS)
    parser.add_argument('--image-size', type=int, nargs='+', default=[SHAPES_IMAGE_SIZE], metavar=('W', 'H'),
                        help='a side, or a width and a height')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--jpeg-quality', type=int, default=None, metavar='Q',
                        help='write JPEGs of this quality instead of PNGs')
    args = parser.parse_args(argv)

    root = os.path.abspath(args.root)
    if has_splits(root):
        print(f"{root} already has {TRAIN_SPLIT}/ and {VAL_SPLIT}/; kept as is", file=sys.stderr)
    else:
        start = time.perf_counter()
        try:
            make_shapes_dataset(root, num_classes=args.num_classes, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, image_size=tuple(args.image_size),
                                seed=args.seed, jpeg_quality=args.jpeg_quality)
        except ValueError as err:
            parser.error(str(err))
        print(f"wrote shapes dataset in {time.perf_counter() - start:.2f}s", file=sys.stderr)
    print(root)


if __name__ == '__main__':
    main()
