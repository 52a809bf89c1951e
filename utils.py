"""Distributed setup, metric logging and checkpoint I/O for the DeiT-style training scripts.

Modernised counterpart of DeiT's ``utils.py``: checkpoints are loaded with ``weights_only=True``
behind an explicit allow-list and saved atomically; distributed init supports torchrun and SLURM.
"""
import argparse
import builtins
import ctypes
import datetime
import os
import pathlib
import pickle
import random
import re
import time
import urllib.error
import zlib
from collections import defaultdict, deque
from typing import Any, Dict, Iterable, Iterator, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    'UserError',
    'init_distributed_mode', 'setup_for_distributed', 'parse_slurm_nodelist', 'slurm_master_port',
    'is_dist_avail_and_initialized', 'get_world_size', 'get_rank', 'is_main_process', 'barrier',
    'any_rank',
    'SmoothedValue', 'MetricLogger',
    'save_checkpoint', 'save_on_master', 'load_checkpoint', 'strip_prefix', 'unwrap_model',
    'retain_freed_memory', 'seed_everything', 'rng_state', 'set_rng_state', 'gather_rng_states',
    'restore_rng_states', 'format_seconds',
]

PathLike = Union[str, os.PathLike]

DEFAULT_DIST_URL = 'env://'
DEFAULT_DIST_TIMEOUT_MIN = 30
DEFAULT_DEVICE = 'cuda'

# Ports derived from a SLURM job id stay clear of well-known/registered low ports and of the
# Linux ephemeral range (32768+ is shared, but a job-id spread keeps collisions unlikely).
SLURM_PORT_MIN = 20000
SLURM_PORT_MAX = 59999

DEFAULT_WINDOW_SIZE = 20
BYTES_PER_MB = 1024.0 * 1024.0
SECONDS_PER_MINUTE = 60
SECONDS_PER_HOUR = 60 * SECONDS_PER_MINUTE

# glibc's mallopt parameters (malloc.h); mallopt takes an int, so the largest trim threshold is INT_MAX.
MALLOPT_TRIM_THRESHOLD = -1
MALLOPT_MMAP_MAX = -4
NEVER_TRIM = 2 ** 31 - 1

# Error reasons are shown on one line to the user; torch's messages can be paragraphs long.
MAX_REASON_CHARS = 200


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


