"""Distributed launches for real, on the CPU with gloo: torch.distributed.launch, torchrun (one and two nodes), SLURM.

Every launch runs the real training or evaluation of main.py in separate processes. ``rank_checkpoints.py`` is
main.py with one addition, every rank saving its own state, so that the ranks can be compared after training.
"""
import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch

import checkpoints
import main
from helpers import (CLSKD_TRAIN, FEATURE_KD, LAUNCH_TIMEOUT_S, PROBE, SHORT_DIST_TIMEOUT, Launch,
                     assert_ranks_in_sync, assert_same_tensors, free_port, launch, launch_env, main_argv,
                     process_alive, rank_states, run, save_teacher, torchrun)
from samplers import RASampler, ShardedEvalSampler
from shapes import make_shapes_dataset

WORLD_SIZE = 2
NUM_REPEATS = 3  # RASampler's default
IMAGE_SIZE = 32
TRAIN_PER_CLASS = 2
# Tiny, CPU-only, single-threaded runs: two processes share the machine's cores.
SMALL_RUN = ['--input-size', str(IMAGE_SIZE), '--num_workers', '0', '--device', 'cpu', '--print-freq', '1',
             *SHORT_DIST_TIMEOUT]
ACC_LINE = re.compile(r'^\* Acc@1 \d+\.\d{3} Acc@5 \d+\.\d{3} loss \d+\.\d{3}$', re.M)
# Eval set: an odd number of images and classes, so that the shards are uneven and Acc@5 is not trivially 100.
EVAL_CLASSES = 13
SLURM_EPOCHS = 4
POLL_S = 0.05
HEAD_SCALE = 0.3  # logits a few units apart, so that a miscounted image moves the loss in its third decimal


def assert_sampler_log(states: list[dict], train_size: int, epochs: int) -> None:
    """Each epoch every rank's sampler was set to that epoch and dealt the RASampler positions of its rank."""
    per_epoch = []
    for rank, state in enumerate(states):
        log = state['sampler_log']
        assert [e['epoch'] for e in log] == [e['sampler_epoch'] for e in log] == list(range(epochs))
        for entry in log:
            sampler = RASampler(range(train_size), num_replicas=WORLD_SIZE, rank=rank, seed=0)
            sampler.set_epoch(entry['epoch'])
            assert entry['indices'] == list(sampler)
        per_epoch.append([e['indices'] for e in log])
    for epoch in range(epochs):
        assert per_epoch[0][epoch] != per_epoch[1][epoch], 'both ranks were dealt the same samples'
    assert per_epoch[0][0] != per_epoch[0][-1] or epochs == 1, 'the sample order did not change with the epoch'


@pytest.mark.parametrize('size', [1, 13, 256, 1001])
@pytest.mark.parametrize('world', [2, 3, 8])
def test_eval_shards_cover_every_image_once(size, world):
    shards = [ShardedEvalSampler(range(size), num_replicas=world, rank=rank) for rank in range(world)]
    indices = [list(shard) for shard in shards]
    assert sorted(i for shard in indices for i in shard) == list(range(size))
    assert [len(shard) for shard in shards] == [len(shard) for shard in indices]
    assert max(map(len, indices)) - min(map(len, indices)) <= 1


def test_ra_sampler_deals_each_rank_its_positions_every_epoch():
    """Per epoch one shared permutation, each image repeated; rank r takes positions r, r + world, ..."""
    size = 600
    orders = []
    for epoch in range(3):
        stream = torch.randperm(size, generator=torch.Generator().manual_seed(epoch)).repeat_interleave(NUM_REPEATS)
        per_rank = []
        for rank in range(WORLD_SIZE):
            sampler = RASampler(range(size), num_replicas=WORLD_SIZE, rank=rank, seed=0)
            sampler.set_epoch(epoch)
            per_rank.append(list(sampler))
            assert per_rank[-1] == stream.tolist()[rank::WORLD_SIZE][:len(sampler)]
        assert per_rank[0] != per_rank[1]
        orders.append(per_rank[0])
    assert orders[0] != orders[1] != orders[2]


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(str(root), train_per_class=TRAIN_PER_CLASS, val_per_class=1, image_size=IMAGE_SIZE)
    return root


@pytest.fixture(scope='module')
def train_size(shapes) -> int:
    return sum(1 for _ in (shapes / 'train').rglob('*.png'))


@pytest.fixture(scope='module')
def teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp('teacher') / 'deit_small.pth', 'deit_small_patch16_224',
                        img_size=IMAGE_SIZE)


