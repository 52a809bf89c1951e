"""Plot the ``log.txt`` files written by ``main.py --output_dir`` side by side.

One panel for ``test_acc1`` and one for each ``train_*`` loss term; one line per run, in the same colour
on every panel. Each line of a ``log.txt`` is one epoch as JSON::

    python figs/plot_logs.py runs/a/log.txt runs/b/log.txt --out curves.png
    python figs/plot_logs.py runs/a runs/b --labels teacher student --out curves.png
"""
import argparse
import json
import math
from pathlib import Path
from typing import Optional, Sequence, Union

import matplotlib

matplotlib.use('Agg')  # files only: no display is needed (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

PathLike = Union[str, Path]

LOG_NAME = 'log.txt'
ACCURACY_KEY = 'test_acc1'
TRAIN_PREFIX = 'train_'
# Logged by the training loop but not a loss term.
NON_LOSS_KEYS = ('train_lr',)
# The total comes first, then the terms in the order the criterion returns them.
TOTAL_LOSS_KEY = 'train_loss'
MAX_COLUMNS = 4
PANEL_SIZE = (4.0, 3.0)  # inches per panel
DPI = 120


def log_path(path: PathLike) -> Path:
    """``path`` itself, or ``path/log.txt`` when ``path`` is a run's output directory."""
    path = Path(path)
    return path / LOG_NAME if path.is_dir() else path


def read_log(path: PathLike) -> list[dict]:
    """The epochs of one ``log.txt``; a half-written last line (a run still going) is skipped."""
    path = log_path(path)
    if not path.is_file():
        raise FileNotFoundError(f'no such log file: {path}')
    epochs = []
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            epochs.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break
            raise ValueError(f'{path}:{number} is not a JSON line') from None
    return epochs


def loss_keys(logs: Sequence[Sequence[dict]]) -> list[str]:
    """The ``train_*`` loss terms found in any of ``logs``: the total first, then in order of appearance."""
    keys: list[str] = []
    for log in logs:
        for epoch in log:
            for key in epoch:
                if key.startswith(TRAIN_PREFIX) and key not in NON_LOSS_KEYS and key not in keys:
                    keys.append(key)
    if TOTAL_LOSS_KEY in keys:
        keys.remove(TOTAL_LOSS_KEY)
        keys.insert(0, TOTAL_LOSS_KEY)
    return keys


def default_label(path: PathLike) -> str:
    """A run's name: its output directory."""
    path = log_path(path)
    return path.parent.name or str(path)


def plot_logs(
        paths: Sequence[PathLike],
        out: PathLike,
        labels: Optional[Sequence[str]] = None,
        title: Optional[str] = None,
) -> Path:
    """Draw ``test_acc1`` and every ``train_*`` term of the runs in ``paths`` into ``out`` (a PNG); returns it."""
    if not paths:
        raise ValueError('no log files to plot')
    labels = list(labels) if labels is not None else [default_label(p) for p in paths]
    if len(labels) != len(paths):
        raise ValueError(f'{len(labels)} labels for {len(paths)} logs')
    logs = [read_log(p) for p in paths]
    keys = [ACCURACY_KEY] + loss_keys(logs)
    columns = min(MAX_COLUMNS, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, squeeze=False,
                             figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1] * rows))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    for index, key in enumerate(keys):
        ax = axes.flat[index]
        for run, (log, label) in enumerate(zip(logs, labels)):
            points = [(e['epoch'], e[key]) for e in log if key in e and 'epoch' in e]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, marker='.', label=label, color=colours[run % len(colours)])
        ax.set_title(key)
        ax.set_xlabel('epoch')
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel('Acc@1 (%)')
    for ax in axes.flat[len(keys):]:
        ax.axis('off')
    # One legend for the figure: every panel uses the same colour per run.
    handles = [plt.Line2D([], [], color=colours[i % len(colours)], marker='.', label=label)
               for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc='lower center', ncol=min(len(labels), MAX_COLUMNS + 1), frameon=False)
    if title:
        fig.suptitle(title)
    legend_rows = math.ceil(len(labels) / (MAX_COLUMNS + 1))
    fig.tight_layout(rect=(0, 0.06 * legend_rows / rows, 1, 1))
    return save_figure(fig, out, DPI)


def save_figure(fig, out: Union[str, Path], dpi: int) -> Path:
    """Write ``fig`` as a PNG (creating the folder) and free it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('logs', nargs='+', help='log.txt files, or the output directories that hold them')
    parser.add_argument('--out', required=True, help='PNG file to write')
    parser.add_argument('--labels', nargs='+', help='one name per log (default: the run directory names)')
    parser.add_argument('--title', default=None)
    args = parser.parse_args(argv)
    try:
        out = plot_logs(args.logs, args.out, args.labels, args.title)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f'error: {err}\n')
    print(out)


if __name__ == '__main__':
    main()
