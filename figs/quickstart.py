"""Quickstart: does distillation help, and which terms? A teacher and four students over three seeds, on the
built-in shapes data set, on a CPU, in minutes.

Trains a teacher once on the full training set, then for every seed of ``--seeds`` four students on a fifth of it
with the same budget (no teacher, soft KD, Manifold Distillation, [CLS]-KD + Manifold) in one ``python main.py ...``
process (the code path of ImageNet training): the soft-KD student is the command's, the others its ``--variant``s,
so that the four see the same batches and start from the same weights, and the teacher's forward is paid once per
batch (``--jobs`` of these processes at a time). Writes ``results.md`` (mean and spread over the seeds),
``accuracy.png`` (with error bars), ``losses.png`` and ``commands.sh`` to ``--out``::

    python figs/quickstart.py --out runs/quickstart
    python figs/quickstart.py --out runs/quickstart-smoke --smoke   # the same pipeline, tiny budget

Finished runs are reused when the command is repeated with the same settings.
"""
import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import matplotlib
import timm
import torch

matplotlib.use('Agg')  # files only: no display is needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

from plot_logs import plot_logs, read_log, save_figure  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SETTINGS_NAME = 'quickstart.json'
RESULTS_NAME = 'results.md'
ACCURACY_FIGURE = 'accuracy.png'
LOSSES_FIGURE = 'losses.png'
COMMANDS_NAME = 'commands.sh'
STDOUT_NAME = 'stdout.txt'
DATA_DIR_NAME = 'shapes'
STUDENT_DATA_DIR_NAME = 'shapes_students'
CHECKPOINT_NAME = 'checkpoint.pth'
EXIT_FAILED = 1
FAILURE_TAIL_LINES = 20  # of main.py's output, shown when a run fails

# The budget: measured to finish in under 10 minutes on a 2-core CPU.
TEACHER_MODEL = 'deit_small_patch16_224'
STUDENT_MODEL = 'deit_tiny_patch16_224'
# 64 px images in 16 px patches: a 4 x 4 grid, so the patch relations and the CLS-patch attention map have 16
# patches to match (at 32 px there were 4).
INPUT_SIZE = 64
MIN_PATCHES = 16
# The teacher learns from all training images, the students from the first fifth of them (the same images: the
# data set is drawn image by image from the seed): with little data of its own, a student has the most to gain
# from a teacher, and at 64 px a student on all images reaches the teacher's 94-98% without one.
TRAIN_PER_CLASS = 100
STUDENT_TRAIN_PER_CLASS = 20
VAL_PER_CLASS = 30
TEACHER_EPOCHS = 12
STUDENT_EPOCHS = 12
SEEDS = (0, 1, 2)
TEACHER_BATCH_SIZE = 64
BATCH_SIZE = 32
LR = 1e-3
# Two single-threaded runs at a time train faster on 2 cores than one at a time on both (small matmuls).
JOBS = min(2, os.cpu_count() or 1)
# One warm-up epoch would run epochs 0 and 1 at --warmup-lr (DeiT steps the schedule with the finished
# epoch's index): a third of a student's budget learning nothing.
WARMUP_EPOCHS = 0
NUM_WORKERS = 0

# --smoke: every step of the pipeline, on a few images for one epoch and two seeds (tests).
SMOKE_TRAIN_PER_CLASS = 2
SMOKE_VAL_PER_CLASS = 1
SMOKE_EPOCHS = 1
SMOKE_BATCH_SIZE = 8
SMOKE_SEEDS = (0, 1)
SMOKE_STUDENT_TRAIN_PER_CLASS = 1

# The layer pairs and weights of the papers' README commands (12-block student and teacher).
LAYER_IDS = (0, 1, 2, 3, 8, 9, 10, 11)
MANIFOLD_FLAGS = ('--w-sample', '0.1', '--w-patch', '4', '--w-rand', '0.2', '--K', '192')
CLSKD_FLAGS = ('--w-cls', '1.0', '--w-atn', '2.0', '--last-w', '4.0')
# The papers' commands learn from the teacher only: no label term, every Manifold term at its own weight.
PAPERS_WEIGHTS = ('--distillation-alpha', '1', '--distillation-beta', '1')
BASE = 'base'  # main.py's name for the student of the command itself, among --variant's

# Same for every run. The model EMA is never evaluated, so it is skipped to save time. The per-epoch evaluation
# runs in the training precision: on a CPU with native bf16 that is bf16, faster than DeiT's float32 evaluation
# (main.py's default, there to reproduce published checkpoints' numbers; docs/differences.md has the measured
# ratio), and a comparison of methods run alike needs no more.
COMMON_FLAGS = ('--data-set', 'SHAPES', '--device', 'cpu', '--no-model-ema', '--unscale-lr',
                '--eval-precision', 'training')
