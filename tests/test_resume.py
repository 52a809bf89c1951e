"""Resume and auto-resume: an interrupted run continues exactly where an uninterrupted one would be.

Runs go through ``main.run`` (the command line) in this process, so that a restart really rebuilds everything
from the checkpoint; a crash is an exception at an epoch boundary, a preemption a real SIGTERM.
"""
import os
import signal
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed

import checkpoints
import main
from shapes import SHAPES_NUM_CLASSES
from helpers import read_log, tiny_shapes_with_teacher, with_data
from helpers import one_thread  # noqa: F401 (autouse fixture)

IMAGE_SIZE = 32
EPOCHS = 3
STOP_EPOCH = 1
# Default augmentation (RandAugment, mixup, cutmix, random erasing), drop path, EMA and every feature term:
# all of their random draws must continue identically after a restart.
TRAIN = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_small_patch16_224', '--distillation-type',
         'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--w-cls', '1', '--w-atn', '1', '--batch-size', '4',
         '--warmup-epochs', '1', '--seed', '3', '--input-size', str(IMAGE_SIZE), '--data-set', 'SHAPES',
         '--num_workers', '0', '--device', 'cpu', '--print-freq', '100']
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Crash(RuntimeError):
    """The job dies (node failure, kill -9) between two epochs."""


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """main.py installs preemption handlers; this process gets its own back after each test."""
    handlers = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    yield
    for sig, handler in handlers.items():
        signal.signal(sig, handler)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_shapes_with_teacher(tmp_path_factory.mktemp('resume'), 'deit_small_patch16_224', IMAGE_SIZE)


