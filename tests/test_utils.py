"""Tests for utils.py: metric logging, checkpoint I/O safety, distributed setup helpers."""
import argparse
import builtins
import os
import pathlib
import pickle
import socket
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
import torch.distributed as dist

# Allow running as `pytest tests/test_utils.py` as well as `python -m pytest` from the repo root.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import utils  # noqa: E402
from utils import (  # noqa: E402
    MetricLogger, SmoothedValue, UserError, format_seconds, load_checkpoint, parse_slurm_nodelist,
    save_checkpoint, slurm_master_port, strip_prefix, unwrap_model,
)

DIST_ENV_VARS = (
    'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT',
    'SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_LOCALID', 'SLURM_JOB_ID',
    'SLURM_NODELIST', 'SLURM_JOB_NODELIST', 'SLURM_LAUNCH_NODE_IPADDR',
)


@pytest.fixture
def clean_env(monkeypatch):
    """Strip launcher env vars; restore os.environ afterwards (utils writes to it directly)."""
    saved = dict(os.environ)
    for name in DIST_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    # init_distributed_mode replaces builtins.print; monkeypatch puts the original back.
    monkeypatch.setattr(builtins, 'print', builtins.print)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _create_marker(path: str) -> None:
    pathlib.Path(path).write_text('payload ran')


class _MaliciousFunction:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return _create_marker, (self.marker,)


class _MaliciousSystem:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


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


# ------------------------------------------------------------------ checkpoints

def _deit_state() -> dict:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    args = argparse.Namespace(
        model='deit_tiny_patch16_224', lr=5e-4, output_dir=pathlib.Path('/tmp/out'),
        smoothing=np.float64(0.1), seed=np.int64(0), dtype=np.dtype('float32'))
    return {'model': model.state_dict(), 'optimizer': opt.state_dict(), 'epoch': 7, 'args': args}


