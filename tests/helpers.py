"""Shared pieces of the end-to-end tests: the papers' commands, small datasets and checkpoints, and the one way
tests start processes (``Launch``, ``run``)."""
import builtins
import contextlib
import errno
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Optional

import pytest
import timm
import torch

import benchmark
import engine
import main
import models
import shapes
import utils
from losses import build_criterion
from models import create_student, random_teacher

REPO = Path(__file__).resolve().parent.parent

# The [CLS]-KD README commands, verbatim (placeholders in angle brackets).
CLSKD_TRAIN = (
    'python -m torch.distributed.launch --nproc_per_node=4 main.py --distributed --output_dir <output-dir> '
    '--data-path <dataset-dir> --teacher-path <path-of-teacher-checkpoint> --model deit_tiny_patch16_224 '
    '--teacher-model deit_base_patch16_224 --distillation-type soft --distillation-alpha 1 --distillation-beta 1 '
    '--manifold --w-cls 1.0 --w-atn 2.0 --last-w 4.0 --K 192 --s-id 0 1 2 3 8 9 10 11 --t-id 0 1 2 3 8 9 10 11 '
    '--drop-path 0 --batch-size 128 --seed 0'
)
CLSKD_TEST = (
    'python main.py --eval --output_dir <output-dir> --data-path <dataset-dir> --teacher-path '
    '<path-of-teacher-checkpoint> --model deit_tiny_patch16_224 --teacher-model deit_base_patch16_224 '
    '--distillation-type soft --distillation-alpha 1 --distillation-beta 1 --manifold --w-cls 1.0 --w-atn 2.0 '
    '--last-w 4.0 --K 192 --s-id 0 1 2 3 8 9 10 11 --t-id 0 1 2 3 8 9 10 11 --drop-path 0 '
    '--resume <path-of-distilled-model>'
)
# The Manifold Distillation README command.
MANIFOLD_TRAIN = (
    'python -m torch.distributed.launch --nproc_per_node=8 main.py --distributed --output_dir <output-dir> '
    '--data-path <dataset-dir> --teacher-path <path-of-teacher-checkpoint> --model deit_tiny_patch16_224 '
    '--teacher-model cait_s24_224 --distillation-type soft --distillation-alpha 1 --distillation-beta 1 '
    '--w-sample 0.1 --w-patch 4 --w-rand 0.2 --K 192 --s-id 0 1 2 3 8 9 10 11 --t-id 0 1 2 3 20 21 22 23 '
    '--drop-path 0'
)


# A tiny student and a wider teacher, so that the [CLS]-KD projector exists and is trained.
FEATURE_KD = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_small_patch16_224',
              '--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--w-cls', '1', '--w-atn', '1',
              '--batch-size', '4', '--warmup-epochs', '0', '--seed', '0']
# Launches: main.py with every rank also saving its own state (rank_checkpoints.py), and how long one may take.
PROBE = 'tests/rank_checkpoints.py'
LAUNCH_TIMEOUT_S = 300
SCRIPT_TIMEOUT_S = 120  # a script of a test that trains nothing (a figure, a probe, the GPU check's control flow)
# A launched run gives up on a peer after a minute (--dist-timeout is in minutes; 30 by default), so that a hung
# collective ends its processes well within LAUNCH_TIMEOUT_S.
SHORT_DIST_TIMEOUT = ['--dist-timeout', '1']
# Every process a test starts carries this variable in its environment, with a value of its own per start; the
# processes they start inherit it (torchrun's workers, data loader workers), so that all of them can be found and
# killed, whichever session they run in (torchrun starts each worker in a new one) and whoever their parent is now.
LAUNCH_MARK = 'TEST_LAUNCH_MARK'
KILL_WAIT_S = 10
KILL_POLL_S = 0.05
# Variables of an outer launcher that would redirect the launches under test.
LAUNCHER_VARS = ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT', 'GROUP_RANK')
LAUNCHER_PREFIXES = ('SLURM_', 'PET_', 'TORCHELASTIC_')
# DeiT's evaluation line.
ACCURACY_LINE = re.compile(r'^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$', re.M)


def main_argv(command: str, **placeholders: str) -> list[str]:
    """The arguments after ``main.py`` of a README command, with ``<placeholders>`` filled in."""
    for name, value in placeholders.items():
        command = command.replace(f'<{name.replace("_", "-")}>', str(value))
    words = shlex.split(command)
    return words[words.index('main.py') + 1:]


