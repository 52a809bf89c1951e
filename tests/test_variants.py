"""Student variants: several students on one data stream and one teacher forward, each a normal run.

Runs go through ``main.run`` in this process (or torchrun on two processes), on the built-in shapes data at 32 px.
"""
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch

import benchmark
import checkpoints
import engine
import main
import students
import utils
from helpers import (ACCURACY_LINE, LAUNCH_TIMEOUT_S, free_port, launch, launch_env, read_log, run,
                     tiny_shapes_with_teacher, torchrun, with_data)
from helpers import one_thread, keep_signal_handlers  # noqa: F401 (fixtures)
from shapes import SHAPES_NUM_CLASSES

IMAGE_SIZE = 32
# Every random draw of a step is on: RandAugment, mixup and cutmix, random erasing, drop path, random tokens, EMA.
BASE = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224', '--distillation-type', 'soft',
        '--s-id', '0', '11', '--t-id', '0', '11', '--w-cls', '1', '--w-atn', '1', '--batch-size', '4',
        '--warmup-epochs', '1', '--seed', '3', '--input-size', str(IMAGE_SIZE), '--data-set', 'SHAPES',
        '--num_workers', '0', '--device', 'cpu', '--print-freq', '100']
# Another model, other blocks and weights, other terms, no teacher at all.
VARIANTS = {'small': '--model deit_small_patch16_224 --t-id 0 5 --w-atn 3 --lr 1e-3',
            'plain': '--distillation-type none --drop-path 0'}
EPOCHS = 2  # the schedule is stepped between them


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> tuple[Path, Path]:
    return tiny_shapes_with_teacher(tmp_path_factory.mktemp('variants'), 'deit_tiny_patch16_224', IMAGE_SIZE)


