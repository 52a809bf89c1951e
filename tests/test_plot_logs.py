"""figs/plot_logs.py draws log.txt files of several runs side by side."""
import json
import sys

import pytest

from helpers import REPO, SCRIPT_TIMEOUT_S, run

sys.path.insert(0, str(REPO / 'figs'))

import plot_logs  # noqa: E402

PNG_MAGIC = b'\x89PNG'


def write_log(run_dir, terms, epochs=3):
    """A synthetic ``log.txt`` as main.py writes it: one JSON line per epoch."""
    run_dir.mkdir(parents=True)
    with (run_dir / 'log.txt').open('w') as f:
        for epoch in range(epochs):
            stats = {f'train_{k}': 1.0 / (epoch + 1 + i) for i, k in enumerate(terms)}
            stats.update(train_lr=1e-3, test_acc1=10.0 * (epoch + 1), test_loss=2.0, epoch=epoch, n_parameters=1)
            f.write(json.dumps(stats) + '\n')
    return run_dir / 'log.txt'


def test_loss_keys_put_the_total_first_and_skip_the_lr(tmp_path):
    a = plot_logs.read_log(write_log(tmp_path / 'a', ['base', 'loss']))
    b = plot_logs.read_log(write_log(tmp_path / 'b', ['base', 'kd', 'mf_patch', 'loss']))
    assert plot_logs.loss_keys([a, b]) == ['train_loss', 'train_base', 'train_kd', 'train_mf_patch']


def test_cli_plots_logs_and_run_directories(tmp_path):
    first = write_log(tmp_path / 'no_teacher', ['base', 'loss'])
    second = write_log(tmp_path / 'clskd', ['base', 'kd', 'cls', 'atn', 'loss'], epochs=5)
    out = tmp_path / 'figs' / 'curves.png'
    result = run([sys.executable, 'figs/plot_logs.py', str(first), str(second.parent), '--out', str(out)],
                 SCRIPT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes().startswith(PNG_MAGIC)
    assert result.stdout.strip() == str(out)


def test_half_written_last_line_is_skipped(tmp_path):
    log = write_log(tmp_path / 'running', ['base', 'loss'])
    with log.open('a') as f:
        f.write('{"train_loss": 0.')
    assert len(plot_logs.read_log(log)) == 3


def test_bad_input_is_one_line(tmp_path):
    result = run([sys.executable, 'figs/plot_logs.py', str(tmp_path / 'missing.txt'), '--out', str(tmp_path / 'x.png')],
                 SCRIPT_TIMEOUT_S)
    assert result.returncode == 2
    assert result.stderr.strip() == f'error: no such log file: {tmp_path / "missing.txt"}'


def test_labels_must_match_the_logs(tmp_path):
    log = write_log(tmp_path / 'a', ['loss'])
    with pytest.raises(ValueError, match='2 labels for 1 logs'):
        plot_logs.plot_logs([log], tmp_path / 'x.png', labels=['a', 'b'])
