"""Training and evaluation of vision transformers with [CLS]-KD, Manifold Distillation and DeiT logit KD.

Parses the command line (every flag of DeiT's main.py and of both papers' parsers) and wires the data,
models, criterion and loops together; the loops live in engine.py.
"""
import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


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
    group.add_argument('--print-freq', default=10, type=int)
    group.add_argument('--log-dir', default='', help='TensorBoard log directory (needs tensorboard)')

    group = parser.add_argument_group('Distributed')
    group.add_argument('--distributed', action='store_true')
    group.add_argument('--world_size', default=1, type=int)
    group.add_argument('--dist_url', default='env://')
    group.add_argument('--dist-timeout', default=30, type=float, help='process-group timeout in minutes')
    group.add_argument('--local_rank', '--local-rank', default=0, type=int)
    return parser
