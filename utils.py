"""DeiT's small helpers: distributed setup and collectives, metric logging, and the user-error type.

Checkpoint reading and writing live in checkpoints.py, the launcher's environment in launch.py.
"""
import builtins
import contextlib
import ctypes
import datetime
import time
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_WINDOW_SIZE = 20
BYTES_PER_MB = 1024.0 * 1024.0
SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 60 * SECONDS_PER_MINUTE

# glibc's mallopt parameters (malloc.h); mallopt takes an int, so the largest trim threshold is INT_MAX.
MALLOPT_TRIM_THRESHOLD = -1
MALLOPT_MMAP_MAX = -4
NEVER_TRIM = 2 ** 31 - 1


class UserError(Exception):
    """An error caused by the user (bad flag, bad path); main.py prints it as one line, exit code 2."""


# ---------------------------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------------------------

_builtin_print = builtins.print


def setup_for_distributed(is_master: bool) -> None:
    """Silence ``print`` on non-master ranks; ``print(..., force=True)`` still prints everywhere."""

    def print(*args: Any, **kwargs: Any) -> None:
        force = kwargs.pop('force', False)
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = print


def is_dist_avail_and_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def collective_device() -> torch.device:
    """Where tensors for a collective live: NCCL reduces CUDA tensors, gloo CPU ones."""
    if is_dist_avail_and_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def init_distributed_mode(launch, device: torch.device, dist_url: str, timeout_minutes: float) -> None:
    """Join the process group described by ``launch`` (a ``launch.LaunchEnvironment``): NCCL on CUDA (``device``
    already the current one), gloo on the CPU; non-master ranks stop printing. A no-op for one process."""
    if not launch.distributed:
        print('Not using distributed mode')
        return
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    init_kwargs: Dict[str, Any] = {}
    if backend == 'nccl':
        # Binding the device up front lets NCCL initialise eagerly on the right GPU.
        init_kwargs['device_id'] = device
    print(f'| distributed init (rank {launch.rank}): {dist_url}, backend {backend}', flush=True)
    dist.init_process_group(backend=backend, init_method=dist_url, world_size=launch.world_size, rank=launch.rank,
                            timeout=datetime.timedelta(minutes=timeout_minutes), **init_kwargs)
    dist.barrier()
    setup_for_distributed(launch.rank == 0)


def leave_distributed() -> None:
    """Leave the process group once every rank is past its last collective. Without it gloo's threads can abort a
    finished process at exit ("terminate called without an active exception", exit -6) and NCCL warns that pending
    operations may be lost."""
    if is_dist_avail_and_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# Random streams
# ---------------------------------------------------------------------------------------------

# numpy's SeedSequence spawn key of a student's stream: independent of the data's stream, which the seed itself
# starts (timm's random_seed).
STUDENT_STREAM_KEY = 1


class RandomStream:
    """A stream of torch's random numbers of its own (the CPU generator's and ``device``'s CUDA generator's states):
    ``active()`` swaps it in around its owner's work and the surrounding stream back after it. A student draws its
    initialisation, drop paths and random tokens in its own stream, so that they neither shift the data's stream
    (sampling, augmentation, mixup) nor another student's: every student of a run draws what it would draw alone."""

    def __init__(self, seed: int, rank: int, device: torch.device):
        seed = int(np.random.SeedSequence(seed, spawn_key=(STUDENT_STREAM_KEY, rank)).generate_state(1, np.uint64)[0])
        self.device = device if device.type == 'cuda' else None
        self._state = {'cpu': torch.Generator().manual_seed(seed).get_state(),
                       'cuda': (torch.Generator(device=self.device).manual_seed(seed).get_state()
                                if self.device is not None else None)}

    def _current(self) -> dict:
        return {'cpu': torch.get_rng_state(),
                'cuda': torch.cuda.get_rng_state(self.device) if self.device is not None else None}

    def _install(self, state: dict) -> None:
        torch.set_rng_state(state['cpu'])
        if self.device is not None:
            torch.cuda.set_rng_state(state['cuda'], self.device)

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        outer = self._current()
        self._install(self._state)
        try:
            yield
        finally:
            self._state = self._current()
            self._install(outer)

    def state_dict(self) -> dict:
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """A state ``state_dict`` returned; a CUDA state is taken only where this stream has a CUDA device."""
        self._state = {'cpu': state['cpu'], 'cuda': state['cuda'] if self.device is not None else None}
        if self.device is not None and state['cuda'] is None:
            self._state['cuda'] = torch.cuda.get_rng_state(self.device)


