"""The DALI data path (``--data-backend dali``): DeiT's train and evaluation transforms decoded and augmented by
NVIDIA DALI, on the GPU ("mixed" decoding, GPU operators) or, without one, the same pipeline on the CPU.

The files are those the samplers of ``datasets.build_samplers`` pick, read here and fed to DALI through
``fn.external_source``, so that epoch order, repeated augmentation, sharding and resume are the PIL loader's. The
random crop is timm's own (``RandomResizedCropAndInterpolation.get_params`` on each file's header, with Python's
``random``, which checkpoints keep); DALI decodes only that region. Flip and RandAugment are drawn inside the pipeline:
the policy is the one timm builds from ``--aa`` (its ops, the layers, each layer's probability, the magnitude's
noise and bound, and the parameter each magnitude gives, read from timm's own level functions) and the pixels are
DALI's auto-augment operations. DALI normalises; random erasing runs on the batch with timm's
``RandomErasing(device=...)``, as timm's prefetcher does.
"""
import argparse
import io
import math
import os
import random
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.auto_augment import AugmentOp, RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import BatchSampler

from datasets import (EVAL_BATCH_FACTOR, IMAGE_READ_ERRORS, SMALL_INPUT_SIZE, UnreadableImageError, build_samplers,
                      build_transform, train_drops_last)
from launch import LaunchEnvironment
from utils import UserError

DALI_INSTALL = 'pip install nvidia-dali-cuda130'
FILE_DATA_SETS = ('IMNET', 'SHAPES', 'INAT', 'INAT19')  # the data sets read from image files
PIXEL_SCALE = 255.0  # DALI normalises uint8 pixels: ImageNet's mean and std times this
FLIP_PROBABILITY = 0.5
# timm's magnitudes run from 0 to 10 (its _LEVEL_DENOM); DALI draws them in steps of a tenth, its bins.
MAGNITUDE_DENOM = 10
BINS_PER_MAGNITUDE = 10
# Batches in flight: decoded and augmented by DALI's threads (and the GPU) while the step runs.
PREFETCH_BATCHES = 2
# Batches whose files are read ahead of those in flight, each by a thread of its own.
READ_AHEAD_BATCHES = 4
DALI_INTERPOLATIONS = {'bicubic': 'INTERP_CUBIC', 'bilinear': 'INTERP_LINEAR', 'nearest': 'INTERP_NN',
                       'lanczos': 'INTERP_LANCZOS3'}


def import_dali() -> Any:
    """``nvidia.dali``, or one line saying how to install it."""
    try:
        import nvidia.dali
    except ImportError:
        raise UserError(f'--data-backend dali needs NVIDIA DALI: {DALI_INSTALL}') from None
    return nvidia.dali


# ---------------------------------------------------------------------------------------------
# RandAugment: timm's policy, DALI's operations
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OpMapping:
    """How a timm RandAugment op becomes a DALI auto-augment operation: ``dali_name`` in
    ``nvidia.dali.auto_aug.augmentations``, whether DALI negates the magnitude at random (timm's ``_randomly_negate``),
    and ``value(args)``, the magnitude DALI's operation takes, from the arguments timm's level function gives."""
    dali_name: str
    signed: bool = False
    value: Optional[Callable[[tuple], float]] = None
    to_param: Optional[Callable[[float], Any]] = None


def _posterize_mask(bits: float) -> np.ndarray:
    """The uint8 mask that keeps the top ``bits`` bits (timm: 8 or more keeps the image, 0 blackens it)."""
    kept = int(min(max(bits, 0), 8))
    return np.array((0xFF << (8 - kept)) & 0xFF, dtype=np.uint8)


def _first(args: tuple) -> float:
    return args[0]


def _unsigned(args: tuple) -> float:
    return abs(args[0])


def _factor_shift(args: tuple) -> float:
    # DALI's enhance operations take 1 + magnitude as the PIL enhancement factor.
    return args[0] - 1.0


def _unsigned_factor_shift(args: tuple) -> float:
    return abs(args[0] - 1.0)