def barrier() -> None:
    """Synchronise all ranks; a no-op when not distributed."""
    if is_dist_avail_and_initialized():
        dist.barrier()


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo wants CPU tensors.
    if is_dist_avail_and_initialized() and dist.get_backend() == dist.Backend.NCCL:
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device('cpu')


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (identity when not distributed)."""
    if get_world_size() == 1:
        return bool(flag)
    t = torch.tensor(float(flag), device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _expand_host_pattern(pattern: str) -> List[str]:
    """Expand one host pattern with zero or more bracket groups, e.g. ``rack[1-2]-n[01,03]``."""
    match = re.search(r'\[([^\]]*)\]', pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    values = []
    for item in match.group(1).split(','):
        item = item.strip()
        if not item:
            continue
        if '-' in item:
            lo, hi = item.split('-', 1)
            # Zero padding in the range start ("01-10") is part of the host names.
            width = len(lo)
            values.extend(str(n).zfill(width) for n in range(int(lo), int(hi) + 1))
        else:
            values.append(item)
    return [head + v + rest for v in values for rest in _expand_host_pattern(tail)]


def parse_slurm_nodelist(nodelist: str) -> List[str]:
    """Expand a compact SLURM node list (``node[01-03,07],gpu5``) into host names, in order."""
    hosts: List[str] = []
    depth = 0
    start = 0
    # Commas inside brackets separate indices, not hosts, so split only at depth 0.
    for i, ch in enumerate(nodelist + ','):
        if ch == '[':
            depth += 1
        elif ch == ']':
            depth -= 1
        elif ch == ',' and depth == 0:
            token = nodelist[start:i].strip()
            if token:
                hosts.extend(_expand_host_pattern(token))
            start = i + 1
    return hosts


def slurm_master_port(job_id: str) -> int:
    """Deterministic rendezvous port for a SLURM job, in ``[SLURM_PORT_MIN, SLURM_PORT_MAX]``.

    Every task of the job computes the same port without communicating; consecutive job ids map
    to different ports so concurrent jobs on the same node rarely collide.
    """
    job_id = job_id.strip()
    # crc32 rather than hash(): str hashes are salted per interpreter, ranks must agree.
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return SLURM_PORT_MIN + key % (SLURM_PORT_MAX - SLURM_PORT_MIN + 1)


def _setup_slurm_rendezvous(args: argparse.Namespace) -> None:
    """Fill MASTER_ADDR / MASTER_PORT for ``env://`` when launched by srun without torchrun."""
    if not os.environ.get('MASTER_ADDR'):
        addr = os.environ.get('SLURM_LAUNCH_NODE_IPADDR')
        if not addr:
            nodelist = os.environ.get('SLURM_NODELIST') or os.environ.get('SLURM_JOB_NODELIST') or ''
            hosts = parse_slurm_nodelist(nodelist)
            if not hosts:
                raise UserError(
                    'cannot find the master node under SLURM: set MASTER_ADDR '
                    '(SLURM_LAUNCH_NODE_IPADDR, SLURM_NODELIST and SLURM_JOB_NODELIST are empty)')
            addr = hosts[0]
        os.environ['MASTER_ADDR'] = addr
    if not os.environ.get('MASTER_PORT'):
        port = getattr(args, 'dist_port', None)
        if port is None:
            job_id = os.environ.get('SLURM_JOB_ID')
            if not job_id:
                raise UserError('cannot choose a port under SLURM: set MASTER_PORT or --dist-port '
                                '(SLURM_JOB_ID is not set)')
            port = slurm_master_port(job_id)
        os.environ['MASTER_PORT'] = str(port)


