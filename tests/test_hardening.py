"""Faults injected into real runs: a NaN teacher, preemption signals, a dead rank, a full disk, SIGKILL in the middle
of a write. Nothing saved may be lost, and nothing left behind."""
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

import pytest
import timm
import torch

import main
import checkpoints
import utils
from helpers import (SHORT_DIST_TIMEOUT, Launch, fill_disk_at, free_port, keep_signal_handlers,  # noqa: F401
                     launch_env, make_shapes, run, run_main, save_teacher, torchrun)

TINY = ['--model', 'deit_tiny_patch16_224', '--device', 'cpu', '--num_workers', '0', '--input-size', '32',
        '--batch-size', '4', '--no-model-ema', '--print-freq', '1']
KD = ['--teacher-model', 'deit_tiny_patch16_224', '--distillation-type', 'soft']
START_TIMEOUT_S = 120
HANDLER_TIMEOUT_S = 5
# What a finished run leaves in its output folder (the best checkpoint once an epoch has improved on 0 %).
CLEAN_RUN_FILES = {checkpoints.CHECKPOINT_NAME, checkpoints.BEST_CHECKPOINT_NAME, utils.LOG_NAME}
TEMPORARY_CHECKPOINT = re.compile(rf'{re.escape(checkpoints.CHECKPOINT_NAME)}\.tmp\.{re.escape(socket.gethostname())}'
                                  r'\.\d+')
NO_SPACE = 'No space left on device (ENOSPC)'
MB = int(utils.BYTES_PER_MB)
# Room left on a file system filled up during a run: log.txt's next line fits in its last page, a checkpoint not.
ROOM_LEFT = 64 * 1024


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
step = engine.train_step
def compiling_first_step(*args, **kwargs):
    engine.train_step = step
    print('first step started', flush=True)
    time.sleep({first_step_s})
    return step(*args, **kwargs)
