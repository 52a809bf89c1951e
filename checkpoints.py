"""Checkpoints in one place: safe loading, atomic saving, room for them on disk, the published layouts, resume and
fine-tuning.

Every file is read with ``torch.load(weights_only=True)`` behind a short allow-list, so a pickle that would run code
is refused before anything of it runs. Writes go to a temporary file that is renamed over the old one; a failed
write is one line naming the file and the OS's reason.
"""
import argparse
import contextlib
import math
import os
import pathlib
import pickle
import random
import re
import shutil
import socket
import urllib.error
import zipfile
from typing import Any, Callable, Optional, Union

import numpy as np
import safetensors.torch
import timm
import torch
import torch.nn as nn
from huggingface_hub.errors import EntryNotFoundError
from timm.layers import resample_abs_pos_embed
from timm.models import clean_state_dict
from torch.utils._pytree import tree_leaves

import utils
from utils import UserError

PathLike = Union[str, os.PathLike]

CHECKPOINT_NAME = 'checkpoint.pth'
BEST_CHECKPOINT_NAME = 'checkpoint_best.pth'
# write_atomically's temporary file: '<target>.tmp.<host>.<pid>' (before the host was named: '<target>.tmp.<pid>').
TEMPORARY_NAME = re.compile(r'(?P<target>.+)\.tmp\.(?:(?P<host>.+)\.)?(?P<pid>\d+)')
# The most checkpoint files a run holds at once: while the last one is replaced, the file being written, the last one
# and the best one (a hard link to the last one when it is saved, a file of its own once the last one moves on).
CHECKPOINTS_AT_ONCE = 3
# Room asked for beyond the checkpoints' tensors: their archive's records, the pickled args and every process's RNG
# states (0.3 % of a DeiT-Ti training checkpoint, 0.1 % of a DeiT-S one, 15 KB more per process) and log.txt.
ROOM_MARGIN = 0.05
# An optimizer that cannot take its step on the meta device (a few of timm's read values with .item(); bitsandbytes
# and APEX need CUDA) is counted as Adam: two moments of a parameter's size per parameter.
FALLBACK_OPTIMIZER_STATES = 2
URL_SCHEMES = ('https://', 'http://')
SAFETENSORS_SUFFIX = '.safetensors'
# torch's load_state_dict lists every missing and unexpected key; a one-line error keeps this much of it.
MAX_ERROR_CHARS = 300
# A [CLS]-KD student's projector is trained with it but takes no part in its predictions.
PROJECTOR_PREFIX = 'projector.'
# A fine-tuned model keeps its own classifier when the checkpoint's has another number of classes (DeiT).
HEAD_KEYS = ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias')
# Checkpoints of the original TNT-S (timm 0.5.4) have the layout that timm 1.x calls "legacy".
LEGACY_VARIANTS = {'tnt_s_patch16_224': 'tnt_s_legacy_patch16_224'}
# A key that only the non-legacy TNT layout has, in timm's naming and in the original TNT release's.
TNT_NEW_LAYOUT_KEYS = ('blocks.0.norm2_proj.weight', 'blocks.0.proj_norm2.weight')
TNT_PREFIX = 'tnt_'
# torch.save writes a zip archive; before PyTorch 1.6 (and with _use_new_zipfile_serialization=False) a pickle
# stream that starts with this pickled magic number.
LEGACY_HEADER = pickle.dumps(torch.serialization.MAGIC_NUMBER, protocol=torch.serialization.DEFAULT_PROTOCOL)[:-1]


# ---------------------------------------------------------------------------------------------
# Reading and writing files
# ---------------------------------------------------------------------------------------------