# timm's RandAugment op names (timm.data.auto_augment.NAME_TO_OP) that have a DALI operation.
TIMM_TO_DALI_OPS = {
    'AutoContrast': OpMapping('auto_contrast'),
    'Equalize': OpMapping('equalize'),
    'Invert': OpMapping('invert'),
    'Rotate': OpMapping('rotate', signed=True, value=_unsigned),
    'ShearX': OpMapping('shear_x', signed=True, value=_unsigned),
    'ShearY': OpMapping('shear_y', signed=True, value=_unsigned),
    'TranslateXRel': OpMapping('translate_x', signed=True, value=_unsigned),
    'TranslateYRel': OpMapping('translate_y', signed=True, value=_unsigned),
    'TranslateX': OpMapping('translate_x_no_shape', signed=True, value=_unsigned),
    'TranslateY': OpMapping('translate_y_no_shape', signed=True, value=_unsigned),
    'Posterize': OpMapping('posterize', value=_first, to_param=_posterize_mask),
    'PosterizeIncreasing': OpMapping('posterize', value=_first, to_param=_posterize_mask),
    'PosterizeOriginal': OpMapping('posterize', value=_first, to_param=_posterize_mask),
    'Solarize': OpMapping('solarize', value=_first, to_param=np.int32),
    'SolarizeIncreasing': OpMapping('solarize', value=_first, to_param=np.int32),
    'SolarizeAdd': OpMapping('solarize_add', value=_first, to_param=np.uint8),
    'Color': OpMapping('color', value=_factor_shift),
    'Contrast': OpMapping('contrast', value=_factor_shift),
    'Brightness': OpMapping('brightness', value=_factor_shift),
    'Sharpness': OpMapping('sharpness', value=_factor_shift),
    'ColorIncreasing': OpMapping('color', signed=True, value=_unsigned_factor_shift),
    'ContrastIncreasing': OpMapping('contrast', signed=True, value=_unsigned_factor_shift),
    'BrightnessIncreasing': OpMapping('brightness', signed=True, value=_unsigned_factor_shift),
    'SharpnessIncreasing': OpMapping('sharpness', signed=True, value=_unsigned_factor_shift),
}


def pil_train_parts(args: argparse.Namespace) -> tuple[RandomResizedCropAndInterpolation, Optional[RandAugment]]:
    """The random crop and the RandAugment (None for ``--aa none``) of the PIL train transform the flags build: the
    same crop range and policy, with its hyper-parameters (fill colour, ``translate_const``), on both backends."""
    parts = build_transform(True, args).transforms
    crop = next(t for t in parts if isinstance(t, RandomResizedCropAndInterpolation))
    return crop, next((t for t in parts if isinstance(t, RandAugment)), None)



def check_policy(aa: str, policy: Optional[RandAugment]) -> None:
    """What the DALI path implements of timm's augmentation policies: RandAugment (``rand-...``) with ops that DALI
    has and uniform op choice; anything else stops with one line naming ``--aa``."""
    if policy is None:
        raise UserError(f'--aa {aa}: --data-backend dali implements timm\'s RandAugment (rand-...), not this policy; '
                        'use --data-backend pil')
    if policy.choice_weights is not None:
        raise UserError(f'--aa {aa}: --data-backend dali draws RandAugment ops uniformly; weighted choice needs '
                        '--data-backend pil')
    missing = sorted({op.name for op in policy.ops if op.name not in TIMM_TO_DALI_OPS})
    if missing:
        raise UserError(f'--aa {aa}: --data-backend dali has no operation for {", ".join(missing)}; use '
                        '--data-backend pil')
    if len({(op.prob, op.magnitude, op.magnitude_std, op.magnitude_max) for op in policy.ops}) > 1:
        raise UserError(f'--aa {aa}: --data-backend dali needs one probability and magnitude for all ops')


def magnitude_bound(op: AugmentOp) -> float:
    """timm's clip of a drawn magnitude: ``[0, magnitude_max or 10]``."""
    return op.magnitude_max or MAGNITUDE_DENOM