def test_seed_launch_line_trains_and_rank0_writes(shapes, teacher, tmp_path):
    """The papers' ``python -m torch.distributed.launch ... main.py --distributed ...`` line, on 2 processes."""
    out = tmp_path / 'run'
    argv = main_argv(CLSKD_TRAIN, output_dir=out, dataset_dir=shapes, path_of_teacher_checkpoint=teacher)
    # The seeds' teacher is deit_base; deit_small keeps the run small and still needs the projector.
    result = launch(['-m', 'torch.distributed.launch', f'--nproc_per_node={WORLD_SIZE}', f'--master_port={free_port()}',
                     'main.py', *argv, '--teacher-model', 'deit_small_patch16_224', '--epochs', '1', *SMALL_RUN])
    for rank in range(WORLD_SIZE):
        assert f'| distributed init (rank {rank}): env://, backend gloo' in result.stdout
    # Only rank 0 prints (the launcher passed --local-rank, which main.py accepts).
    assert result.stdout.count('Start training for 1 epochs') == 1
    assert len(ACC_LINE.findall(result.stdout)) == 1

    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [entry['epoch'] for entry in log] == [0], 'log.txt must be written once, by rank 0'
    assert {'train_cls', 'train_atn', 'train_mf_rand', 'test_acc1'} <= set(log[0])
    checkpoint = torch.load(out / checkpoints.CHECKPOINT_NAME, weights_only=False)
    # The command line as given is saved; the launcher's world size shows in the per-rank RNG states.
    assert checkpoint['epoch'] == 0 and checkpoint['args'].distributed and len(checkpoint['rng_states']) == WORLD_SIZE
    assert 'projector.fc2.weight' in checkpoint['model']
    assert not [p.name for p in out.iterdir() if '.tmp.' in p.name]


def test_torchrun_keeps_ranks_identical(shapes, teacher, train_size, tmp_path):
    """torchrun, 2 processes, 2 epochs: every rank ends with the same student, projector, EMA and optimizer."""
    out = tmp_path / 'run'
    epochs = 2
    launch(torchrun(f'--nproc_per_node={WORLD_SIZE}', f'--master_port={free_port()}')
           + [PROBE, '--distributed', '--data-path', str(shapes), '--teacher-path', str(teacher), '--output_dir',
              str(out), '--epochs', str(epochs), *FEATURE_KD, *SMALL_RUN])
    states = rank_states(out, WORLD_SIZE)
    assert [s['epoch'] for s in states] == [epochs - 1] * WORLD_SIZE
    assert_ranks_in_sync(states)
    assert_sampler_log(states, train_size, epochs)
    assert_same_tensors(states[0]['model'], torch.load(out / checkpoints.CHECKPOINT_NAME, weights_only=False)['model'],
                        'checkpoint.pth and rank 0')


def test_torchrun_two_nodes_keeps_ranks_identical(shapes, teacher, train_size, tmp_path):
    """Two torchrun launches, one per "node", meeting at a rendezvous on localhost."""
    out = tmp_path / 'run'
    port = free_port()
    with contextlib.ExitStack() as launches:
        procs = []
        for node_rank in range(WORLD_SIZE):
            command = torchrun('--nnodes=2', f'--node_rank={node_rank}', '--nproc_per_node=1',
                               '--master_addr=127.0.0.1', f'--master_port={port}')
            procs.append(launches.enter_context(Launch(
                [sys.executable, *command, PROBE, '--distributed', '--data-path', str(shapes), '--teacher-path',
                 str(teacher), '--output_dir', str(out), '--epochs', '1', *FEATURE_KD, *SMALL_RUN],
                launch_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        outputs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for proc in procs]
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-3000:]
    states = rank_states(out, WORLD_SIZE)
    assert_ranks_in_sync(states)
    assert_sampler_log(states, train_size, 1)
    assert all(len(state['rng_states']) == WORLD_SIZE for state in states)


@pytest.fixture(scope='module')
def eval_setup(tmp_path_factory) -> tuple[Path, Path]:
    """An odd-sized evaluation set and a student checkpoint whose predictions vary from image to image."""
    root = tmp_path_factory.mktemp('eval')
    data = make_shapes_dataset(str(root / 'shapes'), num_classes=EVAL_CLASSES, train_per_class=1,
                                        val_per_class=1, image_size=IMAGE_SIZE)
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=EVAL_CLASSES, img_size=IMAGE_SIZE)
    with torch.no_grad():
        model.head.weight.normal_(std=HEAD_SCALE)
    torch.save({'model': model.state_dict()}, root / 'student.pth')
    return Path(data), root / 'student.pth'


