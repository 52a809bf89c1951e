"""figs/quickstart.py, in its --smoke budget (two seeds): every run goes through main.py, each seed's four students
in one run (the other methods the soft-KD command's variants), and the report gives each method's mean and spread
over the seeds."""
import re
import sys

import pytest

from helpers import run

PNG_MAGIC = b'\x89PNG'
METHODS = ('teacher (from scratch)', 'no teacher', 'soft KD', 'Manifold', '[CLS]-KD + Manifold')
ROW = re.compile(r'^\| (?P<method>[^|]+) \| [^|]+ \| [^|]+ \| (?P<epochs>\d+) \| (?P<seeds>\d+) '
                 r'\| (?P<mean>\d+\.\d) ± (?P<std>\d+\.\d) \| (?P<per_seed>[\d. /]+) \| (?P<best>\d+\.\d) \|$',
                 re.M)
SMOKE_SEEDS = 2
SMOKE_SECONDS = 300  # generous: the smoke budget takes about a minute on 2 cores


def test_smoke_quickstart_writes_table_and_figures(tmp_path):
    out = tmp_path / 'quickstart'
    command = [sys.executable, 'figs/quickstart.py', '--out', str(out), '--smoke']
    result = run(command, SMOKE_SECONDS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = list(ROW.finditer((out / 'results.md').read_text()))
    assert [row['method'] for row in rows] == list(METHODS)
    for row in rows:
        assert int(row['epochs']) == 1
        seeds = 1 if row['method'].startswith('teacher') else SMOKE_SEEDS
        finals = [float(value) for value in row['per_seed'].split(' / ')]
        assert int(row['seeds']) == len(finals) == seeds
        assert float(row['mean']) == pytest.approx(sum(finals) / seeds, abs=0.051)
        assert 0.0 <= float(row['mean']) <= float(row['best']) <= 100.0
    for figure in ('accuracy.png', 'losses.png'):
        assert (out / figure).read_bytes().startswith(PNG_MAGIC)
        assert str(out / figure) in result.stdout
    # The students learn from the teacher's own checkpoint, through the real command line: one run per seed, at the
    # papers' weights, the other methods its variants.
    commands = (out / 'commands.sh').read_text().splitlines()
    assert len(commands) == 1 + SMOKE_SEEDS
    students = commands[1:]
    assert all(f'--teacher-path {out / "teacher" / "checkpoint.pth"}' in c for c in students)
    assert all('--distillation-type soft --distillation-alpha 1 --distillation-beta 1' in c for c in students)
    assert all(c.count('--variant') == 3 and "'no_teacher: --distillation-type none'" in c for c in students)
    assert sorted({c.split('--seed ')[1].split()[0] for c in commands}) == ['0', '1']
    for seed in range(SMOKE_SEEDS):
        assert sorted(p.name for p in (out / f'seed{seed}').iterdir() if p.is_dir()) == [
            'base', 'clskd_manifold', 'manifold', 'no_teacher']
    # Every image has at least 16 patches, so that each term has something to match.
    assert all('--input-size 64' in c for c in commands)
    # DeiT-style progress with an ETA and every [CLS]-KD loss term is shown while training.
    assert re.search(r'^\[seed0\] Epoch: \[0\] +\[0/\d+\] +eta: .*clskd_manifold/mf_patch: .*clskd_manifold/cls: '
                     r'.*clskd_manifold/atn: ', result.stdout, re.M)

    # A second call with the same settings reuses the finished runs.
    again = run(command, SMOKE_SECONDS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count('finished earlier') == len(commands)
    changed = run(command + ['--epochs', '2'], SMOKE_SECONDS)
    assert changed.returncode == 1 and 'other settings (epochs)' in changed.stderr
