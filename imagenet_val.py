"""Sort ImageNet's flat validation folder into class folders (val/<wnid>/*.JPEG), the layout that ImageFolder and
--data-set IMNET read.

    python imagenet_val.py <dataset-dir>/val LOC_val_solution.csv --train <dataset-dir>/train
    python imagenet_val.py flat_val/ val_labels.txt --into <dataset-dir>/val --link

LABELS, one of:
  - Kaggle's LOC_val_solution.csv (ImageNet Object Localization Challenge): the header ImageId,PredictionString,
    then lines "ILSVRC2012_val_00000001,n01751748 <box> [n01751748 <box> ...]": the first word is the class;
  - a text file of "<file name> <wnid>" lines (the extension may be left out).
The devkit's ILSVRC2012_validation_ground_truth.txt numbers the classes by ILSVRC2012_ID, which only the devkit's
meta.mat maps to wnids: with ILSVRC2012_devkit_t12.tar.gz and ILSVRC2012_img_val.tar in ROOT, torchvision's
ImageNet(ROOT, split='val') reads them (meta.mat with scipy) and writes ROOT/val/<wnid>/ itself.

The images move (--link: hard links, --copy: copies) into <into>/<wnid>/; a second run finds nothing to do.
Everything is checked before the first file moves: an image without a label, a label that is not a wnid, or (with
--train) a class that train/ has no folder for ends in one line, exit code 2.
"""
import argparse
import csv
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Iterator, Optional, Sequence

from torchvision.datasets.folder import IMG_EXTENSIONS

from utils import EXIT_USER_ERROR, UserError

KAGGLE_HEADER = ('ImageId', 'PredictionString')
WNID = re.compile(r'n\d{8}')
VERBS = {'move': 'moved', 'link': 'linked', 'copy': 'copied'}
LabelLines = Iterator[tuple[int, str, str]]


def image_key(name: str) -> str:
    """The image a labels entry or a file name stands for: its base name without an image extension."""
    base = os.path.basename(name)
    stem, extension = os.path.splitext(base)
    return stem if extension.lower() in IMG_EXTENSIONS else base


def kaggle_lines(path: Path, lines: list[str]) -> LabelLines:
    for number, row in enumerate(csv.reader(lines[1:]), start=2):
        if not row:
            continue
        words = row[1].split() if len(row) == len(KAGGLE_HEADER) else []
        if not words:
            raise UserError(f'{path}:{number}: expected "ImageId,<wnid> <box> ...", got {",".join(row)!r}')
        yield number, row[0], words[0]


def two_column_lines(path: Path, lines: list[str]) -> LabelLines:
    for number, line in enumerate(lines, start=1):
        words = line.split()
        if not words:
            continue
        if len(words) == 1 and words[0].isdigit():
            raise UserError(f"{path} holds class numbers, not wnids (the devkit's "
                            'ILSVRC2012_validation_ground_truth.txt?): use LOC_val_solution.csv or a '
                            '"<file name> <wnid>" list, see docs/data.md')
        if len(words) != 2:
            raise UserError(f'{path}:{number}: expected "<file name> <wnid>", got {line.strip()!r}')
        yield number, words[0], words[1]


def read_labels(path: Path) -> dict[str, str]:
    """Image (``image_key``) to wnid, from Kaggle's ``LOC_val_solution.csv`` or a ``<file name> <wnid>`` list."""
    try:
        lines = path.read_text(encoding='utf-8-sig').splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f'{path}: cannot read the labels file ({getattr(err, "strerror", None) or err})') from None
    is_kaggle = bool(lines) and tuple(word.strip() for word in lines[0].split(',')) == KAGGLE_HEADER
    labels: dict[str, str] = {}
    for number, name, wnid in (kaggle_lines if is_kaggle else two_column_lines)(path, lines):
        if not WNID.fullmatch(wnid):
            raise UserError(f'{path}:{number}: {wnid!r} is not a WordNet ID (n and 8 digits, e.g. n01440764)')
        key = image_key(name)
        if labels.setdefault(key, wnid) != wnid:
            raise UserError(f'{path}:{number}: {name} is labelled both {labels[key]} and {wnid}')
    if not labels:
        raise UserError(f'{path}: no labels in the file')
    return labels


def flat_images(folder: Path) -> list[Path]:
    """The image files directly in ``folder`` (not in its class folders), as ImageFolder would read them."""
    return sorted(path for path in folder.iterdir()
                  if path.is_file() and not path.name.startswith('.') and path.suffix.lower() in IMG_EXTENSIONS)


def class_folders(train_dir: Path) -> set[str]:
    if not train_dir.is_dir():
        raise UserError(f'--train {train_dir}: no such folder')
    classes = {path.name for path in train_dir.iterdir() if path.is_dir()}
    if not classes:
        raise UserError(f'--train {train_dir}: no class folders in it')
    return classes


def existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def place(source: Path, target: Path, mode: str) -> None:
    """``source`` at ``target``, which appears whole or not at all (a copy is written beside it, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if mode == 'move':
        os.replace(source, target)
    elif mode == 'link':
        os.link(source, target)
    else:
        partial = target.with_name(f'.{target.name}.{os.getpid()}.partial')
        try:
            shutil.copyfile(source, partial)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)


def sort_validation_set(val_dir: Path, labels_path: Path, into: Optional[Path] = None,
                        train_dir: Optional[Path] = None, mode: str = 'move') -> str:
    """Place every flat image of ``val_dir`` in ``into/<wnid>/`` (``into`` defaults to ``val_dir``) by ``mode``
    (move, link or copy), after checking all of them; returns what was done, in one line."""
    into = into or val_dir
    if not val_dir.is_dir():
        raise UserError(f'{val_dir}: no such folder')
    labels = read_labels(labels_path)
    images = flat_images(val_dir)
    unlabelled = [image for image in images if image_key(image.name) not in labels]
    if unlabelled:
        raise UserError(f'{labels_path} has no label for {len(unlabelled)} of the {len(images)} images in {val_dir} '
                        f'(first: {unlabelled[0].name}): is it the validation set\'s labels file?')
    wnids = {image: labels[image_key(image.name)] for image in images}
    known = class_folders(train_dir) if train_dir is not None else None
    if known is not None:
        unknown = sorted(set(wnids.values()) - known)
        if unknown:
            first = next(image for image, wnid in wnids.items() if wnid == unknown[0])
            raise UserError(f'--train {train_dir} has no folder for {len(unknown)} of the classes in {labels_path} '
                            f'(first: {unknown[0]}, the label of {first.name})')
    targets = {image: into / wnid / image.name for image, wnid in wnids.items()}
    to_place = {image: target for image, target in targets.items() if not target.exists()}
    if mode == 'move' and len(to_place) < len(targets):
        image = next(image for image in targets if image not in to_place)
        raise UserError(f'{targets[image]} already exists and {image} would replace it: remove one of them')
    if mode in ('move', 'link') and to_place and os.stat(val_dir).st_dev != os.stat(existing_ancestor(into)).st_dev:
        raise UserError(f'--into {into} is on another file system than {val_dir}: --copy copies the images there')
    done = 0
    try:
        for image, target in to_place.items():
            place(image, target, mode)
            done += 1
    except OSError as err:
        raise UserError(f'{err.filename or image}: {err.strerror}; {VERBS[mode]} {done} of {len(to_place)} '
                        'images, a second run goes on from there') from None
    if not to_place:
        in_folders = sum(1 for path in into.glob('*/*') if path.suffix.lower() in IMG_EXTENSIONS)
        return f'nothing to do: {into} holds {in_folders} images in class folders and none to place'
    classes_placed = len({wnids[image] for image in to_place})
    done_line = f'{VERBS[mode]} {len(to_place)} images into {classes_placed} class folders of {into}'
    if len(to_place) < len(targets):
        done_line += f' ({len(targets) - len(to_place)} were there already)'
    sorted_classes = {path.name for path in into.iterdir() if path.is_dir()}
    if known is not None and sorted_classes != known:
        # Each split's labels are the indices of its own sorted class folders (ImageFolder).
        done_line += (f'; note: {into} has {len(sorted_classes)} of the {len(known)} classes of {train_dir}, and '
                      '--data-set IMNET numbers the sorted class folders of each split: give both the same classes')
    return done_line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('val_dir', type=Path, metavar='VAL_DIR', help='the folder of the flat validation images')
    parser.add_argument('labels', type=Path, metavar='LABELS', help='the labels file (see above)')
    parser.add_argument('--train', type=Path, default=None, metavar='TRAIN_DIR',
                        help='the train/ folder: every label must be one of its class folders')
    parser.add_argument('--into', type=Path, default=None, metavar='DIR',
                        help='where the class folders go (default: VAL_DIR itself)')
    how = parser.add_mutually_exclusive_group()
    how.add_argument('--link', dest='mode', action='store_const', const='link',
                     help='hard-link the images instead of moving them (same file system)')
    how.add_argument('--copy', dest='mode', action='store_const', const='copy',
                     help='copy the images instead of moving them')
    parser.set_defaults(mode='move')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        print(sort_validation_set(args.val_dir, args.labels, args.into, args.train, args.mode))
    except UserError as err:
        sys.stderr.write(f'error: {err}\n')
        return EXIT_USER_ERROR
    return 0


if __name__ == '__main__':
    sys.exit(main())