def _safe_globals() -> list[Any]:
    """What DeiT / timm checkpoints reference beyond tensors: ``args`` (a Namespace holding paths and numpy
    scalars). ``(object, "pickled.name")`` entries cover names that moved (numpy 1 -> 2, pathlib per OS)."""
    scalar = np._core.multiarray.scalar
    safe: list[Any] = [argparse.Namespace, pathlib.PurePosixPath, pathlib.PureWindowsPath, np.dtype,
                       (scalar, 'numpy.core.multiarray.scalar'), (scalar, 'numpy._core.multiarray.scalar')]
    native_flavour = 'WindowsPath' if os.name == 'nt' else 'PosixPath'
    for flavour, pure in (('PosixPath', pathlib.PurePosixPath), ('WindowsPath', pathlib.PureWindowsPath)):
        # The other OS's concrete path cannot be instantiated here, so it loads as a pure path.
        target = getattr(pathlib, flavour) if flavour == native_flavour else pure
        # Python 3.13 moved the classes to pathlib._local; older pickles say pathlib.
        for module in {'pathlib', getattr(pathlib, flavour).__module__}:
            safe.append((target, f'{module}.{flavour}'))
    safe.extend(getattr(np.dtypes, name) for name in sorted(dir(np.dtypes)) if name.endswith('DType'))
    return safe


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return f'{type(err).__name__}: {lines[0]}' if lines else type(err).__name__