def argv(data: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return with_data(BASE, data, out, *extra)


def variant_flags(variants: dict[str, str]) -> list[str]:
    return [word for name, flags in variants.items() for word in ('--variant', f'{name}: {flags}')]


def recording_batches(monkeypatch) -> list[tuple[float, float]]:
    """What every step is fed (after mixup), recorded as the batch's and the targets' sums."""
    batches = []
    train_step = engine.train_step

    def recorded(chosen, teacher, samples, targets, timer=None):
        batches.append((samples.double().sum().item(), targets.double().sum().item()))
        return train_step(chosen, teacher, samples, targets, timer)

    monkeypatch.setattr(engine, 'train_step', recorded)
    return batches


@pytest.fixture(scope='module')
def shared_run(data, tmp_path_factory) -> tuple[Path, list]:
    """The base command with both variants, trained for ``EPOCHS`` epochs; and the batches it was fed."""
    out = tmp_path_factory.mktemp('shared')
    with pytest.MonkeyPatch.context() as patch:
        batches = recording_batches(patch)
        handlers = {sig: signal.getsignal(sig) for sig in main.PREEMPTION_SIGNALS}
        try:
            assert main.run(argv(data, out, '--epochs', str(EPOCHS), *variant_flags(VARIANTS))) == 0
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    return out, batches


@pytest.mark.parametrize('name', [students.BASE_NAME, *VARIANTS])
def test_each_student_is_the_single_run_of_its_flags(name, data, shared_run, tmp_path, monkeypatch,
                                                     keep_signal_handlers):
    """Every term of every step, the evaluation and the weights equal those of the single run of the base flags plus
    the student's own, with the same seed, although the step draws drop paths and random tokens: each student
    draws in a random stream of its own, the data (order, augmentation, mixup) in the base command's."""
    out, shared_batches = shared_run
    batches = recording_batches(monkeypatch)
    single = tmp_path / 'single'
    own = shlex.split(VARIANTS.get(name, ''))
    assert main.run(argv(data, single, '--epochs', str(EPOCHS), *own)) == 0
    assert batches == shared_batches
    assert read_log(single) == read_log(out / name)
    assert [entry['epoch'] for entry in read_log(single)] == list(range(EPOCHS))
    ours, theirs = (torch.load(folder / checkpoints.CHECKPOINT_NAME, weights_only=False) for folder in (out / name, single))
    for entry in ('model', 'model_ema'):
        assert ours[entry].keys() == theirs[entry].keys()
        assert all(torch.equal(ours[entry][k], theirs[entry][k]) for k in ours[entry]), entry
    assert ours['args'].output_dir == str(out / name) and ours['args'].variant is None


def test_each_student_folder_holds_a_single_runs_files_and_the_table_compares_them(shared_run):
    out, _ = shared_run
    assert sorted(p.name for p in out.iterdir()) == sorted([students.BASE_NAME, *VARIANTS, students.TABLE_NAME])
    for name in [students.BASE_NAME, *VARIANTS]:
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(
            [checkpoints.CHECKPOINT_NAME, checkpoints.BEST_CHECKPOINT_NAME, utils.LOG_NAME])
    table = (out / students.TABLE_NAME).read_text()
    rows = [line for line in table.splitlines() if line.startswith('| ') and not line.startswith('| student')
            and not line.startswith('| ---')]
    assert [row.split('|')[1].strip() for row in rows] == [students.BASE_NAME, *VARIANTS]
    for row, name in zip(rows, [students.BASE_NAME, *VARIANTS]):
        cells = [cell.strip() for cell in row.split('|')[1:-1]]
        log = read_log(out / name)
        assert float(cells[2]) == pytest.approx(log[-1]['test_acc1'], abs=0.005)
        assert float(cells[3]) == pytest.approx(max(entry['test_acc1'] for entry in log), abs=0.005)
        assert 0 < float(cells[4].rstrip('%')) < 100
    assert '`--distillation-type none --drop-path 0`' in table
    shares = [float(s) for s in re.findall(r'([\d.]+)%', table)]
    assert sum(shares) == pytest.approx(100, abs=0.3)  # the students' and the teacher's


def test_a_student_resumes_and_evaluates_as_a_single_run(data, shared_run, tmp_path, capsys):
    """``--eval --resume`` of a student's checkpoint prints its last evaluation; a single run resumes from it."""
    out, _ = shared_run
    checkpoint = out / 'small' / checkpoints.CHECKPOINT_NAME
    capsys.readouterr()
    assert main.run(argv(data, tmp_path / 'eval', '--eval', '--resume', str(checkpoint),
                         *shlex.split(VARIANTS['small']))) == 0
    accuracy = ACCURACY_LINE.search(capsys.readouterr().out)
    assert float(accuracy[1]) == pytest.approx(read_log(out / 'small')[-1]['test_acc1'], abs=0.001)
    assert main.run(argv(data, tmp_path / 'more', '--resume', str(checkpoint), '--epochs', str(EPOCHS + 1),
                         *shlex.split(VARIANTS['small']))) == 0
    assert [entry['epoch'] for entry in read_log(tmp_path / 'more')] == [EPOCHS]


def test_an_interrupted_run_with_variants_resumes_every_student_exactly(data, shared_run, tmp_path, monkeypatch,
                                                                        keep_signal_handlers):
    out = tmp_path / 'run'
    command = argv(data, out, *variant_flags(VARIANTS))
    assert main.run(command + ['--epochs', '1']) == 0
    assert main.run(command + ['--epochs', str(EPOCHS)]) == 0
    for name in [students.BASE_NAME, *VARIANTS]:
        assert read_log(out / name) == read_log(shared_run[0] / name)


def test_students_without_their_checkpoints_do_not_resume(data, tmp_path, capsys, keep_signal_handlers):
    """All students resume or none: a student missing its checkpoint, or one of another epoch, is one line."""
    out = tmp_path / 'run'
    command = argv(data, out, '--epochs', '3', *variant_flags(VARIANTS))
    assert main.run(argv(data, out, '--epochs', '1', *variant_flags(VARIANTS))) == 0
    plain = out / 'plain' / checkpoints.CHECKPOINT_NAME
    kept = plain.read_bytes()
    plain.unlink()
    capsys.readouterr()
    assert main.run(command) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'base, small have a checkpoint' in err and 'plain none' in err
    plain.write_bytes(kept)
    base = out / 'base' / checkpoints.CHECKPOINT_NAME
    state = torch.load(base, map_location='cpu', weights_only=False)
    torch.save({**state, 'epoch': state['epoch'] + 1}, base)  # as if base had finished an epoch more
    assert main.run(command) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'of different epochs (base 1, small 0, plain 0)' in err, err


@pytest.mark.parametrize('variant, message', [
    ('x: --batch-size 8', '--variant x: --batch-size is shared by every student'),
    ('x: --teacher-model cait_s24_224', '--variant x: --teacher-model is shared'),
    ('x: --epochs 5', '--variant x: --epochs is shared'),
    ('x: --no-repeated-aug', '--variant x: --repeated-aug is shared'),
    ('x: --output_dir elsewhere', '--variant x: --output_dir is shared'),
    ('x: --variant "y: --lr 1"', '--variant x: --variant is shared'),
    ('x: --lr abc', "--variant x: argument --lr: must be a number, got 'abc'"),
    ('x: --s-id 0', '--variant x: --s-id has 1 blocks but --t-id has 2'),
    ('x: --t-id 0 12', '--variant x: --t-id 12: the model has blocks 0..11'),
    ('x: --model no_such_model', '--variant x: --model no_such_model: unknown model'),
    ('x: --bogus 3', '--variant x: unrecognized arguments: --bogus 3'),
    ("x: --lr '1", '--variant x: its flags do not split'),
    ('base: --lr 1', '--variant base: the name is taken'),
    ('no name: --lr 1', "--variant 'no name: --lr 1': expected 'NAME: <flags>'"),
    ('--lr 1', "--variant '--lr 1': expected 'NAME: <flags>'"),
])
def test_a_bad_variant_is_one_line_before_anything_is_written(variant, message, data, tmp_path, capsys):
    out = tmp_path / 'run'
    assert main.run(argv(data, out, '--variant', 'fine: --lr 1e-3', '--variant', variant)) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f'error: {message}'), err
    assert not out.exists()


