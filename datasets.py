"""Datasets and transforms for DeiT-style training.

Rebuilds DeiT's ``datasets.py`` on timm 1.x and adds ``shapes``, a small
synthetic image-classification dataset generated offline so that the whole
training pipeline can run end to end without downloading anything.

Also runnable as a script to write the shapes dataset::

    python datasets.py --make-shapes DIR [--num-classes N --train-per-class N
                                          --val-per-class N --image-size N --seed S]
"""
from __future__ import annotations

import argparse
import colorsys
import json
import math
import os
import shutil
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw, ImageFilter, ImageOps
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import Dataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import InterpolationMode

__all__ = [
    'build_dataset', 'build_transform', 'new_data_aug_generator', 'make_shapes_dataset',
    'CheckedImageFolder', 'INatDataset', 'GrayScale', 'Solarization', 'GaussianBlur',
]

DATA_SETS = ('CIFAR', 'CIFAR10', 'CIFAR100', 'IMNET', 'INAT', 'INAT19', 'SHAPES')
IMAGENET_NUM_CLASSES = 1000
DEFAULT_EVAL_CROP_RATIO = 0.875
# DeiT treats inputs this small as CIFAR-sized: crop with padding instead of rescaling.
SMALL_INPUT_SIZE = 32
CROP_PADDING = 4
THREE_AUG_CROP_SCALE = (0.08, 1.0)
BLUR_RADIUS_RANGE = (0.1, 2.0)
INAT_YEARS = {'INAT': 2018, 'INAT19': 2019}
TRAIN_SPLIT, VAL_SPLIT = 'train', 'val'

SHAPES_NUM_CLASSES = 10
SHAPES_TRAIN_PER_CLASS = 26
SHAPES_VAL_PER_CLASS = 10
SHAPES_IMAGE_SIZE = 64
# Below this the shapes are only a few pixels wide and no longer tell apart.
MIN_SHAPES_IMAGE_SIZE = 16
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

_IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def _data_path_error(path: str, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what} not found: {path} (fix --data-path)")


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------

class _SafeLoadingMixin:
    """``__getitem__`` that names unreadable images and can optionally skip them.

    Subclasses provide ``samples`` (list of ``(path, target)``), ``loader``,
    ``transform``, ``target_transform`` and ``skip_bad_images``.
    """

    samples: list[tuple[str, int]]
    loader: Callable[[str], Any]
    transform: Optional[Callable]
    target_transform: Optional[Callable]
    skip_bad_images: bool

    def _warn_bad_image(self, path: str, err: Exception) -> None:
        # Each DataLoader worker holds its own copy, so this is once per file per worker.
        warned = self.__dict__.setdefault('_warned_bad_paths', set())
        if path not in warned:
            warned.add(path)
            warnings.warn(f"skipping unreadable image {path}: {err}", RuntimeWarning, stacklevel=3)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        num_samples = len(self.samples)
        for offset in range(num_samples):
            path, target = self.samples[(index + offset) % num_samples]
            try:
                sample = self.loader(path)
            except _IMAGE_READ_ERRORS as err:
                if not self.skip_bad_images:
                    raise RuntimeError(f"cannot read image {path}: {err}") from err
                self._warn_bad_image(path, err)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise RuntimeError(f"no readable image among the {num_samples} samples of this dataset")


class CheckedImageFolder(_SafeLoadingMixin, datasets.ImageFolder):
    """ImageFolder that rejects missing/empty folders and reports unreadable images by name."""

    def __init__(
            self,
            root: str,
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            loader: Callable[[str], Any] = default_loader,
            skip_bad_images: bool = False,
    ) -> None:
        if not os.path.isdir(root):
            raise _data_path_error(root, 'image folder')
        # Empty classes are reported below with the folder name instead of torchvision's message.
        super().__init__(
            root, transform=transform, target_transform=target_transform, loader=loader, allow_empty=True)
        self.skip_bad_images = skip_bad_images
        counts = np.bincount(np.asarray(self.targets, dtype=np.int64), minlength=len(self.classes))
        empty = [os.path.join(root, name) for name, count in zip(self.classes, counts) if count == 0]
        if empty:
            shown = ', '.join(empty[:3]) + (f' (+{len(empty) - 3} more)' if len(empty) > 3 else '')
            raise ValueError(f"no images found in class folder {shown}; expected files ending in {IMG_EXTENSIONS}")

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        try:
            return super().find_classes(directory)
        except FileNotFoundError as err:
            # torchvision reports a folder without class sub-folders as missing; it exists but is empty.
            raise ValueError(f"no class folders with images found in {directory}") from err