def dali_augmentation(op: AugmentOp, num_bins: int):
    """DALI's operation for the timm op ``op``, its magnitudes the values timm's level function gives at magnitudes
    0, 0.1, ..., the bound (DALI's explicit magnitude table; the sign, where timm draws one, is DALI's)."""
    from nvidia.dali.auto_aug import augmentations
    mapping = TIMM_TO_DALI_OPS[op.name]
    augmentation = getattr(augmentations, mapping.dali_name)
    if mapping.value is None:
        return augmentation
    magnitudes = np.arange(num_bins, dtype=np.float64) / BINS_PER_MAGNITUDE
    table = np.array([mapping.value(op.level_fn(m, op.hparams)) for m in magnitudes], dtype=np.float32)
    overrides = {'mag_range': table, 'randomly_negate': mapping.signed}
    if mapping.to_param is not None:
        overrides['mag_to_param'] = mapping.to_param
    return augmentation.augmentation(**overrides)


def apply_rand_augment(images, policy: RandAugment, image_size: int, fill_value: float, interp_type) -> tuple:
    """timm's RandAugment on a batch inside a DALI pipeline: ``num_layers`` times, an op drawn uniformly from the
    policy's (with replacement, as timm without weights), applied with the op's probability (else the image passes),
    at a magnitude drawn from N(m, mstd) (uniform in [0, m] for mstd inf) and clipped to [0, bound]. Returns the
    images and each layer's draws: the op index (``len(policy.ops)`` where it was not applied), the magnitude bin
    (tenths) and the sign."""
    from nvidia.dali import fn, math as dali_math, types
    from nvidia.dali.auto_aug import augmentations
    from nvidia.dali.auto_aug.core import select, signed_bin
    first = policy.ops[0]
    bound = magnitude_bound(first)
    num_bins = int(round(bound * BINS_PER_MAGNITUDE)) + 1
    operations = [dali_augmentation(op, num_bins) for op in policy.ops] + [augmentations.identity]
    skip = len(policy.ops)  # the identity's index
    draws = []
    for _ in range(policy.num_layers):
        chosen = fn.random.uniform(values=list(range(len(policy.ops))), dtype=types.INT32)
        applied = fn.random.coin_flip(probability=first.prob, dtype=types.INT32)
        index = chosen * applied + skip * (1 - applied)
        if math.isinf(first.magnitude_std):
            magnitude = fn.random.uniform(range=[0.0, first.magnitude])
        elif first.magnitude_std > 0:
            magnitude = fn.random.normal(mean=first.magnitude, stddev=first.magnitude_std)
        else:
            magnitude = types.Constant(float(first.magnitude))
        magnitude = dali_math.clamp(magnitude, 0.0, float(bound))
        # DALI's cast rounds to the nearest integer: the magnitude's nearest tenth.
        magnitude_bin = signed_bin(fn.cast(magnitude * BINS_PER_MAGNITUDE, dtype=types.INT32))
        images = select(operations, index, images, magnitude_bin=magnitude_bin, num_magnitude_bins=num_bins,
                        shape=[image_size, image_size, 3], fill_value=fill_value, interp_type=interp_type)
        draws += [index, magnitude_bin.bin, magnitude_bin.random_sign]
    return images, draws


# ---------------------------------------------------------------------------------------------
# Pipelines
# ---------------------------------------------------------------------------------------------

ENCODED, LABELS, CROP_ANCHOR, CROP_SHAPE, RESIZE_W, RESIZE_H = (
    'encoded', 'labels', 'crop_anchor', 'crop_shape', 'resize_w', 'resize_h')


def normalised(images):
    from nvidia.dali import fn, types
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout='CHW',
                                    mean=[PIXEL_SCALE * m for m in IMAGENET_DEFAULT_MEAN],
                                    std=[PIXEL_SCALE * s for s in IMAGENET_DEFAULT_STD])


