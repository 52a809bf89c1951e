"""A ``--data-backend dali`` run (DALI's CPU backend) cut off right after its first epoch's checkpoint and resumed by
auto-resume reads its samples in the uninterrupted run's order: launched on two processes, every rank reads in
every epoch the batches the PIL loader reads; on one process, where the order is a shuffle from torch's generator
(which checkpoints keep, and which a PIL run consumes otherwise), the batches the uninterrupted run reads. Its crops
are other draws than the uninterrupted run's."""
import json
from pathlib import Path

import pytest
from torch.utils.data import RandomSampler

import checkpoints
import datasets
import main
from dali_read_order import NOTES_FILE, note_read_order, stop_after_checkpoint, StopAfterCheckpoint
from helpers import (SHORT_DIST_TIMEOUT, free_port, keep_signal_handlers, launch, launch_env, one_thread,  # noqa: F401
                     read_log, torchrun)
from launch import LaunchEnvironment
from shapes import make_shapes_dataset

IMAGE_SIZE = 48  # DALI takes inputs above DeiT's 32 px CIFAR size
PHOTO_SIZE = (64, 48)
PROBE = 'tests/dali_read_order.py'
EPOCHS = 2
STOP_EPOCH = 0  # the run is cut off after this epoch's checkpoint
WORLD_SIZE = 2


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory) -> Path:
    """16 training JPEGs in 2 classes: 4 batches of 4 on one process, 2 on each of two."""
    return Path(make_shapes_dataset(str(tmp_path_factory.mktemp('jpegs')), num_classes=2, train_per_class=8,
                                    val_per_class=2, image_size=PHOTO_SIZE, jpeg_quality=90))


def run_flags(data: Path, out: Path) -> list[str]:
    return ['--data-set', 'IMNET', '--data-path', str(data), '--input-size', str(IMAGE_SIZE), '--device', 'cpu',
            '--model', 'deit_tiny_patch16_224', '--batch-size', '4', '--epochs', str(EPOCHS), '--num_workers', '1',
            '--data-backend', 'dali', '--aa', 'none', '--color-jitter', '0', '--reprob', '0', '--print-freq', '100',
            '--output_dir', str(out)]


def assert_cut_off_then_resumed(out: Path, resumed_stdout: str) -> None:
    assert 'Auto-resume: continuing from' in resumed_stdout
    logged = [line['epoch'] for line in read_log(out)]
    assert logged == list(range(EPOCHS))


def pil_batches(args, rank: int, epoch: int) -> list[list[int]]:
    """The index batches the PIL DataLoader of ``rank`` of a two-process launch reads in ``epoch``."""
    train, _ = datasets.build_dataset(True, args)
    loader, _ = datasets.build_loaders(args, train, train, LaunchEnvironment(rank, WORLD_SIZE, rank, 'torchrun'))
    loader.sampler.set_epoch(epoch)
    return [list(batch) for batch in loader.batch_sampler]


def test_a_resumed_launch_reads_on_every_rank_what_the_pil_loader_reads(jpegs, tmp_path):
    out = tmp_path / 'run'
    notes = {'cut off': tmp_path / 'cut-off', 'resumed': tmp_path / 'resumed'}
    command = torchrun(f'--nproc_per_node={WORLD_SIZE}', f'--master_port={free_port()}', PROBE,
                       *run_flags(jpegs, out), '--distributed', *SHORT_DIST_TIMEOUT)
    for folder in notes.values():
        folder.mkdir()
    launch(command, launch_env(READ_ORDER_DIR=str(notes['cut off']), STOP_AFTER_EPOCH=str(STOP_EPOCH)))
    assert checkpoints.load_checkpoint(str(out / checkpoints.CHECKPOINT_NAME))['epoch'] == STOP_EPOCH
    resumed = launch(command, launch_env(READ_ORDER_DIR=str(notes['resumed'])))
    assert_cut_off_then_resumed(out, resumed.stdout)

    args = main.get_args_parser().parse_args(run_flags(jpegs, out))
    for rank in range(WORLD_SIZE):
        read = [json.loads((folder / NOTES_FILE.format(rank=rank)).read_text()) for folder in notes.values()]
        assert [len(epochs) for epochs in read] == [STOP_EPOCH + 1, EPOCHS - STOP_EPOCH - 1]
        fed = [epoch['batches'] for epochs in read for epoch in epochs]
        assert fed == [pil_batches(args, rank, epoch) for epoch in range(EPOCHS)], rank
        assert fed[0] != fed[1]  # the epochs' orders differ: the resumed epoch's cannot pass for the first one's


@pytest.mark.usefixtures('keep_signal_handlers')
def test_a_resumed_run_on_one_process_reads_what_the_uninterrupted_one_reads(jpegs, tmp_path, monkeypatch, capsys):
    """Order as the uninterrupted run (not the PIL run's: its DataLoader draws from torch's generator too), and its
    crops too: the crops' generator is seeded from Python's random (which the checkpoint keeps) at each epoch's start,
    before anything else draws from it."""
    uninterrupted = tmp_path / 'uninterrupted'
    with monkeypatch.context() as patch:
        whole = note_read_order(patch.setattr)
        assert main.run(run_flags(jpegs, uninterrupted)) == 0
    out = tmp_path / 'run'
    with monkeypatch.context() as patch:
        cut_off = note_read_order(patch.setattr)
        stop_after_checkpoint(STOP_EPOCH, patch.setattr)
        with pytest.raises(StopAfterCheckpoint):
            main.run(run_flags(jpegs, out))
    assert checkpoints.load_checkpoint(str(out / checkpoints.CHECKPOINT_NAME))['epoch'] == STOP_EPOCH
    capsys.readouterr()
    with monkeypatch.context() as patch:
        resumed = note_read_order(patch.setattr)
        assert main.run(run_flags(jpegs, out)) == 0
    assert_cut_off_then_resumed(out, capsys.readouterr().out)

    assert [len(whole), len(cut_off), len(resumed)] == [EPOCHS, STOP_EPOCH + 1, EPOCHS - STOP_EPOCH - 1]
    assert [epoch['batches'] for epoch in cut_off + resumed] == [epoch['batches'] for epoch in whole]
    assert whole[0]['batches'] != whole[1]['batches']
    assert cut_off[0]['crops'] == whole[0]['crops']
    assert resumed[0]['crops'] == whole[1]['crops']

    pil_orders = []
    shuffle = RandomSampler.__iter__

    def noting_shuffle(self):
        pil_orders.append(list(shuffle(self)))
        return iter(pil_orders[-1])

    with monkeypatch.context() as patch:
        patch.setattr(RandomSampler, '__iter__', noting_shuffle)
        assert main.run(run_flags(jpegs, tmp_path / 'pil') + ['--data-backend', 'pil']) == 0
    dali_orders = [[index for batch in epoch['batches'] for index in batch] for epoch in whole]
    assert len(pil_orders) == EPOCHS and all(pil != dali for pil, dali in zip(pil_orders, dali_orders))
