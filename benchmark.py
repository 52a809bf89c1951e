"""Speed of the real training step: images/s, ms/step, peak memory, model FLOPs and MFU.

``python benchmark.py <training flags>`` (or ``python main.py --benchmark <training flags>``) builds the models,
criterion, optimizer and model EMA as training does and times ``engine.train_step`` (the teacher's forward, the
student's terms, backward, optimizer step, EMA update) and its host sync on synthetic batches. FLOPs are counted by
``torch.utils.flop_counter.FlopCounterMode``: teacher forward, student forward and backward, loss terms. MFU is against the GPU's dense bf16 peak (``--peak-tflops`` to
set it), or on a CPU against the matmul rate measured in the same run. With ``--data-path`` the training loader is
timed alone too, and the step fed by it, both in steady state: inside one epoch, after the loader's start and the
batches it holds ahead.

``python benchmark.py --papers <run flags>`` (``main.py --benchmark --papers``) times the papers' three
configurations, eager and compiled, and prints one markdown table in the layout of the Performance table; with
``--data-path`` (an ImageNet-style folder, e.g. the JPEGs ``shapes.py --image-size 500 375 --jpeg-quality 90``
writes) also the data pipeline's images/s per worker and how many workers each row needs.

The script is ``main.py --benchmark``: ``main`` imports this module and hands it the parsed flags and the device;
the module builds from ``engine``, ``models``, ``datasets`` and ``losses`` only.
"""
import argparse
import functools
import gc
import glob
import math
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn
import timm
from torch.utils import flop_counter
from timm.utils import random_seed, unwrap_model
from torch.utils.flop_counter import FlopCounterMode

import dali_data
import models
import students
from datasets import IMAGENET_NUM_CLASSES, build_dataset, build_mixup
from engine import Precision, Student, build_model_ema, build_optimizer, step_values_over_processes, teacher_forward, train_step
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
# The loaders alone are timed on batches of this size, over at least this many after at least as many untimed
# ones (the loader's start), in steady state (benchmark.steady_window).
DATA_TIMING_BATCH = 32
DATA_WARMUP_BATCHES = 8
DATA_TIMED_BATCHES = 24
DATALOADER_PREFETCH_FACTOR = 2  # torch.utils.data.DataLoader's default: batches each worker makes ahead
# /proc/<pid>/stat, after the process name: user and system CPU time in clock ticks.
PROC_STAT_UTIME = 11
PROC_STAT_STIME = 12
DALI_THREAD_PREFIX = '[DALI]'  # the names DALI gives its threads (/proc/<pid>/task/<tid>/comm)
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


# The two [CLS]-KD headline students on one DeiT-B forward: the DeiT-Ti configuration with DeiT-S as a variant.
CLSKD_SMALL_VARIANT = 'small: --model deit_small_patch16_224'
SHARED_MODE = '[CLS]-KD, DeiT-B → DeiT-Ti + DeiT-S, one teacher forward'
PAPER_CONFIGURATIONS = (
    PaperConfiguration('[CLS]-KD, DeiT-B → DeiT-Ti', 'deit_tiny_patch16_224', 'deit_base_patch16_224', CLSKD_FLAGS,
                       CLSKD_GPU_BATCH),
    PaperConfiguration('[CLS]-KD, DeiT-B → DeiT-S', 'deit_small_patch16_224', 'deit_base_patch16_224', CLSKD_FLAGS,
                       CLSKD_GPU_BATCH),
    PaperConfiguration('Manifold, CaiT-S24 → DeiT-Ti', 'deit_tiny_patch16_224', 'cait_s24_224', MANIFOLD_FLAGS,
                       MANIFOLD_GPU_BATCH),
)
CLSKD = PAPER_CONFIGURATIONS[0]


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


