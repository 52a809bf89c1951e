"""Tests for utils.py: metric logging, distributed setup, the CPU allocator setting."""
import builtins
import os
import pathlib
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist

import engine
import utils
from helpers import SCRIPT_TIMEOUT_S, run
from launch import LaunchEnvironment
from utils import MetricLogger, SmoothedValue, format_seconds


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ logging

def test_smoothed_value_math():
    v = SmoothedValue(window_size=3)
    for x in (1.0, 2.0, 3.0, 4.0):
        v.update(x)
    assert list(v.deque) == [2.0, 3.0, 4.0]
    assert v.median == pytest.approx(3.0)
    assert v.avg == pytest.approx(3.0)
    assert v.global_avg == pytest.approx(2.5)
    assert v.max == 4.0
    assert v.value == 4.0
    v.update(10.0, n=4)
    assert v.count == 8
    assert v.global_avg == pytest.approx((1 + 2 + 3 + 4 + 40) / 8)
    assert str(v) == f'{v.median:.4f} ({v.global_avg:.4f})'


def test_smoothed_value_empty_does_not_crash():
    v = SmoothedValue()
    assert 'nan' in str(v)
    v.synchronize_between_processes()  # no-op when not distributed


def test_metric_logger_update_and_getattr():
    logger = MetricLogger(delimiter='  ')
    logger.update(loss=torch.tensor(2.0), acc=1, lr=np.float32(0.5))
    logger.update(loss=4.0, acc=3)
    assert logger.loss.global_avg == pytest.approx(3.0)
    assert logger.acc.avg == pytest.approx(2.0)
    assert logger.lr.value == pytest.approx(0.5)
    assert 'loss: ' in str(logger) and '  ' in str(logger)
    with pytest.raises(AttributeError):
        logger.missing_meter
    with pytest.raises(ValueError):
        logger.update(loss=torch.ones(2))
    with pytest.raises(TypeError):
        logger.update(loss='high')


@pytest.mark.parametrize('n, freq, expected', [(5, 2, [0, 2, 4]), (6, 4, [0, 4, 5]), (1, 10, [0])])
def test_log_every_prints_progress_and_total(capsys, n, freq, expected):
    logger = MetricLogger(delimiter='  ')
    logger.add_meter('lr', SmoothedValue(window_size=1, fmt='{value:.6f}'))
    seen = []
    for i in logger.log_every(range(n), freq, header='Epoch: [0]'):
        logger.update(lr=0.001, loss=float(i))
        seen.append(i)
    assert seen == list(range(n))
    lines = capsys.readouterr().out.strip().splitlines()
    progress, total = lines[:-1], lines[-1]
    width = len(str(n))
    assert [ln.split(']  ')[1].split('/')[0].strip('[ ') for ln in progress] == [str(i) for i in expected]
    for i, line in zip(expected, progress):
        assert line.startswith(f'Epoch: [0]  [{i:>{width}}/{n}]  eta: ')
        assert 'lr: 0.001000' in line and 'loss: ' in line and 'time: ' in line and 'data: ' in line
    assert progress[-1].split('eta: ')[1].startswith('0:00:00')
    assert total.startswith('Epoch: [0] Total time: 0:00:0') and total.endswith(' s / it)')


def test_log_every_without_len(capsys):
    logger = MetricLogger()
    assert list(logger.log_every((i for i in range(3)), 1, header='Test:')) == [0, 1, 2]
    out = capsys.readouterr().out
    assert 'Test:\t[2]' in out and 'Test: Total time:' in out


def test_format_seconds():
    assert format_seconds(0) == '0:00:00'
    assert format_seconds(62.9) == '0:01:02'
    assert format_seconds(3 * 3600 + 5) == '3:00:05'
    assert format_seconds(30 * 3600) == '30:00:00'


# ------------------------------------------------------------------ distributed

def test_init_distributed_mode_without_launcher(capsys):
    utils.init_distributed_mode(LaunchEnvironment(), torch.device('cpu'), 'env://', 1)
    assert 'Not using distributed mode' in capsys.readouterr().out
    assert utils.get_world_size() == 1 and utils.is_main_process()
    assert engine.step_values_over_processes([torch.tensor(2.0), torch.tensor(4.0)], True) == [2.0, 4.0, 1.0]


def test_init_distributed_mode_joins_a_gloo_group(monkeypatch):
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(_free_port()))
    # init_distributed_mode replaces builtins.print on the workers; monkeypatch puts the original back.
    monkeypatch.setattr(builtins, 'print', builtins.print)
    try:
        utils.init_distributed_mode(LaunchEnvironment(0, 1, 0, 'torchrun'), torch.device('cpu'), 'env://', 1)
        assert utils.is_dist_avail_and_initialized() and dist.get_backend() == 'gloo'
        assert utils.get_world_size() == 1
        assert engine.step_values_over_processes([torch.tensor(3.0)], False) == [3.0, 0.0]
        meter = SmoothedValue()
        meter.update(2.0, n=3)
        meter.synchronize_between_processes()
        assert (meter.count, meter.total) == (3, 6.0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


FAULT_PROBE = '''
import resource, sys, torch
sys.path.insert(0, {repo!r})
import utils
if {retain}:
    assert utils.retain_freed_memory()
FLOATS = {mib} << 18  # {mib} MiB of float32, far above glibc's largest mmap threshold (32 MiB)
for _ in range({warmup}):  # glibc's aligned blocks take a few rounds to coalesce into a reusable one
    torch.ones(FLOATS)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range({repeats}):
    torch.ones(FLOATS)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_retain_freed_memory_reuses_pages_of_freed_tensors():
    """Once warm, a freed large tensor's pages serve the next one: no page faults, where glibc maps each afresh."""
    repo, mib, warmup, repeats = str(pathlib.Path(__file__).resolve().parents[1]), 64, 16, 4
    pages_per_tensor = (mib << 20) // os.sysconf('SC_PAGE_SIZE')

    def faults(retain: bool) -> int:
        code = FAULT_PROBE.format(repo=repo, retain=retain, mib=mib, warmup=warmup, repeats=repeats)
        probe = run([sys.executable, '-c', code], SCRIPT_TIMEOUT_S)
        assert probe.returncode == 0, probe.stderr[-3000:]
        return int(probe.stdout)

    assert faults(retain=False) >= repeats * pages_per_tensor // 2  # the default maps every tensor afresh
    assert faults(retain=True) < pages_per_tensor // 10


def _step_values_on_rank(rank: int, init_file: str, results) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        # Rank 0 has terms (1, 10) and no stop request; rank 1 (3, 30) and a stop request.
        terms = [torch.tensor(1.0 + 2 * rank), torch.tensor(10.0 + 20 * rank)]
        results[rank] = engine.step_values_over_processes(terms, stop_requested=rank == 1)
    finally:
        dist.destroy_process_group()


def test_step_values_are_means_over_processes_with_the_stop_requests(tmp_path):
    """One all-reduce per step: every process gets each term's mean over processes and the number of processes asked
    to stop, so all stop at the same step."""
    results = torch.multiprocessing.Manager().dict()
    torch.multiprocessing.spawn(_step_values_on_rank, args=(str(tmp_path / 'init'), results), nprocs=2)
    assert dict(results) == {0: [2.0, 20.0, 1.0], 1: [2.0, 20.0, 1.0]}
