"""The DALI data path (``--data-backend dali``): DeiT's train and evaluation transforms decoded and augmented by
NVIDIA DALI, on the GPU ("mixed" decoding, GPU operators) or, without one, the same pipeline on the CPU.

The files are those the samplers of ``datasets.build_samplers`` pick, read here and fed to DALI through
``fn.external_source``, so that epoch order, repeated augmentation, sharding and resume are the PIL loader's. The
random crop is timm's own (``RandomResizedCropAndInterpolation.get_params`` on each file's header, drawn from a
generator seeded from Python's ``random`` at each epoch's start, which checkpoints keep); DALI decodes only that
region. Flip and RandAugment are drawn inside the pipeline: the policy is the one timm builds from ``--aa`` (its
ops, the layers, each layer's probability, the magnitude's noise and bound, and the parameter each magnitude gives,
read from timm's own level functions) and the pixels are DALI's auto-augment operations. DALI normalises; random
erasing runs on the batch with timm's ``RandomErasing(device=...)``, as timm's prefetcher does. The loader's own
threads read ahead, draw the crops, feed DALI and hand finished batches on the device to the caller's thread.
"""
import argparse
import io
import math
import queue
import random
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from types import FunctionType
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from timm.data.random_erasing import RandomErasing
from timm.data.auto_augment import AugmentOp, RandAugment
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch.utils.data import BatchSampler

from datasets import (EVAL_BATCH_FACTOR, IMAGE_READ_ERRORS, SMALL_INPUT_SIZE, UnreadableImageError, build_loaders,
                      build_samplers, build_transform, train_drops_last)
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
# Batches on the device, waiting for the step, that the loader's thread has taken out of DALI.
READY_BATCHES = 1
# How often the loader's thread, waiting to hand over a batch, looks whether the caller has stopped iterating.
HAND_OVER_POLL_S = 0.1
EPOCH_SEED_BITS = 64
PIPELINE_SEED_BITS = 31  # DALI takes a non-negative 32-bit seed
# The "mixed" JPEG decoder's settings, DALI's defaults (fn.decoders.image and image_slice), named here so that the
# benchmark reports them. The share of images sent to the hardware JPEG decoder (A100, H100: NVJPG engines); the
# others are decoded by nvJPEG's CUDA decoder, whose Huffman stage runs on DALI's host threads for images under
# the threshold in pixels (every ImageNet image: they average 0.19 megapixels), on the GPU above it.
HW_DECODER_LOAD = 0.65
HYBRID_HUFFMAN_THRESHOLD = 1_000_000
DALI_INTERPOLATIONS = {'bicubic': 'INTERP_CUBIC', 'bilinear': 'INTERP_LINEAR', 'nearest': 'INTERP_NN',
                       'lanczos': 'INTERP_LANCZOS3'}


# The stop event of every epoch whose feeding thread runs, set when the interpreter exits: before concurrent.futures
# joins its threads (threading runs its exit calls in the reverse order of their registration, and this module
# registers after importing concurrent.futures), so that an iterator nobody closed (an uncaught error keeps its
# frame alive) does not keep the process from exiting.
_RUNNING_FEEDS: 'weakref.WeakSet[threading.Event]' = weakref.WeakSet()
threading._register_atexit(lambda: [stop.set() for stop in list(_RUNNING_FEEDS)])


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


def fed_input(name: str, dtype):
    """An input the loader feeds. Without a copy: the loader keeps a batch's arrays until DALI's outputs for it are
    taken (a copy of a batch's 12 MB of JPEG bytes took 4 to 18 ms, handing them over 1.4)."""
    from nvidia.dali import fn
    return fn.external_source(name=name, dtype=dtype, no_copy=True)


