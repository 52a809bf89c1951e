"""Datasets and transforms for DeiT-style training (DeiT's ``datasets.py`` on timm 1.x and torchvision).

ImageNet-style folders, CIFAR, iNaturalist 2018/2019 and the built-in offline data set of shapes.py; DeiT's train
and evaluation transforms and DeiT III's ThreeAugment.
"""
from __future__ import annotations

import argparse
import json
import os
import warnings
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from timm.data import Mixup, auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader
from torchvision.transforms import InterpolationMode

from launch import LaunchEnvironment
from samplers import RASampler, ShardedEvalSampler
from shapes import SHAPES_NUM_CLASSES, TRAIN_SPLIT, VAL_SPLIT, ensure_shapes

DATA_SETS = ('CIFAR', 'CIFAR10', 'CIFAR100', 'IMNET', 'INAT', 'INAT19', 'SHAPES')
INAT_CATEGORIES = ('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name')
IMAGENET_NUM_CLASSES = 1000
# DeiT treats inputs this small as CIFAR-sized: crop with padding instead of rescaling.
SMALL_INPUT_SIZE = 32
CROP_PADDING = 4
THREE_AUG_CROP_SCALE = (0.08, 1.0)
BLUR_RADIUS_RANGE = (0.1, 2.0)
SOLARIZE_THRESHOLD = 128
INAT_YEARS = {'INAT': 2018, 'INAT19': 2019}
EVAL_BATCH_FACTOR = 1.5  # DeiT evaluates with 1.5x the training batch

# What reading and decoding a broken or non-image file raises in PIL.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


class UnreadableImageError(RuntimeError):
    """An image file that cannot be read or decoded (``--skip-bad-images`` skips it instead); ``main.py`` prints the
    message's last line, which names the file."""


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
            except IMAGE_READ_ERRORS as err:
                if not self.skip_bad_images:
                    raise UnreadableImageError(f"cannot read image {path}: {err}") from err
                self._warn_bad_image(path, err)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            if self.target_transform is not None:
                target = self.target_transform(target)
            return sample, target
        raise UnreadableImageError(f"no readable image among the {num_samples} samples of this dataset")


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
    try:
        return cls(args.data_path, train=is_train, transform=transform, download=args.download)
    except RuntimeError as err:
        if args.download:
            raise
        folder = os.path.join(args.data_path, cls.base_folder)
        raise FileNotFoundError(
            f"{cls.__name__} files missing or corrupt: {folder} "
            f"(fix --data-path to the folder holding {cls.base_folder}/, or pass --download)") from err


# The class count of the data sets whose flags tell it: ImageNet (whatever subset of folders), CIFAR-100 and -10.
FIXED_NUM_CLASSES = {'IMNET': IMAGENET_NUM_CLASSES, 'CIFAR': 100, 'CIFAR100': 100, 'CIFAR10': 10}


def num_classes_of(args: argparse.Namespace) -> Optional[int]:
    """The class count ``build_dataset`` will give, told before any image is read: from the flags, or for the
    shapes from their class folders (or the count they are drawn with, when not drawn yet); None for iNaturalist,
    whose annotations tell it."""
    if args.data_set in FIXED_NUM_CLASSES:
        return FIXED_NUM_CLASSES[args.data_set]
    if args.data_set == 'SHAPES':
        train = os.path.join(args.data_path, TRAIN_SPLIT)
        if not os.path.isdir(train):
            return SHAPES_NUM_CLASSES
        return sum(entry.is_dir() for entry in os.scandir(train))
    return None