engine.train_step = compiling_first_step
sys.exit(main.run(sys.argv[1:]))
"""
    with start_training(argv, env, code) as process:
        wait_for_line(process, 'first step started')
        process.send_signal(signal.SIGTERM)
        rest = process.communicate(timeout=START_TIMEOUT_S)[0]
    assert process.returncode == main.EXIT_REQUEUE, rest[-3000:]
    assert 'Preempted: saved' in rest and 'error:' not in rest
    assert checkpoints.load_checkpoint(str(out / 'checkpoint.pth'))['epoch'] == -1


# ---------------------------------------------------------------------------------------------
# The disk: too small, full during the run, a writer killed mid-write
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def few_shapes(tmp_path_factory):
    """An image of each class to train on: two steps an epoch."""
    return make_shapes(tmp_path_factory.mktemp('few_shapes'), train_per_class=1, val_per_class=1)


def run_argv(shapes, out, epochs: int) -> list[str]:
    return TINY + ['--data-path', str(shapes), '--output_dir', str(out), '--epochs', str(epochs)]


def logged_epochs(out) -> list[int]:
    return [json.loads(line)['epoch'] for line in (out / utils.LOG_NAME).read_text().splitlines()]


def assert_left_as_a_clean_run(out) -> None:
    names = {path.name for path in out.iterdir()}
    assert {checkpoints.CHECKPOINT_NAME, utils.LOG_NAME} <= names <= CLEAN_RUN_FILES, names
    assert (out / utils.LOG_NAME).read_text().endswith('\n')


def error_lines(text: str) -> list[str]:
    assert 'Traceback' not in text, text[-3000:]
    return [line for line in text.splitlines() if line.startswith('error:')]


def test_too_small_a_file_system_stops_before_any_work(few_shapes, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=50 * MB))
    assert main.run(run_argv(few_shapes, out, 1)) == main.EXIT_USER_ERROR
    captured = capsys.readouterr()
    errors = error_lines(captured.err)
    assert len(errors) == 1 and re.fullmatch(
        rf'error: --output_dir {re.escape(str(out))}: 50\.0 MB free on its file system, \d+\.\d MB needed '
        r'\(the last, the best and the checkpoint being written at once, and 5% more\)', errors[0]), errors
    assert 'Creating model' not in captured.out and 'Start training' not in captured.out
    assert list(out.iterdir()) == []


def test_a_full_disk_at_a_checkpoint_is_one_line_and_loses_nothing(few_shapes, tmp_path, monkeypatch, capsys,
                                                                   keep_signal_handlers):  # noqa: F811
    out = tmp_path / 'run'
    with monkeypatch.context() as patch:
        # Epoch 0's checkpoint is written, epoch 1's meets a full disk.
        fill_disk_at(patch, lambda path: '.tmp.' in path, after=1)
        assert main.run(run_argv(few_shapes, out, 2)) == main.EXIT_WRITE_FAILED
    assert error_lines(capsys.readouterr().err) == [
        f'error: cannot write {out / checkpoints.CHECKPOINT_NAME}: {NO_SPACE}; the previous checkpoint.pth is kept']
    assert checkpoints.load_checkpoint(str(out / checkpoints.CHECKPOINT_NAME))['epoch'] == 0
    assert logged_epochs(out) == [0, 1]  # an epoch's line is written before its checkpoint
    assert_left_as_a_clean_run(out)

    # Room made: the same command trains epoch 1 again, and logs it once.
    assert main.run(run_argv(few_shapes, out, 2)) == 0
    assert (f'Repaired {out / utils.LOG_NAME}: removed the line of epoch 1, which the checkpoint does not hold '
            '(run again)') in capsys.readouterr().out
    assert logged_epochs(out) == [0, 1]
    assert checkpoints.load_checkpoint(str(out / checkpoints.CHECKPOINT_NAME))['epoch'] == 1
    assert_left_as_a_clean_run(out)


def test_a_full_disk_at_log_txt_is_one_line_and_keeps_its_lines_whole(few_shapes, tmp_path, monkeypatch, capsys,
                                                                      keep_signal_handlers):  # noqa: F811
    out = tmp_path / 'run'
    fill_disk_at(monkeypatch, lambda path: path.endswith(utils.LOG_NAME), room=10, after=1)
    assert main.run(run_argv(few_shapes, out, 2)) == main.EXIT_WRITE_FAILED
    assert error_lines(capsys.readouterr().err) == [
        f'error: cannot write {out / utils.LOG_NAME}: {NO_SPACE}; its earlier lines are kept whole']
    assert logged_epochs(out) == [0]
    assert checkpoints.load_checkpoint(str(out / checkpoints.CHECKPOINT_NAME))['epoch'] == 0
    assert_left_as_a_clean_run(out)


def test_sigkills_in_the_middle_of_writes_leave_after_a_resume_what_a_clean_run_leaves(few_shapes, tmp_path):
    """Killed while writing epoch 1's checkpoint, then (resumed) while writing its log line: the next start removes
    the dead writer's temporary file, each start cuts log.txt back to whole lines of saved epochs."""
    out = tmp_path / 'run'
    argv = run_argv(few_shapes, out, 2)

    def killed_at(file: str, after: int, room: int) -> subprocess.CompletedProcess:
        env = launch_env(FAULT='kill', FAULT_FILE=file, FAULT_AFTER=str(after), FAULT_ROOM=str(room))
        result = run([sys.executable, 'tests/faulty_disk.py', *argv], START_TIMEOUT_S, env)
        assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
        return result

    killed_at('.tmp.', after=1, room=MB)
    leftovers = [path.name for path in out.iterdir() if '.tmp.' in path.name]
    assert len(leftovers) == 1 and TEMPORARY_CHECKPOINT.fullmatch(leftovers[0]), leftovers
    assert logged_epochs(out) == [0, 1]

    second = killed_at(utils.LOG_NAME, after=0, room=20)
    assert f'Removed temporary files whose writer is gone from {out}: {leftovers[0]} (1.0 MB)' in second.stdout
    assert 'removed the line of epoch 1, which the checkpoint does not hold' in second.stdout
    assert len((out / utils.LOG_NAME).read_text().splitlines()[-1]) == 20

    last = run_main(argv, env=launch_env())
    assert last.returncode == 0, last.stderr[-3000:]
    assert f'Repaired {out / utils.LOG_NAME}: removed a last line cut short (20 bytes)' in last.stdout
    assert 'Removed temporary files' not in last.stdout
    assert logged_epochs(out) == [0, 1]
    assert_left_as_a_clean_run(out)