def test_a_taken_name_and_eval_with_variants_are_refused(data, tmp_path, capsys):
    for extra in (['--variant', 'a: --lr 1e-3', '--variant', 'a: --lr 2e-3'], ['--eval', '--variant', 'a: --lr 1']):
        assert main.run(argv(data, tmp_path / 'run', *extra)) == main.EXIT_USER_ERROR
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / 'run').exists()


def test_the_benchmark_times_shared_and_separate_steps(data, capsys):
    """``--benchmark`` with variants: student-images/s and the speed-up over separate runs with its bound."""
    command = ['--benchmark', *BASE, '--benchmark-steps', '2', '--benchmark-warmup', '1',
               '--variant', 'other: --w-atn 2 --seed 1']
    assert main.run(command) == 0
    out = capsys.readouterr().out
    line = re.search(r'^speed-up over separate runs: (\d+\.\d\d)x \(bound (\d+\.\d\d)x from the teacher\'s share '
                     r'(\d+)%\)$', out, re.M)
    assert line, out
    speedup, bound, share = float(line[1]), float(line[2]), int(line[3])
    assert 1.0 < bound < 2.0 and 0 < share < 100 and speedup > 0
    assert re.search(r'shared step .*: [\d.]+ ms, [\d.]+ student-images/s', out)


def test_the_bound_is_the_teachers_share_arithmetic():
    # Four equal students whose teacher takes 70% of a separate run's step: K / (t + K (1 - t)).
    speedup, bound, share = benchmark.separate_runs_speedup(2.6, [1.0] * 4, 0.7)
    assert share == pytest.approx(0.7) and bound == pytest.approx(4 / (0.7 + 4 * 0.3))
    assert speedup == pytest.approx(4 / 2.6)
    # Students of different sizes: the separate runs' time over the teacher's forward once plus each student's own.
    speedup, bound, share = benchmark.separate_runs_speedup(1.5, [1.0, 1.4], 0.6)
    assert bound == pytest.approx(2.4 / (0.6 + 0.4 + 0.8)) and share == pytest.approx(1.2 / 2.4)


