"""Fresh students start as the originals' do: DeiT's ViT init (timm 0.5.4 and the [CLS]-KD code), tensor by tensor.

The rule: Linear weights, [CLS], the distillation token and the position embedding from a truncated normal with
std 0.02 (bounds +-2); Linear biases zero; LayerNorm weights one and biases zero; the patch-embedding convolution
at PyTorch's default (uniform within 1/sqrt(fan_in)), as the originals leave it. Every student of the papers is
built through the public contract, with and without a projector, for every teacher.
"""
import math

import pytest
import torch
import torch.nn as nn
from timm.layers import Mlp

import main
import models

NUM_CLASSES = 1000
STD = 0.02
TRUNCATION = 2.0  # timm's trunc_normal_ bounds are absolute: [-2, 2]
SIGMAS = 6  # sampling-error allowance for means and standard deviations
OUTLIER_STDS = 10
MAX_OUTLIER_FRACTION = 1e-4
UNIFORM_STD_FACTOR = 1 / math.sqrt(3)  # std of U(-b, b) is b / sqrt(3)

FEATURE_FLAGS = ['--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11']
# (student, teacher, --w-cls): the papers' pairs, and the projector-free cases (equal widths or no [CLS] term).
STUDENTS = [
    ('deit_tiny_patch16_224', 'deit_base_patch16_224', '1'),
    ('deit_small_patch16_224', 'deit_base_patch16_224', '1'),
    ('deit_tiny_distilled_patch16_224', 'deit_base_patch16_224', '1'),
    ('deit_small_distilled_patch16_224', 'deit_base_patch16_224', '1'),
    ('deit_tiny_patch16_224', 'cait_s24_224', '1'),
    ('deit_tiny_patch16_224', 'tnt_s_patch16_224', '1'),
    ('deit_small_patch16_224', 'tnt_s_patch16_224', '1'),
    ('deit_small_patch16_224', 'cait_s24_224', '0'),
    ('deit_tiny_distilled_patch16_224', 'cait_s24_224', '0'),
]
TOKENS = ('cls_token', 'dist_token', 'pos_embed')
TEACHER_WIDTH = {'deit_base_patch16_224': 768, 'cait_s24_224': 384, 'tnt_s_patch16_224': 384}


def build(student: str, teacher: str, w_cls: str) -> nn.Module:
    args = main.get_args_parser().parse_args(
        ['--model', student, '--teacher-model', teacher, '--w-cls', w_cls, '--teacher-path', 'unused']
        + FEATURE_FLAGS)
    args.nb_classes = NUM_CLASSES
    return models.create_student(args)


def assert_truncated_normal(name: str, value: torch.Tensor) -> None:
    """Mean and std within sampling error, all values within the bounds.

    timm's ``trunc_normal_`` (0.5.4 and 1.x) sends the rare uniform draw of exactly -1 or 1 through ``erfinv`` to
    an infinity that is clamped to the bound: a single value of +-2 in a large tensor lifts its std by a few
    percent. Such outliers are counted apart and the moments are taken over the rest.
    """
    assert value.abs().max().item() <= TRUNCATION, name
    inside = value[value.abs() < OUTLIER_STDS * STD]
    assert value.numel() - inside.numel() <= max(1, value.numel() * MAX_OUTLIER_FRACTION), name
    n = inside.numel()
    assert abs(inside.mean().item()) <= SIGMAS * STD / math.sqrt(n), name
    assert abs(inside.std().item() - STD) <= SIGMAS * STD / math.sqrt(2 * n), name


def assert_pytorch_default_conv(name: str, value: torch.Tensor, fan_in: int) -> None:
    bound = 1 / math.sqrt(fan_in)
    std = bound * UNIFORM_STD_FACTOR
    assert value.abs().max().item() <= bound, name
    assert abs(value.std().item() - std) <= SIGMAS * std / math.sqrt(2 * value.numel()), name


def rule_of_every_parameter(model: nn.Module) -> dict[str, str]:
    """Which rule each parameter follows, from the module that owns it; fails on a parameter no rule covers."""
    rules = {}
    for module_name, module in model.named_modules():
        prefix = f'{module_name}.' if module_name else ''
        for param_name, _ in module.named_parameters(recurse=False):
            name = prefix + param_name
            if isinstance(module, nn.Linear):
                rules[name] = 'truncated normal' if param_name == 'weight' else 'zeros'
            elif isinstance(module, nn.LayerNorm):
                rules[name] = 'ones' if param_name == 'weight' else 'zeros'
            elif isinstance(module, nn.Conv2d):
                rules[name] = 'pytorch default conv'
            elif module is model and param_name in TOKENS:
                rules[name] = 'truncated normal'
    uncovered = sorted(set(dict(model.named_parameters())) - set(rules))
    assert not uncovered, f'no init rule for {uncovered}'
    return rules


@pytest.mark.parametrize('student,teacher,w_cls', STUDENTS)
def test_fresh_student_starts_as_the_originals(student, teacher, w_cls):
    model = build(student, teacher, w_cls)
    assert isinstance(model.projector, Mlp) == (w_cls == '1' and model.embed_dim != TEACHER_WIDTH[teacher])
    params = dict(model.named_parameters())
    conv = model.patch_embed.proj
    fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
    for name, rule in rule_of_every_parameter(model).items():
        value = params[name].detach()
        if rule == 'truncated normal':
            assert_truncated_normal(name, value)
        elif rule == 'zeros':
            assert torch.equal(value, torch.zeros_like(value)), name
        elif rule == 'ones':
            assert torch.equal(value, torch.ones_like(value)), name
        else:
            assert_pytorch_default_conv(name, value, fan_in)


def test_the_rule_catches_timm_1x_defaults():
    """The check is sharp enough to see what timm 1.x and PyTorch would give: [CLS] N(0, 1e-6), default Linear."""
    with pytest.raises(AssertionError):
        assert_truncated_normal('cls_token', torch.randn(1, 1, 192) * 1e-6)
    with pytest.raises(AssertionError):
        assert_truncated_normal('projector.fc1.weight', nn.Linear(192, 480).weight.detach())