def decoder_placement(device_id: Optional[int]) -> dict:
    """The decoder's backend: "mixed" (host parsing and Huffman decoding, the rest on the GPU) with the named
    settings, or the CPU without a GPU."""
    if device_id is None:
        return {'device': 'cpu'}
    # Chroma upsampled as libjpeg-turbo does it (the CPU backend, and PIL): DALI's mixed default does it otherwise,
    # 0.02 std units apart per image on average, most of the GPU test's budget for the decoders' rounding.
    return {'device': 'mixed', 'hw_decoder_load': HW_DECODER_LOAD,
            'hybrid_huffman_threshold': HYBRID_HUFFMAN_THRESHOLD, 'jpeg_fancy_upsampling': True}


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
        encoded = fed_input(ENCODED, types.UINT8)
        labels = fed_input(LABELS, types.INT64)
        anchor = fed_input(CROP_ANCHOR, types.FLOAT)
        shape = fed_input(CROP_SHAPE, types.FLOAT)
        images = fn.decoders.image_slice(encoded, anchor, shape, **decoder_placement(device_id),
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
        encoded = fed_input(ENCODED, types.UINT8)
        labels = fed_input(LABELS, types.INT64)
        resize_w = fed_input(RESIZE_W, types.FLOAT)
        resize_h = fed_input(RESIZE_H, types.FLOAT)
        anchor = fed_input(CROP_ANCHOR, types.FLOAT)
        images = fn.decoders.image(encoded, **decoder_placement(device_id), output_type=types.RGB,
                                   adjust_orientation=False)
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


def crop_params_drawn_by(rng: random.Random) -> Callable:
    """timm's ``RandomResizedCropAndInterpolation.get_params`` drawing from ``rng``: timm's own code, which draws
    from the module-level ``random``, with that name bound to ``rng`` (so that the loader's thread draws the crops
    from a generator of its own while other threads draw from Python's)."""
    get_params = RandomResizedCropAndInterpolation.get_params
    return FunctionType(get_params.__code__, {**get_params.__globals__, 'random': rng}, get_params.__name__)


def train_inputs(sizes: Sequence[tuple[int, int]], scale: tuple[float, float], ratio: tuple[float, float],
                 rng: random.Random) -> dict[str, np.ndarray]:
    """timm's random crop of every image (``(top, left, height, width)`` drawn from ``rng``), as DALI's ``[x, y]``
    anchors and ``[w, h]`` shapes, one row per image."""
    get_params = crop_params_drawn_by(rng)
    anchors, shapes = [], []
    for image_width, image_height in sizes:
        # All get_params reads of an image is its size: an empty tensor of that height and width has it.
        stand_in = torch.empty((0, image_height, image_width))
        top, left, height, width = get_params(stand_in, scale, ratio)
        anchors.append((left, top))
        shapes.append((width, height))
    return {CROP_ANCHOR: np.array(anchors, dtype=np.float32), CROP_SHAPE: np.array(shapes, dtype=np.float32)}


def eval_inputs(sizes: Sequence[tuple[int, int]], resize_size: int, image_size: int) -> dict[str, np.ndarray]:
    """torchvision's ``Resize(resize_size)`` (the shorter side to ``resize_size``, the longer scaled and truncated)
    and ``CenterCrop(image_size)`` (offsets rounded) of every image, as DALI's per-sample resize and crop anchor."""
    resized_sizes, anchors = [], []
    for width, height in sizes:
        if width <= height:
            resized = (resize_size, int(resize_size * height / width))
        else:
            resized = (int(resize_size * width / height), resize_size)
        resized_sizes.append(resized)
        anchors.append([int(round((extent - image_size) / 2.0)) for extent in resized])
    resized_array = np.array(resized_sizes, dtype=np.float32).reshape(-1, 2)
    return {RESIZE_W: resized_array[:, 0].copy(), RESIZE_H: resized_array[:, 1].copy(),
            CROP_ANCHOR: np.array(anchors, dtype=np.float32).reshape(-1, 2)}


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
    """A batch on its way through the pipeline: the dataset indices, the files' bytes and sizes, and once fed, the
    arrays DALI reads without a copy (kept until its outputs are taken)."""
    indices: list[int]
    encoded: list[np.ndarray]
    sizes: list[tuple[int, int]]
    fed: dict[str, Any] = field(default_factory=dict)


class DevicePlacementError(RuntimeError):
    """DALI produced a batch on another device than the one the loader feeds."""


def dali_device_id(device: torch.device) -> Optional[int]:
    """The GPU DALI's pipelines run on for ``device``: its index, the current GPU for ``cuda`` without an index,
    None (DALI's CPU backend) for the CPU."""
    if device.type != 'cuda':
        return None
    return device.index if device.index is not None else torch.cuda.current_device()


def output_device(output) -> torch.device:
    """Where a pipeline output (a DALI ``TensorListGPU`` or ``TensorListCPU``) lies."""
    from nvidia.dali.tensors import TensorListGPU
    return torch.device('cuda', output.device_id()) if isinstance(output, TensorListGPU) else torch.device('cpu')


class DaliLoader:
    """An iterable of ``(images, targets)`` batches on ``device``, in the order ``sampler`` gives, like a DataLoader
    (``len``, ``sampler``, ``batch_size``, ``dataset``).

    Two kinds of threads work ahead of the caller: reading threads read the files of the next batches and parse
    their headers; the loader's feeding thread draws the crops, feeds DALI, takes DALI's outputs and copies them
    into torch tensors (on a CUDA stream of its own, with an event the caller's stream waits on), so that the
    caller's thread only takes finished batches and runs ``after`` (random erasing) on them. Every call into DALI
    is made on the feeding thread. ``waiting_cpu_seconds`` is that thread's CPU time spent waiting in DALI's
    ``outputs``."""

    def __init__(self, dataset, sampler, batch_size: int, drop_last: bool, make_pipeline: Callable[[int, int], Any],
                 make_inputs: Callable[[list[tuple[int, int]], random.Random], dict[str, Any]], device: torch.device,
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
        self.waiting_cpu_seconds = 0.0
        self._readers = ThreadPoolExecutor(READ_AHEAD_BATCHES, thread_name_prefix='dali-read')
        self._feeder = ThreadPoolExecutor(1, thread_name_prefix='dali-feed')
        self._built = None
        self._primed = False
        self._stream: Optional[torch.cuda.Stream] = None

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

    def _feed(self, pipeline, batch: Batch, rng: random.Random) -> None:
        labels = np.array([self.dataset.samples[i][1] for i in batch.indices], dtype=np.int64)
        batch.fed = {ENCODED: batch.encoded, LABELS: labels, **self.make_inputs(batch.sizes, rng)}
        for name, data in batch.fed.items():
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

    def _copy_stream(self) -> torch.cuda.Stream:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def _outputs(self) -> list:
        """The next batch's outputs. Those of a GPU pipeline are bound to the copying stream: the stream waits for
        DALI's work and DALI frees the buffers in its order (after the copy), and the host does not wait for the
        GPU."""
        started = time.thread_time()
        try:
            if self._built.device_id is None:
                return self._built.outputs()
            return self._built.outputs(cuda_stream=self._copy_stream())
        finally:
            self.waiting_cpu_seconds += time.thread_time() - started

    def _to_device(self, outputs) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.cuda.Event]]:
        """The images and labels as torch tensors on the loader's device, and on a GPU the event the caller's stream
        waits on before using them. Outputs on another device are refused: a copy between host and device memory
        through the wrong branch of DALI's copy would crash the process."""
        from nvidia.dali.plugin.pytorch import feed_ndarray
        images_out, labels_out = outputs[:2]
        produced = output_device(images_out)
        if produced != self.device:
            raise DevicePlacementError(f'DALI produced a batch on {produced} for a loader on {self.device}: its '
                                       'pipeline was built for another device')
        images_out = images_out.as_tensor()
        labels = torch.from_numpy(np.asarray(labels_out.as_tensor()).reshape(-1).copy())
        if self.device.type != 'cuda':
            images = torch.empty(images_out.shape(), dtype=torch.float32)
            feed_ndarray(images_out, images)
            return images, labels, None
        stream = self._copy_stream()
        # The feeding thread's current device is the first GPU unless set: allocate on, and copy to, this one.
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            images = torch.empty(images_out.shape(), dtype=torch.float32, device=self.device)
            feed_ndarray(images_out, images, cuda_stream=stream)
            targets = labels.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        return images, targets, copied

    def _schedule(self, runs: int) -> None:
        """Run the pipeline on ``runs`` fed batches: its first ``schedule_run`` runs as many as its prefetch depth,
        every later one a single batch."""
        if not self._primed:
            self._built.schedule_run()
            self._primed = True
            runs -= self._built.prefetch_queue_depth
        for _ in range(runs):
            self._built.schedule_run()

    def _device_batches(self, index_batches: list[list[int]], crop_rng: random.Random,
                        pipeline_seeds: random.Random) -> Iterator[tuple]:
        """The epoch's batches on the device, produced on the feeding thread: files read ahead by the reading
        threads, crops drawn from ``crop_rng``, ``PREFETCH_BATCHES`` batches in DALI. A pipeline that cannot go on
        (DALI failed on a file) is built again, as deep as the batches left to feed it, with the next seed of
        ``pipeline_seeds``."""
        pending = deque(index_batches)
        loading: deque[Future] = deque()  # files being read, in order, ahead of the pipeline
        in_flight: deque[Batch] = deque()  # fed to the pipeline, outputs not taken yet

        def read_ahead() -> None:
            while pending and len(loading) < READ_AHEAD_BATCHES:
                loading.append(self._readers.submit(self._load, pending.popleft()))

        def feed(count: int) -> None:
            if self._built is None:
                # Built on this thread, like every later call into it; a pipeline with RandAugment takes seconds.
                self._built = self.make_pipeline(pipeline_seeds.getrandbits(PIPELINE_SEED_BITS), count)
                self._primed = False
            for _ in range(count):
                batch = loading.popleft().result()
                self._feed(self._built, batch, crop_rng)
                in_flight.append(batch)
                read_ahead()
            self._schedule(count)

        if self._built is not None and self._built.prefetch_queue_depth < min(PREFETCH_BATCHES, len(index_batches)):
            self._built = None  # built shallower for the end of an earlier epoch
        read_ahead()
        feed(min(PREFETCH_BATCHES, len(loading)))
        try:
            while in_flight:
                try:
                    outputs = self._outputs()
                except RuntimeError as err:
                    # The pipeline cannot go on: drop it, name the unreadable files (or stop), then read again what
                    # was in flight.
                    self._built = None
                    self._find_unreadable(in_flight, err)
                    for batch in reversed(in_flight):
                        loading.appendleft(self._readers.submit(self._load, batch.indices))
                    in_flight.clear()
                    feed(min(PREFETCH_BATCHES, len(loading)))
                    continue
                in_flight.popleft()
                on_device = self._to_device(outputs)
                if loading:
                    feed(1)
                yield on_device
        finally:
            self._drain(in_flight)

    def _drain(self, in_flight: deque) -> None:
        """Take the outputs of batches still in DALI (the caller stopped early), so that the next epoch starts on
        an empty pipeline; one that fails is dropped."""
        try:
            for _ in range(len(in_flight) if self._built is not None else 0):
                self._outputs()
        except RuntimeError:
            self._built = None
        in_flight.clear()

    def _hand_over(self, ready: queue.Queue, item, stop: threading.Event) -> bool:
        """Put ``item`` where the caller takes it; False if the caller stopped iterating meanwhile, or the
        interpreter is exiting (its exit waits for this thread to end)."""
        while not stop.is_set() and threading.main_thread().is_alive():
            try:
                ready.put(item, timeout=HAND_OVER_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _feed_epoch(self, index_batches: list[list[int]], crop_rng: random.Random, pipeline_seeds: random.Random,
                    ready: queue.Queue, stop: threading.Event) -> None:
        """The feeding thread's work for one epoch: every batch, then None (or the error that ended it)."""
        ending = None
        try:
            batches = self._device_batches(index_batches, crop_rng, pipeline_seeds)
            try:
                for batch in batches:
                    if not self._hand_over(ready, batch, stop):
                        return
            finally:
                batches.close()
        except BaseException as err:  # noqa: BLE001 - handed to the caller's thread, which raises it
            ending = err
        self._hand_over(ready, ending, stop)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        index_batches = list(self._batch_sampler())
        if not index_batches:
            return  # an evaluation shard without images (more ranks than images)
        # Drawn on the caller's thread at the epoch's start, from the generator state checkpoints keep: a resumed
        # run draws this epoch's crops again (whether or not it builds a pipeline first), and the caller's own
        # draws (random erasing) do not interleave with those of the feeding thread.
        crop_rng = random.Random(random.getrandbits(EPOCH_SEED_BITS))
        pipeline_seeds = random.Random(random.getrandbits(EPOCH_SEED_BITS))
        ready: queue.Queue = queue.Queue(READY_BATCHES)
        stop = threading.Event()
        _RUNNING_FEEDS.add(stop)
        self._feeder.submit(self._feed_epoch, index_batches, crop_rng, pipeline_seeds, ready, stop)
        try:
            while True:
                item = ready.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                images, targets, copied = item
                if copied is not None:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(copied)
                    # Allocated on the copying stream: the allocator may reuse them only after this stream's work.
                    images.record_stream(current)
                    targets.record_stream(current)
                if self.after is not None:
                    images = self.after(images)
                yield images, targets
        finally:
            stop.set()


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
    """The train and evaluation loaders of ``--data-backend dali`` on ``device`` (DALI on its GPU, the current one
    for ``cuda`` without an index, else on the CPU with ``--num_workers`` threads), over the samplers the PIL
    loaders use."""
    import_dali()
    sampler_train, sampler_val = build_samplers(args, dataset_train, dataset_val, launch)
    device_id = dali_device_id(device)
    if device_id is not None:
        device = torch.device('cuda', device_id)
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
        lambda sizes, rng: train_inputs(sizes, crop.scale, crop.ratio, rng), device, args.skip_bad_images,
        after=erasing)
    resize_size = int(size / args.eval_crop_ratio)
    loader_val = DaliLoader(
        dataset_val, sampler_val, eval_batch, False,
        lambda seed, depth: built(eval_pipeline(eval_batch, threads, device_id, depth, size)),
        lambda sizes, rng: eval_inputs(sizes, resize_size, size), device, args.skip_bad_images)
    return loader_train, loader_val


def built(pipeline):
    pipeline.build()
    return pipeline


def build_data_loaders(args: argparse.Namespace, dataset_train, dataset_val, launch: LaunchEnvironment,
                       device: torch.device) -> tuple[Iterable, Iterable]:
    """The loaders of ``--data-backend``: ``datasets.build_loaders`` (pil: DeiT's DataLoaders) or
    ``build_dali_loaders`` (dali), over the same samplers either way. The choice lives here, where both backends are
    known: this module builds on ``datasets``, never the other way round."""
    if args.data_backend == 'dali':
        return build_dali_loaders(args, dataset_train, dataset_val, launch, device)
    return build_loaders(args, dataset_train, dataset_val, launch)