def train_pipeline(batch_size: int, num_threads: int, device_id: Optional[int], seed: int, depth: int,
                   image_size: int, interpolation: str, policy: Optional[RandAugment], fill_value: float,
                   policy_draws: bool = False):
    """DeiT's train transform: the given crop decoded (only that region, on the GPU where there is one), resized to
    ``image_size`` (antialiased), flipped with probability 0.5, RandAugment, normalised. Outputs the images and the
    labels, and with ``policy_draws`` the flips and RandAugment's draws too (to check their distribution)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(enable_conditionals=policy is not None)
    def pipeline():
        encoded = fn.external_source(name=ENCODED, dtype=types.UINT8)
        labels = fn.external_source(name=LABELS, dtype=types.INT64)
        anchor = fn.external_source(name=CROP_ANCHOR, dtype=types.FLOAT)
        shape = fn.external_source(name=CROP_SHAPE, dtype=types.FLOAT)
        images = fn.decoders.image_slice(encoded, anchor, shape, device='mixed' if device_id is not None else 'cpu',
                                         output_type=types.RGB, axis_names='WH', normalized_anchor=False,
                                         normalized_shape=False, adjust_orientation=False)
        images = fn.resize(images, size=[image_size, image_size], antialias=True,
                           interp_type=getattr(types, DALI_INTERPOLATIONS[interpolation]))
        flips = fn.random.coin_flip(probability=FLIP_PROBABILITY)
        images = fn.flip(images, horizontal=flips)
        draws = []
        if policy is not None:
            # DALI's rotate and warp interpolate linearly or by nearest neighbour only.
            images, draws = apply_rand_augment(images, policy, image_size, fill_value, types.INTERP_LINEAR)
        return (normalised(images), labels, flips, *draws) if policy_draws else (normalised(images), labels)

    return pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=seed,
                    prefetch_queue_depth=depth)


def eval_pipeline(batch_size: int, num_threads: int, device_id: Optional[int], depth: int, image_size: int):
    """DeiT's evaluation transform: decoded, resized (bicubic, antialiased) to the given size, centre-cropped to
    ``image_size`` at the given position, normalised."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipeline():
        encoded = fn.external_source(name=ENCODED, dtype=types.UINT8)
        labels = fn.external_source(name=LABELS, dtype=types.INT64)
        resize_w = fn.external_source(name=RESIZE_W, dtype=types.FLOAT)
        resize_h = fn.external_source(name=RESIZE_H, dtype=types.FLOAT)
        anchor = fn.external_source(name=CROP_ANCHOR, dtype=types.FLOAT)
        images = fn.decoders.image(encoded, device='mixed' if device_id is not None else 'cpu',
                                   output_type=types.RGB, adjust_orientation=False)
        images = fn.resize(images, resize_x=resize_w, resize_y=resize_h, antialias=True,
                           interp_type=types.INTERP_CUBIC)
        images = fn.slice(images, anchor, types.Constant(np.array([image_size, image_size], dtype=np.float32)),
                          axis_names='WH', normalized_anchor=False, normalized_shape=False)
        return normalised(images), labels

    return pipeline(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
                    prefetch_queue_depth=depth)


# ---------------------------------------------------------------------------------------------
# Per-sample inputs the pipelines take, computed from each file's header
# ---------------------------------------------------------------------------------------------

def image_size_of(data: np.ndarray) -> tuple[int, int]:
    """``(width, height)`` from an encoded image's header, without decoding it: nvImageCodec's parser (DALI's own
    decoder library, 6 us an image against PIL's 100), PIL's for what it does not parse (PIL then names the
    problem)."""
    from nvidia import nvimgcodec
    try:
        stream = nvimgcodec.CodeStream(data)
        return stream.width, stream.height
    except Exception:  # noqa: BLE001 - nvImageCodec reports an unparsable stream as a plain RuntimeError
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return image.size