def synthetic_batch(step: 'Step', device: torch.device, batch_size: int,
                    input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of images and labels on ``device``, mixed as training mixes them (``step.mixup_fn``)."""
    samples = torch.randn(batch_size, 3, input_size, input_size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    if step.mixup_fn is not None:
        samples, targets = step.mixup_fn(samples, targets)
    return samples, targets


def time_training_step(step: 'Step', device: torch.device, batch_size: int, input_size: int, steps: int, warmup: int,
                       peak_flops: Optional[float] = None) -> dict[str, float]:
    """Time the real training step on one synthetic batch; FLOPs come from ``FlopCounterMode``.

    Without ``peak_flops`` (a CPU) the peak is this machine's matmul rate in the step's dtype, measured before every
    round of ``STEPS_PER_RATE_MEASUREMENT`` steps and after the last, so that rate and steps see the same machine
    load while the steps run back to back, as in training (a product before every step would evict the step's data
    from the caches). Step time and rate are medians.
    """
    count_cpu_attention_flops()
    step.train()
    samples, targets = synthetic_batch(step, device, batch_size, input_size)

    def one_step() -> None:
        run_step(step, samples, targets)

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
    """What ``engine.train_step`` takes, built as training builds it: the students (one, or with ``--variant``
    several), their teacher, and mixup."""
    students: list[Student]
    teacher: Optional[nn.Module]
    mixup_fn: Any

    @property
    def precision(self) -> Precision:
        """The autocast of the step (the students' precisions differ only in their grad scalers)."""
        return self.students[0].precision

    def train(self) -> None:
        for student in self.students:
            student.model.train()


def build_step(args, device: torch.device, variants: Optional[Sequence] = None) -> Step:
    """The step of the flags ``args`` (or of the students ``variants``, ``students.Variant``s, on one teacher): the
    teacher (random weights without ``--teacher-path``) and each student with its EMA, optimizer (at ``--lr`` as
    given) and criterion, compiled with ``--compile``."""
    random_seed(args.seed)
    flags = [variant.args for variant in variants] if variants else [args]
    names = [variant.name for variant in variants] if variants else ['']
    precision = Precision.for_training(args, device)
    teacher = models.load_teacher(args, NUM_CLASSES, device, precision.dtype, flags)
    students = []
    for name, student_args in zip(names, flags):
        model = models.create_student(student_args, teacher, NUM_CLASSES).to(device)
        model_ema = build_model_ema(student_args, model)
        optimizer = build_optimizer(student_args, model, device, student_args.lr)
        criterion = build_criterion(student_args)
        if args.compile:
            model, criterion = models.compile_student(model, criterion)
        students.append(Student(name, model, criterion, optimizer, Precision.for_training(student_args, device),
                                models.teacher_blocks(student_args), student_args.clip_grad, model_ema))
    if args.compile:
        teacher = models.compile_teacher(teacher)
    return Step(students, teacher, build_mixup(args, NUM_CLASSES))


def run_step(step: Step, samples: torch.Tensor, targets: torch.Tensor,
             students: Optional[Sequence[Student]] = None) -> None:
    """What training does per step (``engine.train_step``: the teacher's forward, then each student's step with its
    EMA update) and the step's one host sync; ``students`` a part of the step's (a separate run's step)."""
    terms = train_step(step.students if students is None else students, step.teacher, samples, targets)
    step_values_over_processes([value for student_terms in terms for value in student_terms.values()], False)


@dataclass(frozen=True)
class Window:
    """The batches a timing from files takes, all in one epoch of ``epoch_batches``: ``warmup`` untimed (the
    loader's start and the batches it holds ahead), then ``timed``; the folder's files listed ``repeats`` times."""
    warmup: int
    timed: int
    epoch_batches: int
    files: int
    repeats: int

    def describe(self) -> str:
        listed = f', each listed {self.repeats} times' if self.repeats > 1 else ''
        return (f'batches {self.warmup + 1}-{self.warmup + self.timed} of one epoch of {self.epoch_batches} '
                f'({self.files} files{listed})')


def loader_rounds(args) -> tuple[int, int]:
    """How many batches the loader of ``--data-backend`` holds ahead of its consumer, and how many it makes at a
    time: DataLoader workers each make a whole batch, in turn, two each ahead (torch's ``prefetch_factor``); the
    DALI loader one batch after the other, with those in DALI, read ahead and ready on the device ahead."""
    if args.data_backend == 'dali':
        return dali_data.PREFETCH_BATCHES + dali_data.READ_AHEAD_BATCHES + dali_data.READY_BATCHES, 1
    workers = args.num_workers
    return workers * DATALOADER_PREFETCH_FACTOR, max(workers, 1)


def steady_window(args, warmup: int, steps: int, batch_size: int, files: int) -> Window:
    """The batches to time the loader at its steady rate: after ``warmup`` batches and those it holds ahead, and
    in whole rounds of its workers (started together, they hand over their batches in bursts: a window inside one
    burst times the consumer, not the loader), all in one epoch (an epoch's start is a burst of its own)."""
    ahead, round_size = loader_rounds(args)
    untimed = round_size * math.ceil((warmup + ahead) / round_size)
    timed = round_size * math.ceil(max(steps, 1) / round_size)
    # The timing ends when the batch after the timed ones arrives.
    needed = (untimed + timed + 1) * batch_size
    repeats = math.ceil(needed / files)
    return Window(untimed, timed, files * repeats // batch_size, files, repeats)


def train_loader(args, device: torch.device, warmup: int, steps: int) -> tuple[Iterable, Window]:
    """The training loader of ``--data-backend`` over ``--data-path``, as one process of training builds it, with
    the folder's files listed as often as the steady window needs them in one epoch."""
    dataset, _ = build_dataset(is_train=True, args=args)
    window = steady_window(args, warmup, steps, args.batch_size, len(dataset.samples))
    if window.repeats > 1:
        dataset.samples = dataset.samples * window.repeats
        dataset.imgs = dataset.samples
        dataset.targets = [target for _, target in dataset.samples]
    loader, _ = dali_data.build_data_loaders(args, dataset, dataset, LaunchEnvironment(), device)
    return loader, window


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


def stat_cpu_seconds(stat_path: str) -> float:
    """User and system CPU time from a ``/proc`` stat file (0 where it is gone)."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(')', 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[PROC_STAT_UTIME]) + int(fields[PROC_STAT_STIME])) / os.sysconf('SC_CLK_TCK')


def cpu_seconds(pids: set[int]) -> float:
    """CPU time so far of this process (DALI's threads included) and of the processes ``pids``."""
    return time.process_time() + sum(stat_cpu_seconds(f'/proc/{pid}/stat') for pid in pids)


def dali_threads_cpu_seconds() -> float:
    """CPU time so far of DALI's own threads in this process (decoding on the CPU, and with a GPU the host part
    of JPEG decoding: parsing and Huffman decoding), from ``/proc/self/task``."""
    seconds = 0.0
    for task in glob.glob(f'/proc/{os.getpid()}/task/*'):
        try:
            with open(f'{task}/comm') as f:
                if not f.read().startswith(DALI_THREAD_PREFIX):
                    continue
        except OSError:
            continue
        seconds += stat_cpu_seconds(f'{task}/stat')
    return seconds


def waits_of(loader) -> float:
    """CPU time so far a loader's own thread spent waiting in DALI's ``outputs`` (none for a DataLoader)."""
    return getattr(loader, 'waiting_cpu_seconds', 0.0)


def time_from_files(args, device: torch.device, warmup: int, steps: int,
                    consume: Callable[[torch.Tensor, torch.Tensor], None]) -> dict[str, Any]:
    """Images/s of ``consume`` fed by the loader of ``--data-backend`` in its steady window (``steady_window``):
    from the arrival of the first timed batch to that of the batch after the last. Also the CPU time per image of
    this process and its workers, the part of it in DALI's threads, and the cores that keeps busy, apart from the
    waiting: the CPU of the consuming thread while it waits for the next batch or the device (with a loader of
    its own threads or workers), and of DALI's ``outputs`` on the loader's thread."""
    loader, window = train_loader(args, device, warmup, steps)
    stream = iter(loader)
    for _ in range(window.warmup):
        consume(*next(stream))
    has_own_workers = args.data_backend == 'dali' or args.num_workers > 0
    waited = 0.0
    batch = next(stream)
    synchronize(device)
    workers = child_pids()
    started_cpu, started_dali, started_loader_waits = cpu_seconds(workers), dali_threads_cpu_seconds(), waits_of(loader)
    started = time.perf_counter()
    images = 0
    for _ in range(window.timed):
        consume(*batch)
        images += len(batch[0])
        waiting_since = time.thread_time()
        batch = next(stream)
        waited += time.thread_time() - waiting_since
    waiting_since = time.thread_time()
    synchronize(device)
    waited += time.thread_time() - waiting_since
    wall = time.perf_counter() - started
    cpu = cpu_seconds(workers) - started_cpu
    dali = dali_threads_cpu_seconds() - started_dali
    waiting = (waited if has_own_workers else 0.0) + waits_of(loader) - started_loader_waits
    del batch, stream
    return {'images_per_s': images / wall, 'cpu_ms_per_image': 1000 * cpu / images,
            'dali_threads_ms_per_image': 1000 * dali / images, 'cores_busy': (cpu - waiting) / wall,
            'cores_waiting': waiting / wall, 'window': window}


def time_loader(args, device: torch.device, batches: int, warmup: int) -> dict[str, Any]:
    """The training loader of ``--data-backend`` alone (reading, decoding, augmenting; for DALI also the batch on
    ``device``): ``time_from_files`` with nothing done with the batches."""
    return time_from_files(args, device, warmup, batches, lambda samples, targets: None)


def time_step_from_files(step: Step, args, device: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    """The training step fed by the loader of ``--data-backend``, as training runs it (the batch to the device,
    mixup, the step with its EMA update and host sync): ``time_from_files``."""
    step.train()

    def consume(samples: torch.Tensor, targets: torch.Tensor) -> None:
        samples, targets = samples.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        if step.mixup_fn is not None:
            samples, targets = step.mixup_fn(samples, targets)
        run_step(step, samples, targets)

    return time_from_files(args, device, warmup, steps, consume)


def describe_decoder(args) -> str:
    """The settings of DALI's "mixed" JPEG decoder, where it decodes (``--data-backend dali`` on a GPU)."""
    if args.data_backend != 'dali' or torch.device(args.device).type != 'cuda':
        return ''
    return (f'; DALI\'s mixed JPEG decoder: hw_decoder_load {dali_data.HW_DECODER_LOAD}, '
            f'hybrid_huffman_threshold {dali_data.HYBRID_HUFFMAN_THRESHOLD} px')


def describe_loader(args, stats: dict[str, Any]) -> str:
    workers = f'{args.num_workers} {"threads" if args.data_backend == "dali" else "workers"}'
    dali = (f' ({stats["dali_threads_ms_per_image"]:.2f} in DALI\'s threads)' if args.data_backend == 'dali'
            else '')
    return (f'data ({args.data_backend}, {workers}): {stats["images_per_s"]:.1f} images/s, '
            f'{stats["cpu_ms_per_image"]:.2f} ms CPU per image{dali}, {stats["cores_busy"]:.1f} cores busy and '
            f'{stats["cores_waiting"]:.1f} waiting; {stats["window"].describe()}{describe_decoder(args)}')


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
        loader_stats = time_loader(args, device, args.benchmark_steps, args.benchmark_warmup)
        print(f'  {describe_loader(args, loader_stats)}')
        fed = time_step_from_files(step, args, device, args.benchmark_steps, args.benchmark_warmup)
        print(f'  the step fed from files: {fed["images_per_s"]:.1f} images/s, '
              f'{100 * fed["images_per_s"] / stats["images_per_s"]:.0f}% of the synthetic batch\'s; '
              f'{fed["window"].describe()}')
        stats.update({f'data_{key}': value for key, value in loader_stats.items()},
                     from_files_images_per_s=fed['images_per_s'])
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


def time_shared_and_separate(step: Step, device: torch.device, samples: torch.Tensor, targets: torch.Tensor,
                             rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds of the shared step (``SHARED_PHASE``), of each student's separate step (its name: the teacher's
    forward and that student) and of the teacher's forward alone (``TEACHER_ALONE``), each step as training runs it
    (``run_step``). The measurements alternate within every round, so that all see the same machine."""
    def teacher_alone() -> None:
        with step.precision.autocast():
            teacher_forward(step.teacher, samples)
        synchronize(device)

    phases = {SHARED_PHASE: lambda: run_step(step, samples, targets),
              **{s.name: functools.partial(run_step, step, samples, targets, [s]) for s in step.students},
              TEACHER_ALONE: teacher_alone}
    step.train()
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


def speedup_report(step: Step, device: torch.device, args) -> str:
    """``time_shared_and_separate`` of a step of several students on one synthetic batch, as the line
    ``speed-up over separate runs: R.RRx (bound B.BBx from the teacher's share T%)``; prints the times."""
    samples, targets = synthetic_batch(step, device, args.batch_size, args.input_size)
    seconds = time_shared_and_separate(step, device, samples, targets, args.benchmark_steps, args.benchmark_warmup)
    alone = [seconds[s.name] for s in step.students]
    speedup, bound, share = separate_runs_speedup(seconds[SHARED_PHASE], alone, seconds[TEACHER_ALONE])
    images = len(step.students) * args.batch_size
    print(f'  shared step (the teacher\'s forward once, then each student): {1000 * seconds[SHARED_PHASE]:.1f} ms, '
          f'{images / seconds[SHARED_PHASE]:.1f} student-images/s')
    print('  separate runs, a step each: ' + ', '.join(
        f'{s.name} ({unwrap_model(s.model).default_cfg["architecture"]}) {1000 * seconds[s.name]:.1f} ms'
        for s in step.students) + f'; {images / sum(alone):.1f} student-images/s')
    print(f'  the teacher\'s forward alone: {1000 * seconds[TEACHER_ALONE]:.1f} ms')
    return (f'speed-up over separate runs: {speedup:.2f}x (bound {bound:.2f}x from the teacher\'s share '
            f'{100 * share:.0f}%)')


def run_variants(args, variants: Sequence, device: torch.device) -> str:
    """``main.py --benchmark`` with ``--variant``: the students on one teacher forward against their separate runs
    (``speedup_report``); returns and prints the speed-up line."""
    if all(variant.args.distillation_type == 'none' for variant in variants):
        raise UserError('--benchmark with --variant times students sharing a teacher: give them one '
                        '(--distillation-type soft or hard)')
    step = build_step(args, device, variants)
    print(f'Benchmark {len(step.students)} students <- {args.teacher_model} | device {device.type} | '
          f'{step.precision.describe()} | batch {args.batch_size} | {args.input_size} px')
    line = speedup_report(step, device, args)
    print(line)
    return line


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
               check: Callable[[argparse.Namespace], None], device: torch.device) -> int:
    """Benchmark every paper configuration eager and with ``--compile`` on ``device`` (``main.process_device``'s,
    a GPU with its index), each with the run flags of ``args`` (parsed by ``parser``; ``check`` is the training
    script's check of a flag set); print the rows measured as one markdown table (also after Ctrl-C or SIGINT, e.g.
    from ``timeout -s INT``). With ``--data-path``, also each loader alone (pil with ``--num_workers`` workers,
    dali with as many threads) and every eager configuration fed from the files: by pil with a worker per CPU core
    of the machine, and by dali, each in its steady window."""
    check_papers_run_flags(parser, args)
    rows, loaders, fed, interrupted, shared_speedup = [], {}, [], False, None
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
        shared_args = parser.parse_args([*CLSKD.argv(), '--variant', CLSKD_SMALL_VARIANT],
                                        namespace=argparse.Namespace(**{**vars(args), 'data_path': ''}))
        check(shared_args)
        step = build_step(shared_args, device, students.parse_variants(parser, shared_args, check))
        stats = time_training_step(step, device, shared_args.batch_size, shared_args.input_size,
                                   shared_args.benchmark_steps, shared_args.benchmark_warmup,
                                   peak_flops(device, shared_args.peak_tflops)[0])
        rows.append((SHARED_MODE, stats, table_row(SHARED_MODE, device, step.precision.dtype, CLSKD.batch_size,
                                                   stats)))
        shared_speedup = speedup_report(step, device, shared_args)
        del step
    except KeyboardInterrupt:
        interrupted = True
    versions = f'torch {torch.__version__}, CUDA {torch.version.cuda or "none"}, timm {timm.__version__}'
    print(f'\nThe papers\' configurations ({versions}):\n\n{TABLE_HEADER}')
    for _, _, row in rows:
        print(row)
    if shared_speedup:
        print(f'\n{SHARED_MODE}: {shared_speedup}')
    if loaders:
        print(f'\nThe loaders alone on {args.data_path} (batch {DATA_TIMING_BATCH}):')
        for data_args, loader_stats in loaders.values():
            print(f'- {describe_loader(data_args, loader_stats)}')
    if fed:
        print(f'\nFed from {args.data_path} (images/s, and the share of the synthetic batch\'s; each timed in one '
              'epoch, after the loader\'s start and the batches it holds ahead):\n\n'
              f'| configuration | synthetic | pil, {backends["pil"]} workers | dali, {backends["dali"]} threads |\n'
              '| --- | ---: | ---: | ---: |')
        for mode, synthetic, rates in fed:
            print(f'| {mode} | {figure(synthetic)} | ' + ' | '.join(
                f'{figure(rates[b]["images_per_s"])} ({100 * rates[b]["images_per_s"] / synthetic:.0f}%)'
                for b in backends) + ' |')
        for backend in backends:
            print(f'- {backend}: {fed[-1][2][backend]["window"].describe()}')
    if interrupted:
        print(f'Interrupted: {len(rows)} of {2 * len(PAPER_CONFIGURATIONS) + 1} rows measured')
        return EXIT_INTERRUPTED
    return 0


if __name__ == '__main__':
    # The script is ``main.py --benchmark``: main imports this module, never the other way round.
    import main
    sys.exit(main.run(sys.argv[1:] + ['--benchmark']))