def init_distributed_mode(args: argparse.Namespace) -> None:
    """Initialise ``torch.distributed`` from torchrun or SLURM env vars, else run single-process.

    Sets ``args.distributed``, ``args.rank``, ``args.world_size``, ``args.gpu`` (local rank) and
    ``args.dist_backend``.
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        # torch.distributed.launch passes --local-rank as well; the env var is authoritative.
        local_rank = os.environ.get('LOCAL_RANK')
        args.gpu = int(local_rank) if local_rank is not None else int(getattr(args, 'local_rank', 0) or 0)
    elif 'SLURM_PROCID' in os.environ:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ.get('SLURM_NTASKS', '1'))
        args.gpu = int(os.environ.get('SLURM_LOCALID', '0'))
        _setup_slurm_rendezvous(args)
    else:
        print('Not using distributed mode')
        args.distributed = False
        args.rank = 0
        args.world_size = 1
        args.gpu = 0
        args.dist_backend = None
        return

    args.distributed = True
    device = str(getattr(args, 'device', DEFAULT_DEVICE))
    use_nccl = device.startswith('cuda') and torch.cuda.is_available()
    args.dist_backend = 'nccl' if use_nccl else 'gloo'
    args.dist_url = getattr(args, 'dist_url', None) or DEFAULT_DIST_URL
    timeout = datetime.timedelta(minutes=getattr(args, 'dist_timeout', DEFAULT_DIST_TIMEOUT_MIN))

    init_kwargs: Dict[str, Any] = {}
    if use_nccl:
        torch.cuda.set_device(args.gpu)
        # Binding the device up front lets NCCL init eagerly and barrier() use the right GPU.
        init_kwargs['device_id'] = torch.device('cuda', args.gpu)
    print(f'| distributed init (rank {args.rank}): {args.dist_url}, backend {args.dist_backend}', flush=True)
    dist.init_process_group(
        backend=args.dist_backend,
        init_method=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        timeout=timeout,
        **init_kwargs,
    )
    dist.barrier()
    setup_for_distributed(args.rank == 0)


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
        t = torch.tensor([self.count, self.total], dtype=torch.float64, device=_collective_device())
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
# Checkpoints
# ---------------------------------------------------------------------------------------------

def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every OS/filesystem allows opening a directory.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(state: Dict[str, Any], path: PathLike) -> None:
    """Save ``state`` atomically: a crash mid-save leaves any previous file at ``path`` intact."""
    path = os.fspath(path)
    tmp_path = f'{path}.tmp.{os.getpid()}'
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave a half-written temp file behind.
        try:
            os.remove(tmp_path)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_on_master(state: Dict[str, Any], path: PathLike) -> None:
    """``save_checkpoint`` on the main process only."""
    if is_main_process():
        save_checkpoint(state, path)


def _numpy_multiarray_scalar() -> Any:
    core = getattr(np, '_core', None)  # numpy >= 2 renamed numpy.core to numpy._core
    if core is None:
        core = np.core
    return core.multiarray.scalar


def _checkpoint_safe_globals() -> List[Any]:
    """Globals that DeiT / timm checkpoints legitimately reference beyond plain tensors.

    Entries are ``(object, "pickled.name")`` where the name in old files differs from the
    object's current module path (numpy 1 vs 2, pathlib flavours across OSes).
    """
    scalar = _numpy_multiarray_scalar()
    safe: List[Any] = [
        argparse.Namespace,
        pathlib.PurePosixPath,
        pathlib.PureWindowsPath,
        (scalar, 'numpy.core.multiarray.scalar'),
        (scalar, 'numpy._core.multiarray.scalar'),
        np.dtype,
    ]
    native_flavour = 'WindowsPath' if os.name == 'nt' else 'PosixPath'
    for flavour, pure in (('PosixPath', pathlib.PurePosixPath), ('WindowsPath', pathlib.PureWindowsPath)):
        # The other OS's concrete path cannot be instantiated here, so it loads as a pure path.
        target = getattr(pathlib, flavour) if flavour == native_flavour else pure
        # Python 3.13 moved the classes to pathlib._local; older pickles say pathlib.
        for module in {'pathlib', getattr(pathlib, flavour).__module__}:
            safe.append((target, f'{module}.{flavour}'))
    dtypes = getattr(np, 'dtypes', None)  # numpy >= 1.25 pickles dtypes via these classes
    if dtypes is not None:
        safe.extend(getattr(dtypes, name) for name in sorted(dir(dtypes)) if name.endswith('DType'))
    return safe


# Substrings of torch's weights-only unpickler errors raised when a pickle asks for a global,
# call or object construction that is not allow-listed, i.e. something that could run code.
_REFUSAL_MARKERS = (
    'unsupported global',
    'trying to call reduce for unrecognized function',
    'can only create new object',
    'can only build',
    'must be imported to load',
)
# Substrings of RuntimeErrors that mean the bytes are not a readable torch archive.
_FORMAT_MARKERS = (
    'pytorchstreamreader',
    'zip archive',
    'magic number',
    'central directory',
    'unpickl',
    'inline_container',
    'endianness',
)
_WEIGHTS_ONLY_DETAIL = 'WeightsUnpickler error:'


def _one_line_reason(exc: BaseException) -> str:
    """A short single-line reason from an exception, skipping torch's boilerplate advice."""
    text = str(exc)
    if _WEIGHTS_ONLY_DETAIL in text:
        text = text.split(_WEIGHTS_ONLY_DETAIL, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    reason = lines[0] if lines else ''
    # Bare messages like "101" (KeyError) or "" (EOFError) mean nothing without the type.
    if not isinstance(exc, (pickle.UnpicklingError, RuntimeError)):
        reason = f'{type(exc).__name__}: {reason}' if reason else type(exc).__name__
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[:MAX_REASON_CHARS - 3] + '...'
    return reason


def _classify_load_error(path: str, exc: BaseException) -> UserError:
    text = str(exc)
    lowered = text.lower()
    if any(marker in lowered for marker in _REFUSAL_MARKERS):
        match = re.search(r'GLOBAL (\S+)', text)
        what = f'it references {match.group(1)}, which is not allow-listed' if match else _one_line_reason(exc)
        return UserError(f'{path} was refused: it would run code when loaded ({what})')
    if isinstance(exc, RuntimeError) and not any(marker in lowered for marker in _FORMAT_MARKERS):
        # e.g. a CUDA checkpoint on a CPU-only host without map_location: a real file, wrong setup.
        return UserError(f'cannot load checkpoint {path}: {_one_line_reason(exc)}')
    return UserError(f'{path} is not a PyTorch checkpoint: {_one_line_reason(exc)}')


def load_checkpoint(path_or_url: str, map_location: Any = 'cpu') -> Dict[str, Any]:
    """Load a checkpoint dict from a local path or an http(s) URL without running pickled code.

    Uses ``weights_only=True`` plus a small allow-list (argparse.Namespace, pathlib paths, numpy
    scalars/dtypes) so original DeiT checkpoints with their ``args`` entry still load.
    """
    source = os.fspath(path_or_url)
    is_url = source.startswith(('https://', 'http://'))
    if not is_url:
        if not os.path.exists(source):
            raise UserError(f'checkpoint not found: {source}')
        if os.path.isdir(source):
            raise UserError(f'{source} is not a PyTorch checkpoint: it is a directory')
        if os.path.getsize(source) == 0:
            raise UserError(f'{source} is not a PyTorch checkpoint: the file is empty')
        # Surface permission problems as such rather than as a format error.
        try:
            with open(source, 'rb'):
                pass
        except OSError as e:
            raise UserError(f'cannot read checkpoint {source}: {e.strerror or e}') from None

    try:
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            if is_url:
                checkpoint = torch.hub.load_state_dict_from_url(
                    source, map_location=map_location, check_hash=False, weights_only=True)
            else:
                checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise UserError(f'cannot download checkpoint {source}: {_one_line_reason(e)}') from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError, ValueError,
            TypeError, AttributeError, OSError) as e:
        # Malformed bytes surface as any of these (a truncated zip even as OSError EINVAL).
        raise _classify_load_error(source, e) from None

    if not isinstance(checkpoint, dict):
        raise UserError(f'{source} is not a PyTorch checkpoint: expected a dict, got {type(checkpoint).__name__}')
    return checkpoint


