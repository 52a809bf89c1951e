"""Faults injected into real runs: a NaN teacher, preemption signals, a dead rank. Nothing saved may be lost."""
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import pytest
import timm
import torch

import main
import checkpoints
from helpers import SHORT_DIST_TIMEOUT, Launch, make_shapes, run_main, save_teacher

TINY = ['--model', 'deit_tiny_patch16_224', '--device', 'cpu', '--num_workers', '0', '--input-size', '32',
        '--batch-size', '4', '--no-model-ema', '--print-freq', '1']
KD = ['--teacher-model', 'deit_tiny_patch16_224', '--distillation-type', 'soft']
START_TIMEOUT_S = 120


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('shapes'), train_per_class=2, val_per_class=1)


def test_non_finite_loss_stops_with_step_and_terms_and_keeps_checkpoint(shapes, tmp_path):
    good = save_teacher(tmp_path / 'good.pth', 'deit_tiny_patch16_224', img_size=32)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=1000, img_size=32)
    broken = {k: torch.full_like(v, float('nan')) if k == 'head.weight' else v for k, v in model.state_dict().items()}
    torch.save({'model': broken}, tmp_path / 'nan.pth')
    out = tmp_path / 'run'
    common = TINY + KD + ['--data-path', str(shapes), '--output_dir', str(out), '--epochs', '2']

    first = run_main(common + ['--teacher-path', str(good), '--epochs', '1'])
    assert first.returncode == 0, first.stderr[-2000:]
    saved = (out / 'checkpoint.pth').read_bytes()

    second = run_main(common + ['--teacher-path', str(tmp_path / 'nan.pth')])
    assert second.returncode == main.EXIT_NON_FINITE
    error = second.stderr.strip().splitlines()[-1]
    assert error.startswith('error: non-finite loss at epoch 1, step 0: ')
    assert 'kd=nan' in error and 'base=' in error and 'loss=nan' in error
    assert (out / 'checkpoint.pth').read_bytes() == saved
    assert checkpoints.load_checkpoint(str(out / 'checkpoint.pth'))['epoch'] == 0


def start_training(argv, env=None, code: Optional[str] = None) -> Launch:
    """``python main.py ARGV`` (or ``python -c CODE ARGV``), its output merged into ``stdout``."""
    program = ['-c', code] if code else ['main.py']
    return Launch([sys.executable, *program, *argv], env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_line(process: subprocess.Popen, fragment: str) -> list[str]:
    """Read the process output until a line holds ``fragment``; returns the lines read."""
    lines, deadline = [], time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if fragment in line:
            return lines
    process.kill()
    raise AssertionError(f'{fragment!r} never appeared:\n' + ''.join(lines[-30:]))


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_saves_and_exits_for_requeue_then_auto_resumes(sig, shapes, tmp_path):
    out = tmp_path / 'run'
    argv = TINY + ['--data-path', str(shapes), '--output_dir', str(out), '--epochs', '2']
    with start_training(argv) as process:
        wait_for_line(process, 'Epoch: [0]')
        process.send_signal(sig)
        rest = process.communicate(timeout=START_TIMEOUT_S)[0]
    assert process.returncode == main.EXIT_REQUEUE, rest[-2000:]
    assert 'Preempted: saved' in rest
    checkpoint = checkpoints.load_checkpoint(str(out / 'checkpoint.pth'))
    assert checkpoint['epoch'] == -1 and 'optimizer' in checkpoint

    resumed = run_main(argv)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'Auto-resume: continuing from' in resumed.stdout
    epochs = [line for line in (out / 'log.txt').read_text().splitlines()]
    assert len(epochs) == 2


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def test_dead_rank_does_not_hang_the_survivor(shapes, tmp_path):
    port = free_port()
    argv = TINY + ['--data-path', str(shapes), '--epochs', '50', '--distributed', '--dist-timeout', '0.5']
    env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2',
           'OMP_NUM_THREADS': '1'}
    with contextlib.ExitStack() as launches:
        ranks = [launches.enter_context(start_training(argv, {**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}))
                 for r in range(2)]
        wait_for_line(ranks[0], 'Epoch: [1]')
        ranks[1].kill()
        started = time.monotonic()
        rest = ranks[0].communicate(timeout=START_TIMEOUT_S)[0]
        ranks[1].communicate()
    assert ranks[0].returncode == main.EXIT_PEER_FAILURE, rest[-3000:]
    assert time.monotonic() - started < START_TIMEOUT_S
    assert 'another process died or did not answer' in rest and 'Traceback' not in rest