class INatDataset(_SafeLoadingMixin, datasets.VisionDataset):
    """iNaturalist 2018/2019 read from its json annotations.

    Targets are taken at taxonomy level ``category`` (e.g. 'name', 'genus', 'family', 'kingdom').
    Labels are numbered in order of first appearance in the train annotations, as DeiT does,
    so that label indices stay compatible with DeiT-trained iNat checkpoints.
    """

    def __init__(
            self,
            root: str,
            train: bool = True,
            year: int = 2018,
            category: str = 'name',
            transform: Optional[Callable] = None,
            target_transform: Optional[Callable] = None,
            loader: Callable[[str], Any] = default_loader,
            skip_bad_images: bool = False,
    ) -> None:
        super().__init__(root, transform=transform, target_transform=target_transform)
        self.loader = loader
        self.skip_bad_images = skip_bad_images
        self.year = year
        split_json = os.path.join(root, f"{TRAIN_SPLIT if train else VAL_SPLIT}{year}.json")
        train_json = os.path.join(root, f"{TRAIN_SPLIT}{year}.json")
        categories = {int(c['id']): c for c in self._read_json(os.path.join(root, 'categories.json'))}
        split_data = self._read_json(split_json)
        train_data = split_data if train else self._read_json(train_json)

        first = next(iter(categories.values()), {})
        if category not in first:
            raise ValueError(f"unknown --inat-category {category!r}; available: {sorted(first)}")

        class_to_idx: dict[str, int] = {}
        for ann in train_data['annotations']:
            class_to_idx.setdefault(categories[int(ann['category_id'])][category], len(class_to_idx))
        self.class_to_idx = class_to_idx
        self.classes = list(class_to_idx)
        self.nb_classes = len(self.classes)

        image_category = {ann['image_id']: int(ann['category_id']) for ann in split_data['annotations']}
        file_names = [img['file_name'] for img in split_data['images']]
        resolve = self._path_resolver(root, file_names)
        self.samples = []
        for img in split_data['images']:
            if img['id'] not in image_category:
                raise ValueError(f"image {img['file_name']} has no annotation in {split_json}")
            label = class_to_idx[categories[image_category[img['id']]][category]]
            self.samples.append((resolve(img['file_name']), label))
        self.targets = [target for _, target in self.samples]

    @staticmethod
    def _read_json(path: str) -> Any:
        if not os.path.isfile(path):
            raise _data_path_error(path, 'iNaturalist annotation file')
        with open(path) as f:
            return json.load(f)

    @staticmethod
    def _path_resolver(root: str, file_names: Sequence[str]) -> Callable[[str], str]:
        """Pick the on-disk layout once, from the first image.

        Official archives keep ``<split>/<supercategory>/<id>/<file>`` as in the json;
        DeiT's loader expected the supercategory level removed. Both layouts are accepted.
        """
        def official(name: str) -> str:
            return os.path.join(root, name)

        def without_supercategory(name: str) -> str:
            parts = name.split('/')
            return os.path.join(root, parts[0], *parts[2:])

        if file_names and not os.path.exists(official(file_names[0])) \
                and os.path.exists(without_supercategory(file_names[0])):
            return without_supercategory
        return official

    def __len__(self) -> int:
        return len(self.samples)