def strip_prefix(state_dict: Dict[str, Any], prefix: str = 'module.') -> Dict[str, Any]:
    """Remove ``prefix`` from the keys that start with it (e.g. DDP-saved ``module.`` keys)."""
    if not prefix:
        return dict(state_dict)
    out: Dict[str, Any] = {}
    for key, value in state_dict.items():
        new_key = key[len(prefix):] if key.startswith(prefix) else key
        if new_key in out:
            raise ValueError(f'stripping {prefix!r} maps two keys onto {new_key!r}')
        out[new_key] = value
    return out


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers, nested."""
    while True:
        if isinstance(getattr(model, 'module', None), torch.nn.Module):
            model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# Misc
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


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and all CUDA devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    # torch.manual_seed already seeds every CUDA device, so no separate cuda call is needed.
    torch.manual_seed(seed)


def rng_state() -> Dict[str, Any]:
    """This process's Python, numpy and torch (CPU and CUDA) RNG states.

    Only tensors and plain Python values, so that ``load_checkpoint`` (weights-only) reads them back.
    """
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned; CUDA states are restored only onto as many devices."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state['numpy']
    np.random.set_state(('MT19937', np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                         np_state['has_gauss'], np_state['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's ``rng_state()``, in rank order (collective: call it on all ranks)."""
    states: List[Any] = [None] * get_world_size()
    if len(states) == 1:
        return [rng_state()]
    dist.all_gather_object(states, rng_state())
    return states


def restore_rng_states(states: Optional[List[Dict[str, Any]]]) -> bool:
    """Restore this rank's entry of ``gather_rng_states()``; False (nothing done) when the world size differs."""
    if not states or len(states) != get_world_size():
        return False
    set_rng_state(states[get_rank()])
    return True
