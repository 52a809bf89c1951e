"""Speed of the real training step: images/s, ms/step, peak memory, model FLOPs and MFU.

``python benchmark.py <training flags>`` (or ``python main.py --benchmark <training flags>``) builds the models,
criterion and optimizer as training does and times ``engine.training_step`` (``compute_losses``, backward,
optimizer step) on synthetic batches. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: teacher
forward, student forward and backward, loss terms. MFU is against the GPU's dense bf16 peak (``--peak-tflops`` to
set it), or on a CPU against the matmul rate measured in the same run. With ``--data-path`` the training DataLoader
is timed alone too.
"""
import math
import statistics
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
from torch.utils import flop_counter
from timm.utils import random_seed
from torch.utils.flop_counter import FlopCounterMode

import main
import models
from datasets import IMAGENET_NUM_CLASSES, build_dataset
from engine import Precision, training_step
from launch import LaunchEnvironment
from losses import build_criterion
from utils import UserError

# Dense tensor-core peaks (TFLOP/s, bf16 = fp16) by device name; MFU is measured against these.
GPU_DENSE_PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10G': 125.0}
NUM_CLASSES = IMAGENET_NUM_CLASSES  # the papers' models
STEPS_PER_RATE_MEASUREMENT = 5  # timed steps between two measurements of the CPU matmul rate
MATMUL_SIZE = 4096


def count_cpu_attention_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels, which it does not count by itself.

    They get the formulas torch uses for the GPU kernels, so CPU and GPU runs count the same model FLOPs.
    """
    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop}
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def matmul_flops_per_second(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    """FLOP/s of one ``a @ b`` of large square matrices into a preallocated ``out``: the machine's practical
    matmul peak at that moment (the time is the product's alone, not an allocation's)."""
    synchronize(a.device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    synchronize(a.device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start)


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    """The dense bf16 peak of a known GPU, else None."""
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in GPU_DENSE_PEAK_TFLOPS.items() if key in name), None)


def estimate_mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the achieved model FLOP/s over the peak."""
    return flops_per_step / seconds_per_step / peak_flops


def time_training_step(model: nn.Module, teacher: Optional[nn.Module], criterion: nn.Module,
                       optimizer: torch.optim.Optimizer, precision: Precision, device: torch.device,
                       batch_size: int, input_size: int, steps: int, warmup: int,
                       peak_flops: Optional[float] = None, mixup_fn=None) -> dict[str, float]:
    """Time the real training step on one synthetic batch; FLOPs come from ``FlopCounterMode``.

    Without ``peak_flops`` (a CPU) the peak is this machine's matmul rate in the step's dtype, measured before every
    round of ``STEPS_PER_RATE_MEASUREMENT`` steps and after the last, so that rate and steps see the same machine
    load while the steps run back to back, as in training (a product before every step would evict the step's data
    from the caches). Step time and rate are medians.
    """
    count_cpu_attention_flops()
    model.train()
    samples = torch.randn(batch_size, 3, input_size, input_size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    if mixup_fn is not None:
        samples, targets = mixup_fn(samples, targets)
    for _ in range(warmup):
        training_step(model, teacher, criterion, optimizer, precision, samples, targets)
    with FlopCounterMode(display=False) as counter:
        training_step(model, teacher, criterion, optimizer, precision, samples, targets)
    flops_per_step = counter.get_total_flops()
    operands = None
    if peak_flops is None:
        operands = [torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=precision.dtype)
                    for _ in range(3)]
        matmul_flops_per_second(*operands)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds, rates = [], []
    for index in range(steps):
        if operands is not None and index % STEPS_PER_RATE_MEASUREMENT == 0:
            rates.append(matmul_flops_per_second(*operands))
        synchronize(device)
        start = time.perf_counter()
        training_step(model, teacher, criterion, optimizer, precision, samples, targets)
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    if operands is not None:
        rates.append(matmul_flops_per_second(*operands))
        peak_flops = statistics.median(rates)
    seconds = statistics.median(step_seconds)
    memory = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else float('nan')
    return {
        'images_per_s': batch_size / seconds,
        'ms_per_step': 1000 * seconds,
        'peak_memory_gib': memory / 2 ** 30,
        'gflops_per_image': flops_per_step / batch_size / 1e9,
        'achieved_tflops': flops_per_step / seconds / 1e12,
        'peak_tflops': peak_flops / 1e12,
        'mfu': estimate_mfu(flops_per_step, seconds, peak_flops),
    }


def data_images_per_second(loader, batches: int, warmup: int, data_path: str) -> float:
    """Images/s of the training DataLoader alone (decoding and augmentation), after ``warmup`` batches."""
    images, start = 0, None
    for i, (samples, _) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        elif i > warmup:
            images += len(samples)
        if i >= batches:
            break
    if start is None or images == 0:
        raise UserError(f'--data-path {data_path}: too few images to time {batches} batches of the data pipeline')
    return images / (time.perf_counter() - start)


def run(args) -> dict[str, float]:
    """Benchmark the training step the flags describe; prints the report and returns the step's numbers."""
    device = torch.device(args.device)
    random_seed(args.seed)
    precision = main.build_precision(args, device)
    teacher = main.build_teacher(args, NUM_CLASSES, device, precision)
    model = models.create_student(args, teacher, NUM_CLASSES).to(device)
    optimizer = main.build_optimizer(args, model, device, args.lr)
    criterion = build_criterion(args)
    if args.compile:
        model, teacher, criterion = main.compile_models(model, teacher, criterion)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else gpu_peak_flops(device)
    stats = time_training_step(model, teacher, criterion, optimizer, precision, device, args.batch_size,
                               args.input_size, args.benchmark_steps, args.benchmark_warmup, peak,
                               mixup_fn=main.build_mixup(args, NUM_CLASSES))
    peak_source = 'given peak' if args.peak_tflops else ('dense peak' if peak else 'measured matmul rate')
    print(f'Benchmark {args.model} <- {args.teacher_model if teacher is not None else "no teacher"} '
          f'| device {device.type} | {precision.describe()} | batch {args.batch_size} | {args.input_size} px')
    memory = 'n/a' if math.isnan(stats['peak_memory_gib']) else f'{stats["peak_memory_gib"]:.2f} GiB'
    print(f'  {stats["images_per_s"]:.1f} images/s, {stats["ms_per_step"]:.1f} ms/step, '
          f'peak memory {memory}, {stats["gflops_per_image"]:.2f} GFLOPs/image, '
          f'{stats["achieved_tflops"]:.3f} TFLOP/s, MFU {100 * stats["mfu"]:.1f}% '
          f'of {stats["peak_tflops"]:.3f} TFLOP/s ({peak_source})')
    if args.data_path:
        dataset, _ = build_dataset(is_train=True, args=args)
        loader, _ = main.build_loaders(args, dataset, dataset, LaunchEnvironment())
        rate = data_images_per_second(loader, args.benchmark_steps + args.benchmark_warmup, args.benchmark_warmup,
                                      args.data_path)
        workers = max(args.num_workers, 1)
        stats['data_images_per_s_per_worker'] = rate / workers
        print(f'  data pipeline: {rate:.1f} images/s with {args.num_workers} workers '
              f'({rate / workers:.1f} per worker): about {math.ceil(stats["images_per_s"] / (rate / workers))} '
              f'workers keep this device fed')
    return stats


if __name__ == '__main__':
    sys.exit(main.run(sys.argv[1:] + ['--benchmark']))
