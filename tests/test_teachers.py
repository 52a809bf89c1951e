"""Teachers beyond the papers: any timm ViT-family teacher, fed the student's images in its own normalisation.

The three teachers of ``NEW_TEACHERS`` get random weights, saved to a local file and loaded through the code path of
``--teacher-path timm`` (``timm.create_model(pretrained=True)``), pointed at that file with timm's
``pretrained_cfg_overlay=dict(file=...)``: offline, and otherwise what a user with a network runs.
"""
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import get_pretrained_cfg

import main
import models
from helpers import make_shapes, one_thread, run_main, save_teacher  # noqa: F401 (autouse fixture)

DEIT3 = 'deit3_base_patch16_224.fb_in22k_ft_in1k'
AUGREG = 'vit_base_patch16_224.augreg2_in21k_ft_in1k'
CLIP = 'vit_base_patch16_clip_224.openai_ft_in1k'
NEW_TEACHERS = (DEIT3, AUGREG, CLIP)
SMALL_AUGREG = 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'  # a small teacher with timm weights on the hub
NUM_CLASSES = 10  # the built-in shapes
IMAGE_SIZE = 32
BATCH = 2
FAST = ['--device', 'cpu', '--num_workers', '0', '--epochs', '1', '--batch-size', '8', '--drop-path', '0']
ALL_TERMS = ['--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--w-cls', '1', '--w-atn', '1']


@pytest.fixture(scope='module')
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp('shapes'), train_per_class=2, val_per_class=1)


@pytest.fixture(scope='module')
def timm_weights(tmp_path_factory):
    """``name -> (model, file)``: a random-weight timm model at 32 px and its state dict in a local file (each
    saved once; ViT-B files are large, so they are deleted with the module)."""
    saved: dict[str, tuple[torch.nn.Module, Path]] = {}

    def get(name: str) -> tuple[torch.nn.Module, Path]:
        if name not in saved:
            model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, img_size=IMAGE_SIZE).eval()
            path = tmp_path_factory.mktemp('timm') / 'model.pth'
            torch.save(model.state_dict(), path)
            saved[name] = model, path
        return saved[name]

    yield get
    for _, path in saved.values():
        path.unlink()


