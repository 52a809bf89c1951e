"""imagenet_val.py on a small fake ImageNet of real JPEG files: each accepted labels file sorts the flat validation
folder into the class folders that ``--data-set IMNET`` reads, moved, hard-linked or copied; a second run changes
nothing; every refusal is one line, exit code 2, with nothing moved."""
import sys
from pathlib import Path

import pytest
from PIL import Image

import imagenet_val
import main
from datasets import build_dataset
from helpers import SCRIPT_TIMEOUT_S, run

TRAIN_CLASSES = ('n01440764', 'n01443537', 'n01484850')
# ILSVRC2012_val_<number>.JPEG -> its class, out of the classes' sorted order on purpose.
VAL_LABELS = {1: 'n01443537', 2: 'n01440764', 3: 'n01484850', 4: 'n01440764', 5: 'n01443537', 6: 'n01484850'}
IMAGE_SIDE = 8
COLOUR_STEP = 40


def val_name(number: int) -> str:
    return f'ILSVRC2012_val_{number:08d}.JPEG'


def write_jpeg(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', (IMAGE_SIDE, IMAGE_SIDE), (shade, 255 - shade, 0)).save(path, format='JPEG')


@pytest.fixture
def imagenet(tmp_path: Path) -> Path:
    """``train/<wnid>/`` with an image each and a flat ``val/`` of six images, as ImageNet's archives unpack."""
    for index, wnid in enumerate(TRAIN_CLASSES):
        write_jpeg(tmp_path / 'train' / wnid / f'{wnid}_1.JPEG', COLOUR_STEP * index)
    for number in VAL_LABELS:
        write_jpeg(tmp_path / 'val' / val_name(number), COLOUR_STEP * number)
    return tmp_path


def kaggle_csv(labels: dict[int, str]) -> str:
    """Kaggle's LOC_val_solution.csv: the class, then a box, repeated for each object of the image."""
    rows = [f'{val_name(n)[:-len(".JPEG")]},{wnid} 10 20 300 200' + (f' {wnid} 1 2 3 4' if n % 2 else '')
            for n, wnid in sorted(labels.items(), reverse=True)]
    return '\n'.join(['ImageId,PredictionString', *rows]) + '\n'


def file_list(labels: dict[int, str]) -> str:
    return ''.join(f'{val_name(n)} {wnid}\n' for n, wnid in labels.items())


def file_list_without_extensions(labels: dict[int, str]) -> str:
    return ''.join(f'val/{val_name(n)[:-len(".JPEG")]}\t{wnid}\n' for n, wnid in labels.items())


LABEL_FORMATS = {'kaggle-csv': kaggle_csv, 'file-wnid': file_list, 'stem-wnid': file_list_without_extensions}


def write_labels(root: Path, text: str) -> Path:
    path = root / 'labels.txt'
    path.write_text(text)
    return path


def snapshot(root: Path) -> dict:
    """Every file under ``root``: its inode, size and modification time."""
    return {path.relative_to(root): (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(root.rglob('*')) if path.is_file()}


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.convert('RGB').tobytes()


def sort(capsys, *argv) -> tuple[int, str, str]:
    code = imagenet_val.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_sorted(val: Path, original_pixels: dict[int, bytes]) -> None:
    for number, wnid in VAL_LABELS.items():
        assert pixels(val / wnid / val_name(number)) == original_pixels[number]


@pytest.mark.parametrize('labels_format', LABEL_FORMATS)
def test_each_labels_format_sorts_the_validation_set_for_imnet(imagenet, capsys, labels_format):
    labels = write_labels(imagenet, LABEL_FORMATS[labels_format](VAL_LABELS))
    val = imagenet / 'val'
    original = {number: pixels(val / val_name(number)) for number in VAL_LABELS}

    code, out, err = sort(capsys, val, labels, '--train', imagenet / 'train')
    assert (code, err) == (0, '')
    assert out == f'moved 6 images into 3 class folders of {val}\n'
    assert imagenet_val.flat_images(val) == []
    assert_sorted(val, original)

    args = main.get_args_parser().parse_args(['--data-set', 'IMNET', '--data-path', str(imagenet)])
    train_set, _ = build_dataset(is_train=True, args=args)
    val_set, num_classes = build_dataset(is_train=False, args=args)
    assert num_classes == 1000 and val_set.classes == train_set.classes == sorted(TRAIN_CLASSES)
    assert sorted((Path(path).name, val_set.classes[label]) for path, label in val_set.samples) == \
        sorted((val_name(number), wnid) for number, wnid in VAL_LABELS.items())

    before = snapshot(imagenet)
    code, out, err = sort(capsys, val, labels, '--train', imagenet / 'train')
    assert (code, err) == (0, '')
    assert out == f'nothing to do: {val} holds 6 images in class folders and none to place\n'
    assert snapshot(imagenet) == before


@pytest.mark.parametrize('mode', ['link', 'copy'])
def test_link_or_copy_into_another_folder_keeps_the_flat_one(imagenet, capsys, mode):
    labels = write_labels(imagenet, file_list(VAL_LABELS))
    val, into = imagenet / 'val', imagenet / 'sorted' / 'val'
    flat = snapshot(val)
    original = {number: pixels(val / val_name(number)) for number in VAL_LABELS}

    code, out, err = sort(capsys, val, labels, '--into', into, f'--{mode}')
    assert (code, err) == (0, '')
    assert out == f'{imagenet_val.VERBS[mode]} 6 images into 3 class folders of {into}\n'
    assert snapshot(val) == flat
    assert_sorted(into, original)
    for number, wnid in VAL_LABELS.items():
        same_file = (into / wnid / val_name(number)).samefile(val / val_name(number))
        assert same_file == (mode == 'link')

    before = snapshot(imagenet)
    code, out, err = sort(capsys, val, labels, '--into', into, f'--{mode}')
    assert (code, out, err) == (0, f'nothing to do: {into} holds 6 images in class folders and none to place\n', '')
    assert snapshot(imagenet) == before


def test_a_run_that_stopped_part_way_is_finished_by_the_next(imagenet, capsys):
    labels = write_labels(imagenet, file_list(VAL_LABELS))
    val = imagenet / 'val'
    original = {number: pixels(val / val_name(number)) for number in VAL_LABELS}
    first = val_name(1)
    (val / VAL_LABELS[1]).mkdir()
    (val / first).rename(val / VAL_LABELS[1] / first)

    code, out, err = sort(capsys, val, labels)
    assert (code, out, err) == (0, f'moved 5 images into 3 class folders of {val}\n', '')
    assert_sorted(val, original)


def test_a_val_folder_with_fewer_classes_than_train_gets_a_note(imagenet, capsys):
    labels = write_labels(imagenet, file_list(VAL_LABELS))
    (imagenet / 'train' / 'n01491361').mkdir()
    code, out, err = sort(capsys, imagenet / 'val', labels, '--train', imagenet / 'train')
    assert (code, err) == (0, '')
    assert out.startswith(f'moved 6 images into 3 class folders of {imagenet / "val"}; note: ')
    assert 'has 3 of the 4 classes' in out


def refusals() -> dict:
    """Name -> (labels file text, extra flags, what the one line says); ``{root}`` is the fake ImageNet."""
    return {
        'a file without a label': (
            file_list({n: w for n, w in VAL_LABELS.items() if n != 4}), [],
            f'has no label for 1 of the 6 images in {{root}}/val (first: {val_name(4)})'),
        'a class train/ has no folder for': (
            file_list({**VAL_LABELS, 5: 'n09999999'}), ['--train', '{root}/train'],
            f'--train {{root}}/train has no folder for 1 of the classes in {{root}}/labels.txt (first: n09999999, '
            f'the label of {val_name(5)})'),
        "the devkit's ground truth": (
            ''.join(f'{number}\n' for number in (490, 361, 171, 822, 297, 482)), [],
            "holds class numbers, not wnids (the devkit's ILSVRC2012_validation_ground_truth.txt?)"),
        'class indices instead of wnids': (
            ''.join(f'{val_name(n)} {n}\n' for n in VAL_LABELS), [],
            "labels.txt:1: '1' is not a WordNet ID"),
        'a line of three words': (
            f'{val_name(1)} n01440764 extra\n', [], 'labels.txt:1: expected "<file name> <wnid>"'),
        'a kaggle line without a class': (
            'ImageId,PredictionString\nILSVRC2012_val_00000001,\n', [], 'labels.txt:2: expected "ImageId,<wnid>'),
        'two classes for one image': (
            file_list(VAL_LABELS) + f'{val_name(2)} n01484850\n', [],
            f'labels.txt:7: {val_name(2)} is labelled both n01440764 and n01484850'),
        'an empty labels file': ('', [], 'labels.txt: no labels in the file'),
        'a missing train folder': (file_list(VAL_LABELS), ['--train', '{root}/nowhere'],
                                   '--train {root}/nowhere: no such folder'),
    }


@pytest.mark.parametrize('case', refusals())
def test_refusals_are_one_line_and_move_nothing(imagenet, capsys, case):
    text, flags, message = refusals()[case]
    labels = write_labels(imagenet, text)
    before = snapshot(imagenet)
    code, out, err = sort(capsys, imagenet / 'val', labels, *(flag.format(root=imagenet) for flag in flags))
    assert (code, out) == (main.EXIT_USER_ERROR, '')
    assert err.count('\n') == 1 and err.startswith('error: ') and message.format(root=imagenet) in err, err
    assert snapshot(imagenet) == before


def test_a_move_onto_an_existing_file_is_refused(imagenet, capsys):
    labels = write_labels(imagenet, file_list(VAL_LABELS))
    val = imagenet / 'val'
    write_jpeg(val / VAL_LABELS[3] / val_name(3), 0)
    before = snapshot(imagenet)
    code, out, err = sort(capsys, val, labels)
    assert (code, out) == (main.EXIT_USER_ERROR, '')
    assert err == (f'error: {val / VAL_LABELS[3] / val_name(3)} already exists and {val / val_name(3)} would '
                   'replace it: remove one of them\n')
    assert snapshot(imagenet) == before


def test_the_script_refuses_in_one_line_and_shows_its_help(imagenet):
    missing = imagenet / 'LOC_val_solution.csv'
    result = run([sys.executable, 'imagenet_val.py', str(imagenet / 'val'), str(missing)], SCRIPT_TIMEOUT_S)
    assert result.returncode == main.EXIT_USER_ERROR and result.stdout == ''
    assert result.stderr.startswith(f'error: {missing}: cannot read the labels file') and \
        result.stderr.count('\n') == 1, result.stderr
    help_text = run([sys.executable, 'imagenet_val.py', '--help'], SCRIPT_TIMEOUT_S)
    assert help_text.returncode == 0
    for accepted in ('LOC_val_solution.csv', '"<file name> <wnid>"', 'ILSVRC2012_validation_ground_truth.txt'):
        assert accepted in help_text.stdout
