"""The published checkpoints' layouts, rebuilt with random weights, load through the real code paths.

Students (the [CLS]-KD and Manifold releases) go through ``main.run --eval --resume`` and ``checkpoints.load_student_weights``;
teachers (DeiT, CaiT from DeiT's release, TNT-S as timm 0.5.4 and the original TNT release saved it) through
``models.create_teacher``.
"""
import argparse
import re
from pathlib import Path

import pytest
import timm
import torch

import checkpoints
import datasets
import engine
import main
import models
from shapes import make_shapes_dataset
from helpers import CLSKD_TEST, MANIFOLD_TRAIN, main_argv, one_thread  # noqa: F401 (autouse fixture)

NUM_CLASSES = 1000
IMAGE_SIZE = 224
SMALL_IMAGE_SIZE = 32
EVAL_CLASSES = 4
NORM_SCALE = 0.1
WEIGHT_SCALE = 0.02
DEIT_LINE = re.compile(r'^\* Acc@1 (\d+\.\d{3}) Acc@5 (\d+\.\d{3}) loss (\d+\.\d{3})$', re.M)
# [CLS]-KD's projector: student width -> (student + teacher) / 2 -> deit_base's 768.
CLSKD_STUDENTS = {
    'deit_base_to_tiny_75.1.pth': ('deit_tiny_patch16_224', 192, 480),
    'deit_base_to_small_81.49.pth': ('deit_small_patch16_224', 384, 576),
}
TEACHER_WIDTH = 768
PUBLISHED_EPOCHS = 300
# The Manifold command's CaiT-S24 blocks; CaiT's blocks carry the 196 patch tokens only.
CAIT_T_ID = ['0', '1', '2', '3', '20', '21', '22', '23']
CAIT_PATCHES = 196
# timm 1.x TNT names -> the names of the original TNT release (the inverse of timm's tnt.checkpoint_filter_fn).
TNT_ORIGINAL_NAMES = {
    'patch_pos': 'outer_pos', 'pixel_pos': 'inner_pos', 'pixel_embed': 'patch_embed', 'norm1_proj': 'proj_norm1',
    'norm2_proj': 'proj_norm2', 'norm_in': 'inner_norm1', 'attn_in': 'inner_attn', 'norm_mlp_in': 'inner_norm2',
    'mlp_in': 'inner_mlp', 'norm_out': 'outer_norm1', 'attn_out': 'outer_attn', 'norm_mlp': 'outer_norm2',
    'mlp': 'outer_mlp',
}


def random_state(name: str, seed: int = 0, **kwargs) -> dict:
    """Random weights for every key of a timm model (no slow initialisation): ``1 + 0.1 r`` for 1-D ``*weight``
    tensors (norms), ``0.02 r`` for the others, so that outputs vary from image to image."""
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in model.state_dict().items():
        r = torch.randn(value.shape, generator=generator)
        state[key] = 1 + NORM_SCALE * r if value.dim() == 1 and key.endswith('weight') else WEIGHT_SCALE * r
    return state


def seeded_model(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A timm model holding ``random_state``'s weights."""
    with torch.device('meta'):
        model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)
    model.load_state_dict(random_state(name, seed, **kwargs), assign=True)
    return model.eval()


def training_layout(model_state: dict, args: argparse.Namespace) -> dict:
    """What DeiT-based training scripts saved: weights, optimizer, schedule, epoch, EMA, scaler, args."""
    params = [torch.nn.Parameter(v.clone()) for v in model_state.values() if v.is_floating_point()]
    optimizer = torch.optim.AdamW(params)
    return {
        'model': model_state,
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': {'t_initial': PUBLISHED_EPOCHS, 'warmup_t': 5, 'base_values': [5e-4]},
        'epoch': PUBLISHED_EPOCHS - 1,
        'model_ema': {k: v.clone() for k, v in model_state.items()},
        'scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                   '_growth_tracker': 0},
        'args': args,
    }


