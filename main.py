"""Training and evaluation of vision transformers with [CLS]-KD, Manifold Distillation and DeiT logit KD.

Parses the command line (every flag of DeiT's main.py and of both papers' parsers, each value checked before any
work starts) and wires the data, models, criterion and loops together; the loops live in engine.py.
"""
import argparse
import contextlib
import gc
import math
import os
import signal
import socket
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from timm.data import create_transform
from timm.data.transforms import str_to_interp_mode
from timm.optim import get_optimizer_info
from timm.scheduler import create_scheduler_v2
from timm.utils import random_seed

import benchmark
import checkpoints
import utils
from dali_data import build_data_loaders, check_dali_flags
from datasets import DATA_SETS, INAT_CATEGORIES, UnreadableImageError, build_dataset, build_mixup, num_classes_of
from checkpoints import CHECKPOINT_NAME
from engine import NonFiniteLossError, Precision, StopSignal, evaluate_students, train_one_epoch
from launch import LaunchEnvironment, launch_environment, slurm_rendezvous
from losses import feature_distillation
from models import (check_model_name, check_timm_weights, check_token_shapes, check_weight_files, compile_teacher,
                    load_teacher, no_token_capture, timm_weights_overlay, token_width)
from students import Variant, build_student, parse_variants, prepare_run_dirs, resume_students, write_variants_table
from utils import EXIT_USER_ERROR, OutputWriteError, UserError

DEFAULT_DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
LOOKAHEAD_PREFIX = 'lookahead_'  # timm's optimizer factory wraps 'lookahead_<name>' in Lookahead
NO_AUGMENTATION = ('', 'none')
DATA_BACKENDS = ('pil', 'dali')
# --eval-precision: DeiT's evaluate (float16 autocast on CUDA, float32 on the CPU), the training precision, float32.
EVAL_PRECISIONS = ('original', 'training', 'float32')
RANDOM_ERASING_MODES = ('const', 'rand', 'pixel')  # timm's RandomErasing
MIXUP_MODES = ('batch', 'pair', 'elem')  # timm's Mixup
MAX_SEED = 2 ** 32 - 1  # numpy's seeds are 32-bit
MAX_PORT = 65535
MIN_POLICY_CHECK_SIZE = 32  # the image size at which --aa is built once to check it
EXIT_NON_FINITE = 3
EXIT_PEER_FAILURE = 4
EXIT_WRITE_FAILED = 74  # EX_IOERR: a checkpoint or log.txt could not be written; a full disk stays full, no requeue
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a temporary failure, the job should be run again
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# torchrun and Slurm send SIGKILL 30 s after SIGTERM; a process still waiting on its peers this long after the signal
# (and after it began to wait) is blocked by a dead or hung peer, and says so before it is killed.
PEER_WAIT_AFTER_SIGNAL_S = 20
PEER_WAIT_POLL_S = 0.5
# gloo reports a dead peer inside DDP's backward as a plain RuntimeError (no DistError), recognisable only by its
# transport's words; NCCL and the c10d store raise DistError subclasses.
GLOO_PEER_FAILURES = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'Timed out')
# How each launcher is told to start one process per GPU.
ONE_PROCESS_PER_GPU = {'torchrun': '--nproc_per_node',
                       'slurm': '--ntasks-per-node, or --gpus-per-task=1 to give each task a GPU of its own'}


# ---------------------------------------------------------------------------------------------
# Checked flag values: an argparse type per kind of value, so a bad one stops the parse naming its flag
# ---------------------------------------------------------------------------------------------