def is_torch_archive(path: str) -> bool:
    """Whether the file is in one of torch.save's formats (a zip archive, or the legacy pickle stream)."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, 'rb') as f:
        return f.read(len(LEGACY_HEADER)) == LEGACY_HEADER


def load_checkpoint(path_or_url: PathLike, map_location: Any = 'cpu', lazy: bool = False) -> dict:
    """A checkpoint dict from a file or an http(s) URL, loaded without running pickled code.

    Errors are told apart by type once a file is known to be in torch.save's format: the weights-only unpickler
    refuses a pickle that needs more than tensors and the allow-listed globals (``pickle.UnpicklingError``);
    anything else raised while reading means a damaged archive.
    """
    source = os.fspath(path_or_url)
    is_url = source.startswith(URL_SCHEMES)
    if not is_url:
        if not os.path.exists(source):
            raise UserError(f'checkpoint not found: {source}')
        if os.path.isdir(source):
            raise UserError(f'{source} is not a PyTorch checkpoint: it is a directory')
        if os.path.getsize(source) == 0:
            raise UserError(f'{source} is not a PyTorch checkpoint: the file is empty')
        if not os.access(source, os.R_OK):
            raise UserError(f'cannot read checkpoint {source}: permission denied')
        if not is_torch_archive(source):
            raise UserError(f'{source} is not a PyTorch checkpoint: neither a torch.save zip archive nor a legacy '
                            'torch.save file (truncated, or another format)')
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            if is_url:
                checkpoint = torch.hub.load_state_dict_from_url(source, map_location=map_location, check_hash=False,
                                                                weights_only=True)
            else:
                # Lazy: the tensors' bytes are read only when used (memory-mapped), which torch.save's zip archives
                # allow; a check of keys and shapes reads next to nothing.
                checkpoint = torch.load(source, map_location=map_location, weights_only=True,
                                        mmap=lazy and zipfile.is_zipfile(source))
    except (urllib.error.URLError, ConnectionError, TimeoutError) as err:
        raise UserError(f'cannot download checkpoint {source}: {_first_line(err)}') from None
    except pickle.UnpicklingError:
        raise UserError(f'{source} was refused: it would run code when loaded (it holds more than tensors and '
                        'plain values)') from None
    except Exception as err:  # noqa: BLE001 - malformed bytes surface as any exception type torch.load raises
        raise UserError(f'{source} is not a PyTorch checkpoint: {_first_line(err)}') from None
    if not isinstance(checkpoint, dict):
        raise UserError(f'{source} is not a PyTorch checkpoint: expected a dict, got {type(checkpoint).__name__}')
    return checkpoint


def weights_file_damage(path: str) -> Optional[str]:
    """Why a local weights file (torch.save or safetensors) cannot be read, or None when it reads."""
    try:
        if path.endswith(SAFETENSORS_SUFFIX):
            safetensors.torch.load_file(path, device='cpu')
        else:
            load_checkpoint(path)
    except UserError as err:
        return str(err)
    except Exception as err:  # noqa: BLE001 - safetensors reports damage as its own error types
        return _first_line(err)
    return None


def pretrained_weights_error(err: Exception, source: str, model_flag: str, weights_file: Optional[str]) -> Exception:
    """The one-line error for a failed ``timm.create_model(pretrained=True)``, given where its weights file lies
    (None when it never arrived): a damaged or truncated file is named; a failed download (network, hub, missing
    file: OSError; the hub's missing-file error is no OSError) and weights that do not fit the model are told as
    such. Any other error is returned as it is."""
    damage = weights_file_damage(weights_file) if weights_file and os.path.isfile(weights_file) else None
    if damage is not None:
        return UserError(f'--teacher-path {source}: the weights file of {model_flag} is damaged or truncated: '
                         f'{weights_file} ({damage}); delete it and run again to download it afresh')
    if isinstance(err, (OSError, EntryNotFoundError)):
        return UserError(f'--teacher-path {source}: cannot download the weights of {model_flag}: {_first_line(err)}')
    if isinstance(err, RuntimeError):
        return UserError(f'--teacher-path {source}: the weights do not fit {model_flag}: '
                         f'{" ".join(str(err).split())[:MAX_ERROR_CHARS]}')
    return err


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every OS or file system lets a directory be opened.
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


def temporary_path(path: str) -> str:
    """Where ``write_atomically`` writes ``path`` first, named after this host and process, so that a later run can
    tell whether its writer still runs (``remove_dead_writers_files``)."""
    return f'{path}.tmp.{socket.gethostname()}.{os.getpid()}'


def _os_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The OSError behind ``err``: torch.save tells a failed write of its file as a RuntimeError of its zip writer
    (``unexpected pos ...``), raised while the file's OSError was being handled."""
    while err is not None and not isinstance(err, OSError):
        err = err.__cause__ or err.__context__
    return err


def write_atomically(path: PathLike, write: Callable[[str], None]) -> None:
    """``write(temporary_path)``, then rename the file over ``path`` and make the rename durable: a crash midway
    leaves any previous file at ``path`` intact, and no temporary file behind (also on KeyboardInterrupt). A write
    that fails in the OS (no space, a quota, an I/O error) is raised as a one-line ``utils.OutputWriteError``."""
    path = os.fspath(path)
    tmp_path = temporary_path(path)
    kept = f'the previous {os.path.basename(path)} is kept' if os.path.exists(path) else 'nothing was saved'
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException as err:
        # Left behind only if it cannot be removed either; the next run removes it (its writer is gone).
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        reason = _os_error(err)
        if reason is None:
            raise
        raise utils.write_error(path, reason, kept) from None
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _fsync_file(path: str) -> None:
    with open(path, 'rb+') as f:
        os.fsync(f.fileno())


def save_checkpoint(state: dict, path: PathLike) -> None:
    """Save ``state`` atomically: a crash mid-save leaves any previous file at ``path`` intact."""
    def write(tmp_path: str) -> None:
        with open(tmp_path, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    write_atomically(path, write)


def save_on_master(state: dict, path: PathLike) -> None:
    """``save_checkpoint`` on the main process only; a failed write stops every process (``utils.on_main_process``).
    Call it on all processes."""
    utils.on_main_process(lambda: save_checkpoint(state, path))


def keep_copy_on_master(path: PathLike, copy_path: PathLike) -> None:
    """Keep the checkpoint just saved at ``path`` as ``copy_path`` too (the best one), on the main process only,
    atomically. A hard link writes nothing twice (a DeiT-S training state is 260 MB), and stays what it is when the
    next ``save_checkpoint`` replaces ``path``: that puts a new file under the name. Where the file system has no
    links, a copy. Call it on all processes, as ``save_on_master``."""
    def link_or_copy(tmp_path: str) -> None:
        try:
            os.link(path, tmp_path)
        except OSError:
            shutil.copyfile(path, tmp_path)
            _fsync_file(tmp_path)

    utils.on_main_process(lambda: write_atomically(copy_path, link_or_copy))


# ---------------------------------------------------------------------------------------------
# Room on disk, and what dead writers left
# ---------------------------------------------------------------------------------------------

def _tensor_bytes(tree: Any) -> int:
    return sum(leaf.nbytes for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


def training_state_bytes(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                         with_ema: bool) -> int:
    """The bytes of the tensors ``training_state`` saves for ``model``, a weightless meta-device model: its state
    dict, the EMA's copy of it, and the state of ``make_optimizer(model)`` after a step on meta gradients (no memory,
    no arithmetic; Lookahead's slow weights synced in). ``ROOM_MARGIN`` covers the rest of the file."""
    weights = _tensor_bytes(model.state_dict())
    trained = [p for p in model.parameters() if p.requires_grad]
    # An optimizer's state of a parameter follows the parameter's shape: one of each shape takes the step (a tenth of
    # a ViT's parameters; the step is most of the time this takes).
    probes: dict[tuple, nn.Parameter] = {}
    for param in trained:
        probes.setdefault((param.shape, param.dtype), param)
    try:
        optimizer = make_optimizer(model)
        for probe in probes.values():
            probe.grad = torch.zeros_like(probe)
        optimizer.step()
        if hasattr(optimizer, 'sync_lookahead'):
            optimizer.sync_lookahead()
        state = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group['params']]
        indices = [i for group in state['param_groups'] for i in group['params']]
        held = {id(p): _tensor_bytes(state['state'].get(i, {})) for p, i in zip(params, indices)}
        optimizer_bytes = sum(held[id(probes[p.shape, p.dtype])] for p in trained)
    except Exception:  # noqa: BLE001 - any optimizer of timm's registry: whatever fails on the meta device
        optimizer_bytes = FALLBACK_OPTIMIZER_STATES * _tensor_bytes(trained)
    finally:
        for probe in probes.values():
            probe.grad = None
    return weights * (2 if with_ema else 1) + optimizer_bytes


def room_needed(run_dir: pathlib.Path, checkpoint_bytes: int) -> int:
    """The free bytes a run writing checkpoints of ``checkpoint_bytes`` into ``run_dir`` needs: ``CHECKPOINTS_AT_ONCE``
    of them and ``ROOM_MARGIN``, less what the last and best checkpoints already there hold (a resumed run replaces
    them; a hard-linked best one counts once). Several runs on one file system need the sum."""
    held = {}
    for name in (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME):
        with contextlib.suppress(FileNotFoundError):
            stat = (run_dir / name).stat()
            held[stat.st_dev, stat.st_ino] = min(stat.st_size, checkpoint_bytes)
    return max(0, math.ceil(CHECKPOINTS_AT_ONCE * checkpoint_bytes * (1 + ROOM_MARGIN)) - sum(held.values()))


def check_room(output_dir: pathlib.Path, needed: int) -> None:
    """A ``UserError`` naming ``output_dir``, what its file system has free and what is ``needed``, when that is
    less. User quotas are not seen here: a write beyond one fails as any other (``OutputWriteError``)."""
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(f'--output_dir {output_dir}: {free / utils.BYTES_PER_MB:.1f} MB free on its file system, '
                        f'{needed / utils.BYTES_PER_MB:.1f} MB needed (the last, the best and the checkpoint being '
                        f'written at once, and {ROOM_MARGIN:.0%} more)')


def _writer_is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead_writers_files(run_dir: pathlib.Path) -> None:
    """Remove the temporary checkpoint files in ``run_dir`` whose writer is gone (a process killed mid-write),
    saying which in one line: a writer of this host whose process no longer runs, or, for a writer on another host of
    a shared file system (or of a name without a host), a file older than the run's last checkpoint. A file of a
    writer that still runs (another run in the same folder) is left alone."""
    if not run_dir.is_dir():  # a run's folder made later (a student's under --output_dir)
        return
    last = run_dir / CHECKPOINT_NAME
    last_saved = last.stat().st_mtime if last.is_file() else None
    host = socket.gethostname()
    removed = []
    for path in sorted(run_dir.iterdir()):
        match = TEMPORARY_NAME.fullmatch(path.name)
        if match is None or match['target'] not in (CHECKPOINT_NAME, BEST_CHECKPOINT_NAME):
            continue
        with contextlib.suppress(FileNotFoundError):  # its writer may just have renamed it
            stat = path.stat()
            if match['host'] == host:
                gone = not _writer_is_running(int(match['pid']))
            else:
                gone = last_saved is not None and stat.st_mtime < last_saved
            if gone:
                path.unlink()
                removed.append(f'{path.name} ({stat.st_size / utils.BYTES_PER_MB:.1f} MB)')
    if removed:
        print(f'Removed temporary files whose writer is gone from {run_dir}: {", ".join(removed)}')


# ---------------------------------------------------------------------------------------------
# Weights in the published layouts
# ---------------------------------------------------------------------------------------------

def checkpoint_weights(checkpoint: dict) -> dict:
    """The weights in a training checkpoint or teacher file (``{'model': ...}``, ``{'state_dict': ...}`` or bare),
    without DDP's or torch.compile's key prefixes."""
    for key in ('model', 'state_dict'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    return clean_state_dict(checkpoint)


def check_fit(model: nn.Module, state_dict: dict, path: str, flag: str, model_flag: str) -> None:
    """Strict: ``state_dict`` holds exactly the model's keys in its shapes (a weightless meta-device model will do);
    a file of another architecture is the user's error, named in one line."""
    own = model.state_dict()
    missing, unexpected = sorted(own.keys() - state_dict.keys()), sorted(state_dict.keys() - own.keys())
    mismatched = sorted(k for k in own.keys() & state_dict.keys()
                        if tuple(state_dict[k].shape) != tuple(own[k].shape))
    if missing or unexpected or mismatched:
        details = [f'{label} {len(keys)} keys (e.g. {keys[0]})'
                   for label, keys in (('missing', missing), ('unexpected', unexpected),
                                       ('shape-mismatched', mismatched)) if keys]
        raise UserError(f'{flag} {path} does not fit {model_flag}: ' + ', '.join(details))


def load_weights(model: nn.Module, state_dict: dict, path: str, flag: str, model_flag: str) -> None:
    """``check_fit``, then the strict load."""
    check_fit(model, state_dict, path, flag, model_flag)
    model.load_state_dict(state_dict)


def teacher_architecture(model_name: str, state_dict: dict) -> str:
    """The timm architecture a teacher file fits: TNT-S files of timm 0.5.4 need timm 1.x's legacy variant."""
    if model_name in LEGACY_VARIANTS and not any(key in state_dict for key in TNT_NEW_LAYOUT_KEYS):
        return LEGACY_VARIANTS[model_name]
    return model_name


def teacher_state_dict(model: nn.Module, state_dict: dict) -> dict:
    """A teacher's weights in the model's names: DeiT's / CaiT's release layout as it is, TNT's original names
    renamed."""
    if model.default_cfg.get('architecture', '').startswith(TNT_PREFIX):
        return timm.models.tnt.checkpoint_filter_fn(state_dict, model)
    return state_dict


def load_teacher_weights(model: nn.Module, state_dict: dict, path: str, model_flag: str) -> None:
    load_weights(model, teacher_state_dict(model, state_dict), path, '--teacher-path', model_flag)


def student_state_dict(model: nn.Module, state_dict: dict, training: bool) -> tuple[dict, bool]:
    """``--resume``'s ``X['model']`` in the model's keys, and whether the projector's were set aside: evaluation
    takes no projector (it is trained with the student but takes no part in its predictions)."""
    state_dict = clean_state_dict(state_dict)
    if training:
        return state_dict, False
    own = model.state_dict()
    skipped = sorted(k for k in state_dict if k.startswith(PROJECTOR_PREFIX) and k not in own)
    absent = sorted(k for k in own if k.startswith(PROJECTOR_PREFIX) and k not in state_dict)
    if not (skipped or absent):
        return state_dict, False
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTOR_PREFIX)}
    state_dict.update({k: own[k] for k in own if k.startswith(PROJECTOR_PREFIX)})
    return state_dict, True


def student_flag(model: nn.Module) -> str:
    return f'--model {model.default_cfg.get("architecture", "")}'


def load_student_weights(model: nn.Module, state_dict: dict, path: str, training: bool) -> None:
    """``--resume``'s ``X['model']``; for evaluation the projector (training only) is skipped with a note."""
    state_dict, projector_skipped = student_state_dict(model, state_dict, training)
    if projector_skipped:
        print(f'Note: {path}: the projector is only used in training; its weights are not loaded for evaluation')
    load_weights(model, state_dict, path, '--resume', student_flag(model))


def load_finetune(model: nn.Module, path: str) -> None:
    """``--finetune``: any checkpoint layout; another class count drops the head, the position embedding is
    resized to the model's patch grid (DeiT)."""
    state_dict = checkpoint_weights(load_checkpoint(path))
    own = model.state_dict()
    for key in HEAD_KEYS:
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            print(f'Removing key {key} from the pretrained checkpoint')
            del state_dict[key]
    if 'pos_embed' in state_dict and state_dict['pos_embed'].shape != model.pos_embed.shape:
        num_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state_dict['pos_embed'] = resample_abs_pos_embed(
            state_dict['pos_embed'], new_size=model.patch_embed.grid_size, num_prefix_tokens=num_prefix)
    print(model.load_state_dict(state_dict, strict=False))


# ---------------------------------------------------------------------------------------------
# Training state and resume
# ---------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """This process's Python, numpy and torch RNG states (CPU, and its current CUDA device's: the GPU it trains on),
    as tensors and plain values only (so that the weights-only loader reads them back)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        'python': random.getstate(),
        'numpy': {'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos), 'has_gauss': int(has_gauss),
                  'cached_gaussian': float(cached_gaussian)},
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned, the CUDA state onto this process's current device (whatever GPUs the
    saving and the resuming launch showed each process). Checkpoints of earlier versions hold every visible device's
    CUDA state: restored where as many are visible."""
    version, internal, gauss_next = state['python']
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state['numpy']
    np.random.set_state(('MT19937', numpy_state['keys'].numpy().astype(np.uint32), numpy_state['pos'],
                         numpy_state['has_gauss'], numpy_state['cached_gaussian']))
    torch.set_rng_state(state['torch'])
    cuda = state['cuda']
    if not torch.cuda.is_available() or cuda is None:
        return
    if isinstance(cuda, torch.Tensor):
        torch.cuda.set_rng_state(cuda)
    elif cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def gather_over_ranks(state: Any) -> list:
    """Every rank's ``state``, in rank order (a collective: call it on all ranks)."""
    states: list[Any] = [None] * utils.get_world_size()
    if len(states) == 1:
        return [state]
    torch.distributed.all_gather_object(states, state)
    return states


