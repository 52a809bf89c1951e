"""figs/quickstart.py, in its --smoke budget: every run goes through main.py and the report is written."""
import re
import subprocess
import sys

from helpers import REPO

PNG_MAGIC = b'\x89PNG'
METHODS = ('teacher (from scratch)', 'no teacher', 'DeiT soft KD', 'Manifold', '[CLS]-KD + Manifold')
ROW = re.compile(r'^\| (?P<method>[^|]+) \| [^|]+ \| [^|]+ \| (?P<epochs>\d+) \| (?P<final>\d+\.\d) '
                 r'\| (?P<best>\d+\.\d) \| (?P<seconds>\d+) s \|$', re.M)
SMOKE_SECONDS = 300  # generous: the smoke budget takes about a minute on 2 cores


def test_smoke_quickstart_writes_table_and_figures(tmp_path):
    out = tmp_path / 'quickstart'
    command = [sys.executable, 'figs/quickstart.py', '--out', str(out), '--smoke']
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_SECONDS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    rows = list(ROW.finditer((out / 'results.md').read_text()))
    assert [row['method'] for row in rows] == list(METHODS)
    for row in rows:
        assert int(row['epochs']) == 1
        assert 0.0 <= float(row['final']) <= float(row['best']) <= 100.0
    for figure in ('accuracy.png', 'losses.png'):
        assert (out / figure).read_bytes().startswith(PNG_MAGIC)
        assert str(out / figure) in result.stdout
    # The students learn from the teacher's own checkpoint, through the real command line.
    commands = (out / 'commands.sh').read_text().splitlines()
    assert len(commands) == len(METHODS)
    assert all(f'--teacher-path {out / "teacher" / "checkpoint.pth"}' in c for c in commands[2:])
    # DeiT-style progress with an ETA and every [CLS]-KD loss term is shown while training.
    assert re.search(r'^\[clskd_manifold\] Epoch: \[0\] +\[0/\d+\] +eta: .*mf_patch: .*cls: .*atn: ', result.stdout,
                     re.M)

    # A second call with the same settings reuses the finished runs.
    again = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_SECONDS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count('finished earlier') == len(METHODS)
    changed = subprocess.run(command + ['--epochs', '2'], cwd=REPO, capture_output=True, text=True,
                             timeout=SMOKE_SECONDS)
    assert changed.returncode == 1 and 'other settings (epochs)' in changed.stderr
