"""SPEC section 8: each bad input fails before training with one line naming the flag or path, no traceback."""
import os
import pickle

import pytest
import torch

import main
from helpers import make_shapes, run_main, save_teacher

FAST = ['--device', 'cpu', '--num_workers', '0', '--input-size', '32', '--epochs', '1', '--batch-size', '4']
MANIFOLD = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224',
            '--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('shapes'), train_per_class=1, val_per_class=1)


@pytest.fixture(scope='module')
def tiny_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp('t') / 'tiny.pth', 'deit_tiny_patch16_224', img_size=32)


class RunsCode:
    """Unpickling this would create the file named by ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, 'w')


def fails_with(argv, capsys, *fragments) -> str:
    """Run main in-process; assert exit code 2 and a single ``error:`` line holding every fragment."""
    assert main.run(argv) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and 'Traceback' not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_missing_data_path(tmp_path, capsys):
    missing = tmp_path / 'nowhere'
    fails_with(['--data-path', str(missing)] + FAST, capsys, str(missing), '--data-path')


def test_dataset_folder_without_images(tmp_path, capsys):
    for split in ('train', 'val'):
        (tmp_path / split / 'n01440764').mkdir(parents=True)
    fails_with(['--data-path', str(tmp_path)] + FAST, capsys, '--data-path', 'no images found', 'n01440764')


def test_s_id_and_t_id_of_different_lengths(shapes, tiny_teacher, capsys):
    argv = ['--data-path', str(shapes), '--teacher-path', str(tiny_teacher)] + MANIFOLD + FAST + ['--t-id', '0']
    fails_with(argv, capsys, '--s-id', '--t-id')


@pytest.mark.parametrize('flag', ['--s-id', '--t-id'])
def test_block_out_of_range(flag, shapes, tiny_teacher, capsys):
    argv = ['--data-path', str(shapes), '--teacher-path', str(tiny_teacher)] + MANIFOLD + FAST + [flag, '0', '12']
    fails_with(argv, capsys, f'{flag} 12', '0..11')


def test_k_below_one(shapes, tiny_teacher, capsys):
    argv = ['--data-path', str(shapes), '--teacher-path', str(tiny_teacher)] + MANIFOLD + FAST + ['--K', '0']
    fails_with(argv, capsys, '--K', 'got 0')


def test_distillation_without_teacher_path(shapes, capsys):
    fails_with(['--data-path', str(shapes)] + MANIFOLD + FAST, capsys, '--teacher-path')


def test_teacher_file_missing(shapes, tmp_path, capsys):
    missing = tmp_path / 'teacher.pth'
    fails_with(['--data-path', str(shapes), '--teacher-path', str(missing)] + MANIFOLD + FAST, capsys,
               '--teacher-path', str(missing))


def test_teacher_of_another_architecture(shapes, tmp_path, capsys):
    other = save_teacher(tmp_path / 'small.pth', 'deit_small_patch16_224', img_size=32)
    fails_with(['--data-path', str(shapes), '--teacher-path', str(other)] + MANIFOLD + FAST, capsys,
               '--teacher-path', str(other), 'does not fit --teacher-model deit_tiny_patch16_224')


def test_resume_that_is_not_a_checkpoint(shapes, tmp_path, capsys):
    bogus = tmp_path / 'notes.pth'
    bogus.write_text('this is not a checkpoint')
    fails_with(['--data-path', str(shapes), '--resume', str(bogus)] + FAST, capsys, str(bogus),
               'not a PyTorch checkpoint')


def test_resume_that_carries_code_is_refused_and_not_run(shapes, tmp_path, capsys):
    marker = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    torch.save({'model': RunsCode(str(marker))}, evil)
    fails_with(['--data-path', str(shapes), '--resume', str(evil)] + FAST, capsys, str(evil), 'refused')
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsCode(str(marker)))).close()
    assert marker.exists(), 'the payload does run when unpickled without weights_only'


def test_unwritable_output_dir(shapes, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('')
    fails_with(['--data-path', str(shapes), '--output_dir', str(blocker / 'out')] + FAST, capsys,
               '--output_dir', str(blocker / 'out'))


def test_cli_prints_one_line_without_traceback(tmp_path):
    result = run_main(['--data-path', str(tmp_path / 'none'), '--device', 'cpu'])
    assert result.returncode == main.EXIT_USER_ERROR
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert 'Traceback' not in result.stderr and str(tmp_path / 'none') in result.stderr
    assert os.path.basename(str(tmp_path)) in result.stderr


def test_teacher_tokens_that_do_not_fit_the_attention_term(shapes, tiny_teacher, capsys):
    # A distilled student has one token more than a DeiT teacher: the CLS-patch maps cannot be compared.
    argv = (['--data-path', str(shapes), '--teacher-path', str(tiny_teacher)] + MANIFOLD + FAST
            + ['--model', 'deit_tiny_distilled_patch16_224', '--w-atn', '1'])
    fails_with(argv, capsys, '--w-atn needs equal token counts', '6 tokens', '5')


@pytest.mark.parametrize('workers', ['0', '2'])
def test_a_corrupt_image_is_one_line_naming_it(tmp_path, workers):
    """Also from a DataLoader worker, whose error reaches the main process wrapped in the worker's traceback."""
    data = make_shapes(tmp_path / 'shapes', train_per_class=2, val_per_class=1)
    bad = sorted((data / 'train').rglob('*.png'))[0]
    bad.write_bytes(b'not an image')
    result = run_main(['--data-path', str(data), '--data-set', 'SHAPES', '--model', 'deit_tiny_patch16_224',
                       *FAST[:2], '--num_workers', workers, *FAST[4:]])
    assert result.returncode == main.EXIT_USER_ERROR, result.stderr[-3000:]
    err = result.stderr.strip().splitlines()[-1]
    assert err.startswith(f'error: cannot read image {bad}: ') and '--skip-bad-images' in err, result.stderr[-3000:]


@pytest.mark.parametrize('case', ['model', 'teacher', 'resume', 'resume-eval'])
def test_a_bad_model_teacher_or_resume_file_leaves_no_output_dir(case, shapes, tiny_teacher, tmp_path, capsys):
    """Checked before --output_dir is created or any image read: an unknown --model, and a --teacher-path or
    --resume file of another architecture (its keys and shapes read lazily against a weightless model)."""
    other = save_teacher(tmp_path / 'small.pth', 'deit_small_patch16_224', img_size=32)
    out = tmp_path / 'run'
    argv = ['--data-path', str(shapes), '--output_dir', str(out)] + MANIFOLD + FAST
    flags, fragments = {
        'model': (['--model', 'no_such_model', '--teacher-path', str(tiny_teacher)],
                  ['--model no_such_model: unknown model']),
        'teacher': (['--teacher-path', str(other)],
                    [f'--teacher-path {other} does not fit --teacher-model deit_tiny_patch16_224']),
        'resume': (['--teacher-path', str(tiny_teacher), '--resume', str(other)],
                   [f'--resume {other} does not fit --model deit_tiny_patch16_224']),
        'resume-eval': (['--eval', '--resume', str(other)],
                        [f'--resume {other} does not fit --model deit_tiny_patch16_224']),
    }[case]
    fails_with(argv + flags, capsys, *fragments)
    assert not out.exists()