def test_torchrun_trains_checkpoints_resumes_and_evaluates_each_student(data, tmp_path, capsys):
    """Two processes, two variants: each student trains and checkpoints, the run resumes every student, and each
    student's checkpoint evaluates as a single run's."""
    out = tmp_path / 'run'
    env = launch_env(MASTER_PORT=str(free_port()))
    command = torchrun('--nproc_per_node=2', 'main.py', *argv(data, out, *variant_flags(VARIANTS)))
    launch(command + ['--epochs', '1'], env)
    result = launch(command + ['--epochs', str(EPOCHS)], env)
    assert 'Auto-resume: continuing every student' in result.stdout
    for name in [students.BASE_NAME, *VARIANTS]:
        log = read_log(out / name)
        assert [entry['epoch'] for entry in log] == list(range(EPOCHS))
        capsys.readouterr()
        assert main.run(argv(data, tmp_path / 'eval', '--eval', *shlex.split(VARIANTS.get(name, '')), '--resume',
                             str(out / name / checkpoints.CHECKPOINT_NAME))) == 0
        evaluated = ACCURACY_LINE.search(capsys.readouterr().out)
        assert float(evaluated[1]) == pytest.approx(log[-1]['test_acc1'], abs=0.001)


def test_room_is_checked_for_every_students_checkpoints_at_once(data, tmp_path, capsys, monkeypatch):
    """The students' folders share a file system: the room asked for is the sum of their checkpoints', before any
    step, in one line."""
    out = tmp_path / 'run'
    single = students.checkpoint_bytes(main.get_args_parser().parse_args(argv(data, out)), SHAPES_NUM_CLASSES)
    usage = shutil.disk_usage(tmp_path)
    # Room for one student's checkpoints, not for three students'.
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=2 * checkpoints.room_needed(out, single)))
    assert main.run(argv(data, out, '--epochs', '1', *variant_flags(VARIANTS))) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f'error: --output_dir {out}: ') and 'MB needed' in err
    assert not any(path.is_file() for path in out.rglob('*'))


MEMORY_PROBE = '''
import resource, sys
import torch
import benchmark, engine, main, students
parser = main.command_line_parser()
args = parser.parse_args(sys.argv[1:])
variants = students.parse_variants(parser, args, main.check_student_args)
step = benchmark.build_step(args, torch.device('cpu'), variants)
built, teacher = step.students, step.teacher
samples = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
targets = torch.randint(0, 1000, (args.batch_size,))
# One step: each student's optimizer state is made at the end of its step, before the next student's activations.
engine.train_step(built, teacher, samples, targets)
held = 0
for student in built:
    held += sum(t.nbytes for t in student.model.state_dict().values())
    held += sum(t.nbytes for t in student.model_ema.module.state_dict().values())
    held += sum(t.nbytes for state in student.optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, held)
'''
# glibc maps every allocation from this size on and unmaps it when freed, with no dynamic threshold: the process's
# high-water mark is then the peak of its live tensors, the same from run to run (training's retain_freed_memory
# keeps freed memory for reuse instead, whose high-water mark depends on how the heap fragments).
MALLOC_EXACT_PEAKS = {'MALLOC_MMAP_THRESHOLD_': str(128 * 1024)}
MEMORY_RUN = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224', '--distillation-type',
              'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--w-cls', '1', '--w-atn', '1',
              '--batch-size', '16', '--mixup', '0', '--cutmix', '0', '--device', 'cpu',
              '--benchmark']  # --benchmark: a random teacher


def test_students_hold_one_students_activations_at_a_time():
    """Peak memory (the process's high-water mark) of three students stays below that of one plus the three
    students' weights, EMA and optimizer states: the students step one after another, each one's activations and
    gradients freed before the next. At 224 px and batch 16 a DeiT-Ti step's activations are several times its
    weights and optimizer state: measured 1323 MiB for one student, 1509 MiB for three, within the bound of 1585;
    all three students' activations alive at once took 2354 MiB."""
    def peak_and_held(*extra: str) -> tuple[int, int]:
        result = run([sys.executable, '-c', MEMORY_PROBE, *MEMORY_RUN, *extra], LAUNCH_TIMEOUT_S,
                     launch_env(**MALLOC_EXACT_PEAKS))
        assert result.returncode == 0, result.stderr[-3000:]
        return tuple(map(int, result.stdout.split()[-2:]))

    one, _ = peak_and_held()
    three, held = peak_and_held('--variant', 'b: --seed 1', '--variant', 'c: --w-atn 2')
    assert three < one + held, (three, one, held)
