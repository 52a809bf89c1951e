"""A run's students: one, or with ``--variant 'NAME: <flags>'`` several, trained on one data stream and one teacher
forward per batch. Each student is built from its own flags, resumed, checkpointed and logged as a single run is,
in ``<output_dir>/<NAME>/`` when there are variants; ``<output_dir>/variants.md`` compares them.
"""
import argparse
import contextlib
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn
from timm.scheduler import create_scheduler

import checkpoints
import utils
from engine import TEACHER_PHASE, Precision, Student, build_model_ema, build_optimizer
from launch import LaunchEnvironment
from losses import build_criterion
from models import compile_student, create_student, teacher_blocks
from utils import UserError

BASE_NAME = 'base'
TABLE_NAME = 'variants.md'
NAME_PATTERN = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]*')
LR_REFERENCE_BATCH = 512.0  # DeiT's linear LR scaling: lr * batch * world / 512
# What a student owns, and so what a variant may set: its model, its loss terms, its optimizer and learning rate,
# its EMA and its initialisation seed. Everything else (data, augmentation, mixup, batch size, input size, epochs and
# the schedule's length, the teacher, precision, launch and output) is shared by the students of a run.
STUDENT_FLAGS = frozenset({
    'model', 'drop', 'drop_path', 'model_ema', 'model_ema_decay', 'model_ema_force_cpu',
    'distillation_type', 'distillation_alpha', 'distillation_beta', 'distillation_tau', 'bce_loss',
    'w_sample', 'w_patch', 'w_rand', 'K', 's_id', 't_id', 'manifold',
    'w_cls', 'w_atn', 'w_norm', 'last_w', 'w_proj', 'w_relation', 'dim_match', 'dim_t', 'norm_distill',
    'opt', 'opt_eps', 'opt_betas', 'clip_grad', 'momentum', 'weight_decay', 'lr', 'unscale_lr', 'warmup_lr', 'min_lr',
    'seed',
})
_UNSET = object()


@dataclass(frozen=True)
class Variant:
    """A student's name, its flags (the base command's with its own on top, as a single run of it would parse
    them, writing to its own folder) and the flags it was given (empty for the base)."""
    name: str
    args: argparse.Namespace
    flags: str = ''
    among_variants: bool = False

    @property
    def label(self) -> str:
        """`` (student NAME)`` for the messages of a run with variants; empty for a single run."""
        return f' (student {self.name})' if self.among_variants else ''


def flags_given(parser: argparse.ArgumentParser, tokens: Sequence[str]) -> list[str]:
    """The flags (each action's first spelling) that ``tokens`` set: parsed into a namespace where every flag already
    has a marker value, so that argparse fills in no defaults and what changed is what was given."""
    probe = argparse.Namespace(**{action.dest: _UNSET for action in parser._actions if action.dest != 'help'})
    probe.variant = None  # an appending flag builds on the value it finds
    parser.parse_args(tokens, namespace=probe)
    return [action.option_strings[0] for action in parser._actions
            if action.dest != 'help' and getattr(probe, action.dest) is not _UNSET
            and not (action.dest == 'variant' and probe.variant is None)]


def student_args(args: argparse.Namespace, name: str) -> argparse.Namespace:
    """The flags of the student ``name`` of a run with variants: its folder is ``<output_dir>/<name>``, its
    TensorBoard run ``<exp-name>/<name>``, and it holds no variants of its own (a single run of these flags writes
    what the student writes)."""
    output_dir = str(Path(args.output_dir) / name) if args.output_dir else ''
    return argparse.Namespace(**{**vars(args), 'output_dir': output_dir, 'exp_name': f'{args.exp_name}/{name}',
                                 'variant': None})