def test_a_full_disk_stops_every_process_of_a_launch_at_once(few_shapes, tmp_path):
    """Rank 0 alone writes; its failed write reaches rank 1 through the broadcast after every write, so both exit
    with the write's code at once, with rank 0's line only, long before --dist-timeout."""
    out = tmp_path / 'run'
    env = launch_env(FAULT='full', FAULT_FILE='.tmp.', FAULT_AFTER='1', FAULT_ROOM='1000')
    timeout_min = 5
    started = time.monotonic()
    result = run([sys.executable, *torchrun('--nproc_per_node=2', f'--master_port={free_port()}'),
                  'tests/faulty_disk.py', *run_argv(few_shapes, out, 2), '--distributed', '--dist-timeout',
                  str(timeout_min)], START_TIMEOUT_S * 2, env)
    elapsed = time.monotonic() - started
    assert result.returncode != 0
    # torchrun's own report of the failed workers is a traceback of its ChildFailedError; the workers print none.
    workers, _, report = result.stderr.partition('Traceback')
    assert 'ChildFailedError' in report, result.stderr[-3000:]
    assert error_lines(result.stdout + workers) == [
        f'error: cannot write {out / checkpoints.CHECKPOINT_NAME}: {NO_SPACE}; the previous checkpoint.pth is kept']
    # The processes exited with the write's code. On a busy machine torchrun can see rank 0's exit before rank 1's and
    # stop rank 1 with SIGTERM while it is already on its way out.
    codes = re.findall(r'exitcode\s*:\s*(-?\d+)', report)
    assert str(main.EXIT_WRITE_FAILED) in codes, report
    assert set(codes) <= {str(main.EXIT_WRITE_FAILED), str(-signal.SIGTERM)}, report
    assert elapsed < timeout_min * 60
    assert checkpoints.load_checkpoint(str(out / checkpoints.CHECKPOINT_NAME))['epoch'] == 0
    assert_left_as_a_clean_run(out)


@pytest.fixture()
def small_file_system(tmp_path):
    """``mount(megabytes)``: a tmpfs of that size, mounted under ``tmp_path`` for the test. Skips where mounting is
    not allowed (not root, or a container without the capability)."""
    if os.geteuid() != 0 or shutil.which('mount') is None:
        pytest.skip('mounting a tmpfs needs root')
    mounted = []

    def mount(megabytes: int):
        point = tmp_path / f'fs{len(mounted)}'
        point.mkdir()
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={megabytes}m', 'tmpfs', str(point)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f'cannot mount a tmpfs: {result.stderr.strip()}')
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(['umount', str(point)], check=True)


def test_a_real_file_system_too_small_then_full(few_shapes, small_file_system, monkeypatch, capsys,
                                                keep_signal_handlers):  # noqa: F811
    """A 60 MB file system stops the run before any work; on one with room for the checkpoints, filled up by
    something else while the first epoch trains, torch.save's own failure is the one line."""
    small = small_file_system(60)
    assert main.run(run_argv(few_shapes, small / 'run', 1)) == main.EXIT_USER_ERROR
    assert error_lines(capsys.readouterr().err)[0].startswith(f'error: --output_dir {small / "run"}: 60.0 MB free')
    assert list((small / 'run').iterdir()) == []

    room = small_file_system(256)
    out = room / 'run'
    train_one_epoch = main.train_one_epoch

    def filled_while_training(*args, **kwargs):
        with open(room / 'filler', 'wb') as filler:
            os.posix_fallocate(filler.fileno(), 0, shutil.disk_usage(room).free - ROOM_LEFT)
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(main, 'train_one_epoch', filled_while_training)
    assert main.run(run_argv(few_shapes, out, 1)) == main.EXIT_WRITE_FAILED
    assert error_lines(capsys.readouterr().err) == [
        f'error: cannot write {out / checkpoints.CHECKPOINT_NAME}: {NO_SPACE}; nothing was saved']
    assert logged_epochs(out) == [0]
    assert {path.name for path in out.iterdir()} == {utils.LOG_NAME}


def test_a_second_signal_inside_the_first_ones_handler_does_not_deadlock(keep_signal_handlers, monkeypatch):
    """Python runs a signal's handler between two bytecodes of the main thread, also inside another handler: a
    SIGUSR1 arriving while the SIGTERM handler writes its line must not wait for a lock the main thread holds."""
    flag = main.PreemptionFlag(distributed=False, saves=True)
    written = []

    class InterruptedStderr:
        def write(self, text: str) -> None:
            written.append(text)
            if len(written) == 1:
                flag._handle(signal.SIGUSR1, None)

    monkeypatch.setattr(sys, 'stderr', InterruptedStderr())
    handler = threading.Thread(target=flag._handle, args=(signal.SIGTERM, None), daemon=True)
    handler.start()
    handler.join(HANDLER_TIMEOUT_S)
    assert not handler.is_alive(), 'the nested handler waits forever'
    assert flag.signal == signal.SIGTERM and written == ['Received SIGTERM: saving a checkpoint after this step\n']