# DeiT's regularisation (RandAugment, mixup, cutmix, random erasing, drop path) pays off over hundreds of
# epochs; in a budget of minutes it only slows learning down. RandAugment's colour operations would also
# hide the shapes' colours.
SHORT_RECIPE = ('--aa', 'none', '--mixup', '0', '--cutmix', '0', '--reprob', '0', '--drop-path', '0')

TEACHER_COLOUR = 'tab:gray'
STUDENT_COLOUR = 'tab:blue'
SEED_COLOUR = 'black'
BAR_WIDTH = 0.6
SEED_SPREAD = 0.15  # horizontal offset between a bar's per-seed dots
FULL_ACCURACY = 100.0
BAR_HEADROOM = 1.12  # room above a 100% bar for its label
FIGURE_SIZE = (8.0, 4.0)
DPI = 120


@dataclass(frozen=True)
class Method:
    """A row of the table: a student of each seed's run, named ``key`` there (``BASE`` for the command's own),
    with the flags it adds to the students' command (a ``--variant``)."""
    key: str
    label: str
    teacher: str  # '-' when no teacher is used
    flags: tuple[str, ...]


@dataclass(frozen=True)
class Run:
    """One ``main.py`` training run of the quickstart: the teacher's, or a seed's with every method's student."""
    name: str
    label: str
    model: str
    epochs: int
    seed: int
    batch_size: int
    data_dir: str
    flags: tuple[str, ...]
    methods: tuple[Method, ...] = ()

    def log_paths(self, out: Path) -> list[Path]:
        """Each student's ``log.txt`` (the teacher's own for the teacher's run)."""
        folders = [out / self.name / method.key for method in self.methods] or [out / self.name]
        return [folder / 'log.txt' for folder in folders]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='runs/quickstart', help='folder for the runs, results.md and figures')
    parser.add_argument('--smoke', action='store_true',
                        help=f'tiny budget ({SMOKE_EPOCHS} epoch, a few images): checks the pipeline only')
    parser.add_argument('--teacher-model', default=TEACHER_MODEL)
    parser.add_argument('--model', default=STUDENT_MODEL, help='the student')
    parser.add_argument('--teacher-epochs', type=int, default=None, help=f'default {TEACHER_EPOCHS}')
    parser.add_argument('--epochs', type=int, default=None, help=f'every student; default {STUDENT_EPOCHS}')
    parser.add_argument('--batch-size', type=int, default=None, help=f'every student; default {BATCH_SIZE}')
    parser.add_argument('--teacher-batch-size', type=int, default=None, help=f'default {TEACHER_BATCH_SIZE}')
    parser.add_argument('--lr', type=float, default=LR, help='the learning rate itself (not scaled by batch)')
    parser.add_argument('--warmup-epochs', type=int, default=WARMUP_EPOCHS)
    parser.add_argument('--input-size', type=int, default=INPUT_SIZE, help='also the size the images are drawn at')
    parser.add_argument('--train-per-class', type=int, default=None,
                        help=f"the teacher's training images per class; default {TRAIN_PER_CLASS}")
    parser.add_argument('--student-train-per-class', type=int, default=None,
                        help=f"the students' (the first of the teacher's); default {STUDENT_TRAIN_PER_CLASS}")
    parser.add_argument('--val-per-class', type=int, default=None, help=f'default {VAL_PER_CLASS}')
    parser.add_argument('--s-id', nargs='+', type=int, default=list(LAYER_IDS), help='student blocks distilled')
    parser.add_argument('--t-id', nargs='+', type=int, default=list(LAYER_IDS), help='teacher blocks, paired')
    parser.add_argument('--num-workers', type=int, default=NUM_WORKERS)
    parser.add_argument('--jobs', type=int, default=JOBS,
                        help='students trained at a time, the CPU cores shared among them (default: up to 2)')
    parser.add_argument('--seeds', type=int, nargs='+', default=None,
                        help=f'the students\' seeds; default {" ".join(map(str, SEEDS))} (the teacher uses the first)')
    parser.add_argument('--verbose', action='store_true', help="show all of main.py's output")
    return parser