def _build_cifar(cls: type, is_train: bool, args: argparse.Namespace, transform: Callable) -> Dataset:
    download = bool(getattr(args, 'download', False))
    try:
        return cls(args.data_path, train=is_train, transform=transform, download=download)
    except RuntimeError as err:
        if download:
            raise
        folder = os.path.join(args.data_path, cls.base_folder)
        raise FileNotFoundError(
            f"{cls.__name__} files missing or corrupt: {folder} "
            f"(fix --data-path to the folder holding {cls.base_folder}/, or pass --download)") from err


def _has_splits(root: str) -> bool:
    return all(os.path.isdir(os.path.join(root, split)) for split in (TRAIN_SPLIT, VAL_SPLIT))


def _ensure_shapes(root: str) -> None:
    """Generate the shapes dataset in ``root`` once, even when several processes start together."""
    distributed = dist.is_available() and dist.is_initialized()
    # One generator per node (LOCAL_RANK) also covers node-local disks; on a shared
    # disk the rename in make_shapes_dataset resolves the race between nodes.
    is_local_main = not distributed or int(os.environ.get('LOCAL_RANK', dist.get_rank())) == 0
    if is_local_main and not _has_splits(root):
        make_shapes_dataset(root)
    if distributed:
        dist.barrier()


def build_dataset(is_train: bool, args: argparse.Namespace) -> tuple[Dataset, int]:
    """Build the train or eval dataset selected by ``args.data_set``; returns ``(dataset, nb_classes)``."""
    if is_train and getattr(args, 'ThreeAugment', False):
        transform = new_data_aug_generator(args)
    else:
        transform = build_transform(is_train, args)
    split = TRAIN_SPLIT if is_train else VAL_SPLIT
    skip_bad_images = bool(getattr(args, 'skip_bad_images', False))
    name = args.data_set

    if name in ('CIFAR', 'CIFAR100'):
        return _build_cifar(datasets.CIFAR100, is_train, args, transform), 100
    if name == 'CIFAR10':
        return _build_cifar(datasets.CIFAR10, is_train, args, transform), 10
    if name == 'IMNET':
        root = os.path.join(args.data_path, split)
        dataset = CheckedImageFolder(root, transform=transform, skip_bad_images=skip_bad_images)
        if len(dataset.classes) > IMAGENET_NUM_CLASSES:
            raise ValueError(
                f"{root} has {len(dataset.classes)} class folders, more than ImageNet's {IMAGENET_NUM_CLASSES}")
        # Fixed head size so ImageNet checkpoints evaluate on any subset of the classes.
        return dataset, IMAGENET_NUM_CLASSES
    if name in INAT_YEARS:
        if not os.path.isdir(args.data_path):
            raise _data_path_error(args.data_path, 'iNaturalist folder')
        dataset = INatDataset(
            args.data_path, train=is_train, year=INAT_YEARS[name], category=args.inat_category,
            transform=transform, skip_bad_images=skip_bad_images)
        return dataset, dataset.nb_classes
    if name == 'SHAPES':
        if not args.data_path:
            raise FileNotFoundError('--data-set SHAPES needs --data-path: the folder to generate it in (or read it from)')
        _ensure_shapes(args.data_path)
        dataset = CheckedImageFolder(
            os.path.join(args.data_path, split), transform=transform, skip_bad_images=skip_bad_images)
        return dataset, len(dataset.classes)
    raise ValueError(f"unknown --data-set {name!r}; choose one of {', '.join(DATA_SETS)}")


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------

def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    if bits_to_keep <= 0:
        # Keeping no bits blackens the image, which is what Pillow did before it rejected 0.
        return img.point(lambda _: 0)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _allow_zero_bit_posterize(transform: Callable) -> None:
    """Make timm's posterize ops accept 0 bits.

    'PosterizeIncreasing' maps magnitude 10 (reachable with DeiT's default
    ``rand-m9-mstd0.5-inc1``) to 0 bits, which Pillow 13 rejects with a ValueError
    that would abort training at a random step.
    """
    for t in getattr(transform, 'transforms', []):
        ops = list(getattr(t, 'ops', []))
        for sub_policy in getattr(t, 'policy', []):
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, 'aug_fn', None) is auto_augment.posterize:
                op.aug_fn = _posterize_any_bits