def parse_variants(parser: argparse.ArgumentParser, args: argparse.Namespace,
                   check: Callable[[argparse.Namespace], None]) -> list[Variant]:
    """The students of the command line: the base command's (named ``base``) and one per ``--variant``, each
    checked by ``check`` as a command line is. A malformed or taken name, a flag every student shares, and a flag
    value or combination the command line would refuse are one line naming the variant and the flag."""
    if not args.variant:
        return [Variant(BASE_NAME, args)]
    for flag, given in (('--eval', args.eval), ('--resume', args.resume)):
        if given:
            raise UserError(f'{flag} with --variant: each student is a run of its own in <output_dir>/<NAME>/ '
                            f'(e.g. --eval --resume <output_dir>/<NAME>/{checkpoints.CHECKPOINT_NAME}); a run with '
                            'variants resumes every student from its folder by itself')
    students = [Variant(BASE_NAME, student_args(args, BASE_NAME), among_variants=True)]
    for text in args.variant:
        name, colon, flags = text.partition(':')
        name = name.strip()
        if not colon or not NAME_PATTERN.fullmatch(name):
            raise UserError(f"--variant {text!r}: expected 'NAME: <flags>', NAME of letters, digits, '.', '_' and '-' "
                            "(e.g. --variant 'small: --model deit_small_patch16_224')")
        if any(student.name == name for student in students):
            raise UserError(f'--variant {name}: the name is taken ({BASE_NAME} is the base command\'s student); '
                            'each student needs a name of its own')
        try:
            tokens = shlex.split(flags)
        except ValueError as err:
            raise UserError(f'--variant {name}: its flags do not split as a shell would split them ({err})') from None
        with refusals_named(name):
            given = flags_given(parser, tokens)
        shared = [flag for flag in given if _dest(parser, flag) not in STUDENT_FLAGS]
        if shared:
            raise UserError(f'--variant {name}: {shared[0]} is shared by every student of a run (data, augmentation, '
                            'mixup, batch, input size, epochs and schedule, teacher, precision, launch and output '
                            "are); a variant sets its student's own flags: model, drop path, loss terms, optimizer "
                            'and LR, EMA, seed')
        with refusals_named(name):
            own = student_args(parser.parse_args(tokens, namespace=argparse.Namespace(**vars(args))), name)
            check(own)
        students.append(Variant(name, own, flags.strip(), among_variants=True))
    return students


@contextlib.contextmanager
def refusals_named(name: str) -> Iterator[None]:
    """A refusal of the variant's flags (the parser's, the command line's checks) names the variant."""
    try:
        yield
    except UserError as err:
        raise UserError(f'--variant {name}: {err}') from None


def _dest(parser: argparse.ArgumentParser, flag: str) -> str:
    return next(action.dest for action in parser._actions if flag in action.option_strings)


def scaled_lr(args, world_size: int) -> float:
    """DeiT's linear scaling of ``--lr`` with the global batch (``--unscale-lr`` keeps it as given)."""
    return args.lr if args.unscale_lr else args.lr * args.batch_size * world_size / LR_REFERENCE_BATCH


@dataclass
class StudentRun:
    """A student and what its run keeps and writes: the model without wrappers, the schedule, the folder, the
    TensorBoard writer, the best and last accuracy."""
    variant: Variant
    student: Student
    model_without_ddp: nn.Module
    lr_scheduler: Any
    writer: Any
    n_parameters: int
    max_accuracy: float = 0.0
    last_accuracy: Optional[float] = None

    @property
    def output_dir(self) -> Optional[Path]:
        return Path(self.variant.args.output_dir) if self.variant.args.output_dir else None

    @property
    def checkpoint_path(self) -> Optional[Path]:
        return self.output_dir / checkpoints.CHECKPOINT_NAME if self.output_dir else None

    def repair_log(self, resumed_epoch: int) -> None:
        """``log.txt`` cut back to whole lines of the epochs the checkpoint holds (``utils.repair_log``)."""
        if self.output_dir:
            utils.on_main_process(lambda: utils.repair_log(self.output_dir / utils.LOG_NAME, resumed_epoch or None))

    def save(self, epoch: int) -> None:
        """The training state after ``epoch`` (a collective: every rank calls it; rank 0 writes)."""
        student = self.student
        checkpoints.save_on_master(checkpoints.training_state(
            self.model_without_ddp, student.optimizer, self.lr_scheduler, epoch, student.model_ema,
            student.precision.scaler, self.variant.args, self.max_accuracy, student.random), self.checkpoint_path)

    def finish_epoch(self, epoch: int, train_stats: dict, test_stats: dict) -> None:
        """After an epoch's evaluation: the best accuracy, the checkpoint (and the best one), ``log.txt`` and
        TensorBoard, as a single run writes them."""
        is_best = test_stats['acc1'] > self.max_accuracy
        self.max_accuracy = max(self.max_accuracy, test_stats['acc1'])
        self.last_accuracy = test_stats['acc1']
        print(f'Max accuracy{self.variant.label}: {self.max_accuracy:.2f}%')
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': self.n_parameters}
        if self.output_dir:
            # The epoch's line before its checkpoint: a run stopped between the two runs the epoch again and its
            # restart removes the line (utils.repair_log); the other way round the line would be lost.
            utils.on_main_process(lambda: utils.append_log(self.output_dir / utils.LOG_NAME, log_stats))
            self.save(epoch)
            if is_best:
                checkpoints.keep_copy_on_master(self.checkpoint_path,
                                                self.output_dir / checkpoints.BEST_CHECKPOINT_NAME)
        if self.writer is not None:
            for key, value in log_stats.items():
                self.writer.add_scalar(key, value, epoch)


