"""Speed of the real training step: images/s, ms/step, peak memory, model FLOPs and MFU.

``python benchmark.py <training flags>`` (or ``python main.py --benchmark <training flags>``) builds the models,
criterion and optimizer as training does and times ``engine.training_step`` (``compute_losses``, backward,
optimizer step) on synthetic batches. FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode``: teacher
forward, student forward and backward, loss terms. MFU is against the GPU's dense bf16 peak (``--peak-tflops`` to
set it), or on a CPU against the matmul rate measured in the same run. With ``--data-path`` the training DataLoader
is timed alone too.

``python benchmark.py --papers <run flags>`` (``main.py --benchmark --papers``) times the papers' three
configurations, eager and compiled, and prints one markdown table in the layout of the Performance table; with
``--data-path`` (an ImageNet-style folder, e.g. the JPEGs ``shapes.py --image-size 500 375 --jpeg-quality 90``
writes) also the data pipeline's images/s per worker and how many workers each row needs.

The script is ``main.py --benchmark``: ``main`` imports this module and hands it the parsed flags and the device;
the module builds from ``engine``, ``models``, ``datasets`` and ``losses`` only.
"""
import argparse
import gc
import glob
import itertools
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
import timm
from torch.utils import flop_counter
from timm.utils import ModelEmaV2, random_seed
from torch.utils.flop_counter import FlopCounterMode

import models
import utils
from datasets import IMAGENET_NUM_CLASSES, build_data_loaders, build_dataset, build_mixup
from engine import (Precision, Student, build_optimizer, step_values_over_processes, teacher_forward, train_step,
                    training_step)
from launch import LaunchEnvironment
from losses import build_criterion
from utils import UserError

# Dense (not 2:4-sparse) bf16 = fp16 tensor-core peaks in TFLOP/s, by the exact name torch.cuda.get_device_name
# gives; MFU is measured against these. Sources: NVIDIA's datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet;
# H100 SXM, PCIe and NVL: "NVIDIA H100 Tensor Core GPU" datasheet, the NVL figure per GPU; H200 and H200 NVL: "NVIDIA
# H200 Tensor Core GPU" datasheet; GH200: "NVIDIA GH200 Grace Hopper Superchip" datasheet; L40S: "NVIDIA L40S"
# datasheet; A10: "NVIDIA A10 Tensor Core GPU" datasheet; B200: "NVIDIA HGX B200" specifications, 4.5 PFLOP/s sparse
# per GPU) and, for AWS's A10G, which has no NVIDIA datasheet, Baseten's "NVIDIA A10 vs A10G" comparison. Datasheets
# give sparse figures twice the dense ones; these are the dense halves. Another name (a MIG slice, a new card) has
# no entry: --peak-tflops gives its peak.
GPU_DENSE_PEAK_TFLOPS = {
    'NVIDIA A100-SXM4-40GB': 312.0,
    'NVIDIA A100-SXM4-80GB': 312.0,
    'NVIDIA A100-PCIE-40GB': 312.0,
    'NVIDIA A100 80GB PCIe': 312.0,
    'NVIDIA H100 80GB HBM3': 989.0,  # SXM5
    'NVIDIA H100 PCIe': 756.0,
    'NVIDIA H100 NVL': 835.0,
    'NVIDIA H200': 989.0,  # SXM
    'NVIDIA H200 NVL': 835.0,
    'NVIDIA GH200 480GB': 989.0,
    'NVIDIA L40S': 362.0,
    'NVIDIA A10': 125.0,
    'NVIDIA A10G': 70.0,
    'NVIDIA B200': 2250.0,
}
NUM_CLASSES = IMAGENET_NUM_CLASSES  # the papers' models
STEPS_PER_RATE_MEASUREMENT = 5  # timed steps between two measurements of the CPU matmul rate
MATMUL_SIZE = 4096

PAPERS_FLAG = '--papers'
# README's training flags of the two papers (the models and the per-GPU batch are set per configuration).
CLSKD_FLAGS = ('--distillation-type soft --distillation-alpha 1 --distillation-beta 1 --manifold --w-cls 1.0 '
               '--w-atn 2.0 --last-w 4.0 --K 192 --s-id 0 1 2 3 8 9 10 11 --t-id 0 1 2 3 8 9 10 11 --drop-path 0')