def build_transform(is_train: bool, args: argparse.Namespace) -> Callable:
    """DeiT's train (timm RandAugment/RandomErasing) or eval (resize + center crop) transform."""
    if is_train:
        auto_augment = None if args.aa in (None, '', 'none') else args.aa
        transform = create_transform(
            input_size=args.input_size,
            is_training=True,
            color_jitter=args.color_jitter,
            auto_augment=auto_augment,
            interpolation=args.train_interpolation,
            re_prob=args.reprob,
            re_mode=args.remode,
            re_count=args.recount,
        )
        _allow_zero_bit_posterize(transform)
        if args.input_size <= SMALL_INPUT_SIZE:
            # Rescaling crops of tiny images destroys them; pad-and-crop as for CIFAR instead.
            transform.transforms[0] = transforms.RandomCrop(args.input_size, padding=CROP_PADDING)
        return transform

    crop_ratio = getattr(args, 'eval_crop_ratio', DEFAULT_EVAL_CROP_RATIO)
    # DeiT evaluates CIFAR-sized inputs uncropped; resizing to the input size keeps that (an identity on
    # 32 px CIFAR images) and still fits larger images to the model.
    resize_size = int(args.input_size / crop_ratio) if args.input_size > SMALL_INPUT_SIZE else args.input_size
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class _RandomApply(torch.nn.Module):
    """Base for PIL transforms applied with probability ``p`` (torch RNG, so workers are seeded)."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__()
        self.p = p

    def apply(self, img: Image.Image) -> Image.Image:
        raise NotImplementedError

    def forward(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() < self.p:
            return self.apply(img)
        return img

    def extra_repr(self) -> str:
        return f"p={self.p}"


class GrayScale(_RandomApply):
    """Convert to grayscale, keeping three channels."""

    def apply(self, img: Image.Image) -> Image.Image:
        return ImageOps.grayscale(img).convert('RGB')


class Solarization(_RandomApply):
    """Invert all pixel values above ``threshold``."""

    def __init__(self, p: float = 1.0, threshold: int = 128) -> None:
        super().__init__(p)
        self.threshold = threshold

    def apply(self, img: Image.Image) -> Image.Image:
        return ImageOps.solarize(img, threshold=self.threshold)


class GaussianBlur(_RandomApply):
    """Gaussian blur with a radius drawn uniformly from ``radius_range``."""

    def __init__(self, p: float = 1.0, radius_range: tuple[float, float] = BLUR_RADIUS_RANGE) -> None:
        super().__init__(p)
        self.radius_range = radius_range

    def apply(self, img: Image.Image) -> Image.Image:
        low, high = self.radius_range
        radius = low + (high - low) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))


def new_data_aug_generator(args: argparse.Namespace) -> Callable:
    """DeiT III's ThreeAugment train transform: crop + flip, then one of gray/solarize/blur."""
    img_size = args.input_size
    if getattr(args, 'src', False):
        primary = [
            transforms.Resize(img_size, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomCrop(img_size, padding=CROP_PADDING, padding_mode='reflect'),
        ]
    else:
        primary = [RandomResizedCropAndInterpolation(img_size, scale=THREE_AUG_CROP_SCALE, interpolation='bicubic')]
    primary.append(transforms.RandomHorizontalFlip())

    secondary: list[Callable] = [transforms.RandomChoice([GrayScale(p=1.0), Solarization(p=1.0), GaussianBlur(p=1.0)])]
    color_jitter = getattr(args, 'color_jitter', None)
    if color_jitter:
        secondary.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))

    final = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(primary + secondary + final)


# ---------------------------------------------------------------------------
# Built-in "shapes" dataset
# ---------------------------------------------------------------------------

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


