"""Training and evaluation of vision transformers with [CLS]-KD, Manifold Distillation and DeiT logit KD.

Parses the command line (every flag of DeiT's main.py and of both papers' parsers) and wires the data,
models, criterion and loops together; the loops live in engine.py.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from timm.data import Mixup
from timm.layers import resample_abs_pos_embed
from timm.optim import create_optimizer
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV2
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler

import utils
from datasets import build_dataset
from engine import NonFiniteLossError, Precision, benchmark, evaluate, train_one_epoch
from losses import build_criterion
from models import (FrozenCompiledTeacher, build_teacher, check_token_shapes, checkpoint_weights, create_student,
                    create_teacher, load_weights)
from samplers import RASampler, ShardedEvalSampler
from utils import UserError

DEFAULT_DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'
LR_REFERENCE_BATCH = 512.0  # DeiT's linear LR scaling: lr * batch * world / 512
EVAL_BATCH_FACTOR = 1.5  # DeiT evaluates with 1.5x the training batch
CHECKPOINT_NAME = 'checkpoint.pth'
BEST_CHECKPOINT_NAME = 'checkpoint_best.pth'
PROJECTOR_PREFIX = 'projector.'
EXIT_USER_ERROR = 2
EXIT_NON_FINITE = 3
EXIT_PEER_FAILURE = 4
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a temporary failure, the job should be run again


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser('[CLS]-KD / Manifold Distillation training and evaluation', add_help=False)
    parser.add_argument('--batch-size', default=64, type=int, help='batch size per process')
    parser.add_argument('--epochs', default=300, type=int)
    parser.add_argument('--bce-loss', action='store_true', help='binary cross-entropy base loss (DeiT III)')
    parser.add_argument('--unscale-lr', action='store_true', help='do not scale --lr by batch * world / 512')

    group = parser.add_argument_group('Manifold distillation')
    group.add_argument('--distillation-beta', default=1.0, type=float, help='weight of all manifold terms')
    group.add_argument('--w-sample', default=0.1, type=float, help='inter-image (sample) relation weight')
    group.add_argument('--w-patch', default=4.0, type=float, help='intra-image (patch) relation weight')
    group.add_argument('--w-rand', default=0.2, type=float, help='random-token relation weight')
    group.add_argument('--K', default=192, type=int, help='tokens drawn for the random relation term')
    group.add_argument('--s-id', nargs='+', type=int, help='student blocks whose tokens are distilled')
    group.add_argument('--t-id', nargs='+', type=int, help='teacher blocks matched with --s-id, pairwise')
    group.add_argument('--manifold', action='store_true', help='Manifold terms on (default)')
    group.add_argument('--no-manifold', dest='manifold', action='store_false')
    parser.set_defaults(manifold=True)

    group = parser.add_argument_group('[CLS]-KD')
    group.add_argument('--w-cls', default=0.0, type=float, help='[CLS] token distillation weight (0: off)')
    group.add_argument('--w-atn', default=0.0, type=float, help='CLS-patch attention weight (0: off)')
    group.add_argument('--w-norm', default=1.0, type=float, help='token-norm term weight (--norm-distill)')
    group.add_argument('--last-w', default=4.0, type=float, help="extra weight of the last layer pair")
    group.add_argument('--w-proj', default=1.0, type=float, help='projection term weight (--dim-match both)')
    group.add_argument('--w-relation', default=1.0, type=float, help='relation term weight (--dim-match both)')
    group.add_argument('--dim-match', default='projector', choices=['projector', 'relation', 'both'],
                       help='how student [CLS] tokens meet the teacher width')
    group.add_argument('--dim-t', default=None, type=float,
                       help='teacher token width; read from --teacher-model, checked when given')
    group.add_argument('--norm-distill', action='store_true', help='token-norm distillation term')
    group.add_argument('--no-norm-distill', dest='norm_distill', action='store_false')
    group.add_argument('--exp-name', default='Exp_test', type=str, help='run name (TensorBoard subfolder)')
    parser.set_defaults(norm_distill=False)

    group = parser.add_argument_group('Model')
    group.add_argument('--model', default='deit_base_patch16_224', type=str, metavar='MODEL')
    group.add_argument('--input-size', default=224, type=int, help='image size')
    group.add_argument('--drop', type=float, default=0.0, metavar='PCT', help='dropout rate')
    group.add_argument('--drop-path', type=float, default=0.1, metavar='PCT', help='drop path rate')
    group.add_argument('--model-ema', action='store_true')
    group.add_argument('--no-model-ema', action='store_false', dest='model_ema')
    parser.set_defaults(model_ema=True)
    group.add_argument('--model-ema-decay', type=float, default=0.99996)
    group.add_argument('--model-ema-force-cpu', action='store_true', default=False)

    group = parser.add_argument_group('Optimizer and schedule')
    group.add_argument('--opt', default='adamw', type=str, metavar='OPTIMIZER')
    group.add_argument('--opt-eps', default=1e-8, type=float, metavar='EPSILON')
    group.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA')
    group.add_argument('--clip-grad', type=float, default=None, metavar='NORM', help='clip gradient norm')
    group.add_argument('--momentum', type=float, default=0.9, metavar='M')
    group.add_argument('--weight-decay', type=float, default=0.05)
    group.add_argument('--sched', default='cosine', type=str, metavar='SCHEDULER')
    group.add_argument('--lr', type=float, default=5e-4, metavar='LR', help='base LR for a batch of 512')
    group.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct')
    group.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT')
    group.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV')
    group.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR')
    group.add_argument('--min-lr', type=float, default=1e-5, metavar='LR')
    group.add_argument('--decay-epochs', type=float, default=30, metavar='N')
    group.add_argument('--warmup-epochs', type=int, default=5, metavar='N')
    group.add_argument('--cooldown-epochs', type=int, default=10, metavar='N')
    group.add_argument('--patience-epochs', type=int, default=10, metavar='N')
    group.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE')

    group = parser.add_argument_group('Augmentation')
    group.add_argument('--color-jitter', type=float, default=0.4, metavar='PCT')
    group.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME', help='RandAugment policy')
    group.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    group.add_argument('--train-interpolation', type=str, default='bicubic')
    group.add_argument('--repeated-aug', action='store_true')
    group.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug')
    parser.set_defaults(repeated_aug=True)
    group.add_argument('--train-mode', action='store_true')
    group.add_argument('--no-train-mode', action='store_false', dest='train_mode')
    parser.set_defaults(train_mode=True)
    group.add_argument('--ThreeAugment', action='store_true', help='DeiT III 3-augment')
    group.add_argument('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    group.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase probability')
    group.add_argument('--remode', type=str, default='pixel')
    group.add_argument('--recount', type=int, default=1)
    group.add_argument('--resplit', action='store_true', default=False)
    group.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, on if > 0')
    group.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, on if > 0')
    group.add_argument('--cutmix-minmax', type=float, nargs='+', default=None)
    group.add_argument('--mixup-prob', type=float, default=1.0)
    group.add_argument('--mixup-switch-prob', type=float, default=0.5)
    group.add_argument('--mixup-mode', type=str, default='batch')

    group = parser.add_argument_group('Distillation')
    group.add_argument('--teacher-model', default='cait_s24_224', type=str, metavar='MODEL')
    group.add_argument('--teacher-path', type=str, default='', help='teacher weights: a file or an https URL')
    group.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'], type=str)
    group.add_argument('--distillation-alpha', default=0.5, type=float, help='KD weight; base gets 1 - alpha')
    group.add_argument('--distillation-tau', default=1.0, type=float)

    group = parser.add_argument_group('Fine-tuning')
    group.add_argument('--finetune', default='', help='initialise the student from this checkpoint')
    group.add_argument('--attn-only', action='store_true', help='fine-tune attention weights only')

    group = parser.add_argument_group('Data')
    group.add_argument('--data-path', default='', type=str, help='dataset root')
    group.add_argument('--data-set', default='IMNET', type=str,
                       choices=['CIFAR', 'CIFAR10', 'CIFAR100', 'IMNET', 'INAT', 'INAT19', 'SHAPES'])
    group.add_argument('--inat-category', default='name', type=str,
                       choices=['kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name'])
    group.add_argument('--download', action='store_true', help='download CIFAR if missing')
    group.add_argument('--skip-bad-images', action='store_true', help='warn about and skip unreadable images')
    group.add_argument('--num_workers', default=10, type=int)
    group.add_argument('--pin-mem', action='store_true')
    group.add_argument('--no-pin-mem', action='store_false', dest='pin_mem')
    parser.set_defaults(pin_mem=True)

    group = parser.add_argument_group('Run')
    group.add_argument('--output_dir', default='', help='where to save checkpoints and log.txt')
    group.add_argument('--device', default=DEFAULT_DEVICE, help='cuda or cpu')
    group.add_argument('--seed', default=0, type=int)
    group.add_argument('--resume', default='', help='resume from this checkpoint (file or https URL)')
    group.add_argument('--no-auto-resume', action='store_false', dest='auto_resume',
                       help='do not continue from output_dir/checkpoint.pth')
    group.add_argument('--start_epoch', default=0, type=int, metavar='N')
    group.add_argument('--eval', action='store_true', help='evaluate only')
    group.add_argument('--eval-crop-ratio', default=0.875, type=float)
    group.add_argument('--dist-eval', action='store_true', default=True, help='distributed evaluation')
    group.add_argument('--no-amp', action='store_false', dest='amp', help='train in float32')
    group.add_argument('--amp-dtype', default='auto', choices=['auto', 'bfloat16', 'float16'],
                       help='autocast dtype (auto: bfloat16 where supported, else float16)')
    group.add_argument('--amp-cpu', action='store_true', help='autocast on the CPU too')
    group.add_argument('--compile', action='store_true',
                       help='torch.compile student, teacher (weights frozen) and loss; the first steps are slow '
                            '(--benchmark shows the gain)')
    group.add_argument('--print-freq', default=10, type=int)
    group.add_argument('--log-dir', default='', help='TensorBoard log directory (needs tensorboard)')

    group = parser.add_argument_group('Benchmark')
    group.add_argument('--benchmark', action='store_true',
                       help='time the training step on synthetic batches and print images/s, memory and MFU')
    group.add_argument('--benchmark-steps', default=10, type=int, help='timed steps')
    group.add_argument('--benchmark-warmup', default=3, type=int, help='untimed steps first')
    group.add_argument('--peak-tflops', default=None, type=float,
                       help="the device's dense peak for MFU (default: a GPU's known bf16/fp16 peak; "
                            "on a CPU the measured fp32 matmul rate)")

    group = parser.add_argument_group('Distributed')
    group.add_argument('--distributed', action='store_true')
    group.add_argument('--world_size', default=1, type=int)
    group.add_argument('--dist_url', default='env://')
    group.add_argument('--dist-port', default=None, type=int,
                       help='rendezvous port when MASTER_PORT is unset (SLURM; default: derived from SLURM_JOB_ID)')
    group.add_argument('--dist-timeout', default=30, type=float, help='process-group timeout in minutes')
    group.add_argument('--local_rank', '--local-rank', default=0, type=int)
    return parser


def validate_args(args) -> None:
    """Fail fast, before any data or model is built, on flags that cannot work (one line, naming the flag)."""
    if args.s_id is not None or args.t_id is not None:
        if not args.s_id or not args.t_id:
            raise UserError('--s-id and --t-id must be given together')
        if len(args.s_id) != len(args.t_id):
            raise UserError(f'--s-id has {len(args.s_id)} blocks but --t-id has {len(args.t_id)}: they are paired')
    if args.K < 1:
        raise UserError(f'--K {args.K}: the random relation term needs at least 1 token')
    if not args.eval and args.distillation_type != 'none' and (args.teacher_path or not args.benchmark):
        if not args.teacher_path:
            raise UserError('--teacher-path is required when --distillation-type is not none')
        if not args.teacher_path.startswith('https://') and not os.path.isfile(args.teacher_path):
            raise UserError(f'--teacher-path {args.teacher_path}: no such file')
    if args.resume and not args.resume.startswith('https://') and not os.path.isfile(args.resume):
        raise UserError(f'--resume {args.resume}: no such file')
    if args.distillation_type != 'none' and args.finetune and not args.eval:
        raise UserError('--finetune with distillation is not supported (as in DeiT): drop one of them')
    if args.output_dir:
        try:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            probe = Path(args.output_dir) / f'.write-test-{os.getpid()}'
            probe.touch()
            probe.unlink()
        except OSError as err:
            raise UserError(f'--output_dir {args.output_dir} is not writable: {err.strerror}') from None


def amp_dtype(args, device: torch.device) -> torch.dtype:
    """bfloat16 where supported, else float16 (with a grad scaler); float32 when AMP is off."""
    if not args.amp or (device.type == 'cpu' and not args.amp_cpu):
        return torch.float32
    if args.amp_dtype != 'auto':
        return getattr(torch, args.amp_dtype)
    if device.type == 'cuda' and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def build_loaders(args, dataset_train, dataset_val) -> tuple:
    world, rank = utils.get_world_size(), utils.get_rank()
    if args.distributed:
        if args.repeated_aug:
            sampler_train = RASampler(dataset_train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
        else:
            sampler_train = DistributedSampler(dataset_train, num_replicas=world, rank=rank, shuffle=True,
                                               seed=args.seed)
        sampler_val = (ShardedEvalSampler(dataset_val, num_replicas=world, rank=rank) if args.dist_eval
                       else SequentialSampler(dataset_val))
    else:
        sampler_train = RandomSampler(dataset_train)
        sampler_val = SequentialSampler(dataset_val)
    workers = dict(num_workers=args.num_workers, pin_memory=args.pin_mem and args.device.startswith('cuda'),
                   persistent_workers=args.num_workers > 0)
    # DeiT drops the last partial batch; a dataset smaller than one batch still trains on what it has.
    drop_last = len(sampler_train) >= args.batch_size
    loader_train = DataLoader(dataset_train, sampler=sampler_train, batch_size=args.batch_size,
                              drop_last=drop_last, **workers)
    loader_val = DataLoader(dataset_val, sampler=sampler_val, batch_size=int(EVAL_BATCH_FACTOR * args.batch_size),
                            drop_last=False, **workers)
    return loader_train, loader_val


def interpolate_pos_embed(model: torch.nn.Module, state_dict: dict) -> None:
    """Resize a checkpoint's position embedding to the model's patch grid (DeiT fine-tuning)."""
    if 'pos_embed' not in state_dict or state_dict['pos_embed'].shape == model.pos_embed.shape:
        return
    num_prefix = 0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens
    state_dict['pos_embed'] = resample_abs_pos_embed(
        state_dict['pos_embed'], new_size=model.patch_embed.grid_size, num_prefix_tokens=num_prefix)


def load_finetune(args, model: torch.nn.Module) -> None:
    state_dict = checkpoint_weights(utils.load_checkpoint(args.finetune))
    own = model.state_dict()
    for key in ('head.weight', 'head.bias', 'head_dist.weight', 'head_dist.bias'):
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            print(f'Removing key {key} from the pretrained checkpoint')
            del state_dict[key]
    interpolate_pos_embed(model, state_dict)
    print(model.load_state_dict(state_dict, strict=False))
    if args.attn_only:
        for name, param in model.named_parameters():
            param.requires_grad = '.attn.' in name or name.startswith(('head', 'pos_embed', 'cls_token',
                                                                        'dist_token'))


def load_model_weights(model: torch.nn.Module, state_dict: dict, path: str, training: bool) -> None:
    """Load ``X['model']``; ``projector.*`` (a training-only module) is skipped with a note for evaluation."""
    state_dict = utils.strip_prefix(state_dict)
    if not training:
        own = model.state_dict()
        skipped = sorted(k for k in state_dict if k.startswith(PROJECTOR_PREFIX) and k not in own)
        absent = sorted(k for k in own if k.startswith(PROJECTOR_PREFIX) and k not in state_dict)
        if skipped or absent:
            print(f'Note: {path}: the projector is only used in training; its weights are not loaded for evaluation')
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith(PROJECTOR_PREFIX)}
            state_dict.update({k: own[k] for k in own if k.startswith(PROJECTOR_PREFIX)})
    load_weights(model, state_dict, path, '--resume', f'--model {model.default_cfg.get("architecture", "")}')


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1 (cluster preemption): the loop finishes its step, saves and exits to be requeued."""

    def __init__(self):
        self.signal = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        sys.stderr.write(f'Received {signal.Signals(signum).name}: saving a checkpoint after this step\n')

    def __call__(self) -> bool:
        # Every rank must stop at the same step, or the others would wait in the next all-reduce.
        return utils.any_rank(self.signal is not None)