def use_local_timm_weights(monkeypatch, path: Path) -> None:
    """``--teacher-path timm`` reads ``path`` (a model of ``NUM_CLASSES`` classes at ``IMAGE_SIZE`` px) through
    timm's file overlay instead of downloading."""
    overlay = models.timm_weights_overlay
    monkeypatch.setattr(models, 'timm_weights_overlay', lambda teacher_path: None if overlay(teacher_path) is None else {
        **overlay(teacher_path), 'file': str(path), 'num_classes': NUM_CLASSES,
        'input_size': (3, IMAGE_SIZE, IMAGE_SIZE)})


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Loading pretrained weights fails the test: the checks must stop the run before."""
    def refuse(*args, **kwargs):
        raise AssertionError('pretrained weights were loaded')
    monkeypatch.setattr(timm.models._builder, 'load_pretrained', refuse)


def teacher_args(teacher_model: str, teacher_path: str, *flags: str):
    args = main.get_args_parser().parse_args(['--teacher-model', teacher_model, '--teacher-path', teacher_path,
                                              '--distillation-type', 'soft', '--input-size', str(IMAGE_SIZE), *flags])
    args.nb_classes = NUM_CLASSES
    return args


def normalise(images: torch.Tensor, mean, std) -> torch.Tensor:
    return (images - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


def fails_cleanly(argv: list[str], tmp_path: Path, capsys, *fragments: str) -> None:
    """Exit 2, one ``error:`` line holding every fragment, no training, nothing written."""
    out = tmp_path / 'out'
    assert main.run(['--output_dir', str(out), *argv]) == main.EXIT_USER_ERROR
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
    assert all(fragment in err for fragment in fragments), err
    assert 'Start training' not in captured.out and not out.exists()


@pytest.mark.parametrize('name', NEW_TEACHERS)
def test_teacher_sees_its_own_normalisation(name, timm_weights, monkeypatch):
    plain, path = timm_weights(name)
    use_local_timm_weights(monkeypatch, path)
    teacher = models.create_teacher(teacher_args(name, models.TIMM_WEIGHTS))
    assert teacher.state_dict().keys() == {f'model.{key}' for key in plain.state_dict()}  # no affine buffers

    images = torch.rand(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    student_images = normalise(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
    own = plain.pretrained_cfg['mean'], plain.pretrained_cfg['std']
    with torch.no_grad():
        expected = plain(normalise(images, *own))
        torch.testing.assert_close(teacher(student_images), expected, rtol=1e-4, atol=1e-5)
        if own == (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD):  # DeiT III
            assert not teacher.renormalises and teacher.to_teacher_input(student_images) is student_images
        else:  # AugReg (0.5, 0.5), CLIP (OpenAI's statistics): feeding ImageNet-normalised images would differ
            assert teacher.renormalises and not torch.allclose(plain(student_images), expected)


@pytest.mark.parametrize('name', ['deit_tiny_patch16_224', 'cait_xxs24_224'])
def test_imagenet_teachers_get_the_student_tensor_itself(name, tmp_path):
    path = save_teacher(tmp_path / 'teacher.pth', name, num_classes=NUM_CLASSES, img_size=IMAGE_SIZE)
    teacher = models.create_teacher(teacher_args(name, str(path)))
    plain = timm.create_model(name, num_classes=NUM_CLASSES, img_size=IMAGE_SIZE).eval()
    plain.load_state_dict(torch.load(path)['model'])
    images = torch.randn(BATCH, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert not teacher.renormalises and teacher.to_teacher_input(images) is images
    assert [name for name, _ in teacher.named_buffers()] == [f'model.{n}' for n, _ in plain.named_buffers()]
    with torch.no_grad():
        assert torch.equal(teacher(images), plain(images))


def test_which_paper_teachers_are_renormalised():
    def affine(name):
        cfg = get_pretrained_cfg(name)
        return models.renormalisation(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, cfg.mean, cfg.std)

    assert affine('deit_base_patch16_224') is None and affine('cait_s24_224') is None
    scale, shift = affine('tnt_s_patch16_224')  # TNT's weights expect mean = std = 0.5
    images = torch.rand(1, 3, 4, 4)
    expected = normalise(images, (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(normalise(images, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) * scale + shift, expected)


def test_augreg_teacher_trains_with_every_term(timm_weights, shapes, monkeypatch, tmp_path):
    use_local_timm_weights(monkeypatch, timm_weights(AUGREG)[1])
    out = tmp_path / 'run'
    argv = ['--data-set', 'SHAPES', '--data-path', str(shapes), '--output_dir', str(out), '--input-size',
            str(IMAGE_SIZE), '--model', 'deit_tiny_patch16_224', '--teacher-model', AUGREG, '--teacher-path',
            models.TIMM_WEIGHTS, *ALL_TERMS, *FAST]
    assert main.run(argv) == 0
    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert len(log) == 1
    for term in ('kd', 'mf_sample', 'mf_patch', 'mf_rand', 'cls', 'atn'):
        assert log[0][f'train_{term}'] > 0, term


def test_logit_kd_from_a_cnn_teacher(shapes, tmp_path):
    """Any classifier of the same class count teaches logits (a CNN takes no ``img_size``; timm's test ResNet
    expects mean = std = 0.5, so it is renormalised too)."""
    path = save_teacher(tmp_path / 'resnet.pth', 'test_resnet', num_classes=NUM_CLASSES)
    out = tmp_path / 'run'
    argv = ['--data-set', 'SHAPES', '--data-path', str(shapes), '--output_dir', str(out), '--input-size',
            str(IMAGE_SIZE), '--model', 'deit_tiny_patch16_224', '--teacher-model', 'test_resnet', '--teacher-path',
            str(path), '--distillation-type', 'soft', *FAST]
    assert main.run(argv) == 0
    assert json.loads((out / 'log.txt').read_text())['train_kd'] > 0
    assert models.create_teacher(teacher_args('test_resnet', str(path))).renormalises


@pytest.mark.parametrize('teacher_model,teacher_path,fragments', [
    # EVA-02: 14-px patches, a 16x16 grid against DeiT's 14x14.
    ('eva02_base_patch14_224', 'timm', ['patch size and grid differ', '14 px', '16x16', '--w-atn', 'Manifold']),
    # Four register tokens before the patches, no [CLS]; the file is never read.
    ('vit_base_patch16_reg4_gap_256', 'junk.pth', ['prefix tokens differ', '4 prefix', '1 prefix', '--w-atn']),
    # timm's weights are for 384 px: a 24x24 grid.
    ('deit3_base_patch16_384.fb_in22k_ft_in1k', 'timm', ['resolution and grid differ', '384 px', '24x24']),
])
def test_tokens_that_cannot_pair_stop_before_any_work(teacher_model, teacher_path, fragments, no_weight_loading,
                                                      tmp_path, capsys):
    (tmp_path / 'junk.pth').write_text('never read')
    argv = ['--data-path', str(tmp_path / 'no-data'), '--model', 'deit_tiny_patch16_224', '--teacher-model',
            teacher_model, '--teacher-path', teacher_path if teacher_path == 'timm' else str(tmp_path / teacher_path),
            *ALL_TERMS, *FAST]
    fails_cleanly(argv, tmp_path, capsys, f'--teacher-model {teacher_model}', *fragments)


def test_tokens_that_pair_by_cls_alone_train_past_the_check(no_weight_loading):
    """EVA-02's [CLS] tokens pair with DeiT's: --w-cls without the patch-wise terms passes the check."""
    args = main.get_args_parser().parse_args(['--model', 'deit_tiny_patch16_224', '--teacher-model',
                                              'eva02_base_patch14_224', '--teacher-path', 'timm', *ALL_TERMS,
                                              '--w-atn', '0', '--no-manifold', '--device', 'cpu'])
    main.check_args(args)


@pytest.mark.parametrize('teacher_model,fragments', [
    ('vit_base_patch16_reg4_gap_256', ['timm has no pretrained weights']),
    ('vit_base_patch16_224.bogus', ['Invalid pretrained tag (bogus)']),
])
def test_timm_weights_that_do_not_exist(teacher_model, fragments, no_weight_loading, tmp_path, capsys):
    argv = ['--data-path', str(tmp_path / 'no-data'), '--teacher-model', teacher_model, '--teacher-path', 'timm',
            '--distillation-type', 'soft', *FAST]
    fails_cleanly(argv, tmp_path, capsys, f'--teacher-model {teacher_model}', *fragments)


def test_timm_weights_of_another_class_count(shapes, no_weight_loading, tmp_path, capsys):
    argv = ['--data-set', 'SHAPES', '--data-path', str(shapes), '--input-size', str(IMAGE_SIZE), '--teacher-model',
            SMALL_AUGREG, '--teacher-path', 'timm', '--distillation-type', 'soft', *FAST]
    assert main.run(argv) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and 'classify 1000 classes, the data set has 10' in err, err


def test_hf_hub_spelling_names_the_repository():
    cfg = models.timm_weights_cfg(AUGREG, 'hf-hub:someone/augreg-copy')
    assert (cfg.source, cfg.hf_hub_id, cfg.has_weights) == ('hf-hub', 'someone/augreg-copy', 'someone/augreg-copy')
    assert models.timm_weights_cfg(AUGREG, 'timm').hf_hub_id == f'timm/{AUGREG}'
    assert models.timm_weights_cfg(AUGREG, 'teacher.pth') is None


@pytest.mark.parametrize('teacher_path', ['timm', f'hf-hub:timm/{SMALL_AUGREG}'])
def test_failed_download_is_one_line(teacher_path, shapes, tmp_path):
    """The command line without a network (the hub's offline mode, empty caches): one line, exit 2."""
    env = {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf'), 'TORCH_HOME': str(tmp_path / 'torch')}
    # IMNET folders always have 1000 classes, as timm's ImageNet weights.
    argv = ['--data-set', 'IMNET', '--data-path', str(shapes), '--input-size', str(IMAGE_SIZE), '--teacher-model',
            SMALL_AUGREG, '--teacher-path', teacher_path, '--distillation-type', 'soft', *FAST]
    result = run_main(argv, env={**os.environ, **env})
    assert result.returncode == main.EXIT_USER_ERROR, result.stderr[-3000:]
    err = result.stderr.strip()
    assert err.splitlines() == [err] and 'Traceback' not in err, err
    assert f'--teacher-path {teacher_path}: cannot download the weights of --teacher-model {SMALL_AUGREG}' in err


def test_a_truncated_timm_weights_file_is_named(shapes, monkeypatch, tmp_path, capsys):
    """A local weights file cut short: one line naming it, exit 2."""
    whole = tmp_path / 'whole.pth'
    torch.save(timm.create_model(SMALL_AUGREG, num_classes=NUM_CLASSES, img_size=IMAGE_SIZE).state_dict(), whole)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(whole.read_bytes()[:whole.stat().st_size // 2])
    use_local_timm_weights(monkeypatch, truncated)
    argv = ['--data-set', 'SHAPES', '--data-path', str(shapes), '--input-size', str(IMAGE_SIZE), '--teacher-model',
            SMALL_AUGREG, '--teacher-path', 'timm', '--distillation-type', 'soft', *FAST]
    assert main.run(argv) == main.EXIT_USER_ERROR
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert err.splitlines() == [err] and 'Start training' not in captured.out, err
    assert f'--teacher-model {SMALL_AUGREG} is damaged or truncated: {truncated}' in err, err


def test_a_damaged_file_in_the_hub_cache_is_named(shapes, tmp_path):
    """A weights file that a download left broken in the Hugging Face cache, read offline: one line naming the
    cached file, exit 2, no traceback."""
    snapshot = tmp_path / 'hf' / 'hub' / f'models--timm--{SMALL_AUGREG}' / 'snapshots' / ('0' * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / 'refs').mkdir()
    (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)
    damaged = snapshot / 'model.safetensors'
    damaged.write_bytes(b'\x40\x00\x00\x00\x00\x00\x00\x00{"broken')
    env = {'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path / 'hf'), 'TORCH_HOME': str(tmp_path / 'torch')}
    argv = ['--data-set', 'IMNET', '--data-path', str(shapes), '--input-size', str(IMAGE_SIZE), '--teacher-model',
            SMALL_AUGREG, '--teacher-path', 'timm', '--distillation-type', 'soft', *FAST]
    result = run_main(argv, env={**os.environ, **env})
    assert result.returncode == main.EXIT_USER_ERROR, result.stderr[-3000:]
    err = result.stderr.strip()
    assert err.splitlines() == [err] and 'Traceback' not in err, err
    assert f'is damaged or truncated: {damaged}' in err and 'delete it' in err, err