def train_inputs(sizes: Sequence[tuple[int, int]], scale: tuple[float, float],
                 ratio: tuple[float, float]) -> dict[str, list]:
    """timm's random crop of every image (``(top, left, height, width)`` from Python's ``random``), as DALI's
    ``[x, y]`` anchors and ``[w, h]`` shapes."""
    anchors, shapes = [], []
    for image_width, image_height in sizes:
        # All get_params reads of an image is its size: an empty tensor of that height and width has it.
        stand_in = torch.empty((0, image_height, image_width))
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(stand_in, scale, ratio)
        anchors.append(np.array([left, top], dtype=np.float32))
        shapes.append(np.array([width, height], dtype=np.float32))
    return {CROP_ANCHOR: anchors, CROP_SHAPE: shapes}


def eval_inputs(sizes: Sequence[tuple[int, int]], resize_size: int, image_size: int) -> dict[str, list]:
    """torchvision's ``Resize(resize_size)`` (the shorter side to ``resize_size``, the longer scaled and truncated)
    and ``CenterCrop(image_size)`` (offsets rounded) of every image, as DALI's per-sample resize and crop anchor."""
    inputs: dict[str, list] = {RESIZE_W: [], RESIZE_H: [], CROP_ANCHOR: []}
    for width, height in sizes:
        if width <= height:
            resized = (resize_size, int(resize_size * height / width))
        else:
            resized = (int(resize_size * width / height), resize_size)
        inputs[RESIZE_W].append(np.array(resized[0], dtype=np.float32))
        inputs[RESIZE_H].append(np.array(resized[1], dtype=np.float32))
        inputs[CROP_ANCHOR].append(np.array([int(round((extent - image_size) / 2.0)) for extent in resized],
                                            dtype=np.float32))
    return inputs


def unreadable_reason(data: np.ndarray) -> Optional[str]:
    """Why PIL cannot decode a file's bytes (what the PIL loader would fail on), or None."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            image.convert('RGB')
    except IMAGE_READ_ERRORS as err:
        return f'{type(err).__name__}: {err}'
    return None


# ---------------------------------------------------------------------------------------------
# The loader
# ---------------------------------------------------------------------------------------------

@dataclass
class Batch:
    """A batch on its way through the pipeline: the dataset indices and the files' bytes and sizes."""
    indices: list[int]
    encoded: list[np.ndarray]
    sizes: list[tuple[int, int]]


