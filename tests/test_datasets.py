"""Tests for datasets.py and shapes.py: shapes generation, dataset building, transforms and error reporting."""
import argparse
import hashlib
import json
import os
import re
import warnings

import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms

import main
import shapes
from datasets import UnreadableImageError, build_dataset, build_transform, new_data_aug_generator
from shapes import make_shapes_dataset

SMALL_SHAPES = dict(num_classes=3, train_per_class=2, val_per_class=1, image_size=32)


def make_args(**overrides) -> argparse.Namespace:
    """The flags a run gets by default (the parser's), with the given values."""
    args = main.get_args_parser().parse_args(['--input-size', '48', '--color-jitter', '0.3'])
    vars(args).update(overrides)
    return args


def tree_digest(root) -> dict:
    return {
        os.path.relpath(os.path.join(d, f), root): hashlib.sha256(open(os.path.join(d, f), 'rb').read()).hexdigest()
        for d, _, files in os.walk(root) for f in files
    }


@pytest.fixture(scope='module')
def shapes_root(tmp_path_factory) -> str:
    return make_shapes_dataset(str(tmp_path_factory.mktemp('shapes')), **SMALL_SHAPES)


def write_image(path, colour=(10, 200, 30), size=40) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new('RGB', (size, size), colour).save(path)


def test_shapes_defaults_deterministic_and_real_pngs(tmp_path):
    first = make_shapes_dataset(str(tmp_path / 'a'))
    second = make_shapes_dataset(str(tmp_path / 'b'))
    digest = tree_digest(first)
    assert digest == tree_digest(second)
    assert set(os.listdir(first)) == {'train', 'val'}, "temporary folders must be cleaned up"

    for split, per_class in (('train', shapes.SHAPES_TRAIN_PER_CLASS), ('val', shapes.SHAPES_VAL_PER_CLASS)):
        classes = sorted(os.listdir(os.path.join(first, split)))
        assert len(classes) == shapes.SHAPES_NUM_CLASSES
        assert classes[0] == '00_circle'
        for name in classes:
            files = os.listdir(os.path.join(first, split, name))
            assert len(files) == per_class
            with Image.open(os.path.join(first, split, name, files[0])) as img:
                assert img.format == 'PNG'
                assert img.size == (shapes.SHAPES_IMAGE_SIZE,) * 2
                img.load()
    assert shapes.SHAPES_NUM_CLASSES * shapes.SHAPES_TRAIN_PER_CLASS >= 128

    other_seed = make_shapes_dataset(str(tmp_path / 'c'), seed=1)
    assert tree_digest(other_seed) != digest


def test_shapes_as_imagenet_like_jpegs(tmp_path, capsys):
    """``--image-size W H --jpeg-quality Q``: JPEGs of that size, which the ImageNet folder reader takes."""
    out_dir = tmp_path / 'jpeg'
    shapes.main([str(out_dir), '--num-classes', '2', '--train-per-class', '1', '--val-per-class', '1',
                 '--image-size', '50', '30', '--jpeg-quality', '90'])
    assert capsys.readouterr().out.strip() == str(out_dir)
    with Image.open(out_dir / 'train' / '00_circle' / '0000.jpg') as img:
        assert (img.format, img.size) == ('JPEG', (50, 30))
    args = main.get_args_parser().parse_args(['--data-path', str(out_dir), '--input-size', '32'])
    dataset, _ = build_dataset(True, args)
    assert len(dataset) == 2 and dataset[0][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match='jpeg_quality'):
        make_shapes_dataset(str(tmp_path / 'bad'), jpeg_quality=0)


def test_shapes_cli(tmp_path, capsys):
    out_dir = tmp_path / 'cli'
    shapes.main([str(out_dir), '--num-classes', '12', '--train-per-class', '2', '--val-per-class', '1',
                 '--image-size', '24', '--seed', '3'])
    assert capsys.readouterr().out.strip() == str(out_dir)
    classes = sorted(os.listdir(out_dir / 'train'))
    assert len(classes) == 12 and classes[10] == '10_circle_c1'
    with Image.open(out_dir / 'val' / classes[0] / '0000.png') as img:
        assert img.size == (24, 24)