# ---------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    """Format a duration as ``H:MM:SS`` (hours are not wrapped into days)."""
    total = max(0, int(seconds))
    hours, rem = divmod(total, SECONDS_PER_HOUR)
    minutes, secs = divmod(rem, SECONDS_PER_MINUTE)
    return f'{hours}:{minutes:02d}:{secs:02d}'


class SmoothedValue:
    """Track a series of values: smoothed over a window and averaged over the whole run."""

    def __init__(self, window_size: int = DEFAULT_WINDOW_SIZE, fmt: Optional[str] = None) -> None:
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce ``count`` and ``total``; the window stays per-rank."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=collective_device())
        dist.barrier()
        dist.all_reduce(t)
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self) -> float:
        if not self.deque:
            return float('nan')
        # torch's median (lower middle for even sizes) keeps logs identical to DeiT's.
        return torch.tensor(list(self.deque)).median().item()

    @property
    def avg(self) -> float:
        if not self.deque:
            return float('nan')
        return torch.tensor(list(self.deque), dtype=torch.float64).mean().item()

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else float('nan')

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else float('nan')

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else float('nan')

    def __str__(self) -> str:
        return self.fmt.format(
            median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max, value=self.value)


def _to_number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f'metric {name!r} must be a scalar, got a tensor of shape {tuple(value.shape)}')
        return value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise TypeError(f'metric {name!r} must be an int, float or scalar tensor, got {type(value).__name__}')
    return value.item() if isinstance(value, np.number) else value


class MetricLogger:
    """A named set of ``SmoothedValue`` meters with DeiT-style progress printing."""

    def __init__(self, delimiter: str = '\t') -> None:
        self.meters: Dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, **kwargs: Any) -> None:
        for name, value in kwargs.items():
            if value is None:
                continue
            self.meters[name].update(_to_number(name, value))

    def __getattr__(self, attr: str) -> SmoothedValue:
        # Look up via __dict__: __getattr__ may run before __init__ (copy, unpickling).
        meters = self.__dict__.get('meters', {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def log_every(self, iterable: Iterable, print_freq: int, header: Optional[str] = None) -> Iterator:
        """Yield from ``iterable``, printing progress every ``print_freq`` steps and at the last one."""
        header = header or ''
        print_freq = max(1, int(print_freq))
        try:
            total: Optional[int] = len(iterable)  # type: ignore[arg-type]
        except TypeError:
            total = None
        iter_time = SmoothedValue(fmt='{avg:.4f}')
        data_time = SmoothedValue(fmt='{avg:.4f}')
        show_mem = torch.cuda.is_available() and torch.cuda.is_initialized()
        width = len(str(total)) if total is not None else 0

        start_time = time.perf_counter()
        end = start_time
        i = 0
        for i, obj in enumerate(iterable):
            data_time.update(time.perf_counter() - end)
            yield obj
            iter_time.update(time.perf_counter() - end)
            is_last = total is not None and i == total - 1
            if i % print_freq == 0 or is_last:
                parts = [header]
                if total is not None:
                    eta = iter_time.global_avg * (total - i - 1)
                    parts += [f'[{i:>{width}}/{total}]', f'eta: {format_seconds(eta)}']
                else:
                    parts.append(f'[{i}]')
                parts += [str(self), f'time: {iter_time}', f'data: {data_time}']
                if show_mem:
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / BYTES_PER_MB:.0f}')
                print(self.delimiter.join(p for p in parts if p))
            end = time.perf_counter()
        elapsed = time.perf_counter() - start_time
        steps = iter_time.count
        per_it = elapsed / steps if steps else 0.0
        summary = f'Total time: {format_seconds(elapsed)} ({per_it:.4f} s / it)'
        print(f'{header} {summary}' if header else summary)


# ---------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------

def retain_freed_memory() -> bool:
    """Make the C allocator keep freed memory for reuse instead of handing it back to the kernel.

    PyTorch's CPU allocator has no cache: every tensor is a fresh ``malloc``. glibc maps blocks above its mmap
    threshold afresh and unmaps them on free, and trims the heap top after a step, so every step page-faults its
    memory in again (46-76 thousand faults per eager [CLS]-KD step, 3-5% of its CPU time). With no mmap and no
    trimming a step reuses the previous step's pages; the process keeps its peak footprint, as a caching allocator
    would. Returns False where the C library has no ``mallopt`` (not glibc) or refuses the settings.
    """
    mallopt = getattr(ctypes.CDLL(None), 'mallopt', None)
    if mallopt is None:
        return False
    return bool(mallopt(MALLOPT_MMAP_MAX, 0)) and bool(mallopt(MALLOPT_TRIM_THRESHOLD, NEVER_TRIM))