def bounded(kind: type, low: Optional[float] = None, high: Optional[float] = None, *,
            low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite ``kind`` (int or float) within ``[low, high]`` (open ends where asked)."""
    interval = (('(-inf' if low is None else ('(' if low_open else '[') + f'{low:g}') + ', '
                + ('inf)' if high is None else f'{high:g}' + (')' if high_open else ']')))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be {"an integer" if kind is int else "a number"}, got {text!r}')
        if (not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low)))
                or (high is not None and (value > high or (high_open and value == high)))):
            raise argparse.ArgumentTypeError(f'must be in {interval}, got {text}')
        return value

    parse.kind, parse.low, parse.high, parse.low_open, parse.high_open = kind, low, high, low_open, high_open
    parse.__name__ = kind.__name__
    return parse


POSITIVE_INT = bounded(int, 1)
NON_NEGATIVE_INT = bounded(int, 0)
NON_NEGATIVE = bounded(float, 0)
POSITIVE = bounded(float, 0, low_open=True)
PROBABILITY = bounded(float, 0, 1)
RATE_BELOW_ONE = bounded(float, 0, 1, high_open=True)  # dropout, drop path, smoothing, momentum, Adam betas
FRACTION = bounded(float, 0, 1, low_open=True)  # a crop ratio, a CutMix box size


def optimizer_name(text: str) -> str:
    """A name from timm's optimizer registry (``timm.optim.list_optimizers()``), optionally ``lookahead_``-prefixed."""
    base = text.lower().removeprefix(LOOKAHEAD_PREFIX)
    try:
        get_optimizer_info(base)
    except ValueError:
        raise argparse.ArgumentTypeError(f"unknown optimizer '{text}' (timm.optim.list_optimizers() lists them)")
    return text


def scheduler_name(text: str) -> str:
    """A schedule that timm's scheduler factory builds (cosine, tanh, step, multistep, plateau, poly, ...)."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)])
    try:
        built, _ = create_scheduler_v2(probe, sched=text)
    except ValueError:
        built = None
    if built is None:
        raise argparse.ArgumentTypeError(f"unknown schedule '{text}' (timm.scheduler.create_scheduler_v2 builds "
                                         'cosine, tanh, step, multistep, plateau, poly, ...)')
    return text


def interpolation_name(text: str) -> str:
    """``random`` or an interpolation timm's transforms know (bicubic, bilinear, nearest, ...)."""
    if text != 'random':
        try:
            str_to_interp_mode(text)
        except KeyError:
            raise argparse.ArgumentTypeError(f"unknown interpolation '{text}' (bicubic, bilinear, nearest, box, "
                                             'hamming, lanczos or random)')
    return text


def augmentation_policy(text: str) -> str:
    """``none`` or a policy timm's augmentation factory builds (``rand-m9-mstd0.5-inc1``, ``augmix-...``, ``v0``)."""
    if text not in NO_AUGMENTATION:
        try:
            create_transform(MIN_POLICY_CHECK_SIZE, is_training=True, auto_augment=text)
        except (AssertionError, ValueError, KeyError, IndexError):
            raise argparse.ArgumentTypeError(f"unknown augmentation policy '{text}' (e.g. rand-m9-mstd0.5-inc1, "
                                             'augmix-m5-w4-d2, v0, original, 3a, or none)')
    return text


def device_name(text: str) -> str:
    """A device ``torch.device`` parses (cuda, cuda:1, cpu)."""
    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a torch device (cuda, cuda:1, cpu)")
    return text


class OneLineArgumentParser(argparse.ArgumentParser):
    """A parse error is the user's: one line naming the flag (``main.run`` prints it), no usage dump."""

    def error(self, message: str):
        raise UserError(message)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('[CLS]-KD / Manifold Distillation training and evaluation', add_help=False)
    parser.add_argument('--batch-size', default=64, type=POSITIVE_INT, help='batch size per process')
    parser.add_argument('--epochs', default=300, type=POSITIVE_INT)
    parser.add_argument('--bce-loss', action='store_true', help='binary cross-entropy base loss (DeiT III)')
    parser.add_argument('--unscale-lr', action='store_true', help='do not scale --lr by batch * world / 512')

    group = parser.add_argument_group('Manifold distillation')
    group.add_argument('--distillation-beta', default=1.0, type=NON_NEGATIVE, help='weight of all manifold terms')
    group.add_argument('--w-sample', default=0.1, type=NON_NEGATIVE, help='inter-image (sample) relation weight')
    group.add_argument('--w-patch', default=4.0, type=NON_NEGATIVE, help='intra-image (patch) relation weight')
    group.add_argument('--w-rand', default=0.2, type=NON_NEGATIVE, help='random-token relation weight')
    group.add_argument('--K', default=192, type=POSITIVE_INT, help='tokens drawn for the random relation term')
    group.add_argument('--s-id', nargs='+', type=NON_NEGATIVE_INT, help='student blocks whose tokens are distilled')
    group.add_argument('--t-id', nargs='+', type=NON_NEGATIVE_INT, help='teacher blocks matched with --s-id, pairwise')
    group.add_argument('--manifold', action=argparse.BooleanOptionalAction, default=True,
                       help='the Manifold terms (need --s-id/--t-id)')

    group = parser.add_argument_group('[CLS]-KD')
    group.add_argument('--w-cls', default=0.0, type=NON_NEGATIVE, help='[CLS] token distillation weight (0: off)')
    group.add_argument('--w-atn', default=0.0, type=NON_NEGATIVE, help='CLS-patch attention weight (0: off)')
    group.add_argument('--w-norm', default=1.0, type=NON_NEGATIVE, help='token-norm term weight (--norm-distill)')
    group.add_argument('--last-w', default=4.0, type=NON_NEGATIVE, help='extra weight of the last layer pair')
    group.add_argument('--w-proj', default=1.0, type=NON_NEGATIVE, help='projection term weight (--dim-match both)')
    group.add_argument('--w-relation', default=1.0, type=NON_NEGATIVE,
                       help='relation term weight (--dim-match both)')
    group.add_argument('--dim-match', default='projector', choices=['projector', 'relation', 'both'],
                       help='how student [CLS] tokens meet the teacher width')
    group.add_argument('--dim-t', default=None, type=POSITIVE,
                       help='teacher token width; read from --teacher-model, checked when given')
    group.add_argument('--norm-distill', action=argparse.BooleanOptionalAction, default=False,
                       help='token-norm distillation term')
    group.add_argument('--exp-name', default='Exp_test', type=str, help='run name (TensorBoard subfolder)')

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL')
    group.add_argument('--input-size', default=224, type=POSITIVE_INT, help='image size')
    group.add_argument('--drop', type=RATE_BELOW_ONE, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=RATE_BELOW_ONE, default=0.1, metavar='PCT', help='drop path rate')
    group.add_argument('--model-ema', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--model-ema-decay', type=PROBABILITY, default=0.99996)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False)

    group = parser.add_argument_group('Optimizer and schedule')
    group.add_argument('--opt', default='adamw', type=optimizer_name, metavar='OPTIMIZER',
                       help="a name of timm's optimizer registry")
    group.add_argument('--opt-eps', default=1e-8, type=POSITIVE, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=RATE_BELOW_ONE, nargs='+', metavar='BETA')
    group.add_argument('--clip-grad', type=POSITIVE, default=None, metavar='NORM', help='clip gradient norm')
    group.add_argument('--momentum', type=RATE_BELOW_ONE, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=NON_NEGATIVE, default=0.05)
    group.add_argument('--sched', default='cosine', type=scheduler_name, metavar='SCHEDULER',
                       help="a schedule of timm's scheduler factory")
    group.add_argument('--lr', type=NON_NEGATIVE, default=5e-4, metavar='LR', help='base LR for a batch of 512')
    group.add_argument('--lr-noise', type=NON_NEGATIVE, nargs='+', default=None, metavar='pct, pct')
    group.add_argument('--lr-noise-pct', type=NON_NEGATIVE, default=0.67, metavar='PERCENT')
    group.add_argument('--lr-noise-std', type=NON_NEGATIVE, default=1.0, metavar='STDDEV')
    group.add_argument('--warmup-lr', type=NON_NEGATIVE, default=1e-6, metavar='LR')
    group.add_argument('--min-lr', type=NON_NEGATIVE, default=1e-5, metavar='LR')
    group.add_argument('--decay-epochs', type=POSITIVE, default=30, metavar='N')
    group.add_argument('--warmup-epochs', type=NON_NEGATIVE_INT, default=5, metavar='N')
    group.add_argument('--cooldown-epochs', type=NON_NEGATIVE_INT, default=10, metavar='N')
    group.add_argument('--patience-epochs', type=NON_NEGATIVE_INT, default=10, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=POSITIVE, default=0.1, metavar='RATE')

    group = parser.add_argument_group('Augmentation')
    group.add_argument('--color-jitter', type=NON_NEGATIVE, default=0.4, metavar='PCT')
    group.add_argument('--aa', type=augmentation_policy, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                       help='RandAugment / AutoAugment policy of timm, or none')
    group.add_argument('--smoothing', type=RATE_BELOW_ONE, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', type=interpolation_name, default='bicubic')
    group.add_argument('--repeated-aug', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--train-mode', action=argparse.BooleanOptionalAction, default=True)
    group.add_argument('--ThreeAugment', action='store_true', help='DeiT III 3-augment')
    group.add_argument('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    group.add_argument('--reprob', type=PROBABILITY, default=0.25, metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel', choices=RANDOM_ERASING_MODES)
    group.add_argument('--recount', type=POSITIVE_INT, default=1)
    group.add_argument('--resplit', action='store_true', default=False)
    group.add_argument('--mixup', type=NON_NEGATIVE, default=0.8, help='mixup alpha, on if > 0')
    group.add_argument('--cutmix', type=NON_NEGATIVE, default=1.0, help='cutmix alpha, on if > 0')
    group.add_argument('--cutmix-minmax', type=FRACTION, nargs=2, default=None, metavar=('MIN', 'MAX'))
    group.add_argument('--mixup-prob', type=PROBABILITY, default=1.0)
    group.add_argument('--mixup-switch-prob', type=PROBABILITY, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch', choices=MIXUP_MODES)

    group = parser.add_argument_group('Distillation')
    group.add_argument('--teacher-model', default='cait_s24_224', type=str, metavar='MODEL')
    group.add_argument('--teacher-path', type=str, default='',
                       help="teacher weights: a file, an https URL, timm (timm's pretrained weights of "
                            '--teacher-model) or hf-hub:<repo>')
    group.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'], type=str)
    group.add_argument('--distillation-alpha', default=0.5, type=PROBABILITY, help='KD weight; base gets 1 - alpha')
    group.add_argument('--distillation-tau', default=1.0, type=POSITIVE)

    group = parser.add_argument_group('Fine-tuning')
    group.add_argument('--finetune', default='', help='initialise the student from this checkpoint')
    group.add_argument('--attn-only', action='store_true', help='fine-tune attention weights only')

    group = parser.add_argument_group('Data')
    group.add_argument('--data-path', default='', type=str, help='dataset root')
    group.add_argument('--data-set', default='IMNET', type=str, choices=DATA_SETS)
    group.add_argument('--inat-category', default='name', type=str, choices=INAT_CATEGORIES)
    group.add_argument('--download', action='store_true', help='download CIFAR if missing')
    group.add_argument('--skip-bad-images', action='store_true', help='warn about and skip unreadable images')
    group.add_argument('--data-backend', default='pil', choices=DATA_BACKENDS,
                       help="pil: DeiT's transforms in DataLoader workers; dali: the same decoded and augmented by "
                            'NVIDIA DALI on the GPU (on the CPU without one)')
    group.add_argument('--num_workers', default=10, type=NON_NEGATIVE_INT)
    group.add_argument('--pin-mem', action=argparse.BooleanOptionalAction, default=True,
                       help='pinned host memory for faster copies to the GPU')

    group = parser.add_argument_group('Run')
    group.add_argument('--output_dir', default='', help='where to save checkpoints and log.txt')
    group.add_argument('--device', default=DEFAULT_DEVICE, type=device_name, help='cuda or cpu')
    group.add_argument('--seed', default=0, type=bounded(int, 0, MAX_SEED))
    group.add_argument('--resume', default='', help='resume from this checkpoint (file or https URL)')
    group.add_argument('--auto-resume', action=argparse.BooleanOptionalAction, default=True,
                       help='continue from output_dir/checkpoint.pth when there is one')
    group.add_argument('--start_epoch', default=0, type=NON_NEGATIVE_INT, metavar='N')
    group.add_argument('--eval', action='store_true', help='evaluate only')
    group.add_argument('--eval-crop-ratio', default=0.875, type=FRACTION)
    group.add_argument('--eval-precision', default='original', choices=EVAL_PRECISIONS,
                       help="evaluation arithmetic: original (DeiT's: float16 autocast on CUDA, float32 on the CPU, "
                            'whatever trains), training (the training precision) or float32')
    group.add_argument('--dist-eval', action=argparse.BooleanOptionalAction, default=True,
                       help='each process evaluates its share of the images (off: every process all of them)')
    group.add_argument('--amp', action=argparse.BooleanOptionalAction, default=True,
                       help='mixed precision (--no-amp: float32)')
    group.add_argument('--amp-dtype', default='auto', choices=['auto', 'bfloat16', 'float16'],
                       help='autocast dtype (auto: bfloat16 where supported, else float16 on CUDA)')
    group.add_argument('--amp-cpu', action='store_true',
                       help='autocast on a CPU without native bf16 too (with it, the CPU autocasts by default)')
    group.add_argument('--compile', action='store_true',
                       help='torch.compile student, teacher (weights frozen) and loss; the first steps are slow '
                            '(--benchmark shows the gain)')
    group.add_argument('--print-freq', default=10, type=POSITIVE_INT)
    group.add_argument('--log-dir', default='', help='TensorBoard log directory (needs tensorboard)')

    group = parser.add_argument_group('Benchmark')
    group.add_argument('--benchmark', action='store_true',
                       help='time the training step on synthetic batches and print images/s, memory and MFU')
    group.add_argument('--papers', action='store_true',
                       help="with --benchmark: the papers' three configurations, eager and compiled, as one table "
                            '(takes only run flags: device, precision, steps, data)')
    group.add_argument('--benchmark-steps', default=10, type=POSITIVE_INT, help='timed steps')
    group.add_argument('--benchmark-warmup', default=3, type=NON_NEGATIVE_INT, help='untimed steps first')
    group.add_argument('--peak-tflops', default=None, type=POSITIVE,
                       help="the device's dense peak for MFU (default: a GPU's known bf16/fp16 peak; "
                            'on a CPU the measured matmul rate)')

    group = parser.add_argument_group('Distributed (the launcher\'s environment decides; see README)')
    group.add_argument('--distributed', action='store_true',
                       help='expect a launcher (torchrun, torch.distributed.launch, srun); a note when none is found')
    group.add_argument('--world_size', default=None, type=POSITIVE_INT,
                       help="checked against the launcher's number of processes when given")
    group.add_argument('--dist_url', default='env://')
    group.add_argument('--dist-port', default=None, type=bounded(int, 1, MAX_PORT),
                       help='rendezvous port when MASTER_PORT is unset (SLURM; default: derived from SLURM_JOB_ID)')
    group.add_argument('--dist-timeout', default=30, type=POSITIVE, help='process-group timeout in minutes')
    group.add_argument('--local_rank', '--local-rank', default=0, type=NON_NEGATIVE_INT)

    group = parser.add_argument_group('Student variants (one teacher forward, several students)')
    group.add_argument('--variant', action='append', default=None, metavar="'NAME: <flags>'",
                       help='one more student: the base command with <flags> on top (model, drop path, loss terms, '
                            'optimizer and LR, EMA, seed); repeatable. Each student writes a run to '
                            '<output_dir>/<NAME>/ (the base command\'s is "base"), and <output_dir>/variants.md '
                            'compares them')
    return parser


def check_student_args(args: argparse.Namespace) -> None:
    """What a student's own flags must satisfy together (its model, its terms, the teacher they read), checked
    before any data, model or file is touched: for the base command and for every ``--variant``."""
    if args.s_id is not None or args.t_id is not None:
        if not args.s_id or not args.t_id:
            raise UserError('--s-id and --t-id must be given together')
        if len(args.s_id) != len(args.t_id):
            raise UserError(f'--s-id has {len(args.s_id)} blocks but --t-id has {len(args.t_id)}: they are paired')
    check_model_name(args.model, '--model')
    trains_with_teacher = not args.eval and args.distillation_type != 'none'
    if trains_with_teacher:
        check_model_name(args.teacher_model, '--teacher-model')
    if trains_with_teacher and (args.teacher_path or not args.benchmark):
        if not args.teacher_path:
            raise UserError('--teacher-path is required when --distillation-type is not none')
        if timm_weights_overlay(args.teacher_path) is not None:
            check_timm_weights(args.teacher_model, args.teacher_path)
        elif not args.teacher_path.startswith(checkpoints.URL_SCHEMES) and not os.path.isfile(args.teacher_path):
            raise UserError(f'--teacher-path {args.teacher_path}: no such file (timm or hf-hub:<repo> take timm\'s '
                            'pretrained weights)')
    if args.distillation_type != 'none' and args.finetune and not args.eval:
        raise UserError('--finetune with distillation is not supported (as in DeiT): drop one of them')
    if trains_with_teacher and args.dim_t is not None:
        width = token_width(args.teacher_model, 1, args.input_size)
        if width is None or int(args.dim_t) != width:
            raise UserError(f'--dim-t {args.dim_t:g} does not match --teacher-model {args.teacher_model} '
                            f'(token width {width if width is not None else "none: it has no tokens"})')
    if trains_with_teacher and feature_distillation(args):
        # The block ranges, token counts and widths need only the architectures: meta-device models, no weights.
        check_token_shapes(args, num_classes=1)
    num_classes = num_classes_of(args)
    if num_classes is not None:
        check_weight_files(args, num_classes)


def check_args(args: argparse.Namespace) -> None:
    """What no single flag's type can see, checked before any data, model or file is touched (one line, naming the
    flag): the run's and the base student's (``check_student_args``)."""
    launched = launch_environment()
    if args.world_size is not None and args.world_size != launched.world_size:
        raise UserError(f'--world_size {args.world_size}: the launcher started {launched.world_size} processes')
    if args.papers and not args.benchmark:
        raise UserError('--papers is a mode of --benchmark: add --benchmark')
    if args.benchmark and launched.distributed:
        raise UserError(f'--benchmark times the step of one process, on one device: run it without {launched.launcher} '
                        '(a GPU of your choice with --device cuda:N)')
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        raise UserError(f'--device {args.device}: CUDA is not available on this machine (use --device cpu)')
    for flag, path in (('--resume', args.resume), ('--finetune', args.finetune)):
        if path and not path.startswith(checkpoints.URL_SCHEMES) and not os.path.isfile(path):
            raise UserError(f'{flag} {path}: no such file')
    check_student_args(args)
    if args.data_backend == 'dali':
        check_dali_flags(args)


def prepare_output_dir(args: argparse.Namespace) -> None:
    """Create ``--output_dir`` (training and evaluation; the benchmark writes nothing), once every check has passed,
    and make sure it can be written."""
    if args.output_dir and not args.benchmark:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(args.output_dir) / f'.write-test-{os.getpid()}'
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise UserError(f'--output_dir {args.output_dir} is not writable: {err.strerror}') from None


# ---------------------------------------------------------------------------------------------
# Builders: each returns what it makes, from the flags and the values it is given
# ---------------------------------------------------------------------------------------------

def join_launch(args) -> tuple[LaunchEnvironment, torch.device]:
    """This process's place in the job and its device; joins the process group when launched as several."""
    launch = launch_environment(local_rank_flag=args.local_rank)
    if args.distributed and not launch.distributed:
        print('Note: --distributed, but no launcher environment (torchrun\'s RANK/WORLD_SIZE, or a task of an srun '
              'step of several tasks): one process')
    if launch.launcher == 'slurm':
        os.environ['MASTER_ADDR'], os.environ['MASTER_PORT'] = slurm_rendezvous(os.environ, args.dist_port)
    device = process_device(args.device, launch)
    utils.init_distributed_mode(launch, device, args.dist_url, args.dist_timeout)
    return launch, device


def process_device(name: str, launch: LaunchEnvironment) -> torch.device:
    """This process's device, made the current one on CUDA (so that memory statistics, the pinning thread and
    NCCL use it): ``--device`` for one process, the ``cuda:<local rank>`` GPU for each process of a launch, or the
    one GPU a process sees where the cluster binds a GPU to each task. Fewer visible GPUs than processes on the
    node, but more than one, would put two processes on one GPU (NCCL: "Duplicate GPU detected"): refused. A task
    bound to several GPUs of its own (SLURM's ``--gpus-per-task=2``) is refused too: it would use one of them."""
    device = torch.device(name)
    if device.type != 'cuda':
        return device
    if launch.distributed:
        visible = torch.cuda.device_count()
        # Without the launcher's count of processes on the node, this process's local rank is a lower bound.
        local_processes = launch.local_world_size or launch.local_rank + 1
        if 1 < visible < local_processes:
            counted = local_processes if launch.local_world_size else f'at least {local_processes}'
            raise UserError(f'--device {name}: {launch.launcher} started {counted} processes on this node, but '
                            f'each sees {visible} GPUs (CUDA_VISIBLE_DEVICES='
                            f'{os.environ.get("CUDA_VISIBLE_DEVICES", "unset")}): a GPU for each process needs at '
                            f'most {visible} per node ({ONE_PROCESS_PER_GPU[launch.launcher]})')
        device = torch.device('cuda', launch.local_rank % visible)
    elif device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    torch.cuda.set_device(device)
    return device


class PreemptionFlag(StopSignal):
    """Set by SIGTERM / SIGUSR1 (cluster preemption; torchrun and Slurm stopping a job): every process finishes the
    same step (they agree in the step's all-reduce), rank 0 saves (where the run ``saves``: it has an
    ``--output_dir``) and all exit to be requeued.

    A process blocked in a collective of the step cannot run a Python signal handler: a peer has died or hangs, and
    torchrun (or ``srun --kill-on-bad-exit``) is now stopping the survivors with SIGTERM, followed by SIGKILL 30 s
    later. Launched as several processes, a watcher thread learns of the signal through the interpreter's wakeup fd;
    if this process is still waiting on its peers ``PEER_WAIT_AFTER_SIGNAL_S`` after both the signal and the start
    of that wait, and longer than any step it finished before, it writes one line and exits with
    ``EXIT_PEER_FAILURE`` instead of waiting to be killed. A step is only a dead peer's sign once one has finished:
    the first step (with ``--compile`` a minute or two of compilation) and a step that recompiles take as long as
    they take, and a signal during them is a preemption like any other (the step ends, rank 0 saves, exit 75).
    """

    def __init__(self, distributed: bool, saves: bool):
        self.saves = saves
        self.signal: Optional[int] = None
        self.signal_time = 0.0
        self.waiting_since: Optional[float] = None
        self.longest_step: Optional[float] = None  # seconds; None until a step has finished
        # Reentrant: a second signal can interrupt the first one's handler on the main thread, inside the lock.
        self._lock = threading.RLock()
        for sig in PREEMPTION_SIGNALS:
            signal.signal(sig, self._handle)
        if distributed:
            reader, writer = socket.socketpair()
            writer.setblocking(False)
            signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
            self._wakeup = (reader, writer)  # kept open for the life of the process
            threading.Thread(target=self._watch, args=(reader,), name='preemption-watch', daemon=True).start()

    def _handle(self, signum, frame) -> None:
        self._record(signum)

    def _record(self, signum: int) -> None:
        with self._lock:
            if self.signal is None:
                self.signal, self.signal_time = signum, time.monotonic()
                name = signal.Signals(signum).name
                if self.saves:
                    sys.stderr.write(f'Received {name}: saving a checkpoint after this step\n')
                else:
                    sys.stderr.write(f'Received {name}: stopping after this step; nothing is saved (no --output_dir)\n')

    def _watch(self, reader: socket.socket) -> None:
        while self.signal is None:
            # The wakeup fd carries the number of every signal with a Python handler (SIGINT too).
            signum = reader.recv(1)[0]
            if signum in PREEMPTION_SIGNALS:
                self._record(signum)
        while True:
            time.sleep(PEER_WAIT_POLL_S)
            since, longest, now = self.waiting_since, self.longest_step, time.monotonic()
            if (since is not None and longest is not None and now - since > longest
                    and now - max(since, self.signal_time) > PEER_WAIT_AFTER_SIGNAL_S):
                sys.stderr.write(f'error: rank {utils.get_rank()}: received {signal.Signals(self.signal).name} while '
                                 f'waiting on the other processes for {PEER_WAIT_AFTER_SIGNAL_S} s: one of them died '
                                 'or hangs; exiting without a checkpoint (the last saved one is kept)\n')
                sys.stderr.flush()
                os._exit(EXIT_PEER_FAILURE)

    def requested(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def waiting_on_peers(self) -> Iterator[None]:
        self.waiting_since = started = time.monotonic()
        try:
            yield
            self.longest_step = max(self.longest_step or 0.0, time.monotonic() - started)
        finally:
            self.waiting_since = None


def make_tensorboard_writer(args):
    """A TensorBoard writer under ``--log-dir/--exp-name`` on the main process, when asked for (a student of a run
    with variants: ``--exp-name/<NAME>``)."""
    if not args.log_dir or not utils.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--log-dir needs the tensorboard package: pip install tensorboard') from None
    return SummaryWriter(log_dir=os.path.join(args.log_dir, args.exp_name))


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def main(args: argparse.Namespace, variants: list[Variant], launch: LaunchEnvironment, device: torch.device) -> int:
    """Train (or with ``--eval`` evaluate) the students of ``variants``: the base command's, and with ``--variant``
    more, on one data stream and one teacher forward per batch."""
    if device.type == 'cpu':
        utils.retain_freed_memory()
    if args.benchmark:
        if args.papers:
            return benchmark.run_papers(args, command_line_parser(), check_args, device)
        if len(variants) > 1:
            benchmark.run_variants(args, variants, device)
        else:
            benchmark.run(args, device)
        return 0
    # Made first so that a missing optional dependency stops the run before data and models are built.
    writers = [None if args.eval else make_tensorboard_writer(variant.args) for variant in variants]
    random_seed(args.seed, launch.rank)  # Python's, numpy's and torch's RNGs: the data's stream
    torch.backends.cudnn.benchmark = True

    try:
        dataset_train, num_classes = build_dataset(is_train=True, args=args)
        dataset_val, _ = build_dataset(is_train=False, args=args)
    except ValueError as err:
        raise UserError(f'--data-path {args.data_path}: {err}') from None
    if not args.eval:
        utils.on_main_process(lambda: prepare_run_dirs(args.output_dir, variants, num_classes))
    loader_train, loader_val = build_data_loaders(args, dataset_train, dataset_val, launch, device)
    mixup_fn = build_mixup(args, num_classes)

    precision = Precision.for_training(args, device)
    eval_precision = Precision.for_evaluation(args, device, precision)
    if not args.eval:
        print(f'Training precision: {precision.describe()}')
    print(f'Evaluation precision: {eval_precision.describe()}')
    # The teacher's (discarded) random initialisation draws nothing from the data's stream: with a teacher or
    # without, for any variants, the data are those of the base command run alone.
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        teacher = None if args.eval else load_teacher(args, num_classes, device, precision.dtype,
                                                      [variant.args for variant in variants])
    if args.compile:
        teacher = compile_teacher(teacher)
    runs = [build_student(variant, teacher, num_classes, launch, device, writer)
            for variant, writer in zip(variants, writers)]
    resumed_epoch = resume_students(runs, args.resume, args.auto_resume, not args.eval)
    start_epoch = resumed_epoch or args.start_epoch

    def run_evaluation() -> list[dict[str, float]]:
        with no_token_capture(*(run.model_without_ddp for run in runs)):
            stats = evaluate_students(loader_val, [run.student.model for run in runs], device, eval_precision,
                                      args.print_freq, [run.variant.name for run in runs] if len(runs) > 1 else ())
        for run, student_stats in zip(runs, stats):
            print(f'Accuracy of the network{run.variant.label} on the {len(dataset_val)} test images: '
                  f'{student_stats["acc1"]:.1f}%')
        return stats

    if args.eval:
        run_evaluation()
        return 0

    preempted = PreemptionFlag(launch.distributed, saves=bool(args.output_dir))
    # Everything built so far (torch's, timm's and dynamo's modules, the models) lives as long as the process: frozen
    # out of the garbage collector's way, a full collection no longer walks it, nor does the interpreter's last one
    # at exit (1.1 of the 1.3 s a finished run took to exit).
    gc.freeze()
    for run in runs:
        run.repair_log(resumed_epoch)
    step_seconds: dict[str, float] = defaultdict(float)
    print(f'Start training for {args.epochs} epochs' + (f' of {len(runs)} students' if len(runs) > 1 else ''))
    start_time = time.time()
    for epoch in range(start_epoch, args.epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        result = train_one_epoch(
            [run.student for run in runs], teacher, loader_train, device, epoch, mixup_fn=mixup_fn,
            set_training_mode=args.train_mode and not args.finetune, print_freq=args.print_freq, stop=preempted)
        if result.stopped:
            # The interrupted epoch is repeated on restart; its partial progress is kept in the weights.
            if args.output_dir:
                for run in runs:
                    run.save(epoch - 1)
                saved = runs[0].checkpoint_path if len(runs) == 1 else f'{args.output_dir}/<NAME>/{CHECKPOINT_NAME}'
                sys.stderr.write(f'Preempted: saved {saved}; exiting with code {EXIT_REQUEUE} to be requeued\n')
            else:
                sys.stderr.write(f'Preempted: nothing saved (no --output_dir); exiting with code {EXIT_REQUEUE}\n')
            return EXIT_REQUEUE
        for phase, seconds in result.seconds.items():
            step_seconds[phase] += seconds
        for run in runs:
            # As DeiT (and so the papers' runs): the schedule is stepped with the finished epoch's index.
            run.lr_scheduler.step(epoch)
        for run, train_stats, test_stats in zip(runs, result.stats, run_evaluation()):
            run.finish_epoch(epoch, train_stats, test_stats)
        write_variants_table(args.output_dir, runs, epoch + 1, step_seconds)
    for run in runs:
        if run.writer is not None:
            run.writer.close()
    print(f'Training time {utils.format_seconds(time.time() - start_time)}')
    return 0


def is_peer_failure(err: RuntimeError) -> bool:
    if not utils.is_dist_avail_and_initialized():
        return False
    return isinstance(err, torch.distributed.DistError) or any(words in str(err) for words in GLOO_PEER_FAILURES)


def command_line_parser() -> OneLineArgumentParser:
    return OneLineArgumentParser('[CLS]-KD / Manifold Distillation', parents=[get_args_parser()])


def run(argv=None) -> int:
    """Command-line entry: user errors end with one line and exit code 2, no traceback; the process group is left
    on every exit."""
    parser = command_line_parser()
    timeout = None
    try:
        args = parser.parse_args(argv)
        timeout = args.dist_timeout
        check_args(args)
        variants = parse_variants(parser, args, check_student_args)
        for flags in [args, *(variant.args for variant in variants if variant.among_variants)]:
            prepare_output_dir(flags)
        launch, device = join_launch(args)
        print(args)
        return main(args, variants, launch, device)
    except (UserError, FileNotFoundError, NotADirectoryError) as err:
        sys.stderr.write(f'error: {err}\n')
        return EXIT_USER_ERROR
    except UnreadableImageError as err:
        # From a DataLoader worker the message holds the worker's traceback; its last line names the file.
        last = str(err).strip().splitlines()[-1].split(f'{UnreadableImageError.__name__}: ', 1)[-1]
        sys.stderr.write(f'error: {last} (--skip-bad-images skips such files with a warning)\n')
        return EXIT_USER_ERROR
    except OutputWriteError as err:
        # Only the main process writes; the others stop with its error (utils.on_main_process) and add nothing.
        if utils.is_main_process():
            sys.stderr.write(f'error: {err}\n')
        return EXIT_WRITE_FAILED
    except NonFiniteLossError as err:
        sys.stderr.write(f'error: {err}. The last good checkpoint is kept.\n')
        return EXIT_NON_FINITE
    except RuntimeError as err:
        if not is_peer_failure(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f'error: rank {utils.get_rank()}: another process died or did not answer within '
                         f'--dist-timeout {timeout:g} min ({reason}); exiting\n')
        return EXIT_PEER_FAILURE
    finally:
        # On every exit, so that NCCL does not warn of a process group left behind (and gloo's threads do not
        # abort a finished process).
        utils.leave_distributed()


if __name__ == '__main__':
    sys.exit(run())