def checkpoint_state(model_without_ddp, optimizer, lr_scheduler, epoch, model_ema, precision, args,
                     max_accuracy) -> dict:
    return {
        'model': model_without_ddp.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': lr_scheduler.state_dict(),
        'epoch': epoch,
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'scaler': precision.scaler.state_dict(),
        'args': args,
        'max_accuracy': max_accuracy,
        # Every rank's RNGs, so that a resumed run draws the same data order, augmentations and drop paths.
        'rng_states': utils.gather_rng_states(),
    }


# Dense tensor-core peaks (TFLOP/s, bf16 = fp16) by device name; MFU is measured against these.
GPU_DENSE_PEAK_TFLOPS = {'H100': 989.0, 'H200': 989.0, 'A100': 312.0, 'L40S': 362.0, 'A10G': 125.0}
BENCHMARK_NUM_CLASSES = 1000
FUSED_OPTIMIZER_DEVICES = ('cuda', 'cpu')
FUSED_OPTIMIZERS = ('adamw', 'adam')


def build_mixup(args) -> Optional[Mixup]:
    """DeiT's mixup/cutmix (with label smoothing folded into the soft targets), when either is on."""
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                     prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                     label_smoothing=args.smoothing, num_classes=args.nb_classes)
    return None


def gpu_peak_flops(device: torch.device) -> Optional[float]:
    if device.type != 'cuda':
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in GPU_DENSE_PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def run_benchmark(args) -> int:
    """``--benchmark``: the real training step (losses, backward, optimizer) on synthetic batches."""
    device = torch.device(args.device)
    utils.seed_everything(args.seed)
    args.nb_classes = BENCHMARK_NUM_CLASSES
    teacher = None
    if args.distillation_type != 'none':
        if args.teacher_path:
            teacher = create_teacher(args)
        else:
            print('Benchmark: no --teacher-path, the teacher keeps random weights (speed does not depend on them)')
            teacher = build_teacher(args)
        teacher.to(device)
    model = create_student(args, teacher).to(device)
    optimizer = build_optimizer(args, model, device)
    criterion = build_criterion(args)
    if args.compile:
        model, teacher, criterion = compile_models(model, teacher, criterion)
    precision = Precision(device, args.amp, amp_dtype(args, device))
    peak = args.peak_tflops * 1e12 if args.peak_tflops else gpu_peak_flops(device)
    stats = benchmark(model, teacher, criterion, optimizer, precision, device, args.batch_size,
                      args.input_size, args.nb_classes, args.benchmark_steps, args.benchmark_warmup, peak,
                      mixup_fn=build_mixup(args))
    peak_source = 'given peak' if args.peak_tflops else ('dense peak' if peak else 'measured matmul rate')
    print(f'Benchmark {args.model} <- {args.teacher_model if teacher is not None else "no teacher"} '
          f'| device {device.type} | {str(precision.dtype).replace("torch.", "")} | batch {args.batch_size} '
          f'| {args.input_size} px')
    memory = 'n/a' if math.isnan(stats['peak_memory_gib']) else f'{stats["peak_memory_gib"]:.2f} GiB'
    print(f'  {stats["images_per_s"]:.1f} images/s, {stats["ms_per_step"]:.1f} ms/step, '
          f'peak memory {memory}, {stats["gflops_per_image"]:.2f} GFLOPs/image, '
          f'{stats["achieved_tflops"]:.3f} TFLOP/s, MFU {100 * stats["mfu"]:.1f}% '
          f'of {stats["peak_tflops"]:.3f} TFLOP/s ({peak_source})')
    if args.data_path:
        dataset, _ = build_dataset(is_train=True, args=args)
        loader, _ = build_loaders(args, dataset, dataset)
        rate = data_images_per_second(loader, args.benchmark_steps + args.benchmark_warmup, args.benchmark_warmup,
                                      args.data_path)
        workers = max(args.num_workers, 1)
        print(f'  data pipeline: {rate:.1f} images/s with {args.num_workers} workers '
              f'({rate / workers:.1f} per worker): about {math.ceil(stats["images_per_s"] / (rate / workers))} '
              f'workers keep this device fed')
    return 0


