"""Every flag is checked before any work starts: a bad value ends with exit code 2 and one line naming the flag,
nothing trained and nothing written."""
import argparse
import math

import pytest

import main
from helpers import make_shapes


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('shapes'), train_per_class=1, val_per_class=1)


def fails_cleanly(argv, tmp_path, capsys, flag: str) -> str:
    """``main.run`` stops with exit 2, one ``error:`` line naming ``flag``, and writes nothing."""
    out = tmp_path / 'out'
    assert main.run(['--output_dir', str(out), '--device', 'cpu', *argv]) == main.EXIT_USER_ERROR
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: ') and flag in err, err
    assert 'Start training' not in captured.out
    assert not out.exists(), 'nothing may be written'
    return err


@pytest.mark.parametrize('flag,value,words', [
    ('--aa', 'foo', 'unknown augmentation policy'),
    ('--train-interpolation', 'nonsense', 'unknown interpolation'),
    ('--opt', 'bogus', 'unknown optimizer'),
    ('--sched', 'bogus', 'unknown schedule'),
    ('--batch-size', '0', 'must be in [1, inf)'),
    ('--model-ema-decay', '2', 'must be in [0, 1]'),
    ('--lr', 'nan', 'must be in [0, inf)'),
    ('--remode', 'bogus', 'invalid choice'),
    ('--mixup-mode', 'bogus', 'invalid choice'),
    ('--device', 'gpu0', 'not a torch device'),
])
def test_bad_value_is_one_line_naming_the_flag(flag, value, words, shapes, tmp_path, capsys):
    err = fails_cleanly(['--data-path', str(shapes), flag, value], tmp_path, capsys, flag)
    assert words in err


def numeric_actions() -> list[argparse.Action]:
    return [a for a in main.get_args_parser()._actions if hasattr(a.type, 'kind')]


def out_of_range(check) -> list[str]:
    """Values just outside the flag's interval, and non-finite ones."""
    values = []
    if check.low is not None:
        values.append(check.low if check.low_open else check.low - 1)
    if check.high is not None:
        values.append(check.high if check.high_open else check.high + 1)
    if check.kind is float:
        values += [math.nan, math.inf]
    return [f'{v:g}' if isinstance(v, float) else str(int(v)) for v in values]


def test_every_numeric_flag_is_range_checked():
    parser = main.get_args_parser()
    unchecked = [a.option_strings[0] for a in parser._actions if a.type in (int, float)]
    assert not unchecked, f'numeric flags without a range: {unchecked}'
    assert len(numeric_actions()) > 50


@pytest.mark.parametrize('action', numeric_actions(), ids=lambda a: a.option_strings[0])
def test_out_of_range_value_is_refused(action, shapes, tmp_path, capsys):
    flag = action.option_strings[0]
    for value in out_of_range(action.type):
        values = [value] * (action.nargs if isinstance(action.nargs, int) else 1)
        fails_cleanly(['--data-path', str(shapes), flag, *values], tmp_path, capsys, flag)


def test_in_range_defaults_parse():
    """The defaults themselves pass their checks (argparse runs string defaults through the type too)."""
    args = main.get_args_parser().parse_args([])
    assert args.batch_size == 64 and args.model_ema_decay == 0.99996 and args.lr == 5e-4


@pytest.mark.parametrize('flag,dest', [
    ('manifold', 'manifold'), ('norm-distill', 'norm_distill'), ('model-ema', 'model_ema'),
    ('repeated-aug', 'repeated_aug'), ('train-mode', 'train_mode'), ('pin-mem', 'pin_mem'),
    ('dist-eval', 'dist_eval'), ('amp', 'amp'), ('auto-resume', 'auto_resume'),
])
def test_switches_have_both_spellings(flag, dest):
    parser = main.get_args_parser()
    assert getattr(parser.parse_args([f'--{flag}']), dest) is True
    assert getattr(parser.parse_args([f'--no-{flag}']), dest) is False


def test_world_size_is_checked_against_the_launcher(shapes, tmp_path, capsys):
    fails_cleanly(['--data-path', str(shapes), '--world_size', '4'], tmp_path, capsys, '--world_size 4')


def test_distributed_without_a_launcher_says_so(shapes, tmp_path, capsys):
    argv = ['--eval', '--model', 'deit_tiny_patch16_224', '--input-size', '32', '--data-set', 'SHAPES',
            '--data-path', str(shapes), '--num_workers', '0', '--device', 'cpu', '--distributed']
    assert main.run(argv) == 0
    assert 'no launcher environment' in capsys.readouterr().out


@pytest.mark.parametrize('teacher', ['deit_base_patch16_224', 'test_resnet'])
def test_dim_t_is_checked_against_the_teacher_before_any_work(teacher, shapes, tmp_path, capsys):
    """--dim-t is read from a weightless instance of --teacher-model: the teacher file is not even loaded."""
    unread = tmp_path / 'teacher.pth'
    unread.write_bytes(b'not read')
    argv = ['--data-path', str(shapes), '--distillation-type', 'soft', '--teacher-model', teacher,
            '--teacher-path', str(unread), '--dim-t', '100']
    err = fails_cleanly(argv, tmp_path, capsys, '--dim-t 100')
    assert teacher in err