def resolve_budget(args: argparse.Namespace) -> None:
    """Fill the flags left unset with the full or the --smoke budget."""
    budget = {
        'teacher_epochs': (TEACHER_EPOCHS, SMOKE_EPOCHS),
        'epochs': (STUDENT_EPOCHS, SMOKE_EPOCHS),
        'batch_size': (BATCH_SIZE, SMOKE_BATCH_SIZE),
        'teacher_batch_size': (TEACHER_BATCH_SIZE, SMOKE_BATCH_SIZE),
        'train_per_class': (TRAIN_PER_CLASS, SMOKE_TRAIN_PER_CLASS),
        'student_train_per_class': (STUDENT_TRAIN_PER_CLASS, SMOKE_STUDENT_TRAIN_PER_CLASS),
        'val_per_class': (VAL_PER_CLASS, SMOKE_VAL_PER_CLASS),
        'seeds': (list(SEEDS), list(SMOKE_SEEDS)),
    }
    for name, (full, smoke) in budget.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)


def check_patches(args: argparse.Namespace) -> None:
    """Every term needs patches to relate: at least ``MIN_PATCHES`` per image for both models."""
    for name in (args.model, args.teacher_model):
        with torch.device('meta'):
            grid = timm.create_model(name, img_size=args.input_size).patch_embed.grid_size
        if grid[0] * grid[1] < MIN_PATCHES:
            raise ValueError(f'--input-size {args.input_size} gives {name} {grid[0] * grid[1]} patches per image; '
                             f'the feature terms need at least {MIN_PATCHES}')


def plan_methods(args: argparse.Namespace) -> tuple[Method, ...]:
    """The four students of a seed's run: they differ only in the terms the table names. The distilled ones learn
    at the papers' weights (``--distillation-alpha 1 --distillation-beta 1``: from the teacher only, no label
    term), so that soft KD is the logit term alone and each further row adds its terms to it."""
    layers = ('--s-id', *map(str, args.s_id), '--t-id', *map(str, args.t_id))
    return (
        Method('no_teacher', 'no teacher', '-', ('--distillation-type', 'none')),
        Method(BASE, 'soft KD', args.teacher_model, ()),
        Method('manifold', 'Manifold', args.teacher_model, layers + MANIFOLD_FLAGS),
        Method('clskd_manifold', '[CLS]-KD + Manifold', args.teacher_model, layers + MANIFOLD_FLAGS + CLSKD_FLAGS),
    )


def plan_runs(args: argparse.Namespace, out: Path) -> list[Run]:
    """The teacher (once, first seed), then one run of the four students for every seed."""
    teacher_path = out / 'teacher' / CHECKPOINT_NAME
    distill = ('--teacher-model', args.teacher_model, '--teacher-path', str(teacher_path),
               '--distillation-type', 'soft') + PAPERS_WEIGHTS
    methods = plan_methods(args)
    variants = tuple(word for method in methods if method.key != BASE
                     for word in ('--variant', f'{method.key}: {shlex.join(method.flags)}'))
    teacher = Run('teacher', 'teacher (from scratch)', args.teacher_model, args.teacher_epochs, args.seeds[0],
                  args.teacher_batch_size, DATA_DIR_NAME, ('--distillation-type', 'none'))
    return [teacher] + [Run(f'seed{seed}', f'the students of seed {seed}', args.model, args.epochs, seed,
                            args.batch_size, STUDENT_DATA_DIR_NAME, distill + variants, methods)
                        for seed in args.seeds]


def main_command(run: Run, args: argparse.Namespace, out: Path) -> list[str]:
    """The ``python main.py ...`` command line of one run."""
    return [
        sys.executable, 'main.py', *COMMON_FLAGS, *SHORT_RECIPE,
        '--data-path', str(out / run.data_dir), '--output_dir', str(out / run.name),
        '--model', run.model, '--input-size', str(args.input_size), '--epochs', str(run.epochs),
        '--batch-size', str(run.batch_size), '--lr', str(args.lr), '--warmup-epochs', str(args.warmup_epochs),
        '--num_workers', str(args.num_workers), '--seed', str(run.seed), *run.flags,
    ]


def is_progress_line(line: str) -> bool:
    """The DeiT progress lines worth showing by default: steps with ETA, accuracy (each student's), total time."""
    return line.startswith(('Epoch:', 'Test:', '* Acc@1', 'Max accuracy', 'Training time', 'error')) or \
        '] * Acc@1' in line