def build_student(variant: Variant, teacher: Optional[nn.Module], num_classes: int, launch: LaunchEnvironment,
                  device: torch.device, writer: Any = None) -> StudentRun:
    """The student of ``variant`` as a single run builds it: the model in the student's own random stream
    (``utils.RandomStream`` from its ``--seed``), fine-tuning weights, DDP, EMA, criterion, compilation, optimizer,
    schedule and precision."""
    args = variant.args
    stream = utils.RandomStream(args.seed, launch.rank, device)
    with stream.active():
        print(f'Creating model: {args.model}{variant.label}')
        model = create_student(args, teacher, num_classes)
    if args.finetune:
        checkpoints.load_finetune(model, args.finetune)
        if args.attn_only:
            for name, param in model.named_parameters():
                param.requires_grad = '.attn.' in name or name.startswith(('head', 'pos_embed', 'cls_token',
                                                                            'dist_token'))
    model.to(device)
    model_without_ddp = model
    if launch.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == 'cuda' else None)
    # After DDP has broadcast rank 0's weights, so that every rank's EMA starts from the same model.
    model_ema = build_model_ema(args, model_without_ddp)
    criterion = build_criterion(args)
    if args.compile:
        model, criterion = compile_student(model, criterion)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print('number of params:', n_parameters)
    optimizer = build_optimizer(args, model_without_ddp, device, scaled_lr(args, launch.world_size))
    lr_scheduler, _ = create_scheduler(args, optimizer)
    student = Student(variant.name, model, criterion, optimizer, Precision.for_training(args, device),
                      teacher_blocks(args), args.clip_grad, model_ema, stream)
    return StudentRun(variant, student, model_without_ddp, lr_scheduler, writer, n_parameters)


def resume_students(runs: Sequence[StudentRun], resume: str, auto_resume: bool, training: bool) -> int:
    """Resume every student: a single run from ``--resume`` or, training with auto-resume, its folder's checkpoint;
    a run with variants from each student's folder, all of them or none, at one epoch. Returns the epoch to start
    from (0 for a fresh run)."""
    found = [r for r in runs if r.checkpoint_path and r.checkpoint_path.is_file()] if training and auto_resume else []
    if len(runs) == 1:
        path = resume or (str(found[0].checkpoint_path) if found else '')
        if path and not resume:
            print(f'Auto-resume: continuing from {path} (--no-auto-resume starts afresh)')
        return resume_one(runs[0], path, training) if path else 0
    if found and len(found) < len(runs):
        missing = [r.variant.name for r in runs if r not in found]
        raise UserError(f'--output_dir {runs[0].output_dir.parent}: students {", ".join(r.variant.name for r in found)} '
                        f'have a checkpoint to resume from and {", ".join(missing)} none: resume with the students of '
                        'the interrupted run, or another --output_dir (--no-auto-resume starts every student afresh)')
    epochs = {r.variant.name: resume_one(r, str(r.checkpoint_path), training) for r in found}
    if len(set(epochs.values())) > 1:
        raise UserError(f'--output_dir {runs[0].output_dir.parent}: the students\' checkpoints are of different epochs '
                        f'({", ".join(f"{name} {epoch - 1}" for name, epoch in epochs.items())}): they cannot resume '
                        'together')
    if found:
        print(f'Auto-resume: continuing every student from {runs[0].output_dir.parent}/<NAME>/'
              f'{checkpoints.CHECKPOINT_NAME} (--no-auto-resume starts afresh)')
    return next(iter(epochs.values()), 0)