MANIFOLD_FLAGS = ('--distillation-type soft --distillation-alpha 1 --distillation-beta 1 --w-sample 0.1 --w-patch 4 '
                  '--w-rand 0.2 --K 192 --s-id 0 1 2 3 8 9 10 11 --t-id 0 1 2 3 20 21 22 23 --drop-path 0')
CLSKD_GPU_BATCH = 128  # the papers' per-GPU batches: [CLS]-KD 4 x 128, Manifold 8 x 64
MANIFOLD_GPU_BATCH = 64
# What ``--papers`` takes from its command line; the models, losses and batch sizes are its own.
PAPERS_RUN_FLAGS = ('device', 'seed', 'benchmark_steps', 'benchmark_warmup', 'peak_tflops', 'amp', 'amp_dtype',
                    'amp_cpu', 'data_path', 'data_set', 'num_workers', 'pin_mem', 'benchmark', 'papers', 'data_backend')
# The loaders alone are timed on batches of this size, over this many after as many untimed ones (workers start).
DATA_TIMING_BATCH = 32
DATA_WARMUP_BATCHES = 8
DATA_TIMED_BATCHES = 24
# /proc/<pid>/stat, after the process name: user and system CPU time in clock ticks.
PROC_STAT_UTIME = 11
PROC_STAT_STIME = 12
PRECISION_NAMES = {torch.float32: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}
TABLE_HEADER = ('| mode | device | precision | batch | images/s | ms/step | memory | GFLOPs/image | MFU |\n'
                '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |')
WHOLE_NUMBERS_FROM = 100  # README's tables give values from 100 on without decimals
TERA = 1e12
GIGA = 1e9
EXIT_INTERRUPTED = 130  # the shell's code for a process ended by SIGINT


@dataclass(frozen=True)
class PaperConfiguration:
    """One row of README's Performance table: a paper's student, teacher, flags and per-GPU batch."""
    mode: str
    model: str
    teacher_model: str
    flags: str
    batch_size: int

    def argv(self) -> list[str]:
        """The training flags of this configuration."""
        return ['--model', self.model, '--teacher-model', self.teacher_model, *shlex.split(self.flags),
                '--batch-size', str(self.batch_size)]


PAPER_CONFIGURATIONS = (
    PaperConfiguration('[CLS]-KD, DeiT-B → DeiT-Ti', 'deit_tiny_patch16_224', 'deit_base_patch16_224', CLSKD_FLAGS,
                       CLSKD_GPU_BATCH),
    PaperConfiguration('[CLS]-KD, DeiT-B → DeiT-S', 'deit_small_patch16_224', 'deit_base_patch16_224', CLSKD_FLAGS,
                       CLSKD_GPU_BATCH),
    PaperConfiguration('Manifold, CaiT-S24 → DeiT-Ti', 'deit_tiny_patch16_224', 'cait_s24_224', MANIFOLD_FLAGS,
                       MANIFOLD_GPU_BATCH),
)


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


def gpu_peak_flops(name: str) -> Optional[float]:
    """The dense bf16 peak of the GPU called ``name`` (``torch.cuda.get_device_name``), None for a name not in the
    table."""
    tflops = GPU_DENSE_PEAK_TFLOPS.get(name.strip())
    return tflops * TERA if tflops is not None else None


def peak_flops(device: torch.device, given_tflops: Optional[float]) -> tuple[Optional[float], str]:
    """The peak MFU is measured against and where it comes from: ``--peak-tflops``, a known GPU's dense peak, or
    (None) the matmul rate the benchmark measures, on a CPU or on a GPU it does not know (it says so)."""
    if given_tflops:
        return given_tflops * TERA, 'given peak'
    if device.type != 'cuda':
        return None, 'measured matmul rate'
    name = torch.cuda.get_device_name(device)
    peak = gpu_peak_flops(name)
    if peak is not None:
        return peak, f'dense bf16 peak of the {name}'
    print(f'Note: no dense peak is known for the GPU "{name}": MFU is against the measured matmul rate; '
          '--peak-tflops <its datasheet dense bf16 TFLOP/s> measures against its peak')
    return None, 'measured matmul rate'