def test_save_and_load_roundtrip_deit_layout(tmp_path):
    state = _deit_state()
    path = tmp_path / 'checkpoint.pth'
    torch.save(state, path)  # plain torch.save, as the original DeiT scripts do
    loaded = load_checkpoint(str(path))
    assert loaded['epoch'] == 7
    assert loaded['args'] == state['args']
    assert isinstance(loaded['args'].output_dir, pathlib.PurePath)
    for k, v in state['model'].items():
        assert torch.equal(loaded['model'][k], v)
    assert loaded['optimizer']['param_groups'][0]['lr'] == pytest.approx(1e-3)

    atomic_path = tmp_path / 'atomic.pth'
    save_checkpoint(state, atomic_path)
    assert load_checkpoint(str(atomic_path))['epoch'] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ['atomic.pth', 'checkpoint.pth']


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    save_checkpoint({'epoch': 1, 'w': torch.arange(5)}, path)
    good_bytes = path.read_bytes()

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b'PK\x03\x04 half a zip')
        raise RuntimeError('disk full')

    monkeypatch.setattr(torch, 'save', crashing_save)
    with pytest.raises(RuntimeError, match='disk full'):
        save_checkpoint({'epoch': 2, 'w': torch.zeros(5)}, path)
    monkeypatch.undo()

    assert path.read_bytes() == good_bytes
    loaded = load_checkpoint(str(path))
    assert loaded['epoch'] == 1 and torch.equal(loaded['w'], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pth']


def test_load_checkpoint_strips_module_prefix(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    ddp_style = {f'module.{k}': v for k, v in model.state_dict().items()}
    path = tmp_path / 'ddp.pth'
    torch.save({'model': ddp_style}, path)
    state = strip_prefix(load_checkpoint(str(path))['model'])
    assert set(state) == {'0.weight', '0.bias'}
    torch.nn.Sequential(torch.nn.Linear(2, 2)).load_state_dict(state)
    assert strip_prefix({'a': 1, 'module.b': 2}) == {'a': 1, 'b': 2}
    with pytest.raises(ValueError):
        strip_prefix({'module.a': 1, 'a': 2})


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / 'nope.pth'
    with pytest.raises(UserError, match='checkpoint not found') as exc:
        load_checkpoint(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize('payload', [os.urandom(4096), b'hello, this is text\n', b''])
def test_load_checkpoint_garbage(tmp_path, payload):
    path = tmp_path / 'garbage.pth'
    path.write_bytes(payload)
    with pytest.raises(UserError) as exc:
        load_checkpoint(str(path))
    msg = str(exc.value)
    assert msg.startswith(f'{path} is not a PyTorch checkpoint: ')
    assert '\n' not in msg and 'Traceback' not in msg


def test_load_checkpoint_truncated(tmp_path):
    path = tmp_path / 'trunc.pth'
    torch.save({'w': torch.randn(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(UserError, match='is not a PyTorch checkpoint'):
        load_checkpoint(str(path))


def test_load_checkpoint_not_a_dict(tmp_path):
    path = tmp_path / 'list.pth'
    torch.save([torch.zeros(1)], path)
    with pytest.raises(UserError, match='expected a dict'):
        load_checkpoint(str(path))


@pytest.mark.parametrize('payload_cls', [_MaliciousFunction, _MaliciousSystem])
@pytest.mark.parametrize('zip_format', [True, False])
def test_load_checkpoint_refuses_code_execution(tmp_path, payload_cls, zip_format):
    marker = tmp_path / 'pwned'
    path = tmp_path / 'evil.pth'
    with open(path, 'wb') as f:
        torch.save({'model': {}, 'payload': payload_cls(str(marker))}, f,
                   _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UserError) as exc:
        load_checkpoint(str(path))
    msg = str(exc.value)
    assert msg.startswith(f'{path} was refused: it would run code when loaded (')
    assert '\n' not in msg
    assert not marker.exists()


def test_malicious_payload_is_live(tmp_path):
    """Guard for the test above: a plain unpickler really does run the payload."""
    marker = tmp_path / 'pwned'
    pickle.loads(pickle.dumps(_MaliciousFunction(str(marker))))
    assert marker.exists()


def test_load_checkpoint_url_uses_weights_only(monkeypatch):
    calls = {}

    def fake_download(url, map_location=None, check_hash=True, weights_only=False, **kwargs):
        calls.update(url=url, map_location=map_location, check_hash=check_hash, weights_only=weights_only)
        return {'model': {}}

    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', fake_download)
    url = 'https://example.invalid/deit_tiny.pth'
    assert load_checkpoint(url) == {'model': {}}
    assert calls == {'url': url, 'map_location': 'cpu', 'check_hash': False, 'weights_only': True}

    def offline(*args, **kwargs):
        raise urllib.error.URLError('no network')

    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(UserError, match='cannot download checkpoint https://example.invalid'):
        load_checkpoint(url)


def test_save_on_master_writes_when_not_distributed(tmp_path):
    path = tmp_path / 'ckpt.pth'
    utils.save_on_master({'epoch': 3}, path)
    assert load_checkpoint(str(path)) == {'epoch': 3}


# ------------------------------------------------------------------ models

def test_unwrap_model():
    class FakeDDP(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    inner = torch.nn.Linear(2, 2)
    compiled = torch.compile(inner)
    assert compiled is not inner and compiled._orig_mod is inner
    assert unwrap_model(compiled) is inner
    assert unwrap_model(FakeDDP(inner)) is inner
    assert unwrap_model(FakeDDP(compiled)) is inner
    assert unwrap_model(inner) is inner


def test_seed_everything_is_reproducible():
    utils.seed_everything(123)
    first = (torch.rand(3), np.random.rand(3), __import__('random').random())
    utils.seed_everything(123)
    second = (torch.rand(3), np.random.rand(3), __import__('random').random())
    assert torch.equal(first[0], second[0])
    assert np.array_equal(first[1], second[1]) and first[2] == second[2]


# ------------------------------------------------------------------ distributed

@pytest.mark.parametrize('nodelist, hosts', [
    ('node01', ['node01']),
    ('node[01-03,07],gpu5', ['node01', 'node02', 'node03', 'node07', 'gpu5']),
    ('gpu5,node[8-10]', ['gpu5', 'node8', 'node9', 'node10']),
    ('a[1,3],b[001-002]', ['a1', 'a3', 'b001', 'b002']),
    ('rack[1-2]-n[1-2]', ['rack1-n1', 'rack1-n2', 'rack2-n1', 'rack2-n2']),
    ('', []),
])
def test_parse_slurm_nodelist(nodelist, hosts):
    assert parse_slurm_nodelist(nodelist) == hosts


def test_slurm_master_port_range_and_stability():
    ports = [slurm_master_port(str(job)) for job in (0, 1, 12345, 987654321, 2 ** 40)]
    assert all(utils.SLURM_PORT_MIN <= p <= utils.SLURM_PORT_MAX for p in ports)
    assert slurm_master_port('12345') == slurm_master_port('12345')
    assert slurm_master_port('12345') != slurm_master_port('12346')
    assert utils.SLURM_PORT_MIN <= slurm_master_port('4242_7') <= utils.SLURM_PORT_MAX
    assert slurm_master_port('4242_7') == slurm_master_port('4242_7')


def test_slurm_rendezvous_env(clean_env, monkeypatch):
    monkeypatch.setenv('SLURM_JOB_NODELIST', 'node[03-04]')
    monkeypatch.setenv('SLURM_JOB_ID', '31337')
    utils._setup_slurm_rendezvous(argparse.Namespace())
    assert os.environ['MASTER_ADDR'] == 'node03'
    assert os.environ['MASTER_PORT'] == str(slurm_master_port('31337'))

    monkeypatch.delenv('MASTER_ADDR')
    monkeypatch.delenv('MASTER_PORT')
    monkeypatch.setenv('SLURM_LAUNCH_NODE_IPADDR', '10.0.0.5')
    utils._setup_slurm_rendezvous(argparse.Namespace(dist_port=29999))
    assert os.environ['MASTER_ADDR'] == '10.0.0.5' and os.environ['MASTER_PORT'] == '29999'

    monkeypatch.setenv('MASTER_PORT', '12001')
    utils._setup_slurm_rendezvous(argparse.Namespace(dist_port=29999))
    assert os.environ['MASTER_PORT'] == '12001'

    monkeypatch.delenv('MASTER_PORT')
    monkeypatch.delenv('SLURM_JOB_ID')
    with pytest.raises(UserError, match='MASTER_PORT'):
        utils._setup_slurm_rendezvous(argparse.Namespace())


def test_init_distributed_mode_without_env(clean_env, capsys):
    args = argparse.Namespace(device='cpu')
    utils.init_distributed_mode(args)
    assert 'Not using distributed mode' in capsys.readouterr().out
    assert (args.distributed, args.rank, args.world_size) == (False, 0, 1)
    assert utils.get_world_size() == 1 and utils.is_main_process()
    assert utils.any_rank(True) and not utils.any_rank(False)
    utils.barrier()


def _check_single_rank_group(args: argparse.Namespace) -> None:
    try:
        assert args.distributed and args.dist_backend == 'gloo'
        assert (args.rank, args.world_size, args.gpu) == (0, 1, 0)
        assert utils.is_dist_avail_and_initialized() and utils.get_world_size() == 1
        assert utils.any_rank(True) and not utils.any_rank(False)
        meter = SmoothedValue()
        meter.update(2.0, n=3)
        meter.synchronize_between_processes()
        assert (meter.count, meter.total) == (3, 6.0)
        utils.barrier()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_init_distributed_mode_torchrun_env_gloo(clean_env, monkeypatch):
    monkeypatch.setenv('RANK', '0')
    monkeypatch.setenv('WORLD_SIZE', '1')
    monkeypatch.setenv('LOCAL_RANK', '0')
    monkeypatch.setenv('MASTER_ADDR', '127.0.0.1')
    monkeypatch.setenv('MASTER_PORT', str(_free_port()))
    args = argparse.Namespace(device='cpu', local_rank=5, dist_timeout=1)
    utils.init_distributed_mode(args)
    assert args.dist_url == 'env://'
    _check_single_rank_group(args)


def test_init_distributed_mode_slurm_gloo(clean_env, monkeypatch):
    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '1')
    monkeypatch.setenv('SLURM_LOCALID', '0')
    monkeypatch.setenv('SLURM_NODELIST', '127.0.0.1')
    args = argparse.Namespace(device='cpu', dist_port=_free_port())
    utils.init_distributed_mode(args)
    assert os.environ['MASTER_ADDR'] == '127.0.0.1'
    _check_single_rank_group(args)


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
        return int(subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                                  check=True).stdout)

    assert faults(retain=False) >= repeats * pages_per_tensor // 2  # the default maps every tensor afresh
    assert faults(retain=True) < pages_per_tensor // 10