def resume_one(run: StudentRun, path: str, training: bool) -> int:
    student = run.student
    epoch, run.max_accuracy = checkpoints.resume(path, run.model_without_ddp, training, student.optimizer,
                                                 run.lr_scheduler, student.model_ema, student.precision.scaler,
                                                 student.random)
    return epoch


def step_shares(seconds: dict[str, float]) -> dict[str, float]:
    """Each phase's share of the summed step time (the teacher's forward and each student's step)."""
    total = sum(seconds.values())
    return {phase: value / total for phase, value in seconds.items()} if total > 0 else {}


def variants_table(runs: Sequence[StudentRun], epochs_done: int, seconds: dict[str, float]) -> str:
    """``variants.md``: a row per student with its flags, final and best Acc@1 and its share of the step time."""
    shares = step_shares(seconds)
    lines = [f'# Students after {epochs_done} epochs', '',
             '| student | flags | final Acc@1 | best Acc@1 | share of the step time |',
             '| --- | --- | ---: | ---: | ---: |']
    for run in runs:
        final = f'{run.last_accuracy:.2f}' if run.last_accuracy is not None else '-'
        share = f'{100 * shares[run.variant.name]:.1f}%' if run.variant.name in shares else '-'
        flags = f'`{run.variant.flags}`' if run.variant.flags else '(the base command)'
        lines.append(f'| {run.variant.name} | {flags} | {final} | {run.max_accuracy:.2f} | {share} |')
    if TEACHER_PHASE in shares:
        lines += ['', f"The teacher's forward, shared by the students: {100 * shares[TEACHER_PHASE]:.1f}% of the step "
                      'time (measured over the epochs this process trained).']
    return '\n'.join(lines) + '\n'


def write_variants_table(output_dir: Optional[str], runs: Sequence[StudentRun], epochs_done: int,
                         seconds: dict[str, float]) -> None:
    """``<output_dir>/variants.md`` (rank 0, atomically), when the run has variants and an output folder. Call it on
    all processes (a failed write stops them all: ``utils.on_main_process``)."""
    if len(runs) < 2 or not output_dir:
        return
    text = variants_table(runs, epochs_done, seconds)

    def write(path: str) -> None:
        with open(path, 'w') as f:
            f.write(text)

    utils.on_main_process(lambda: checkpoints.write_atomically(os.path.join(output_dir, TABLE_NAME), write))


def checkpoint_bytes(args: argparse.Namespace, num_classes: int) -> int:
    """The size of a student's training checkpoints, from a weightless (meta-device) student and its optimizer."""
    with torch.device('meta'):
        student = create_student(args, None, num_classes)
    return checkpoints.training_state_bytes(
        student, lambda model: build_optimizer(args, model, torch.device('meta'), args.lr), args.model_ema)


def prepare_run_dirs(output_dir: Optional[str], variants: Sequence[Variant], num_classes: int) -> None:
    """Before the students write into their folders: the temporary files of dead writers removed from each, and room
    on ``output_dir``'s file system for all their checkpoints at once (``checkpoints.check_room``)."""
    if not output_dir:
        return
    needed = 0
    for variant in variants:
        folder = Path(variant.args.output_dir)
        checkpoints.remove_dead_writers_files(folder)
        needed += checkpoints.room_needed(folder, checkpoint_bytes(variant.args, num_classes))
    checkpoints.check_room(Path(output_dir), needed)