def test_imnet_on_shapes_tree(shapes_root):
    args = make_args(data_set='IMNET', data_path=shapes_root, input_size=32)
    train, nb_classes = build_dataset(True, args)
    val, _ = build_dataset(False, args)
    assert nb_classes == 1000
    assert train.classes == sorted(train.classes)
    for path, target in train.samples:
        assert target == train.classes.index(os.path.basename(os.path.dirname(path)))
    assert len(train) == 6 and len(val) == 3

    image, target = val[0]
    assert image.dtype == torch.float32 and image.shape == (3, 32, 32)
    assert target == 0


def test_eval_normalization_uses_imagenet_stats(tmp_path):
    colour = (255, 0, 128)
    write_image(tmp_path / 'val' / 'only' / 'x.png', colour)
    dataset, nb_classes = build_dataset(False, make_args(data_path=str(tmp_path), input_size=48))
    image, _ = dataset[0]
    assert nb_classes == 1000 and image.shape == (3, 48, 48)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    assert torch.allclose(image[:, 24, 24], torch.tensor(expected), atol=1e-2)


def test_eval_transform_layout():
    tf = build_transform(False, make_args(input_size=224))
    resize, crop = tf.transforms[:2]
    assert resize.size == int(224 / 0.875) and resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert crop.size == (224, 224)


def test_train_transform_size():
    tf = build_transform(True, make_args(input_size=48))
    assert not isinstance(tf.transforms[0], transforms.RandomCrop)
    out = tf(Image.new('RGB', (70, 60), (120, 30, 200)))
    assert out.shape == (3, 48, 48)


def test_small_input_uses_random_crop():
    tf = build_transform(True, make_args(input_size=32, aa=''))
    assert isinstance(tf.transforms[0], transforms.RandomCrop)
    assert tf.transforms[0].padding == 4
    assert tf(Image.new('RGB', (32, 32))).shape == (3, 32, 32)


@pytest.mark.parametrize('src', [False, True])
def test_three_augment_size(src):
    tf = new_data_aug_generator(make_args(input_size=40, src=src))
    assert tf(Image.new('RGB', (64, 50), (200, 100, 0))).shape == (3, 40, 40)
    assert isinstance(tf.transforms[0], transforms.Resize) == src


def test_build_dataset_uses_three_augment(shapes_root):
    dataset, _ = build_dataset(True, make_args(data_set='SHAPES', data_path=shapes_root, input_size=24,
                                               ThreeAugment=True))
    assert any(isinstance(t, transforms.RandomChoice) for t in dataset.transform.transforms)
    assert dataset[0][0].shape == (3, 24, 24)


def test_three_augment_ops():
    """DeiT III's three: grayscale and solarize from torchvision, PIL's blur with a random radius."""
    transform = new_data_aug_generator(make_args(input_size=8))
    gray, solarize, blur = next(t for t in transform.transforms if isinstance(t, transforms.RandomChoice)).transforms
    img = Image.new('RGB', (8, 8), (250, 10, 100))
    grayed = gray(img)
    assert grayed.mode == 'RGB' and len(set(grayed.getpixel((0, 0)))) == 1
    assert solarize(img).getpixel((0, 0)) == (5, 10, 100)
    img.putpixel((4, 4), (0, 0, 0))
    assert blur(img).getpixel((4, 4)) != (0, 0, 0)


def test_missing_data_path(tmp_path):
    missing = str(tmp_path / 'nowhere')
    for data_set in ('IMNET', 'CIFAR', 'CIFAR10', 'INAT'):
        with pytest.raises(FileNotFoundError, match='--data-path') as err:
            build_dataset(False, make_args(data_set=data_set, data_path=missing))
        assert missing in str(err.value)


def test_missing_inat_annotations(tmp_path):
    with pytest.raises(FileNotFoundError, match='categories.json'):
        build_dataset(True, make_args(data_set='INAT', data_path=str(tmp_path)))


def test_empty_folders(tmp_path):
    (tmp_path / 'val').mkdir()
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / 'val'))):
        build_dataset(False, make_args(data_path=str(tmp_path)))

    (tmp_path / 'val' / 'a').mkdir()
    (tmp_path / 'val' / 'b').mkdir()
    write_image(tmp_path / 'val' / 'b' / 'x.png')
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / 'val' / 'a'))):
        build_dataset(False, make_args(data_path=str(tmp_path)))


def test_unknown_data_set():
    with pytest.raises(ValueError, match='NOPE'):
        build_dataset(False, make_args(data_set='NOPE'))


