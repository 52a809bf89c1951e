"""Training logs: DeiT-style progress lines with ETA and every loss term; optional TensorBoard (--log-dir)."""
import re
import sys

import pytest

import main
from shapes import make_shapes_dataset
from helpers import save_teacher

IMAGE_SIZE = 32
MANIFOLD_CLSKD = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224',
                  '--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11',
                  '--w-cls', '1', '--w-atn', '2']
FAST = ['--data-set', 'SHAPES', '--device', 'cpu', '--num_workers', '0', '--input-size', str(IMAGE_SIZE),
        '--epochs', '1', '--batch-size', '4', '--print-freq', '1', '--no-model-ema']
TERMS = ('base', 'kd', 'mf_sample', 'mf_patch', 'mf_rand', 'cls', 'atn', 'loss')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_shapes_dataset(str(root), train_per_class=1, val_per_class=1, image_size=IMAGE_SIZE)
    return root


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp('t') / 'tiny.pth', 'deit_tiny_patch16_224', num_classes=10,
                        img_size=IMAGE_SIZE)


def train_argv(shapes, teacher, out) -> list[str]:
    return ['--data-path', str(shapes), '--teacher-path', str(teacher), '--output_dir', str(out)] \
        + MANIFOLD_CLSKD + FAST


def test_progress_lines_show_eta_and_every_term(shapes, teacher, tmp_path, capsys):
    assert main.run(train_argv(shapes, teacher, tmp_path / 'run')) == 0
    out = capsys.readouterr().out
    steps = re.findall(r'^Epoch: \[0\] +\[ *(\d+)/(\d+)\] +eta: \d+:\d\d:\d\d +lr: [\d.]+ +(.*)$', out, re.M)
    assert steps, out[-2000:]
    total = int(steps[0][1])
    assert [int(step) for step, _, _ in steps] == list(range(total))  # --print-freq 1: every step
    for term in TERMS:
        # Each meter shows its window median and, in brackets, the epoch average.
        assert re.search(rf'\b{term}: -?\d+\.\d{{4}} \(-?\d+\.\d{{4}}\)', steps[-1][2]), steps[-1][2]
    assert re.search(r'^Epoch: \[0\] Total time: \d+:\d\d:\d\d \(\d+\.\d{4} s / it\)$', out, re.M)
    assert re.search(r'^Test: +\[0/\d+\] +eta: ', out, re.M)
    assert re.search(r'^Averaged stats: .*atn: ', out, re.M)


def test_log_dir_without_tensorboard_is_one_line_error(shapes, teacher, tmp_path, monkeypatch, capsys):
    # A None entry makes the import fail as if tensorboard were not installed.
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    argv = train_argv(shapes, teacher, tmp_path / 'run') + ['--log-dir', str(tmp_path / 'tb')]
    assert main.run(argv) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err == 'error: --log-dir needs the tensorboard package: pip install tensorboard'


def test_log_dir_writes_every_logged_value(shapes, teacher, tmp_path):
    pytest.importorskip('torch.utils.tensorboard', reason='tensorboard is optional')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = train_argv(shapes, teacher, tmp_path / 'run') + ['--log-dir', str(tmp_path / 'tb'), '--exp-name', 'demo']
    assert main.run(argv) == 0
    events = EventAccumulator(str(tmp_path / 'tb' / 'demo'))
    events.Reload()
    tags = set(events.Tags()['scalars'])
    assert {f'train_{term}' for term in TERMS} | {'train_lr', 'test_acc1', 'test_acc5', 'test_loss'} <= tags
    assert [event.step for event in events.Scalars('test_acc1')] == [0]