def clskd_student(file_name: str) -> tuple[torch.nn.Module, dict]:
    """A [CLS]-KD student in its release layout: timm ViT keys plus ``projector.fc1/fc2``."""
    model_name, width, hidden = CLSKD_STUDENTS[file_name]
    student = seeded_model(model_name)
    state = student.state_dict()
    generator = torch.Generator().manual_seed(1)
    for key, shape in (('fc1.weight', (hidden, width)), ('fc1.bias', (hidden,)),
                       ('fc2.weight', (TEACHER_WIDTH, hidden)), ('fc2.bias', (TEACHER_WIDTH,))):
        state[f'projector.{key}'] = torch.randn(shape, generator=generator)
    return student, state


def published_args(model_name: str, teacher_model: str) -> argparse.Namespace:
    return argparse.Namespace(model=model_name, teacher_model=teacher_model, lr=5e-4, batch_size=128,
                              s_id=[0, 1, 2, 3, 8, 9, 10, 11], t_id=[0, 1, 2, 3, 8, 9, 10, 11], output_dir='/x',
                              distributed=True, world_size=4, resume='', opt_betas=None)


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('shapes')
    return Path(make_shapes_dataset(str(root), num_classes=EVAL_CLASSES, train_per_class=1,
                                             val_per_class=1, image_size=SMALL_IMAGE_SIZE))


def evaluate_directly(model: torch.nn.Module, shapes: Path, argv: list[str]) -> dict:
    args = main.get_args_parser().parse_args(argv)
    val, _ = datasets.build_dataset(False, args)
    return engine.evaluate(torch.utils.data.DataLoader(val, batch_size=len(val)), model, torch.device('cpu'))


def assert_eval_line_matches(stdout: str, expected: dict) -> None:
    acc1, acc5, loss = map(float, DEIT_LINE.search(stdout).groups())
    assert (acc1, acc5) == (round(expected['acc1'], 3), round(expected['acc5'], 3))
    assert loss == pytest.approx(expected['loss'], abs=1e-3)


@pytest.mark.parametrize('file_name', sorted(CLSKD_STUDENTS))
def test_clskd_student_evaluates_and_resumes(file_name, shapes, tmp_path, capsys):
    student, state = clskd_student(file_name)
    model_name = CLSKD_STUDENTS[file_name][0]
    path = tmp_path / file_name
    torch.save(training_layout(state, published_args(model_name, 'deit_base_patch16_224')), path)

    # The [CLS]-KD test command, with the student of this file.
    argv = main_argv(CLSKD_TEST, output_dir=tmp_path / 'out', dataset_dir=shapes,
                     path_of_teacher_checkpoint=tmp_path / 'absent.pth', path_of_distilled_model=path)
    argv += ['--model', model_name, '--device', 'cpu', '--num_workers', '0']
    assert main.run(argv) == 0
    assert_eval_line_matches(capsys.readouterr().out, evaluate_directly(student, shapes, argv))

    # Training from it: the student with its projector (the train command's flags) takes every key strictly.
    args = main.get_args_parser().parse_args(argv[1:])
    args.nb_classes = NUM_CLASSES
    resumed = models.create_student(args)
    checkpoints.load_student_weights(resumed, checkpoints.load_checkpoint(str(path))['model'], str(path), training=True)
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in state.items())


def test_manifold_student_evaluates(shapes, tmp_path, capsys):
    """``manifold_kd_deit_76.4.pth``: plain DeiT-tiny keys in the training layout, saved through DDP."""
    student = seeded_model('deit_tiny_patch16_224')
    path = tmp_path / 'manifold_kd_deit_76.4.pth'
    state = {f'module.{k}': v for k, v in student.state_dict().items()}
    torch.save(training_layout(state, published_args('deit_tiny_patch16_224', 'cait_s24_224')), path)

    argv = main_argv(MANIFOLD_TRAIN, output_dir=tmp_path / 'out', dataset_dir=shapes,
                     path_of_teacher_checkpoint=tmp_path / 'absent.pth')
    argv = [a for a in argv if a != '--distributed']
    argv += ['--eval', '--resume', str(path), '--device', 'cpu', '--num_workers', '0']
    assert main.run(argv) == 0
    assert_eval_line_matches(capsys.readouterr().out, evaluate_directly(student, shapes, argv))


