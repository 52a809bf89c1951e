"""DeiT's small helpers: distributed setup and collectives, metric logging and ``log.txt``, and the error types a
run ends with in one line.

Checkpoint reading and writing live in checkpoints.py, the launcher's environment in launch.py.
"""
import builtins
import contextlib
import ctypes
import datetime
import errno
import json
import os
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

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

LOG_NAME = 'log.txt'  # DeiT's log of the run in --output_dir: a JSON line per epoch
EXIT_USER_ERROR = 2  # a UserError's exit code, also argparse's for a bad flag


class UserError(Exception):
    """An error caused by the user (bad flag, bad path); main.py prints it as one line, exit code 2."""


class OutputWriteError(Exception):
    """A file of the run (a checkpoint, ``log.txt``) could not be written: no space, a quota, an I/O error. main.py
    prints it as one line and exits with its own code (``main.EXIT_WRITE_FAILED``)."""


def os_reason(err: OSError) -> str:
    """The OS's words for ``err`` and its errno name: ``No space left on device (ENOSPC)``."""
    name = errno.errorcode.get(err.errno) if err.errno is not None else None
    return f'{err.strerror} ({name})' if err.strerror and name else str(err)


def write_error(path: Any, err: OSError, kept: str) -> OutputWriteError:
    """The one-line error of a failed write of ``path``, saying what is ``kept``."""
    return OutputWriteError(f'cannot write {path}: {os_reason(err)}; {kept}')


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


def on_main_process(action: Callable[[], Any]) -> None:
    """``action()`` on the main process only (it writes the run's files). A ``UserError`` or ``OutputWriteError`` it
    raises is raised on every process, through one broadcast that all of them wait in: all stop at once with its line,
    instead of the others waiting for the main process in their next collective until the launcher or
    ``--dist-timeout`` ends them. Call it on all processes."""
    error = None
    if is_main_process():
        try:
            action()
        except (UserError, OutputWriteError) as err:
            error = err
    if is_dist_avail_and_initialized():
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error is not None:
        raise error


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
        self.seed = int(np.random.SeedSequence(seed, spawn_key=(STUDENT_STREAM_KEY, rank)).generate_state(
            1, np.uint64)[0])
        self.device = device if device.type == 'cuda' else None
        self._state = {'cpu': torch.Generator().manual_seed(self.seed).get_state(), 'cuda': self._first_cuda_state()}

    def _first_cuda_state(self) -> Optional[torch.Tensor]:
        """The stream's CUDA state as its seed starts it (None without a CUDA device)."""
        if self.device is None:
            return None
        return torch.Generator(device=self.device).manual_seed(self.seed).get_state()

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
        """A state ``state_dict`` returned; a CUDA state is taken only where this stream has a CUDA device, and one
        saved without it (a run on the CPU resumed on a GPU) starts from the stream's seed, as a fresh one does."""
        cuda = state['cuda'] if state['cuda'] is not None else self._first_cuda_state()
        self._state = {'cpu': state['cpu'], 'cuda': cuda if self.device is not None else None}


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


def append_log(path: Path, stats: Dict[str, Any]) -> None:
    """Append ``stats`` to ``path`` (DeiT's ``log.txt``) as one JSON line, whole or not at all: a write that fails (no
    space, a quota, an I/O error) is cut back to the file's previous end and raised as an ``OutputWriteError``."""
    line = memoryview((json.dumps(stats) + '\n').encode())
    try:
        # Unbuffered: no bytes of the line wait in a buffer to be written after the cut, at close.
        with open(path, 'ab', buffering=0) as f:
            end = f.seek(0, os.SEEK_END)
            try:
                while line:
                    line = line[f.write(line):]
                os.fsync(f.fileno())
            except OSError:
                f.truncate(end)
                raise
    except OSError as err:
        raise write_error(path, err, 'its earlier lines are kept whole') from None


def _logged_epoch(line: bytes) -> Optional[int]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    epoch = record.get('epoch') if isinstance(record, dict) else None
    return epoch if isinstance(epoch, int) else None


def repair_log(path: Path, next_epoch: Optional[int] = None) -> None:
    """Cut ``path`` (``log.txt``) back to whole lines, saying so in one line: a last line cut short by a kill or a
    full disk goes, and, for a run that resumes at ``next_epoch``, so do the last lines of that epoch and later ones
    (an epoch's line is written before its checkpoint: a run stopped between the two runs that epoch again). Only
    ever truncates, which needs no free space."""
    if not path.is_file():
        return
    data = path.read_bytes()
    end = data.rfind(b'\n') + 1
    removed = []
    if end < len(data):
        removed.append(f'a last line cut short ({len(data) - end} bytes)')
    later = []
    while next_epoch is not None and end:
        start = data.rfind(b'\n', 0, end - 1) + 1
        epoch = _logged_epoch(data[start:end])
        if epoch is None or epoch < next_epoch:
            break
        later.append(epoch)
        end = start
    if later:
        plural = 's' if len(later) > 1 else ''
        removed.append(f'the line{plural} of epoch{plural} {", ".join(map(str, sorted(later)))}, which the checkpoint '
                       'does not hold (run again)')
    if removed:
        try:
            os.truncate(path, end)
        except OSError as err:
            raise write_error(path, err, 'it is left as it was') from None
        print(f'Repaired {path}: removed {" and ".join(removed)}')


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