def run_main(run: Run, command: list[str], run_dir: Path, verbose: bool, threads: int) -> float:
    """Run one ``main.py`` process on ``threads`` CPU threads, echoing its progress; returns its wall time in s."""
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f'\n=== {run.label}: {run.model}, {run.epochs} epochs ===\n{shlex.join(command)}', flush=True)
    start = time.perf_counter()
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    with (run_dir / STDOUT_NAME).open('w') as log, subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            bufsize=1) as proc:
        for line in proc.stdout:
            log.write(line)
            if verbose or is_progress_line(line):
                print(f'[{run.name}] {line}', end='', flush=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        if not verbose:
            tail = (run_dir / STDOUT_NAME).read_text().splitlines()[-FAILURE_TAIL_LINES:]
            print('\n'.join(f'[{run.name}] {line}' for line in tail), flush=True)
        raise RuntimeError(f'{run.name} failed with exit code {proc.returncode}; see {run_dir / STDOUT_NAME}')
    return seconds


def is_finished(run: Run, out: Path) -> bool:
    return all(log.is_file() and len(read_log(log)) >= run.epochs for log in run.log_paths(out))


def load_settings(out: Path, settings: dict) -> dict:
    """Wall times of the finished runs of an earlier quickstart in ``out`` with the same settings."""
    path = out / SETTINGS_NAME
    if not path.is_file():
        return {}
    saved = json.loads(path.read_text())
    if saved.get('settings') != settings:
        changed = sorted(k for k in settings if saved.get('settings', {}).get(k) != settings[k])
        raise ValueError(f'{out} holds a quickstart with other settings ({", ".join(changed)}): '
                         'use another --out or delete it')
    return saved.get('seconds', {})


@dataclass
class Row:
    """A row of results: a method's (or the teacher's) final and best Acc@1 over the seeds."""
    label: str
    teacher: str
    model: str
    epochs: int
    final: list[float]
    best: list[float]

    @property
    def mean(self) -> float:
        return statistics.mean(self.final)

    @property
    def std(self) -> float:
        return statistics.stdev(self.final) if len(self.final) > 1 else 0.0


def summarise(runs: Sequence[Run], out: Path) -> list[Row]:
    """The teacher's row, then one per method over the seeds' runs."""
    def accuracies(log: Path) -> list[float]:
        return [epoch['test_acc1'] for epoch in read_log(log)]

    teacher, students = runs[0], runs[1:]
    own = accuracies(teacher.log_paths(out)[0])
    rows = [Row(teacher.label, '-', teacher.model, teacher.epochs, [own[-1]], [max(own)])]
    for index, method in enumerate(students[0].methods):
        seeds = [accuracies(run.log_paths(out)[index]) for run in students]
        rows.append(Row(method.label, method.teacher, students[0].model, students[0].epochs,
                        [a[-1] for a in seeds], [max(a) for a in seeds]))
    return rows


def count_images(folder: Path) -> tuple[int, int]:
    """``(images, classes)`` of an ImageFolder split."""
    classes = [c for c in folder.iterdir() if c.is_dir()]
    return sum(1 for c in classes for f in c.iterdir() if f.is_file()), len(classes)


def write_results(rows: Sequence[Row], args: argparse.Namespace, data_path: Path, seconds: dict, runs: Sequence[Run],
                  path: Path) -> None:
    """The results table as markdown, under a line that says what was trained on and how long it took."""
    train_images, classes = count_images(data_path / 'train')
    val_images, _ = count_images(data_path / 'val')
    student_images, _ = count_images(data_path.parent / STUDENT_DATA_DIR_NAME / 'train')
    lines = [
        '| method | teacher | student | epochs | seeds | final Acc@1, mean ± std | final Acc@1 per seed '
        '| best Acc@1, mean |',
        '| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |',
    ]
    for row in rows:
        per_seed = ' / '.join(f'{value:.1f}' for value in row.final)
        lines.append(f'| {row.label} | {row.teacher} | {row.model} | {row.epochs} | {len(row.final)} '
                     f'| {row.mean:.1f} ± {row.std:.1f} | {per_seed} | {statistics.mean(row.best):.1f} |')
    students = [seconds[run.name] for run in runs[1:]]
    header = (f'Shapes data set: {train_images} training images for the teacher, the first {student_images} of '
              f'them for the students, {val_images} validation images; {args.input_size}x{args.input_size} px, '
              f'{classes} classes; batch {args.teacher_batch_size} (teacher) and {args.batch_size} (students), '
              f'lr {args.lr:g}; student seeds {" ".join(map(str, args.seeds))}, each seed\'s four students in one '
              'main.py process (the same batches and initial weights; the teacher\'s forward once per batch). Acc@1 '
              'in % on the validation images (std: sample standard deviation over the seeds). Wall time: the '
              f'teacher {seconds[runs[0].name]:.0f} s, a seed\'s students {min(students):.0f} to {max(students):.0f} s '
              f'({args.jobs} process(es) at a time).')
    path.write_text('\n'.join([header, ''] + lines) + '\n')


def plot_accuracy(rows: Sequence[Row], path: Path) -> None:
    """Mean final Acc@1 per method with the seeds' standard deviation as error bars and each seed as a dot."""
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    for i, row in enumerate(rows):
        colour = TEACHER_COLOUR if i == 0 else STUDENT_COLOUR
        several = len(row.final) > 1
        bar = ax.bar(i, row.mean, BAR_WIDTH, yerr=row.std if several else None, capsize=4, color=colour)
        ax.bar_label(bar, labels=[f'{row.mean:.1f} ± {row.std:.1f}' if several else f'{row.mean:.1f}'],
                     fontsize='small', padding=6)
        offsets = [SEED_SPREAD * (k - (len(row.final) - 1) / 2) for k in range(len(row.final))]
        ax.scatter([i + o for o in offsets], row.final, s=12, color=SEED_COLOUR, zorder=3)
    ax.set_xticks(range(len(rows)), [f"{r.label}\n{r.model.split('_patch')[0]}" for r in rows], fontsize='small')
    ax.set_ylabel('final Acc@1 (%)')
    ax.set_ylim(0, FULL_ACCURACY * BAR_HEADROOM)
    ax.set_title(f'Shapes, {rows[1].epochs} student epochs, {len(rows[1].final)} seeds: mean ± std (dots: seeds)')
    ax.grid(axis='y', alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, DPI)


def make_data(args: argparse.Namespace, data_path: Path, train_per_class: int) -> None:
    """Draw the shapes data set at the input size; the same seed draws the same images, so a smaller training set
    is the first images of a larger one."""
    if all((data_path / split).is_dir() for split in ('train', 'val')):
        return
    subprocess.run([sys.executable, 'shapes.py', str(data_path),
                    '--train-per-class', str(train_per_class), '--val-per-class', str(args.val_per_class),
                    '--image-size', str(args.input_size), '--seed', str(args.seeds[0])],
                   cwd=REPO, check=True, stdout=subprocess.DEVNULL)


def quickstart(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    resolve_budget(args)
    check_patches(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / DATA_DIR_NAME
    runs = plan_runs(args, out)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in ('out', 'verbose', 'num_workers', 'jobs')}
    seconds = load_settings(out, settings)

    make_data(args, data_path, args.train_per_class)
    make_data(args, out / STUDENT_DATA_DIR_NAME, args.student_train_per_class)
    commands = {run.name: main_command(run, args, out) for run in runs}
    (out / COMMANDS_NAME).write_text('\n'.join(shlex.join(['python', *c[1:]]) for c in commands.values()) + '\n')
    cores = os.cpu_count() or 1
    recording = threading.Lock()  # students finish on several threads; one at a time updates quickstart.json

    def train(run: Run, threads: int) -> None:
        run_dir = out / run.name
        if run.name in seconds and is_finished(run, out):
            print(f'{run.label}: finished earlier in {run_dir}, reused')
            return
        run_seconds = run_main(run, commands[run.name], run_dir, args.verbose, threads)
        with recording:
            seconds[run.name] = run_seconds
            (out / SETTINGS_NAME).write_text(json.dumps({'settings': settings, 'seconds': seconds}, indent=1) + '\n')

    teacher, students = runs[0], runs[1:]
    train(teacher, cores)  # the students need its checkpoint
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for future in [pool.submit(train, run, max(1, cores // args.jobs)) for run in students]:
            future.result()

    rows = summarise(runs, out)
    write_results(rows, args, data_path, seconds, runs, out / RESULTS_NAME)
    plot_accuracy(rows, out / ACCURACY_FIGURE)
    first = students[0]
    plot_logs(first.log_paths(out), out / LOSSES_FIGURE, labels=[method.label for method in first.methods],
              title=f'Students ({args.model}, teacher {args.teacher_model}, seed {first.seed}): Acc@1 and the '
                    'weighted loss terms (train_*) per epoch')
    print('\n' + (out / RESULTS_NAME).read_text())
    for name in (RESULTS_NAME, ACCURACY_FIGURE, LOSSES_FIGURE, COMMANDS_NAME):
        print(f'wrote {out / name}')
    print(f'quickstart wall time: {time.perf_counter() - start:.0f} s')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        return quickstart(args)
    except (RuntimeError, ValueError, subprocess.CalledProcessError) as err:
        sys.stderr.write(f'error: {err}\n')
        return EXIT_FAILED


if __name__ == '__main__':
    sys.exit(main())
