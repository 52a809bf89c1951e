"""Shared pieces of the end-to-end tests: the papers' commands, small datasets and checkpoints."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import shapes

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


def main_argv(command: str, **placeholders: str) -> list[str]:
    """The arguments after ``main.py`` of a README command, with ``<placeholders>`` filled in."""
    for name, value in placeholders.items():
        command = command.replace(f'<{name.replace("_", "-")}>', str(value))
    words = shlex.split(command)
    return words[words.index('main.py') + 1:]


def run_main(argv: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    """``python main.py ARGS`` in the repository, as a user runs it."""
    return subprocess.run([sys.executable, 'main.py', *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def make_shapes(root: Path, train_per_class: int = 4, val_per_class: int = 2) -> Path:
    shapes.make_shapes_dataset(str(root), train_per_class=train_per_class, val_per_class=val_per_class)
    return root


def save_teacher(path: Path, model_name: str, num_classes: int = 1000, **kwargs) -> Path:
    """A teacher file in DeiT's release layout: ``{'model': state_dict}``."""
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, **kwargs)
    torch.save({'model': model.state_dict()}, path)
    return path


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread: on a busy machine OpenMP threads waiting on each other make the runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