class DaliLoader:
    """An iterable of ``(images, targets)`` batches on ``device``, in the order ``sampler`` gives, like a DataLoader
    (``len``, ``sampler``, ``batch_size``, ``dataset``): the files of the next batches are read by threads and
    decoded and augmented by DALI while the step runs."""

    def __init__(self, dataset, sampler, batch_size: int, drop_last: bool, make_pipeline: Callable[[int, int], Any],
                 make_inputs: Callable[[list[tuple[int, int]]], dict[str, list]], device: torch.device,
                 skip_bad_images: bool, after: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.dataset = dataset
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.make_pipeline = make_pipeline
        self.make_inputs = make_inputs
        self.device = device
        self.skip_bad_images = skip_bad_images
        self.after = after
        self.bad_paths: set[str] = set()
        self._readers = ThreadPoolExecutor(READ_AHEAD_BATCHES, thread_name_prefix='dali-read')
        self._built = None
        self._primed = False

    def _batch_sampler(self) -> BatchSampler:
        """The index batches a DataLoader with this sampler, batch size and ``drop_last`` reads."""
        return BatchSampler(self.sampler, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return len(self._batch_sampler())

    def _read(self, index: int) -> tuple[int, np.ndarray, tuple[int, int]]:
        """The sample at ``index`` or, where that file cannot be read and bad images are skipped, the next readable
        one (as the PIL loader does): ``(index read, bytes, size)``."""
        samples = self.dataset.samples
        for offset in range(len(samples)):
            at = (index + offset) % len(samples)
            path = samples[at][0]
            if path in self.bad_paths:
                continue
            try:
                data = np.fromfile(path, dtype=np.uint8)
                return at, data, image_size_of(data)
            except IMAGE_READ_ERRORS as err:
                self._unreadable(path, f'{type(err).__name__}: {err}')
        raise UnreadableImageError(f'no readable image among the {len(samples)} samples of this dataset')

    def _unreadable(self, path: str, reason: str) -> None:
        if not self.skip_bad_images:
            raise UnreadableImageError(f'cannot read image {path}: {reason}')
        if path not in self.bad_paths:
            self.bad_paths.add(path)
            warnings.warn(f'skipping unreadable image {path}: {reason}', RuntimeWarning, stacklevel=2)

    def _load(self, indices: list[int]) -> Batch:
        """A batch's files, read one after the other by one of the reading threads (a thread per file cost twice the
        reading itself in hand-offs); the threads read batches ahead in parallel."""
        read = [self._read(index) for index in indices]
        return Batch([r[0] for r in read], [r[1] for r in read], [r[2] for r in read])

    def _feed(self, pipeline, batch: Batch) -> None:
        labels = [np.array(self.dataset.samples[i][1], dtype=np.int64) for i in batch.indices]
        for name, data in {ENCODED: batch.encoded, LABELS: labels, **self.make_inputs(batch.sizes)}.items():
            pipeline.feed_input(name, data)

    def _find_unreadable(self, batches: Sequence[Batch], error: Exception) -> None:
        """After DALI failed on a batch: name the file PIL cannot decode either (or pass DALI's error on)."""
        found = False
        for batch in batches:
            for index, data in zip(batch.indices, batch.encoded):
                path = self.dataset.samples[index][0]
                reason = unreadable_reason(data)
                if reason is not None:
                    self._unreadable(path, reason)
                    found = True
        if not found:
            raise error

    def _to_torch(self, outputs) -> tuple[torch.Tensor, torch.Tensor]:
        from nvidia.dali.plugin.pytorch import feed_ndarray
        images_out, labels_out = outputs[:2]
        images_out = images_out.as_tensor()
        images = torch.empty(images_out.shape(), dtype=torch.float32, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == 'cuda' else None
        feed_ndarray(images_out, images, cuda_stream=stream)
        targets = torch.from_numpy(np.asarray(labels_out.as_tensor()).reshape(-1).copy())
        return images, targets.to(self.device, non_blocking=True)

    def _pipeline(self):
        """The pipeline, built once (a train pipeline with RandAugment takes seconds to build), with a seed drawn
        from Python's ``random``; built again only after DALI failed on a file."""
        if self._built is None:
            self._built = self.make_pipeline(random.getrandbits(31), min(PREFETCH_BATCHES, max(len(self), 1)))
            self._primed = False
        return self._built

    def _schedule(self, runs: int) -> None:
        """Run the pipeline on ``runs`` fed batches: its first ``schedule_run`` runs as many as its prefetch depth,
        every later one a single batch."""
        if not self._primed:
            self._built.schedule_run()
            self._primed = True
            runs -= self._built.prefetch_queue_depth
        for _ in range(runs):
            self._built.schedule_run()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = deque(self._batch_sampler())
        loading: deque[Future] = deque()  # files being read, in order, ahead of the pipeline
        in_flight: deque[Batch] = deque()  # fed to the pipeline, outputs not taken yet

        def read_ahead() -> None:
            while batches and len(loading) < READ_AHEAD_BATCHES:
                loading.append(self._readers.submit(self._load, batches.popleft()))

        def feed(count: int) -> None:
            for _ in range(count):
                batch = loading.popleft().result()
                self._feed(self._pipeline(), batch)
                in_flight.append(batch)
                read_ahead()
            self._schedule(count)

        read_ahead()
        feed(min(PREFETCH_BATCHES, len(loading)))
        while in_flight:
            try:
                outputs = self._built.outputs()
            except RuntimeError as err:
                # The pipeline cannot go on: name the unreadable files (or stop), then read again what was in flight.
                self._find_unreadable(in_flight, err)
                for batch in reversed(in_flight):
                    loading.appendleft(self._readers.submit(self._load, batch.indices))
                in_flight.clear()
                self._built = None
                feed(min(PREFETCH_BATCHES, len(loading)))
                continue
            in_flight.popleft()
            images, targets = self._to_torch(outputs)
            if loading:
                feed(1)
            if self.after is not None:
                images = self.after(images)
            yield images, targets


# ---------------------------------------------------------------------------------------------
# Flags and loaders
# ---------------------------------------------------------------------------------------------

def check_dali_flags(args: argparse.Namespace) -> None:
    """What ``--data-backend dali`` cannot do, refused before any work with one line naming the flag."""
    import_dali()
    if args.data_set not in FILE_DATA_SETS:
        raise UserError(f'--data-set {args.data_set}: --data-backend dali reads image files ({", ".join(FILE_DATA_SETS)}); '
                        'use --data-backend pil')
    if args.ThreeAugment or args.src:
        raise UserError(f'--{"ThreeAugment" if args.ThreeAugment else "src"}: --data-backend dali implements DeiT\'s '
                        'RandAugment transform; use --data-backend pil')
    if args.input_size <= SMALL_INPUT_SIZE:
        raise UserError(f'--input-size {args.input_size}: inputs of {SMALL_INPUT_SIZE} px and less are padded and '
                        'cropped (DeiT\'s CIFAR transform), which --data-backend dali does not do; use --data-backend pil')
    if args.train_interpolation not in DALI_INTERPOLATIONS:
        raise UserError(f'--train-interpolation {args.train_interpolation}: --data-backend dali takes '
                        f'{", ".join(DALI_INTERPOLATIONS)}')
    if args.aa in ('', 'none'):
        if args.color_jitter > 0:
            raise UserError('--color-jitter: with --aa none timm applies ColorJitter, which --data-backend dali does '
                            'not implement; pass --color-jitter 0 or use --data-backend pil')
    else:
        check_policy(args.aa, pil_train_parts(args)[1])


def fill_value_of(policy: Optional[RandAugment]) -> float:
    """DALI fills with one grey level: the mean of timm's per-channel fill colour (its ``img_mean``)."""
    if policy is None:
        return 0.0
    return float(np.mean(policy.ops[0].kwargs['fillcolor']))


def build_dali_loaders(args: argparse.Namespace, dataset_train, dataset_val, launch: LaunchEnvironment,
                       device: torch.device) -> tuple[DaliLoader, DaliLoader]:
    """The train and evaluation loaders of ``--data-backend dali`` on ``device`` (DALI on its GPU, else on the
    CPU with ``--num_workers`` threads), over the samplers the PIL loaders use."""
    import_dali()
    sampler_train, sampler_val = build_samplers(args, dataset_train, dataset_val, launch)
    device_id = device.index if device.type == 'cuda' else None
    threads = max(args.num_workers, 1)
    crop, policy = pil_train_parts(args)
    fill_value = fill_value_of(policy)
    size = args.input_size
    eval_batch = int(EVAL_BATCH_FACTOR * args.batch_size)
    erasing = (RandomErasing(args.reprob, mode=args.remode, max_count=args.recount, num_splits=0, device=device)
               if args.reprob > 0 else None)
    loader_train = DaliLoader(
        dataset_train, sampler_train, args.batch_size, train_drops_last(sampler_train, args.batch_size),
        lambda seed, depth: built(train_pipeline(args.batch_size, threads, device_id, seed, depth, size,
                                                 args.train_interpolation, policy, fill_value)),
        lambda sizes: train_inputs(sizes, crop.scale, crop.ratio), device, args.skip_bad_images, after=erasing)
    resize_size = int(size / args.eval_crop_ratio)
    loader_val = DaliLoader(
        dataset_val, sampler_val, eval_batch, False,
        lambda seed, depth: built(eval_pipeline(eval_batch, threads, device_id, depth, size)),
        lambda sizes: eval_inputs(sizes, resize_size, size), device, args.skip_bad_images)
    return loader_train, loader_val


def built(pipeline):
    pipeline.build()
    return pipeline