def build_dataset(is_train: bool, args: argparse.Namespace) -> tuple[Dataset, int]:
    """Build the train or eval dataset selected by ``args.data_set``; returns ``(dataset, nb_classes)``."""
    if is_train and args.ThreeAugment:
        transform = new_data_aug_generator(args)
    else:
        transform = build_transform(is_train, args)
    split = TRAIN_SPLIT if is_train else VAL_SPLIT
    skip_bad_images = args.skip_bad_images
    name = args.data_set

    if name in ('CIFAR', 'CIFAR100'):
        return _build_cifar(datasets.CIFAR100, is_train, args, transform), FIXED_NUM_CLASSES[name]
    if name == 'CIFAR10':
        return _build_cifar(datasets.CIFAR10, is_train, args, transform), FIXED_NUM_CLASSES[name]
    if name == 'IMNET':
        root = os.path.join(args.data_path, split)
        dataset = CheckedImageFolder(root, transform=transform, skip_bad_images=skip_bad_images)
        if len(dataset.classes) > IMAGENET_NUM_CLASSES:
            raise ValueError(
                f"{root} has {len(dataset.classes)} class folders, more than ImageNet's {IMAGENET_NUM_CLASSES}")
        # Fixed head size so ImageNet checkpoints evaluate on any subset of the classes.
        return dataset, FIXED_NUM_CLASSES[name]
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
        ensure_shapes(args.data_path)
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

    # DeiT evaluates CIFAR-sized inputs uncropped; resizing to the input size keeps that (an identity on
    # 32 px CIFAR images) and still fits larger images to the model.
    resize_size = (int(args.input_size / args.eval_crop_ratio) if args.input_size > SMALL_INPUT_SIZE
                   else args.input_size)
    return transforms.Compose([
        transforms.Resize(resize_size, interpolation=InterpolationMode.BICUBIC),
        transforms.CenterCrop(args.input_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    ])


class GaussianBlur:
    """PIL's Gaussian blur with a radius drawn uniformly from ``radius_range`` (DeiT III; torch's RNG, so that
    DataLoader workers are seeded)."""

    def __init__(self, radius_range: tuple[float, float] = BLUR_RADIUS_RANGE) -> None:
        self.radius_range = radius_range

    def __call__(self, img: Image.Image) -> Image.Image:
        low, high = self.radius_range
        radius = low + (high - low) * torch.rand(1).item()
        return img.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f'{type(self).__name__}(radius_range={self.radius_range})'


def new_data_aug_generator(args: argparse.Namespace) -> Callable:
    """DeiT III's ThreeAugment train transform: crop + flip, then one of gray/solarize/blur."""
    img_size = args.input_size
    if args.src:
        primary = [
            transforms.Resize(img_size, interpolation=InterpolationMode.BICUBIC),
            transforms.RandomCrop(img_size, padding=CROP_PADDING, padding_mode='reflect'),
        ]
    else:
        primary = [RandomResizedCropAndInterpolation(img_size, scale=THREE_AUG_CROP_SCALE, interpolation='bicubic')]
    primary.append(transforms.RandomHorizontalFlip())

    secondary: list[Callable] = [transforms.RandomChoice([
        transforms.Grayscale(num_output_channels=3),
        transforms.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=1.0),
        GaussianBlur(),
    ])]
    if args.color_jitter:
        secondary.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))

    final = [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(primary + secondary + final)


# ---------------------------------------------------------------------------
# Loaders and mixup
# ---------------------------------------------------------------------------

def build_samplers(args: argparse.Namespace, dataset_train: Dataset, dataset_val: Dataset,
                   launch: LaunchEnvironment) -> tuple[torch.utils.data.Sampler, torch.utils.data.Sampler]:
    """DeiT's samplers: repeated augmentation (or a plain shard) and, with ``--dist-eval``, an unpadded shard of
    the validation set per process; one process shuffles and evaluates everything."""
    if not launch.distributed:
        return RandomSampler(dataset_train), SequentialSampler(dataset_val)
    world, rank = launch.world_size, launch.rank
    if args.repeated_aug:
        sampler_train = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    else:
        sampler_train = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    sampler_val = (ShardedEvalSampler(dataset_val, num_replicas=world, rank=rank) if args.dist_eval
                   else SequentialSampler(dataset_val))
    return sampler_train, sampler_val


def train_drops_last(sampler: torch.utils.data.Sampler, batch_size: int) -> bool:
    """DeiT drops the last partial batch; a data set smaller than one batch still trains on what it has."""
    return len(sampler) >= batch_size


def build_loaders(args: argparse.Namespace, dataset_train: Dataset, dataset_val: Dataset,
                  launch: LaunchEnvironment) -> tuple[DataLoader, DataLoader]:
    """The training and evaluation DataLoaders (``--data-backend pil``): DeiT's samplers, ``--num_workers``
    workers kept between epochs, pinned memory for CUDA."""
    sampler_train, sampler_val = build_samplers(args, dataset_train, dataset_val, launch)
    workers = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and torch.device(args.device).type == 'cuda',
                   persistent_workers=args.num_workers > 0)
    loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                              drop_last=train_drops_last(sampler_train, args.batch_size), **workers)
    loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=int(EVAL_BATCH_FACTOR * args.batch_size),
                            drop_last=False, **workers)
    return loader_train, loader_val


def build_mixup(args: argparse.Namespace, num_classes: int) -> Optional[Mixup]:
    """DeiT's mixup/cutmix (with label smoothing folded into the soft targets), when either is on."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=num_classes)
    return None