def train_argv(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return with_data(TRAIN, data, out, *extra)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope='module')
def uninterrupted(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('uninterrupted')
    handlers = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    try:
        assert main.run(train_argv(data, out, '--epochs', str(EPOCHS))) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    return out


def stop_at(monkeypatch, epoch: int, action) -> None:
    """Run ``action`` when training epoch ``epoch`` is about to start."""
    train_one_epoch = main.train_one_epoch

    def wrapped(*args, **kwargs):
        if args[4] == epoch:
            action()
        return train_one_epoch(*args, **kwargs)

    monkeypatch.setattr(main, 'train_one_epoch', wrapped)


def assert_tensors_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f'{what} differs: {differ[:5]}'


def assert_optimizer_equal(a: dict, b: dict) -> None:
    assert a['param_groups'] == b['param_groups']
    assert a['state'].keys() == b['state'].keys()
    for index, state in a['state'].items():
        assert_tensors_equal(state, b['state'][index], f'optimizer state {index}')


def test_auto_resume_continues_exactly(data, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'

    def crash() -> None:
        raise Crash

    with monkeypatch.context() as patch:
        stop_at(patch, STOP_EPOCH, crash)
        with pytest.raises(Crash):
            main.run(train_argv(data, out, '--epochs', str(EPOCHS)))
    assert load(out / checkpoints.CHECKPOINT_NAME)['epoch'] == STOP_EPOCH - 1
    capsys.readouterr()

    # The same command again: no --resume, the run finds output_dir/checkpoint.pth itself.
    assert main.run(train_argv(data, out, '--epochs', str(EPOCHS))) == 0
    stdout = capsys.readouterr().out
    assert f'Auto-resume: continuing from {out / checkpoints.CHECKPOINT_NAME}' in stdout
    assert f'Resumed from {out / checkpoints.CHECKPOINT_NAME} at epoch {STOP_EPOCH}' in stdout

    expected, resumed = read_log(uninterrupted), read_log(out)
    assert [e['epoch'] for e in resumed] == list(range(EPOCHS))
    assert [e['train_lr'] for e in resumed] == [e['train_lr'] for e in expected]
    assert len({e['train_lr'] for e in expected}) > 1, 'the schedule must move within the compared epochs'
    # Same data order, augmentations, drop paths and random tokens: every logged number is identical.
    assert resumed == expected

    a, b = load(uninterrupted / checkpoints.CHECKPOINT_NAME), load(out / checkpoints.CHECKPOINT_NAME)
    assert a['epoch'] == b['epoch'] == EPOCHS - 1
    assert_tensors_equal(a['model'], b['model'], 'model')
    assert_tensors_equal(a['model_ema'], b['model_ema'], 'model_ema')
    assert_optimizer_equal(a['optimizer'], b['optimizer'])
    assert a['lr_scheduler'] == b['lr_scheduler']
    assert a['max_accuracy'] == b['max_accuracy']


def test_preemption_saves_exits_75_and_requeue_resumes(data, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    with monkeypatch.context() as patch:
        stop_at(patch, STOP_EPOCH, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert main.run(train_argv(data, out, '--epochs', str(EPOCHS))) == main.EXIT_REQUEUE
    stderr = capsys.readouterr().err
    assert 'Received SIGTERM' in stderr and f'exiting with code {main.EXIT_REQUEUE}' in stderr
    # The interrupted epoch is not finished: the checkpoint says the one before, so it is repeated.
    assert load(out / checkpoints.CHECKPOINT_NAME)['epoch'] == STOP_EPOCH - 1
    assert [e['epoch'] for e in read_log(out)] == list(range(STOP_EPOCH))

    assert main.run(train_argv(data, out, '--epochs', str(EPOCHS))) == 0
    assert f'at epoch {STOP_EPOCH}' in capsys.readouterr().out
    resumed, expected = read_log(out), read_log(uninterrupted)
    assert [e['epoch'] for e in resumed] == list(range(EPOCHS))
    assert [e['train_lr'] for e in resumed] == [e['train_lr'] for e in expected]
    a, b = load(uninterrupted / checkpoints.CHECKPOINT_NAME), load(out / checkpoints.CHECKPOINT_NAME)
    assert a['lr_scheduler'] == b['lr_scheduler']
    steps = [[s['step'] for s in c['optimizer']['state'].values()] for c in (a, b)]
    assert steps[0] != steps[1], 'the preempted epoch ran one step before stopping, so the step counts differ'


def test_preemption_without_an_output_dir_says_that_nothing_is_saved(data, tmp_path, monkeypatch, capsys):
    argv = train_argv(data, tmp_path / 'unused', '--epochs', str(EPOCHS))
    at = argv.index('--output_dir')
    del argv[at:at + 2]
    with monkeypatch.context() as patch:
        stop_at(patch, STOP_EPOCH, lambda: os.kill(os.getpid(), signal.SIGTERM))
        assert main.run(argv) == main.EXIT_REQUEUE
    stderr = capsys.readouterr().err
    assert 'Received SIGTERM: stopping after this step; nothing is saved (no --output_dir)' in stderr
    assert f'Preempted: nothing saved (no --output_dir); exiting with code {main.EXIT_REQUEUE}' in stderr
    assert 'saving a checkpoint' not in stderr and not (tmp_path / 'unused').exists()


def test_no_auto_resume_starts_afresh(data, uninterrupted, tmp_path, capsys):
    out = tmp_path / 'run'
    out.mkdir()
    (out / checkpoints.CHECKPOINT_NAME).write_bytes((uninterrupted / checkpoints.CHECKPOINT_NAME).read_bytes())
    assert main.run(train_argv(data, out, '--epochs', '1', '--no-auto-resume')) == 0
    stdout = capsys.readouterr().out
    assert 'Auto-resume' not in stdout and 'Resumed from' not in stdout
    assert [e['epoch'] for e in read_log(out)] == [0]
    assert load(out / checkpoints.CHECKPOINT_NAME)['epoch'] == 0


def test_best_checkpoint_follows_test_acc1(data, tmp_path, monkeypatch):
    """checkpoint_best.pth is the epoch with the highest Acc@1, also across a restart."""
    out = tmp_path / 'run'
    accuracies = iter([10.0, 30.0, 20.0, 25.0])
    evaluate_students = main.evaluate_students

    def scripted_evaluate(*args, **kwargs) -> list[dict]:
        return [{**stats, 'acc1': next(accuracies)} for stats in evaluate_students(*args, **kwargs)]

    monkeypatch.setattr(main, 'evaluate_students', scripted_evaluate)
    argv = train_argv(data, out, '--no-model-ema', '--distillation-type', 'none', '--epochs')
    assert main.run(argv + ['3']) == 0
    best, last = load(out / checkpoints.BEST_CHECKPOINT_NAME), load(out / checkpoints.CHECKPOINT_NAME)
    assert (best['epoch'], best['max_accuracy']) == (1, 30.0)
    assert (last['epoch'], last['max_accuracy']) == (2, 30.0)
    assert not torch.equal(best['model']['head.weight'], last['model']['head.weight'])

    # A restart keeps the best accuracy: 25 % in epoch 3 does not replace the 30 % of epoch 1.
    assert main.run(argv + ['4']) == 0
    assert load(out / checkpoints.BEST_CHECKPOINT_NAME)['epoch'] == 1
    assert [e['test_acc1'] for e in read_log(out)] == [10.0, 30.0, 20.0, 25.0]


def test_finetune_resizes_pos_embed_and_drops_head(data, tmp_path, capsys):
    """A 224 px, 1000-class checkpoint fine-tuned at 32 px on 10 classes (LR 0, so the weights stay as loaded)."""
    pretrained = timm.create_model('deit_tiny_patch16_224', num_classes=1000)
    state = pretrained.state_dict()
    torch.save({'model': {f'module.{k}': v for k, v in state.items()}}, tmp_path / 'deit_tiny_224.pth')
    out = tmp_path / 'run'
    argv = train_argv(data, out, '--finetune', str(tmp_path / 'deit_tiny_224.pth'), '--distillation-type', 'none',
                      '--epochs', '1', '--lr', '0', '--warmup-lr', '0', '--min-lr', '0', '--no-model-ema')
    assert main.run(argv) == 0
    stdout = capsys.readouterr().out
    assert 'Removing key head.weight' in stdout and 'Removing key head.bias' in stdout

    tuned = load(out / checkpoints.CHECKPOINT_NAME)['model']
    grid = IMAGE_SIZE // pretrained.patch_embed.patch_size[0]
    assert tuned['pos_embed'].shape == (1, 1 + grid * grid, pretrained.embed_dim)
    expected = resample_abs_pos_embed(state['pos_embed'], new_size=(grid, grid), num_prefix_tokens=1)
    assert torch.equal(tuned['pos_embed'], expected)
    assert torch.equal(tuned['pos_embed'][:, 0], state['pos_embed'][:, 0]), 'the [CLS] position is kept'
    assert tuned['head.weight'].shape == (SHAPES_NUM_CLASSES, pretrained.embed_dim)
    assert torch.equal(tuned['blocks.5.attn.qkv.weight'], state['blocks.5.attn.qkv.weight'])