class Launch(subprocess.Popen):
    """``argv`` started in the repository, in a session of its own and marked (``LAUNCH_MARK``). Leaving it as a
    context manager, on success, failure, timeout or Ctrl-C alike, kills every process of it, so that no rank is
    left on a GPU or a port after its test: ``subprocess.run``'s timeout kills only the process it started, and a
    signal to the test's process group does not reach torchrun's workers."""

    def __init__(self, argv: list[str], env: Optional[dict] = None, **popen_kwargs):
        self.mark = uuid.uuid4().hex
        super().__init__(argv, cwd=REPO, env={**(os.environ if env is None else env), LAUNCH_MARK: self.mark},
                         start_new_session=True, **popen_kwargs)

    def processes(self) -> list[int]:
        """The live processes of this launch (a process killed but not yet reaped has no environment left)."""
        entry = f'{LAUNCH_MARK}={self.mark}'.encode()
        found = []
        for path in Path('/proc').iterdir():
            with contextlib.suppress(OSError, ValueError):
                if entry in (path / 'environ').read_bytes().split(b'\0'):
                    found.append(int(path.name))
        return found

    def kill_all(self) -> None:
        """SIGKILL every process of the launch, those it starts meanwhile too."""
        deadline = time.monotonic() + KILL_WAIT_S
        while (pids := self.processes()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(KILL_POLL_S)

    def __exit__(self, *exc_info):
        self.kill_all()
        return super().__exit__(*exc_info)


def process_alive(pid: int) -> bool:
    """Running or sleeping, not a zombie waiting to be reaped."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def run(argv: list[str], timeout: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``argv`` run to its end in the repository (output captured as text), as a ``Launch``; past ``timeout``
    seconds every process of it is killed and the test fails with the output so far."""
    with Launch(argv, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill_all()
            stdout, stderr = process.communicate()
            raise AssertionError(f'{shlex.join(argv)} did not end within {timeout:g} s; all its processes were '
                                 f'killed\n{stdout[-3000:]}{stderr[-3000:]}') from None
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def run_main(argv: list[str], timeout: float = 600, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` in the repository, as a user runs it."""
    return run([sys.executable, 'main.py', *argv], timeout, env)


def make_shapes(root: Path, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    shapes.make_shapes_dataset(str(root), train_per_class=train_per_class, val_per_class=val_per_class)
    return root


def save_teacher(path: Path, model_name: str, num_classes: int = 1000, **kwargs) -> Path:
    """A teacher file in DeiT's release layout: ``{'model': state_dict}``."""
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    torch.save({'model': model.state_dict()}, path)
    return path


def tiny_shapes_with_teacher(root: Path, teacher_model: str, image_size: int) -> tuple[Path, Path]:
    """Two training and one validation image per shapes class at ``image_size``, and a random ``teacher_model`` for
    them in DeiT's release layout: the data of a run that checks what a run does, not what it learns."""
    data = shapes.make_shapes_dataset(str(root / 'shapes'), train_per_class=2, val_per_class=1, image_size=image_size)
    teacher = save_teacher(root / 'teacher.pth', teacher_model, num_classes=shapes.SHAPES_NUM_CLASSES,
                           img_size=image_size)
    return Path(data), teacher


def with_data(flags: list[str], data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    """``flags`` on the data and teacher of ``tiny_shapes_with_teacher``, writing to ``out``, then ``extra``."""
    shapes_dir, teacher = data
    return [*flags, '--data-path', str(shapes_dir), '--teacher-path', str(teacher), '--output_dir', str(out), *extra]


def read_log(folder: Path) -> list[dict]:
    """The epochs' lines of ``folder``'s ``log.txt``."""
    return [json.loads(line) for line in (folder / utils.LOG_NAME).read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def launch_env(**extra: str) -> dict:
    """This environment without any launcher's variables, single-threaded, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARS and not k.startswith(LAUNCHER_PREFIXES)}
    env.update(OMP_NUM_THREADS='1', PYTHONUNBUFFERED='1', **extra)
    return env


def launch(command: list[str], env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """``python COMMAND`` (a launcher and its processes) run to a successful end within ``LAUNCH_TIMEOUT_S``."""
    result = run([sys.executable, *command], LAUNCH_TIMEOUT_S, env or launch_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def torchrun(*launcher_args: str) -> list[str]:
    """``torchrun ...`` as ``python -m torch.distributed.run ...``, so that it uses this interpreter."""
    return ['-m', 'torch.distributed.run', *launcher_args]


def rank_states(out: Path, world_size: int) -> list[dict]:
    """What every rank of a ``PROBE`` launch saved, on the CPU (so that ranks on different GPUs compare)."""
    return [torch.load(out / f'rank{r}-checkpoint.pth', map_location='cpu', weights_only=False)
            for r in range(world_size)]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{what} differs between ranks: {differ[:5]}'


def assert_ranks_in_sync(states: list[dict]) -> None:
    """Model (projector included), EMA and optimizer state are identical on every rank, and training moved them."""
    first = states[0]
    projector = [k for k in first['model'] if k.startswith('projector.')]
    assert projector, 'the student has no projector: the run does not test its gradient reduction'
    for other in states[1:]:
        assert_same_tensors(first['model'], other['model'], 'model')
        assert_same_tensors(first['model_ema'], other['model_ema'], 'model_ema')
        assert first['optimizer']['state'].keys() == other['optimizer']['state'].keys()
        for index, state in first['optimizer']['state'].items():
            assert_same_tensors(state, other['optimizer']['state'][index], f'optimizer state {index}')
    # The EMA (decay ~1) stays near the initial weights: the projector moved away from them, so it was trained.
    assert all(not torch.equal(first['model'][k], first['model_ema'][k]) for k in projector)


@pytest.fixture()
def keep_signal_handlers():
    """main.py installs preemption handlers; the test process gets its own back after the test."""
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: on a busy machine OpenMP threads waiting on each other make the runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def check_compiled_matches_eager(device: torch.device, rel: float, rtol: float, atol: float) -> None:
    """--compile traces the token hooks with the models and freezes the teacher's weights into its graph: every
    term (within ``rel``) and every gradient (``rtol``/``atol``) must stay what eager gives on ``device``, and a
    later update of the student's weights must show in the compiled losses."""
    argv = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224', '--distillation-type',
            'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--w-cls', '1', '--w-atn', '2', '--w-sample', '0.1',
            '--w-patch', '4', '--w-rand', '0.2', '--input-size', '32', '--drop-path', '0']
    args = main.get_args_parser().parse_args(argv)
    num_classes, batch, size = 10, 4, 32
    torch.manual_seed(0)
    teacher = random_teacher(args, num_classes).to(device)
    student = create_student(args, teacher, num_classes).to(device)
    criterion = build_criterion(args)
    samples = torch.randn(batch, 3, size, size, device=device)
    targets = torch.nn.functional.one_hot(torch.randint(0, num_classes, (batch,), device=device), num_classes).float()

    def losses_and_gradients(model, frozen, loss):
        torch.manual_seed(1)  # the random relation term samples its tokens
        terms = engine.compute_losses(model, frozen, loss, samples, targets)
        terms['loss'].backward()
        gradients = [p.grad.clone() for p in student.parameters()]
        student.zero_grad(set_to_none=True)
        return {name: value.item() for name, value in terms.items()}, gradients

    eager_terms, eager_gradients = losses_and_gradients(student, teacher, criterion)
    compiled_student, compiled_criterion = models.compile_student(student, criterion)
    compiled_models = (compiled_student, models.compile_teacher(teacher), compiled_criterion)
    # Compiled code draws its own random numbers unless told to use eager's: the same tokens must be sampled.
    with torch._inductor.config.patch(fallback_random=True):
        compiled_terms, compiled_gradients = losses_and_gradients(*compiled_models)
    assert all(eager_terms[name] > 0 for name in ('kd', 'mf_sample', 'mf_patch', 'mf_rand', 'cls', 'atn'))
    assert compiled_terms == pytest.approx(eager_terms, rel=rel)
    for compiled, eager in zip(compiled_gradients, eager_gradients):
        torch.testing.assert_close(compiled, eager, rtol=rtol, atol=atol)

    # The teacher's weights are constants of its graph, but the student's are not: an update must show.
    with torch.no_grad():
        student.head.weight.mul_(2.0)
    with torch._inductor.config.patch(fallback_random=True):
        updated_terms, _ = losses_and_gradients(*compiled_models)
    assert updated_terms['base'] != pytest.approx(compiled_terms['base'])
    assert updated_terms == pytest.approx(losses_and_gradients(student, teacher, criterion)[0], rel=rel)


class FaultyFile:
    """A file as ``open`` returns it, on a disk with ``room`` bytes left: a write past them writes what fits, then
    fails as the OS's write does on a full disk (ENOSPC) or, with ``kill``, is cut there by SIGKILL to this process
    (a scheduler's kill, the OOM killer)."""

    def __init__(self, file, room: int, kill: bool = False) -> None:
        self._file, self._room, self._kill = file, room, kill

    def write(self, data) -> int:
        data = memoryview(data).cast('B')
        fits = min(len(data), max(self._room, 0))
        self._room -= fits
        if fits:
            self._file.write(data[:fits])
        if fits < len(data):
            if self._kill:
                self._file.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return fits

    def __getattr__(self, name):
        return getattr(self._file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)


def faulty_open(matches: Callable[[str], bool], room: int, after: int = 0, kill: bool = False) -> Callable:
    """``open`` for which the files opened for writing whose path ``matches`` are ``FaultyFile``s, except the first
    ``after`` of them, written whole."""
    real_open = builtins.open
    opened = 0

    def opener(file, mode='r', *args, **kwargs):
        nonlocal opened
        handle = real_open(file, mode, *args, **kwargs)
        if not any(m in mode for m in 'wa') or not matches(os.fspath(file)):
            return handle
        opened += 1
        return FaultyFile(handle, room, kill) if opened > after else handle

    return opener


def fill_disk_at(monkeypatch, matches: Callable[[str], bool], room: int = 1000, after: int = 0) -> None:
    """The disk is full for the files opened for writing whose path ``matches``, after the first ``after``."""
    monkeypatch.setattr(builtins, 'open', faulty_open(matches, room, after))


SPEEDUP_LINE = "speed-up over separate runs: 1.50x (bound 1.60x from the teacher's share 70%)"


def stub_step(args, device: torch.device) -> benchmark.Step:
    """A step of one student whose precision is the flags' and nothing else (its timing is stubbed)."""
    return benchmark.Step([engine.Student('', None, None, None, engine.Precision.for_training(args, device))], None,
                          None)