def estimate_mfu(flops_per_step: float, seconds_per_step: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: the achieved model FLOP/s over the peak."""
    return flops_per_step / seconds_per_step / peak_flops


def time_training_step(step: 'Step', device: torch.device, batch_size: int, input_size: int, steps: int, warmup: int,
                       peak_flops: Optional[float] = None) -> dict[str, float]:
    """Time the real training step on one synthetic batch; FLOPs come from ``FlopCounterMode``.

    Without ``peak_flops`` (a CPU) the peak is this machine's matmul rate in the step's dtype, measured before every
    round of ``STEPS_PER_RATE_MEASUREMENT`` steps and after the last, so that rate and steps see the same machine
    load while the steps run back to back, as in training (a product before every step would evict the step's data
    from the caches). Step time and rate are medians.
    """
    count_cpu_attention_flops()
    step.model.train()
    samples = torch.randn(batch_size, 3, input_size, input_size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    if step.mixup_fn is not None:
        samples, targets = step.mixup_fn(samples, targets)

    def one_step() -> None:
        # The step's one host sync, as training has it.
        step_values_over_processes(training_step(step.model, step.teacher, step.criterion, step.optimizer,
                                                 step.precision, samples, targets).values(), False)

    for _ in range(warmup):
        one_step()
    with FlopCounterMode(display=False) as counter:
        one_step()
    flops_per_step = counter.get_total_flops()
    operands = None
    if peak_flops is None:
        operands = [torch.randn(MATMUL_SIZE, MATMUL_SIZE, device=device, dtype=step.precision.dtype)
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
        one_step()
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


@dataclass
class Step:
    """What ``engine.training_step`` takes, built as training builds it."""
    model: nn.Module
    teacher: Optional[nn.Module]
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    precision: Precision
    mixup_fn: Any


def build_step(args, device: torch.device) -> Step:
    random_seed(args.seed)
    precision = Precision.for_training(args, device)
    teacher = models.load_teacher(args, NUM_CLASSES, device, precision.dtype)
    model = models.create_student(args, teacher, NUM_CLASSES).to(device)
    optimizer = build_optimizer(args, model, device, args.lr)
    criterion = build_criterion(args)
    if args.compile:
        model, teacher, criterion = models.compile_models(model, teacher, criterion)
    return Step(model, teacher, criterion, optimizer, precision, build_mixup(args, NUM_CLASSES))


def train_loader(args, device: torch.device) -> Iterable:
    """The training loader of ``--data-backend`` over ``--data-path``, as one process of training builds it."""
    dataset, _ = build_dataset(is_train=True, args=args)
    loader, _ = build_data_loaders(args, dataset, dataset, LaunchEnvironment(), device)
    return loader


def batches_of(loader, data_path: str) -> Iterator:
    """The loader's batches, epoch after epoch (a small folder is read several times)."""
    for epoch in itertools.count():
        if hasattr(loader.sampler, 'set_epoch'):
            loader.sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise UserError(f'--data-path {data_path}: too few images for one batch of the data pipeline')


def child_pids() -> set[int]:
    """This process's children (a DataLoader's workers), from ``/proc`` (Linux); empty where it cannot be read."""
    pids: set[int] = set()
    for children in glob.glob(f'/proc/{os.getpid()}/task/*/children'):
        try:
            with open(children) as f:
                pids.update(int(pid) for pid in f.read().split())
        except OSError:
            continue
    return pids


def cpu_seconds(pids: set[int]) -> float:
    """CPU time so far of this process (DALI's threads included) and of the processes ``pids``."""
    seconds = time.process_time()
    ticks = os.sysconf('SC_CLK_TCK')
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        seconds += (int(fields[PROC_STAT_UTIME]) + int(fields[PROC_STAT_STIME])) / ticks
    return seconds


def time_loader(args, device: torch.device, batches: int, warmup: int) -> dict[str, float]:
    """The training loader of ``--data-backend`` alone over ``batches`` after ``warmup`` (workers starting, DALI
    building its pipeline): images/s (reading, decoding, augmenting; for DALI also the batch on ``device``), the
    CPU time per image of this process and its workers, and the cores that keeps busy."""
    loader = train_loader(args, device)
    stream = batches_of(loader, args.data_path)
    for _ in range(warmup):
        next(stream)
    synchronize(device)
    workers = child_pids()
    started_cpu, started = cpu_seconds(workers), time.perf_counter()
    images = sum(len(next(stream)[0]) for _ in range(batches))
    synchronize(device)
    cpu, wall = cpu_seconds(workers) - started_cpu, time.perf_counter() - started
    stream.close()
    return {'images_per_s': images / wall, 'cpu_ms_per_image': 1000 * cpu / images, 'cores_busy': cpu / wall}


def time_step_from_files(step: Step, args, device: torch.device, steps: int, warmup: int) -> float:
    """Images/s of the training step fed by the loader of ``--data-backend``, as training runs it: the loader's
    batch to the device, mixup, the step, its host sync."""
    loader = train_loader(args, device)
    stream = batches_of(loader, args.data_path)
    step.model.train()
    images, started = 0, None
    for index in range(warmup + steps):
        if index == warmup:
            synchronize(device)
            started = time.perf_counter()
        samples, targets = next(stream)
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if step.mixup_fn is not None:
            samples, targets = step.mixup_fn(samples, targets)
        # The step's one host sync, as training has it.
        step_values_over_processes(training_step(step.model, step.teacher, step.criterion, step.optimizer,
                                                 step.precision, samples, targets).values(), False)
        images += len(samples) if index >= warmup else 0
    synchronize(device)
    stream.close()
    return images / (time.perf_counter() - started)


def describe_loader(args, stats: dict[str, float]) -> str:
    workers = f'{args.num_workers} {"threads" if args.data_backend == "dali" else "workers"}'
    return (f'data ({args.data_backend}, {workers}): {stats["images_per_s"]:.1f} images/s, '
            f'{stats["cpu_ms_per_image"]:.2f} ms CPU per image, {stats["cores_busy"]:.1f} cores busy')


def run(args, device: torch.device) -> dict[str, float]:
    """Benchmark the training step the flags describe on ``device``; prints the report and returns the step's
    numbers. With ``--data-path`` also the loader of ``--data-backend`` alone and the step fed by it."""
    step = build_step(args, device)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    stats = time_training_step(step, device, args.batch_size, args.input_size, args.benchmark_steps,
                               args.benchmark_warmup, peak)
    print(f'Benchmark {args.model} <- {args.teacher_model if step.teacher is not None else "no teacher"} '
          f'| device {device.type} | {step.precision.describe()} | batch {args.batch_size} | {args.input_size} px')
    memory = 'n/a' if math.isnan(stats['peak_memory_gib']) else f'{stats["peak_memory_gib"]:.2f} GiB'
    print(f'  {stats["images_per_s"]:.1f} images/s, {stats["ms_per_step"]:.1f} ms/step, '
          f'peak memory {memory}, {stats["gflops_per_image"]:.2f} GFLOPs/image, '
          f'{stats["achieved_tflops"]:.3f} TFLOP/s, MFU {100 * stats["mfu"]:.1f}% '
          f'of {stats["peak_tflops"]:.3f} TFLOP/s ({peak_source})')
    if args.data_path:
        batches = args.benchmark_steps
        loader_stats = time_loader(args, device, batches, args.benchmark_warmup)
        print(f'  {describe_loader(args, loader_stats)}')
        from_files = time_step_from_files(step, args, device, args.benchmark_steps, args.benchmark_warmup)
        print(f'  the step fed from files: {from_files:.1f} images/s, {100 * from_files / stats["images_per_s"]:.0f}% '
              'of the synthetic batch\'s')
        stats.update({f'data_{key}': value for key, value in loader_stats.items()}, from_files_images_per_s=from_files)
    return stats


# ---------------------------------------------------------------------------------------------
# Students sharing one teacher forward (main.py --benchmark --variant ...)
# ---------------------------------------------------------------------------------------------

SHARED_PHASE = 'shared'
TEACHER_ALONE = 'teacher'


def separate_runs_speedup(shared_s: float, alone_s: Sequence[float], teacher_s: float) -> tuple[float, float, float]:
    """``(R, B, t)``: the speed-up ``R`` of one shared step (the teacher's forward once, then every student) over
    the students' separate runs (each a teacher's forward and one student: ``alone_s``); the bound ``B`` that
    sharing the teacher's forward alone gives, ``K / (t + K (1 - t))``; and ``t``, the teacher's forward's share of
    the separate runs' time (``K`` teacher forwards over their sum: for students of one size, the share of one
    run's step)."""
    k, separate = len(alone_s), sum(alone_s)
    share = k * teacher_s / separate
    return separate / shared_s, k / (share + k * (1 - share)), share


def build_students(args, variants: Sequence, device: torch.device) -> tuple[list[Student], Optional[nn.Module]]:
    """The students of ``variants`` and their one teacher (random weights without ``--teacher-path``), built as
    training builds them (EMA included: training updates it after every step), on ``device``."""
    random_seed(args.seed)
    flags = [variant.args for variant in variants]
    teacher = models.load_teacher(args, NUM_CLASSES, device, Precision.for_training(args, device).dtype, flags)
    students = []
    for variant in variants:
        model = models.create_student(variant.args, teacher, NUM_CLASSES).to(device)
        ema = ModelEmaV2(model, decay=variant.args.model_ema_decay) if variant.args.model_ema else None
        optimizer = build_optimizer(variant.args, model, device, variant.args.lr)
        criterion = build_criterion(variant.args)
        if args.compile:
            model, criterion = models.compile_student(model, criterion)
        students.append(Student(variant.name, model, criterion, optimizer, Precision.for_training(variant.args, device),
                                models.teacher_blocks(variant.args), variant.args.clip_grad, ema))
    if args.compile and teacher is not None:
        teacher = models.FrozenCompiledTeacher(teacher)
    return students, teacher


def time_shared_and_separate(students: Sequence[Student], teacher: Optional[nn.Module], device: torch.device,
                             samples: torch.Tensor, targets: torch.Tensor, rounds: int,
                             warmup: int) -> dict[str, float]:
    """Median seconds of the shared step (``SHARED_PHASE``), of each student's separate step (its name) and of the
    teacher's forward alone (``TEACHER_ALONE``), each step as training runs it (the step's one host sync, the EMA
    updates). The measurements alternate within every round, so that all see the same machine."""
    def step(chosen: Sequence[Student]) -> Callable[[], None]:
        def run() -> None:
            terms = train_step(chosen, teacher, samples, targets)
            step_values_over_processes([value for t in terms for value in t.values()], False)
            for student in chosen:
                if student.model_ema is not None:
                    student.model_ema.update(student.model)
        return run

    def teacher_alone() -> None:
        with students[0].precision.autocast():
            teacher_forward(teacher, samples)

    phases = {SHARED_PHASE: step(students), **{s.name: step([s]) for s in students}, TEACHER_ALONE: teacher_alone}
    for student in students:
        student.model.train()
    for run in phases.values():
        for _ in range(warmup):
            run()
    seconds: dict[str, list[float]] = {phase: [] for phase in phases}
    for _ in range(rounds):
        for phase, run in phases.items():
            synchronize(device)
            start = time.perf_counter()
            run()
            synchronize(device)
            seconds[phase].append(time.perf_counter() - start)
    return {phase: statistics.median(values) for phase, values in seconds.items()}


def run_variants(args, variants: Sequence, device: torch.device) -> dict[str, float]:
    """``main.py --benchmark`` with ``--variant``: the students on one teacher forward against their separate runs;
    prints student-images/s and the speed-up over separate runs with its bound from the teacher's share."""
    if args.distillation_type == 'none' and all(v.args.distillation_type == 'none' for v in variants):
        raise UserError('--benchmark with --variant times students sharing a teacher: give them one '
                        '(--distillation-type soft or hard)')
    students, teacher = build_students(args, variants, device)
    samples = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    mixup_fn = build_mixup(args, NUM_CLASSES)
    if mixup_fn is not None:
        samples, targets = mixup_fn(samples, targets)
    seconds = time_shared_and_separate(students, teacher, device, samples, targets, args.benchmark_steps,
                                       args.benchmark_warmup)
    alone = [seconds[s.name] for s in students]
    speedup, bound, share = separate_runs_speedup(seconds[SHARED_PHASE], alone, seconds[TEACHER_ALONE])
    print(f'Benchmark {len(students)} students <- {args.teacher_model} | device {device.type} | '
          f'{students[0].precision.describe()} | batch {args.batch_size} | {args.input_size} px')
    print(f'  shared step (the teacher\'s forward once, then each student): {1000 * seconds[SHARED_PHASE]:.1f} ms, '
          f'{len(students) * args.batch_size / seconds[SHARED_PHASE]:.1f} student-images/s')
    print('  separate runs, a step each: ' + ', '.join(
        f'{s.name} ({s.model.default_cfg["architecture"] if hasattr(s.model, "default_cfg") else ""}) '
        f'{1000 * seconds[s.name]:.1f} ms' for s in students)
          + f'; {len(students) * args.batch_size / sum(alone):.1f} student-images/s')
    print(f'  the teacher\'s forward alone: {1000 * seconds[TEACHER_ALONE]:.1f} ms')
    print(f'speed-up over separate runs: {speedup:.2f}x (bound {bound:.2f}x from the teacher\'s share '
          f'{100 * share:.0f}%)')
    return {'speedup': speedup, 'bound': bound, 'teacher_share': share, **seconds}


# ---------------------------------------------------------------------------------------------
# The papers' configurations as one table (python benchmark.py --papers)
# ---------------------------------------------------------------------------------------------

def device_description(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{os.cpu_count()}-core CPU'


def figure(value: float) -> str:
    """A measured value as README's tables write it: one decimal below 100, none from there on."""
    return f'{value:.0f}' if value >= WHOLE_NUMBERS_FROM else f'{value:.1f}'


def table_row(mode: str, device: torch.device, dtype: torch.dtype, batch_size: int, stats: dict) -> str:
    """One row of README's Performance table."""
    memory = 'n/a' if math.isnan(stats['peak_memory_gib']) else f'{stats["peak_memory_gib"]:.1f} GiB'
    peak = stats['peak_tflops'] * TERA
    peak_text = f'{peak / TERA:.0f} TFLOP/s' if peak >= TERA else f'{peak / GIGA:.0f} GFLOP/s'
    return (f'| {mode} | {device_description(device)} | {PRECISION_NAMES[dtype]} | {batch_size} | '
            f'{figure(stats["images_per_s"])} | {figure(stats["ms_per_step"])} | {memory} | '
            f'{stats["gflops_per_image"]:.1f} | {100 * stats["mfu"]:.1f}% of {peak_text} |')


def check_papers_run_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--papers`` takes run flags only; a model, loss or batch flag is refused (the configurations set them)."""
    given, defaults = vars(args), vars(parser.parse_args([]))
    for action in parser._actions:
        if action.dest not in PAPERS_RUN_FLAGS and given.get(action.dest) != defaults.get(action.dest):
            raise UserError(f'{PAPERS_FLAG} sets the models, losses and batch sizes itself: drop '
                            f'{action.option_strings[0]} (it takes {", ".join(run_flag_names(parser))})')


def run_flag_names(parser: argparse.ArgumentParser) -> list[str]:
    return [a.option_strings[0] for a in parser._actions
            if a.dest in PAPERS_RUN_FLAGS and a.dest not in ('benchmark', 'papers')]


def forget_compiled_models(device: torch.device) -> None:
    """Drop compiled graphs (a frozen teacher's graph holds its weights) so that the next row's memory is its own."""
    torch.compiler.reset()
    gc.collect()
    if device.type == 'cuda':
        torch.cuda.empty_cache()


def with_backend(args: argparse.Namespace, backend: str, workers: int, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), 'data_backend': backend, 'num_workers': workers, **changes})


def run_papers(args: argparse.Namespace, parser: argparse.ArgumentParser,
               check: Callable[[argparse.Namespace], None]) -> int:
    """Benchmark every paper configuration eager and with ``--compile``, each with the run flags of ``args`` (parsed
    by ``parser``; ``check`` is the training script's check of a flag set); print the rows measured as one markdown
    table (also after Ctrl-C or SIGINT, e.g. from ``timeout -s INT``). With ``--data-path``, also each loader alone
    (pil with ``--num_workers`` workers, dali with as many threads) and every eager configuration fed from the
    files: by pil with a worker per CPU core of the machine, and by dali."""
    check_papers_run_flags(parser, args)
    device = torch.device(args.device)
    rows, loaders, fed, interrupted = [], {}, [], False
    backends = {'pil': os.cpu_count() or 1, 'dali': max(args.num_workers, 1)}
    try:
        if args.data_path:
            for backend in backends:
                data_args = with_backend(args, backend, max(args.num_workers, 1), batch_size=DATA_TIMING_BATCH)
                check(data_args)
                loaders[backend] = (data_args, time_loader(data_args, device, DATA_TIMED_BATCHES,
                                                           DATA_WARMUP_BATCHES))
        for configuration in PAPER_CONFIGURATIONS:
            for compiled in (False, True):
                row_args = parser.parse_args([*configuration.argv(), *(['--compile'] if compiled else [])],
                                             namespace=argparse.Namespace(**{**vars(args), 'data_path': ''}))
                check(row_args)
                step = build_step(row_args, device)
                stats = time_training_step(step, device, row_args.batch_size, row_args.input_size,
                                           row_args.benchmark_steps, row_args.benchmark_warmup,
                                           peak_flops(device, row_args.peak_tflops)[0])
                mode = configuration.mode + (', `--compile`' if compiled else '')
                rows.append((mode, stats, table_row(mode, device, step.precision.dtype, configuration.batch_size,
                                                    stats)))
                if args.data_path and not compiled:
                    fed.append((configuration.mode, stats['images_per_s'], {
                        backend: time_step_from_files(step, with_backend(row_args, backend, workers,
                                                                         data_path=args.data_path), device,
                                                      row_args.benchmark_steps, row_args.benchmark_warmup)
                        for backend, workers in backends.items()}))
                del step
                forget_compiled_models(device)
    except KeyboardInterrupt:
        interrupted = True
    versions = f'torch {torch.__version__}, CUDA {torch.version.cuda or "none"}, timm {timm.__version__}'
    print(f'\nThe papers\' configurations ({versions}):\n\n{TABLE_HEADER}')
    for _, _, row in rows:
        print(row)
    if loaders:
        print(f'\nThe loaders alone on {args.data_path} (batch {DATA_TIMING_BATCH}):')
        for data_args, loader_stats in loaders.values():
            print(f'- {describe_loader(data_args, loader_stats)}')
    if fed:
        print(f'\nFed from {args.data_path} (images/s, and the share of the synthetic batch\'s):\n\n'
              f'| configuration | synthetic | pil, {backends["pil"]} workers | dali, {backends["dali"]} threads |\n'
              '| --- | ---: | ---: | ---: |')
        for mode, synthetic, rates in fed:
            print(f'| {mode} | {figure(synthetic)} | '
                  + ' | '.join(f'{figure(rates[b])} ({100 * rates[b] / synthetic:.0f}%)' for b in backends) + ' |')
    if interrupted:
        print(f'Interrupted: {len(rows)} of {2 * len(PAPER_CONFIGURATIONS)} rows measured')
        return EXIT_INTERRUPTED
    return 0


if __name__ == '__main__':
    # The script is ``main.py --benchmark``: main imports this module, never the other way round.
    import main
    sys.exit(main.run(sys.argv[1:] + ['--benchmark']))