def test_a_rank_blocked_by_a_hung_peer_exits_after_a_stop_signal(shapes, tmp_path):
    """What torchrun does when a worker dies, as NCCL sees it: the survivor is blocked in a collective (here its
    peer is stopped, so gloo sees no broken connection either) and receives SIGTERM. No Python handler can run while
    it waits; the watcher thread ends it with one line and exit 4 well before torchrun's SIGKILL."""
    port = free_port()
    wait_s = 2
    argv = TINY + ['--data-path', str(shapes), '--epochs', '50', '--distributed', *SHORT_DIST_TIMEOUT]
    env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(port), 'WORLD_SIZE': '2',
           'OMP_NUM_THREADS': '1'}
    code = f'import sys, main; main.PEER_WAIT_AFTER_SIGNAL_S = {wait_s}; sys.exit(main.run(sys.argv[1:]))'
    with contextlib.ExitStack() as launches:
        ranks = [launches.enter_context(start_training(argv, {**env, 'RANK': str(r), 'LOCAL_RANK': str(r)}, code))
                 for r in range(2)]
        wait_for_line(ranks[0], 'Epoch: [1]')
        ranks[1].send_signal(signal.SIGSTOP)
        time.sleep(1)  # rank 0 is now waiting on rank 1 in the step's all-reduce
        started = time.monotonic()
        ranks[0].send_signal(signal.SIGTERM)
        rest = ranks[0].communicate(timeout=START_TIMEOUT_S)[0]
        elapsed = time.monotonic() - started
    assert ranks[0].returncode == main.EXIT_PEER_FAILURE, rest[-3000:]
    assert wait_s <= elapsed < wait_s + 10, elapsed
    errors = [line for line in rest.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'received SIGTERM while waiting on the other processes' in errors[0], rest[-3000:]
    assert 'Traceback' not in rest


def test_a_stop_signal_during_a_long_first_step_is_a_preemption(shapes, tmp_path):
    """A signal while the first step still runs (with --compile, a minute or two of compilation) is no sign of a dead
    peer: the step ends, the checkpoint is saved and the process exits 75 to be requeued, where the watcher of a
    launched process used to exit 4 ``PEER_WAIT_AFTER_SIGNAL_S`` after the signal. Launched as one process of a
    torchrun job, so that the watcher runs; the first step is made as long as a compilation by a sleep."""
    wait_s, first_step_s = 1, 4
    out = tmp_path / 'run'
    argv = TINY + ['--data-path', str(shapes), '--output_dir', str(out), '--epochs', '2', *SHORT_DIST_TIMEOUT]
    env = {**os.environ, 'MASTER_ADDR': '127.0.0.1', 'MASTER_PORT': str(free_port()), 'WORLD_SIZE': '1',
           'RANK': '0', 'LOCAL_RANK': '0', 'OMP_NUM_THREADS': '1'}
    code = f"""
import sys, time, engine, main
main.PEER_WAIT_AFTER_SIGNAL_S = {wait_s}
step = engine.training_step
def compiling_first_step(*args, **kwargs):
    engine.training_step = step
    print('first step started', flush=True)
    time.sleep({first_step_s})
    return step(*args, **kwargs)
engine.training_step = compiling_first_step
sys.exit(main.run(sys.argv[1:]))
"""
    with start_training(argv, env, code) as process:
        wait_for_line(process, 'first step started')
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=START_TIMEOUT_S)[0]
    assert process.returncode == main.EXIT_REQUEUE, rest[-3000:]
    assert 'Preempted: saved' in rest and 'error:' not in rest
    assert checkpoints.load_checkpoint(str(out / 'checkpoint.pth'))['epoch'] == -1