@pytest.mark.parametrize('dist_eval', ['--dist-eval', '--no-dist-eval'])
def test_dist_eval_matches_one_process(dist_eval, eval_setup, capsys):
    """Each process evaluating its share (--dist-eval) or every process all images (--no-dist-eval): both print
    the Acc@1, Acc@5 and loss of one process."""
    data, checkpoint = eval_setup
    argv = ['--eval', '--resume', str(checkpoint), '--model', 'deit_tiny_patch16_224', '--data-set', 'SHAPES',
            '--data-path', str(data), '--batch-size', '2', *SMALL_RUN]
    result = launch(torchrun(f'--nproc_per_node={WORLD_SIZE}', f'--master_port={free_port()}')
                    + ['main.py', dist_eval, *argv])
    assert result.stdout.count('backend gloo') == WORLD_SIZE
    distributed = ACC_LINE.findall(result.stdout)

    assert main.run(argv) == 0
    single = ACC_LINE.findall(capsys.readouterr().out)
    assert len(distributed) == len(single) == 1
    assert distributed == single
    assert 'Acc@1 0.000 Acc@5 0.000' not in single[0] and 'Acc@5 100.000' not in single[0]


def test_slurm_tasks_train_and_stop_together_when_one_is_preempted(shapes, tmp_path):
    """main.py started as srun starts it (SLURM variables only, the port from --dist-port).

    After the first epoch only task 1 gets SIGTERM: both tasks must stop after the same step (or their
    collectives would no longer pair up), rank 0 saves, and both exit with the requeue code.
    """
    out = tmp_path / 'run'
    port = free_port()
    argv = ['main.py', '--data-path', str(shapes), '--output_dir', str(out), '--model', 'deit_tiny_patch16_224',
            '--batch-size', '2', '--epochs', str(SLURM_EPOCHS), '--dist-port', str(port), *SMALL_RUN]
    with contextlib.ExitStack() as launches:
        procs = []
        for rank in range(WORLD_SIZE):
            # What srun gives each task of its step (here a step of both tasks on one node).
            env = launch_env(SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank), SLURM_NTASKS=str(WORLD_SIZE),
                             SLURM_STEP_ID='0', SLURM_STEP_NUM_TASKS=str(WORLD_SIZE), SLURM_NODEID='0',
                             SLURM_STEP_TASKS_PER_NODE=str(WORLD_SIZE), SLURM_JOB_ID='4242',
                             SLURM_JOB_NODELIST='127.0.0.1')
            procs.append(launches.enter_context(Launch([sys.executable, *argv], env, stdout=subprocess.PIPE,
                                                       stderr=subprocess.STDOUT, text=True)))
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not (out / 'log.txt').exists() and procs[1].poll() is None and time.monotonic() < deadline:
            time.sleep(POLL_S)
        procs[1].send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0] for proc in procs]
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        assert f'| distributed init (rank {rank}): env://, backend gloo' in output, output[-3000:]
        assert proc.returncode == main.EXIT_REQUEUE, output[-3000:]
    assert 'Received SIGTERM' in outputs[1] and 'Received SIGTERM' not in outputs[0]
    assert f'Preempted: saved {out / checkpoints.CHECKPOINT_NAME}' in outputs[0]
    assert ACC_LINE.search(outputs[0]) and not ACC_LINE.search(outputs[1])
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    checkpoint = torch.load(out / checkpoints.CHECKPOINT_NAME, weights_only=False)
    assert 1 <= len(log) < SLURM_EPOCHS and checkpoint['epoch'] == log[-1]['epoch']
    # No --distributed on the command line: the SLURM variables alone made it a two-process run.
    assert checkpoint['args'].dist_port == port and len(checkpoint['rng_states']) == WORLD_SIZE


# A launcher that starts its workers as torchrun does, each in a session of its own (the elastic agent's
# SubprocessHandler passes start_new_session=True), and hangs. Each worker ignores SIGTERM and SIGINT, as a rank
# blocked in a collective does, and starts a child of its own (a data loader worker). All write their process ids.
HANGING_WORKER = '''
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = subprocess.Popen(['sleep', '600'])
print(os.getpid(), child.pid, flush=True)
time.sleep(600)
'''
HANGING_LAUNCHER = f'''
import os, subprocess, sys, time
with open(sys.argv[1], 'a') as pids:
    print(os.getpid(), file=pids, flush=True)
    workers = [subprocess.Popen([sys.executable, '-c', {HANGING_WORKER!r}], stdout=pids, start_new_session=True)
               for _ in range(2)]
time.sleep(600)
'''
HANGING_PROCESSES = 5  # the launcher, two workers, their two children
HANG_TIMEOUT_S = 5


def test_a_launch_past_its_timeout_leaves_no_process_behind(tmp_path):
    """A launch that hangs fails its test at the timeout, and none of its processes survives it: not the launcher,
    not the workers in their own sessions that ignore SIGTERM, not their children."""
    pids = tmp_path / 'pids'
    with pytest.raises(AssertionError, match=f'did not end within {HANG_TIMEOUT_S} s; all its processes were killed'):
        run([sys.executable, '-c', HANGING_LAUNCHER, str(pids)], HANG_TIMEOUT_S, launch_env())
    started = [int(pid) for pid in pids.read_text().split()]
    assert len(started) == HANGING_PROCESSES, started
    assert [pid for pid in started if process_alive(pid)] == []
