"""checkpoints.py's file handling: weights-only loading that refuses code, atomic saves, one-line errors."""
import argparse
import os
import pathlib
import pickle
import urllib.error

import numpy as np
import pytest
import torch

import checkpoints
from checkpoints import checkpoint_weights, load_checkpoint, save_checkpoint
from utils import UserError


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


def test_checkpoint_weights_strip_ddp_and_compile_prefixes(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    for prefix in ('module.', '_orig_mod.', '_orig_mod.module.'):
        path = tmp_path / 'wrapped.pth'
        torch.save({'model': {prefix + k: v for k, v in model.state_dict().items()}}, path)
        state = checkpoint_weights(load_checkpoint(str(path)))
        assert set(state) == {'0.weight', '0.bias'}
        torch.nn.Sequential(torch.nn.Linear(2, 2)).load_state_dict(state)


def test_load_checkpoint_missing_file(tmp_path):
    path = tmp_path / 'nope.pth'
    with pytest.raises(UserError, match='checkpoint not found') as exc:
        load_checkpoint(str(path))
    assert str(path) in str(exc.value)


@pytest.mark.parametrize('payload', [os.urandom(4096), b'hello, this is text\n', b''],
                         ids=['random', 'text', 'empty'])
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
    checkpoints.save_on_master({'epoch': 3}, path)
    assert load_checkpoint(str(path)) == {'epoch': 3}


@pytest.mark.parametrize('links', [True, False], ids=['hard link', 'copy'])
def test_the_best_checkpoint_keeps_its_content_when_the_last_one_is_replaced(tmp_path, monkeypatch, links):
    if not links:
        monkeypatch.setattr(os, 'link', lambda *args: (_ for _ in ()).throw(OSError('no links here')))
    last, best = tmp_path / 'checkpoint.pth', tmp_path / 'checkpoint_best.pth'
    save_checkpoint({'epoch': 3, 'model': {'w': torch.ones(4)}}, last)
    checkpoints.keep_copy_on_master(last, best)
    assert (best.stat().st_ino == last.stat().st_ino) == links
    save_checkpoint({'epoch': 4, 'model': {'w': torch.zeros(4)}}, last)
    assert load_checkpoint(best)['epoch'] == 3 and torch.equal(load_checkpoint(best)['model']['w'], torch.ones(4))
    assert load_checkpoint(last)['epoch'] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth', 'checkpoint_best.pth']
