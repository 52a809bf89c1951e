""".ci/gpu-check's control flow on the CPU: its stages replaced by a stub ``python3`` first on PATH that passes,
fails, hangs ignoring SIGINT, or leaves a process behind, as told. Every stage ends within its limit (plus the kill
grace) and leaves no process behind, the summary says how each ended, the exit code is 0 only when every required
stage passed, and the install stage runs only when asked (or where torch cannot be imported)."""
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
from torch.distributed.launcher.api import LaunchConfig

from helpers import REPO, SCRIPT_TIMEOUT_S, process_alive, run

GPU_CHECK = REPO / '.ci' / 'gpu-check'
LIMIT_S = 2
KILL_AFTER_S = 1
# A stand-in for python3: each stage's invocation behaves as STUB_<STAGE> says (pass, fail, slow: sleep, hang:
# ignore SIGINT and sleep, orphan: start a process in a session of its own, as torchrun starts its workers, write its
# id to STUB_ORPHAN_PID and hang). STUB_TORCH=fail makes torch impossible to import. The version print reads its
# script from stdin.
STUB = r'''#!/usr/bin/env bash
behave() {
    case "${1:-pass}" in
        pass) exit 0 ;;
        fail) exit 1 ;;
        slow) sleep 60 ;;
        hang) trap '' INT; sleep 60 ;;
        orphan) setsid sleep 60 & echo $! > "$STUB_ORPHAN_PID"; trap '' INT; sleep 60 ;;
    esac
}
case "$1 $2" in
    "-m pip"*) echo "pip install ran"; behave "$STUB_INSTALL" ;;
    "- "*) cat > /dev/null; echo "python stub" ;;
    "-c import pytest") exit 0 ;;
    "-c import torch") behave "$STUB_TORCH" ;;
    "-c"*) behave "$STUB_TRITON" ;;
    "-m pytest"*) behave "$STUB_TESTS" ;;
    "shapes.py"*) exit 0 ;;
    "benchmark.py"*) behave "$STUB_BENCHMARK" ;;
esac
exit 3
'''


@pytest.fixture
def stub_path(tmp_path):
    (tmp_path / 'python3').write_text(STUB)
    (tmp_path / 'python3').chmod(0o755)
    return str(tmp_path)


def gpu_check(stub_path: str, *stages: str, kill_after: bool = True,
              **behaviour: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run .ci/gpu-check with the stub; ``kill_after=False`` leaves the kill grace at the script's default."""
    env = {**os.environ, 'PATH': f'{stub_path}:{os.environ["PATH"]}',
           'STUB_ORPHAN_PID': str(Path(stub_path) / 'orphan.pid'),
           **{f'GPU_CHECK_{stage}_LIMIT_S': str(LIMIT_S) for stage in ('INSTALL', 'TRITON', 'TESTS', 'BENCHMARK')},
           **{f'STUB_{stage.upper()}': value for stage, value in behaviour.items()}}
    env.pop('GPU_CHECK_KILL_AFTER_S', None)
    if kill_after:
        env['GPU_CHECK_KILL_AFTER_S'] = str(KILL_AFTER_S)
    started = time.monotonic()
    result = run([str(GPU_CHECK), *stages], SCRIPT_TIMEOUT_S, env)
    return result, time.monotonic() - started


def summary(result: subprocess.CompletedProcess) -> list[str]:
    return result.stdout.split('== gpu-check summary\n', 1)[1].splitlines()


def test_every_stage_passes_and_torch_is_left_as_it_is(stub_path):
    """By default torch is not reinstalled where it can be imported: a reinstall stopped at its limit could leave a
    half-installed torch behind. The versions are printed all the same."""
    result, _ = gpu_check(stub_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result) == ['install: skipped (torch is installed; .ci/gpu-check install runs pip install -r '
                               'requirements.txt)', 'triton: passed', 'tests: passed', 'benchmark: passed']
    assert 'pip install ran' not in result.stdout and 'python stub' in result.stdout


def test_the_install_runs_when_asked_or_where_torch_cannot_be_imported(stub_path):
    asked, _ = gpu_check(stub_path, 'install')
    assert summary(asked) == ['install: passed'] and 'pip install ran' in asked.stdout
    # The versions are printed after the install, so that they are those the other stages use.
    assert asked.stdout.index('pip install ran') < asked.stdout.index('python stub')
    without_torch, _ = gpu_check(stub_path, torch='fail')
    assert summary(without_torch) == ['install: passed', 'triton: passed', 'tests: passed', 'benchmark: passed']


def test_an_offline_install_is_advisory(stub_path):
    result, _ = gpu_check(stub_path, 'install', 'triton', install='fail')
    assert result.returncode == 0
    assert summary(result) == ['install: failed (exit 1)', 'triton: passed']
    assert 'going on with what is installed' in result.stdout


@pytest.mark.parametrize('stage', ['triton', 'tests', 'benchmark'])
def test_a_failed_stage_fails_the_check_and_the_others_still_run(stub_path, stage):
    result, _ = gpu_check(stub_path, 'triton', 'tests', 'benchmark', **{stage: 'fail'})
    assert result.returncode == 1
    lines = summary(result)
    assert f'{stage}: failed (exit 1)' in lines and len(lines) == 3
    assert sum(line.endswith(': passed') for line in lines) == 2


def test_a_stage_past_its_limit_is_stopped(stub_path):
    result, elapsed = gpu_check(stub_path, 'tests', tests='slow')
    assert result.returncode == 1
    assert summary(result) == [f'tests: stopped at its limit of {LIMIT_S} s']
    assert elapsed < LIMIT_S + KILL_AFTER_S + 5


def test_a_stage_that_ignores_sigint_is_killed(stub_path):
    result, elapsed = gpu_check(stub_path, 'triton', 'benchmark', benchmark='hang')
    assert result.returncode == 1
    assert summary(result) == ['triton: passed',
                               f'benchmark: killed {KILL_AFTER_S} s after its limit of {LIMIT_S} s (it ignored SIGINT)']
    assert elapsed < LIMIT_S + KILL_AFTER_S + 5


def test_an_unknown_stage_is_one_line(stub_path):
    result, _ = gpu_check(stub_path, 'benchmarks')
    assert result.returncode == 2
    assert result.stdout.strip() == "gpu-check: unknown stage 'benchmarks' (stages: install triton tests benchmark)"


def test_a_stage_leaves_no_process_behind(stub_path):
    """A process the stage started in a session of its own (as torchrun starts each worker) outlives timeout's
    SIGINT and SIGKILL, which reach the stage's process group only: it is found by the stage's mark and killed."""
    result, elapsed = gpu_check(stub_path, 'tests', tests='orphan')
    orphan = int((Path(stub_path) / 'orphan.pid').read_text())
    assert summary(result) == [f'tests: killed {KILL_AFTER_S} s after its limit of {LIMIT_S} s (it ignored SIGINT); '
                               '1 process(es) it left running killed']
    assert not process_alive(orphan)
    assert elapsed < LIMIT_S + KILL_AFTER_S + 5


def test_the_kill_grace_outlasts_torchruns_own(stub_path):
    """A stage ignoring SIGINT is killed only after torchrun (which got the SIGINT too) has had its time to stop its
    workers: SIGTERM, then SIGKILL after its shutdown timeout."""
    result, _ = gpu_check(stub_path, 'triton', kill_after=False)
    grace = int(re.search(r'^== triton \(at most \d+ s, killed (\d+) s later if it ignores SIGINT\)$', result.stdout,
                          re.M)[1])
    torchrun_grace = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout
    assert grace > torchrun_grace