def _shape_mask(shape: str, size: int, cx: float, cy: float, radius: float, angle: float) -> Image.Image:
    mask = Image.new('L', (size, size), 0)
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


def _render_shape(rng: np.random.Generator, class_idx: int, image_size: int) -> Image.Image:
    shape = SHAPE_NAMES[class_idx % len(SHAPE_NAMES)]
    radius = rng.uniform(*SHAPE_RADIUS_RANGE) * image_size
    margin = SHAPE_MARGIN * image_size
    cx, cy = rng.uniform(radius + margin, image_size - radius - margin, size=2)
    angle = rng.uniform(0.0, 2 * np.pi)
    mask = np.asarray(_shape_mask(shape, image_size, cx, cy, radius, angle), dtype=np.float32)[..., None] / MAX_PIXEL

    hue = (class_idx * HUE_STEP + rng.uniform(-HUE_JITTER, HUE_JITTER)) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*SATURATION_RANGE), rng.uniform(*VALUE_RANGE)))
    foreground = (colour * MAX_PIXEL).astype(np.float32)
    background = rng.uniform(*BACKGROUND_LEVEL_RANGE) + rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    noise = rng.normal(0.0, PIXEL_NOISE_STD, size=(image_size, image_size, 3))
    pixels = background * (1.0 - mask) + foreground * mask + noise
    return Image.fromarray(np.clip(np.rint(pixels), 0, MAX_PIXEL).astype(np.uint8), mode='RGB')


def make_shapes_dataset(
        root: str,
        num_classes: int = SHAPES_NUM_CLASSES,
        train_per_class: int = SHAPES_TRAIN_PER_CLASS,
        val_per_class: int = SHAPES_VAL_PER_CLASS,
        image_size: int = SHAPES_IMAGE_SIZE,
        seed: int = 0,
) -> str:
    """Write the synthetic shapes dataset as PNGs under ``root/{train,val}/<class>/``; returns ``root``.

    Each class is a distinct shape with its own base hue, drawn at a random position, size,
    rotation and colour jitter on a noisy background. Output is byte-identical for a given seed.
    Splits that already exist are kept: each split is written to a temporary folder and renamed
    into place, so concurrent callers never see a half-written split.
    """
    if num_classes < 1 or train_per_class < 1 or val_per_class < 1:
        raise ValueError("num_classes, train_per_class and val_per_class must all be >= 1")
    if image_size < MIN_SHAPES_IMAGE_SIZE:
        raise ValueError(f"image_size must be >= {MIN_SHAPES_IMAGE_SIZE}, got {image_size}")
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
                    _render_shape(rng, class_idx, image_size).save(
                        os.path.join(class_dir, f"{img_idx:04d}.png"), format='PNG')
            try:
                os.rename(os.path.join(tmp_dir, split), target)
            except OSError:
                if not os.path.isdir(target):
                    raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return root


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Command line entry point: ``--make-shapes DIR`` writes the shapes dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--make-shapes', metavar='DIR', required=True, help='folder to write the shapes dataset to')
    parser.add_argument('--num-classes', type=int, default=SHAPES_NUM_CLASSES)
    parser.add_argument('--train-per-class', type=int, default=SHAPES_TRAIN_PER_CLASS)
    parser.add_argument('--val-per-class', type=int, default=SHAPES_VAL_PER_CLASS)
    parser.add_argument('--image-size', type=int, default=SHAPES_IMAGE_SIZE)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)

    root = os.path.abspath(args.make_shapes)
    if _has_splits(root):
        print(f"{root} already has {TRAIN_SPLIT}/ and {VAL_SPLIT}/; kept as is", file=sys.stderr)
    else:
        start = time.perf_counter()
        make_shapes_dataset(
            root, num_classes=args.num_classes, train_per_class=args.train_per_class,
            val_per_class=args.val_per_class, image_size=args.image_size, seed=args.seed)
        print(f"wrote shapes dataset in {time.perf_counter() - start:.2f}s", file=sys.stderr)
    print(root)


if __name__ == '__main__':
    main()
