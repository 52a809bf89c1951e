""".ci/gpu-check's control flow on the CPU: its stages replaced by a stub ``python3`` first on PATH that passes,
fails, or hangs ignoring SIGINT as told. Every stage ends within its limit (plus the kill grace), the summary says
how each ended, and the exit code is 0 only when every required stage passed."""
import os
import subprocess
import time

import pytest

from helpers import REPO

GPU_CHECK = REPO / '.ci' / 'gpu-check'
LIMIT_S = 2
KILL_AFTER_S = 1
# A stand-in for python3: each stage's invocation behaves as STUB_<STAGE> says (pass, fail, or hang: ignore SIGINT
# and sleep). The version print reads its script from stdin.
STUB = r'''#!/usr/bin/env bash
behave() {
    case "${1:-pass}" in
        pass) exit 0 ;;
        fail) exit 1 ;;
        slow) sleep 60 ;;
        hang) trap '' INT; sleep 60 ;;
    esac
}
case "$1 $2" in
    "-m pip"*) behave "$STUB_INSTALL" ;;
    "- "*) cat > /dev/null; echo "python stub" ;;
    "-c import pytest") exit 0 ;;
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


def gpu_check(stub_path: str, *stages: str, **behaviour: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, 'PATH': f'{stub_path}:{os.environ["PATH"]}', 'GPU_CHECK_KILL_AFTER_S': str(KILL_AFTER_S),
           **{f'GPU_CHECK_{stage}_LIMIT_S': str(LIMIT_S) for stage in ('INSTALL', 'TRITON', 'TESTS', 'BENCHMARK')},
           **{f'STUB_{stage.upper()}': value for stage, value in behaviour.items()}}
    started = time.monotonic()
    result = subprocess.run([str(GPU_CHECK), *stages], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    return result, time.monotonic() - started


def summary(result: subprocess.CompletedProcess) -> list[str]:
    return result.stdout.split('== gpu-check summary\n', 1)[1].splitlines()


def test_every_stage_passes(stub_path):
    result, _ = gpu_check(stub_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result) == ['install: passed', 'triton: passed', 'tests: passed', 'benchmark: passed']
    assert 'python stub' in result.stdout  # the versions are printed after the install


def test_an_offline_install_is_advisory(stub_path):
    result, _ = gpu_check(stub_path, install='fail')
    assert result.returncode == 0
    assert summary(result)[0] == 'install: failed (exit 1)' and 'going on with what is installed' in result.stdout


@pytest.mark.parametrize('stage', ['triton', 'tests', 'benchmark'])
def test_a_failed_stage_fails_the_check_and_the_others_still_run(stub_path, stage):
    result, _ = gpu_check(stub_path, **{stage: 'fail'})
    assert result.returncode == 1
    lines = summary(result)
    assert f'{stage}: failed (exit 1)' in lines and len(lines) == 4
    assert sum(line.endswith(': passed') for line in lines) == 3


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