def teacher_args(teacher_model: str, path: Path, t_id: list[str], input_size: int = IMAGE_SIZE) -> argparse.Namespace:
    args = main.get_args_parser().parse_args([
        '--teacher-model', teacher_model, '--teacher-path', str(path), '--distillation-type', 'soft',
        '--s-id', *(['0'] * len(t_id)), '--t-id', *t_id, '--input-size', str(input_size)])
    args.nb_classes = NUM_CLASSES
    return args


def assert_loaded(teacher: torch.nn.Module, expected: dict) -> None:
    own = teacher.model.state_dict()
    assert own.keys() == expected.keys()
    assert all(torch.equal(own[k], v) for k, v in expected.items())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize('prefix', ['', 'module.'])
def test_deit_teacher(prefix, tmp_path):
    """DeiT's release layout ``{'model': ...}``; also as saved from a DDP-wrapped model."""
    source = random_state('deit_base_patch16_224', img_size=SMALL_IMAGE_SIZE)
    path = tmp_path / 'deit_base_patch16_224-b5f2ef4d.pth'
    torch.save({'model': {prefix + k: v for k, v in source.items()}}, path)
    teacher = models.create_teacher(teacher_args('deit_base_patch16_224', path, ['0', '11'], SMALL_IMAGE_SIZE))
    assert_loaded(teacher, source)
    assert teacher.embed_dim == TEACHER_WIDTH


def test_cait_s24_teacher_from_deit_release(tmp_path):
    source = random_state('cait_s24_224')
    path = tmp_path / 'S24_224.pth'
    torch.save({'model': source}, path)
    teacher = models.create_teacher(teacher_args('cait_s24_224', path, CAIT_T_ID))
    assert_loaded(teacher, source)
    with torch.inference_mode():
        logits = teacher(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
    tokens = teacher.token_capture.pop()
    assert logits.shape == (1, NUM_CLASSES)
    assert [t.shape for t in tokens] == [(1, CAIT_PATCHES, teacher.embed_dim)] * len(CAIT_T_ID)


def tnt_original_layout(state: dict) -> dict:
    """A timm 1.x ``tnt_s_patch16_224`` state dict in the names and shapes of the original TNT release."""
    out = {}
    for key, value in state.items():
        if key == 'pixel_pos':
            value = value.flatten(2).transpose(1, 2)  # [1, C, H, W] -> [1, H*W, C]
        out['.'.join(TNT_ORIGINAL_NAMES.get(part, part) for part in key.split('.'))] = value
    out['outer_tokens'] = torch.zeros(1, 1, state['patch_pos'].shape[-1])  # dropped by timm's filter
    return out


@pytest.mark.parametrize('layout', ['timm_0.5.4', 'timm_1.x', 'original_release'])
def test_tnt_s_teacher(layout, tmp_path):
    """``--teacher-model tnt_s_patch16_224`` takes each of the layouts TNT-S weights were published in."""
    arch = 'tnt_s_legacy_patch16_224' if layout == 'timm_0.5.4' else 'tnt_s_patch16_224'
    source = random_state(arch)
    saved = tnt_original_layout(source) if layout == 'original_release' else source
    path = tmp_path / 'tnt_s_patch16_224.pth'
    torch.save(saved, path)
    teacher = models.create_teacher(teacher_args('tnt_s_patch16_224', path, ['0', '11']))
    assert teacher.model.default_cfg['architecture'] == arch
    assert_loaded(teacher, source)
    if layout == 'timm_0.5.4':
        with torch.inference_mode():
            teacher(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        assert [t.shape for t in teacher.token_capture.pop()] == [(1, CAIT_PATCHES + 1, teacher.embed_dim)] * 2