def test_corrupt_image(tmp_path):
    class_dir = tmp_path / 'val' / 'cls'
    class_dir.mkdir(parents=True)
    bad = class_dir / 'a.png'
    bad.write_bytes(b'definitely not a png')
    write_image(class_dir / 'b.png')

    dataset, _ = build_dataset(False, make_args(data_path=str(tmp_path), input_size=48))
    with pytest.raises(UnreadableImageError, match=re.escape(f'cannot read image {bad}')):
        dataset[0]

    dataset, _ = build_dataset(False, make_args(data_path=str(tmp_path), input_size=48, skip_bad_images=True))
    with pytest.warns(RuntimeWarning, match=re.escape(str(bad))):
        image, target = dataset[0]
    assert image.shape == (3, 48, 48) and target == 0
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        dataset[0]  # warned once per file only


def test_shapes_autogenerated(tmp_path):
    root = tmp_path / 'fresh'
    train, nb_classes = build_dataset(True, make_args(data_set='SHAPES', data_path=str(root), input_size=32))
    val, _ = build_dataset(False, make_args(data_set='SHAPES', data_path=str(root), input_size=32))
    assert nb_classes == shapes.SHAPES_NUM_CLASSES
    assert len(train) == shapes.SHAPES_NUM_CLASSES * shapes.SHAPES_TRAIN_PER_CLASS
    assert len(val) == shapes.SHAPES_NUM_CLASSES * shapes.SHAPES_VAL_PER_CLASS
    assert sorted(os.listdir(root)) == ['train', 'val']
    image, _ = train[0]
    assert image.shape == (3, 32, 32)

    # An existing tree is reused, not regenerated.
    mtime = os.path.getmtime(train.samples[0][0])
    build_dataset(True, make_args(data_set='SHAPES', data_path=str(root), input_size=32))
    assert os.path.getmtime(train.samples[0][0]) == mtime


def test_inat_annotations(tmp_path):
    categories = [
        {'id': 0, 'name': 'oak', 'genus': 'Quercus', 'supercategory': 'Plantae'},
        {'id': 1, 'name': 'fox', 'genus': 'Vulpes', 'supercategory': 'Animalia'},
        {'id': 2, 'name': 'wolf', 'genus': 'Canis', 'supercategory': 'Animalia'},
    ]

    def split(prefix, items):
        images = [{'id': i, 'file_name': f'{prefix}/{sup}/{cat}/{i}.jpg'} for i, (sup, cat) in enumerate(items)]
        annotations = [{'id': i, 'image_id': i, 'category_id': cat} for i, (_, cat) in enumerate(items)]
        return {'images': images, 'annotations': annotations}

    train = split('train_val2018', [('Animalia', 2), ('Plantae', 0), ('Animalia', 2)])
    val = split('train_val2018', [('Plantae', 0), ('Animalia', 2)])
    for name, data in (('categories.json', categories), ('train2018.json', train), ('val2018.json', val)):
        (tmp_path / name).write_text(json.dumps(data))
    for img in val['images']:
        write_image(tmp_path / img['file_name'])

    dataset, nb_classes = build_dataset(False, make_args(data_set='INAT', data_path=str(tmp_path), input_size=48))
    # Labels follow first appearance in the train annotations: wolf -> 0, oak -> 1.
    assert nb_classes == 2 and dataset.classes == ['wolf', 'oak']
    assert dataset.targets == [1, 0]
    image, target = dataset[1]
    assert image.shape == (3, 48, 48) and target == 0


@pytest.mark.parametrize('aa', ['rand-m9-mstd0.5-inc1', 'v0', 'augmix-m5-w4-d2'])
def test_posterize_survives_zero_bits(aa):
    tf = build_transform(True, make_args(aa=aa))
    augment = tf.transforms[2]
    ops = list(getattr(augment, 'ops', [])) + [op for sub in getattr(augment, 'policy', []) for op in sub]
    posterize_ops = [op for op in ops if 'Posterize' in op.name]
    assert posterize_ops
    img = Image.new('RGB', (8, 8), (200, 90, 30))
    for op in posterize_ops:
        assert op.aug_fn(img, 0).getpixel((0, 0)) == (0, 0, 0)
        assert op.aug_fn(img, 1).getpixel((0, 0)) == (128, 0, 0)