def data_images_per_second(loader, batches: int, warmup: int, data_path: str) -> float:
    """Images/s of the training DataLoader alone (decoding and augmentation), after ``warmup`` batches."""
    images, start = 0, None
    for i, (samples, _) in enumerate(loader):
        if i == warmup:
            start = time.perf_counter()
        elif i > warmup:
            images += len(samples)
        if i >= batches:
            break
    if start is None or images == 0:
        raise UserError(f'--data-path {data_path}: too few images to time {batches} batches of the data pipeline')
    return images / (time.perf_counter() - start)


def compile_models(model: torch.nn.Module, teacher: Optional[torch.nn.Module], criterion: torch.nn.Module) -> tuple:
    """``torch.compile`` the student (token hooks traced with it), the teacher with its weights frozen, and the
    criterion (the loss terms' normalisations and copies fused)."""
    return (torch.compile(model), FrozenCompiledTeacher(teacher) if teacher is not None else None,
            torch.compile(criterion))


def build_optimizer(args, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer factory (DeiT); Adam(W) on CUDA and CPU uses the fused single-kernel implementation."""
    if device.type in FUSED_OPTIMIZER_DEVICES and args.opt.lower() in FUSED_OPTIMIZERS:
        args.opt_args = {'fused': True}
    return create_optimizer(args, model)


def main(args) -> int:
    validate_args(args)
    if torch.device(args.device).type == 'cpu':
        utils.retain_freed_memory()
    if args.benchmark:
        return run_benchmark(args)
    # Made first so that a missing optional dependency stops the run before data and models are built.
    writer = None if args.eval else make_tensorboard_writer(args)
    device = torch.device(args.device)
    utils.seed_everything(args.seed + utils.get_rank())
    torch.backends.cudnn.benchmark = True

    try:
        dataset_train, args.nb_classes = build_dataset(is_train=True, args=args)
        dataset_val, _ = build_dataset(is_train=False, args=args)
    except ValueError as err:
        raise UserError(f'--data-path {args.data_path}: {err}') from None
    loader_train, loader_val = build_loaders(args, dataset_train, dataset_val)

    mixup_fn = build_mixup(args)

    teacher = None
    if args.distillation_type != 'none' and not args.eval:
        print(f'Creating teacher model: {args.teacher_model}')
        teacher = create_teacher(args).to(device)
        if args.dim_t is not None and int(args.dim_t) != teacher.embed_dim:
            raise UserError(f'--dim-t {args.dim_t:g} does not match --teacher-model {args.teacher_model} '
                            f'(token width {teacher.embed_dim})')
    print(f'Creating model: {args.model}')
    model = create_student(args, teacher)
    if args.finetune:
        load_finetune(args, model)
    model.to(device)
    if teacher is not None:
        check_token_shapes(args, model, teacher, device)

    model_without_ddp = model
    if args.distributed:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[args.gpu] if device.type == 'cuda' else None)
        model_without_ddp = model.module

    # After DDP has broadcast rank 0's weights, so that every rank's EMA starts from the same model.
    model_ema = None
    if args.model_ema:
        model_ema = ModelEmaV2(model_without_ddp, decay=args.model_ema_decay,
                               device='cpu' if args.model_ema_force_cpu else None)
    criterion = build_criterion(args)
    if args.compile:
        model, teacher, criterion = compile_models(model, teacher, criterion)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print('number of params:', n_parameters)

    if not args.unscale_lr:
        args.lr = args.lr * args.batch_size * utils.get_world_size() / LR_REFERENCE_BATCH
    optimizer = build_optimizer(args, model_without_ddp, device)
    lr_scheduler, _ = create_scheduler(args, optimizer)
    precision = Precision(device, args.amp, amp_dtype(args, device))

    output_dir = Path(args.output_dir) if args.output_dir else None
    last_checkpoint = output_dir / CHECKPOINT_NAME if output_dir else None
    if not args.resume and args.auto_resume and not args.eval and last_checkpoint and last_checkpoint.is_file():
        args.resume = str(last_checkpoint)
        print(f'Auto-resume: continuing from {last_checkpoint} (--no-auto-resume starts afresh)')
    max_accuracy = 0.0
    if args.resume:
        checkpoint = utils.load_checkpoint(args.resume)
        if not isinstance(checkpoint.get('model'), dict):
            raise UserError(f'--resume {args.resume} is not a training checkpoint: it has no "model" entry')
        load_model_weights(model_without_ddp, checkpoint['model'], args.resume, training=not args.eval)
        if not args.eval and all(k in checkpoint for k in ('optimizer', 'lr_scheduler', 'epoch')):
            optimizer.load_state_dict(checkpoint['optimizer'])
            lr_scheduler.load_state_dict(checkpoint['lr_scheduler'])
            args.start_epoch = checkpoint['epoch'] + 1
            if model_ema is not None and checkpoint.get('model_ema'):
                model_ema.module.load_state_dict(utils.strip_prefix(checkpoint['model_ema']))
            if checkpoint.get('scaler'):
                precision.scaler.load_state_dict(checkpoint['scaler'])
            max_accuracy = checkpoint.get('max_accuracy', 0.0)
            if not utils.restore_rng_states(checkpoint.get('rng_states')):
                print(f'Note: {args.resume} has no RNG states for {utils.get_world_size()} processes; '
                      'the data order and augmentations continue from --seed')
            print(f'Resumed from {args.resume} at epoch {args.start_epoch}')

    if args.eval:
        stats = evaluate(loader_val, model, device, precision, args.print_freq)
        print(f'Accuracy of the network on the {len(dataset_val)} test images: {stats["acc1"]:.1f}%')
        return 0

    preempted = PreemptionFlag()
    print(f'Start training for {args.epochs} epochs')
    start_time = time.time()
    for epoch in range(args.start_epoch, args.epochs):
        if hasattr(loader_train.sampler, 'set_epoch'):
            loader_train.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(
            model, teacher, criterion, loader_train, optimizer, device, epoch, precision,
            max_norm=args.clip_grad, model_ema=model_ema, mixup_fn=mixup_fn,
            set_training_mode=args.train_mode and not args.finetune, print_freq=args.print_freq,
            should_stop=preempted,
        )
        if preempted():
            # The interrupted epoch is repeated on restart; its partial progress is kept in the weights.
            if last_checkpoint:
                utils.save_on_master(checkpoint_state(model_without_ddp, optimizer, lr_scheduler, epoch - 1,
                                                      model_ema, precision, args, max_accuracy), last_checkpoint)
                sys.stderr.write(f'Preempted: saved {last_checkpoint}; exiting with code {EXIT_REQUEUE} '
                                 'to be requeued\n')
            return EXIT_REQUEUE
        # As DeiT (and so the papers' runs): the schedule is stepped with the finished epoch's index.
        lr_scheduler.step(epoch)
        test_stats = evaluate(loader_val, model, device, precision, args.print_freq)
        print(f'Accuracy of the network on the {len(dataset_val)} test images: {test_stats["acc1"]:.1f}%')
        is_best = test_stats['acc1'] > max_accuracy
        max_accuracy = max(max_accuracy, test_stats['acc1'])
        print(f'Max accuracy: {max_accuracy:.2f}%')
        if output_dir:
            state = checkpoint_state(model_without_ddp, optimizer, lr_scheduler, epoch, model_ema, precision,
                                     args, max_accuracy)
            utils.save_on_master(state, last_checkpoint)
            if is_best:
                utils.save_on_master(state, output_dir / BEST_CHECKPOINT_NAME)

        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()},
                     **{f'test_{k}': v for k, v in test_stats.items()},
                     'epoch': epoch, 'n_parameters': n_parameters}
        if output_dir and utils.is_main_process():
            with (output_dir / 'log.txt').open('a') as f:
                f.write(json.dumps(log_stats) + '\n')
        if writer is not None:
            for key, value in log_stats.items():
                writer.add_scalar(key, value, epoch)
    if writer is not None:
        writer.close()
    print(f'Training time {utils.format_seconds(time.time() - start_time)}')
    return 0


def make_tensorboard_writer(args):
    """A TensorBoard writer under ``--log-dir/--exp-name`` on the main process, when asked for."""
    if not args.log_dir or not utils.is_main_process():
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError('--log-dir needs the tensorboard package: pip install tensorboard') from None
    return SummaryWriter(log_dir=os.path.join(args.log_dir, args.exp_name))


# What the gloo and NCCL backends say when a peer process died or a collective timed out.
PEER_FAILURE_MESSAGES = ('Connection reset by peer', 'Connection closed by peer', 'Broken pipe', 'timed out',
                         'Timed out', 'NCCL communicator was aborted', 'Socket Timeout')


def is_peer_failure(err: RuntimeError) -> bool:
    if not utils.is_dist_avail_and_initialized():
        return False
    return isinstance(err, torch.distributed.DistError) or any(m in str(err) for m in PEER_FAILURE_MESSAGES)


def run(argv=None) -> int:
    """Command-line entry: user errors end with one line and exit code 2, no traceback."""
    parser = argparse.ArgumentParser('[CLS]-KD / Manifold Distillation', parents=[get_args_parser()])
    args = parser.parse_args(argv)
    try:
        utils.init_distributed_mode(args)
        print(args)
        return main(args)
    except (UserError, FileNotFoundError, NotADirectoryError) as err:
        sys.stderr.write(f'error: {err}\n')
        return EXIT_USER_ERROR
    except NonFiniteLossError as err:
        sys.stderr.write(f'error: {err}. The last good checkpoint is kept.\n')
        return EXIT_NON_FINITE
    except RuntimeError as err:
        if not is_peer_failure(err):
            raise
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        sys.stderr.write(f'error: rank {utils.get_rank()}: another process died or did not answer within '
                         f'--dist-timeout {args.dist_timeout:g} min ({reason}); exiting\n')
        return EXIT_PEER_FAILURE


if __name__ == '__main__':
    sys.exit(run())