def training_state(model: nn.Module, optimizer, lr_scheduler, epoch: int, model_ema, scaler,
                   args: argparse.Namespace, max_accuracy: float,
                   student_stream: Optional[utils.RandomStream] = None) -> dict:
    """DeiT's checkpoint layout, plus the best accuracy so far and every rank's RNG states: the data's stream
    (``rng_states``) and the student's own (``student_rng_states``), so that a resumed run draws the same data order,
    augmentations, drop paths and random tokens. A collective: call it on all ranks."""
    return {
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'epoch': epoch,
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'scaler': scaler.state_dict(),
        'args': args,
        'max_accuracy': max_accuracy,
        'rng_states': gather_over_ranks(rng_state()),
        'student_rng_states': gather_over_ranks(student_stream.state_dict()) if student_stream is not None else None,
    }


def resume(path: str, model: nn.Module, training: bool, optimizer=None, lr_scheduler=None, model_ema=None,
           scaler=None, student_stream: Optional[utils.RandomStream] = None) -> tuple[int, float]:
    """Load ``path`` into the student and, when training from a full training checkpoint, the optimizer, schedule,
    EMA, grad scaler and RNG states (the data's and the student's own stream). Returns
    ``(start_epoch, max_accuracy)``."""
    checkpoint = load_checkpoint(path)
    if not isinstance(checkpoint.get('model'), dict):
        raise UserError(f'--resume {path} is not a training checkpoint: it has no "model" entry')
    load_student_weights(model, checkpoint['model'], path, training)
    if not training or not all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
        return 0, 0.0
    optimizer.load_state_dict(checkpoint['optimizer'])
    lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
    if model_ema is not None and checkpoint.get('model_ema'):
        model_ema.module.load_state_dict(clean_state_dict(checkpoint['model_ema']))
    if checkpoint.get('scaler'):
        scaler.load_state_dict(checkpoint['scaler'])
    states, student_states = checkpoint.get('rng_states'), checkpoint.get('student_rng_states')
    if states and len(states) == utils.get_world_size():
        set_rng_state(states[utils.get_rank()])
    else:
        print(f'Note: {path} has no RNG states for {utils.get_world_size()} processes; '
              'the data order and augmentations continue from --seed')
    if student_stream is not None:
        if student_states and len(student_states) == utils.get_world_size():
            student_stream.load_state_dict(student_states[utils.get_rank()])
        else:
            print(f"Note: {path} has no state of the student's random stream for {utils.get_world_size()} processes; "
                  'its drop paths and random tokens continue from --seed')
    start_epoch = checkpoint['epoch'] + 1
    print(f'Resumed from {path} at epoch {start_epoch}')
    return start_epoch, checkpoint.get('max_accuracy', 0.0)
