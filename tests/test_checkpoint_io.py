"""checkpoints.py's file handling: weights-only loading that refuses code, atomic saves, one-line errors."""
import argparse
import errno
import json
import os
import pathlib
import pickle
import shutil
import socket
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler
from timm.utils import ModelEmaV2
from torch.utils._pytree import tree_leaves

import checkpoints
import engine
import main
import students
import models
import utils
from checkpoints import checkpoint_weights, load_checkpoint, save_checkpoint
from utils import OutputWriteError, UserError
from helpers import fill_disk_at

LOOKAHEAD_K = 6  # timm's Lookahead syncs its slow weights every 6 steps


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


# ---------------------------------------------------------------------------------------------
# A full disk, room checked up front, and what dead writers leave behind
# ---------------------------------------------------------------------------------------------

def test_a_full_disk_at_the_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / 'checkpoint.pth'
    save_checkpoint({'epoch': 1, 'w': torch.arange(5)}, path)
    good_bytes = path.read_bytes()
    with monkeypatch.context() as patch:
        fill_disk_at(patch, lambda name: '.tmp.' in name)
        with pytest.raises(OutputWriteError) as exc:
            save_checkpoint({'epoch': 2, 'w': torch.zeros(100_000)}, path)
    assert str(exc.value) == (f'cannot write {path}: No space left on device (ENOSPC); '
                              'the previous checkpoint.pth is kept')
    assert path.read_bytes() == good_bytes
    assert [p.name for p in tmp_path.iterdir()] == ['checkpoint.pth']


def test_a_full_disk_at_the_best_checkpoints_copy_keeps_the_previous_best(tmp_path, monkeypatch):
    last, best = tmp_path / 'checkpoint.pth', tmp_path / 'checkpoint_best.pth'
    save_checkpoint({'epoch': 1}, best)
    save_checkpoint({'epoch': 2, 'w': torch.zeros(100_000)}, last)
    monkeypatch.setattr(os, 'link', lambda *args: (_ for _ in ()).throw(OSError('no links here')))
    # shutil.copyfile writes with sendfile on Linux, through Python's file objects elsewhere.
    monkeypatch.setattr(os, 'sendfile', lambda *args: (_ for _ in ()).throw(
        OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))))
    fill_disk_at(monkeypatch, lambda name: '.tmp.' in name)
    with pytest.raises(OutputWriteError, match=r'cannot write .*checkpoint_best.pth: No space left on device '
                                               r'\(ENOSPC\); the previous checkpoint_best.pth is kept'):
        checkpoints.keep_copy_on_master(last, best)
    monkeypatch.undo()
    assert load_checkpoint(best)['epoch'] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth', 'checkpoint_best.pth']


def test_a_full_disk_at_log_txt_keeps_its_lines_whole(tmp_path, monkeypatch):
    log = tmp_path / 'log.txt'
    utils.append_log(log, {'epoch': 0, 'train_loss': 1.0})
    before = log.read_bytes()
    fill_disk_at(monkeypatch, lambda name: name.endswith('log.txt'), room=10)
    with pytest.raises(OutputWriteError) as exc:
        utils.append_log(log, {'epoch': 1, 'train_loss': 0.5})
    monkeypatch.undo()
    assert str(exc.value) == f'cannot write {log}: No space left on device (ENOSPC); its earlier lines are kept whole'
    assert log.read_bytes() == before
    utils.append_log(log, {'epoch': 1, 'train_loss': 0.5})
    assert [json.loads(line)['epoch'] for line in log.read_text().splitlines()] == [0, 1]


def test_a_resumed_run_repairs_a_cut_last_line_and_the_epochs_it_runs_again(tmp_path, capsys):
    log = tmp_path / 'log.txt'
    whole = ''.join(json.dumps({'epoch': e, 'train_loss': 1.0}) + '\n' for e in range(4))
    cut = '{"epoch": 4, "train_lo'
    log.write_text(whole + cut)
    utils.repair_log(log)
    assert log.read_text() == whole
    assert capsys.readouterr().out == f'Repaired {log}: removed a last line cut short ({len(cut)} bytes)\n'
    # Epochs 2 and 3 were logged, but the checkpoint holds epoch 1: they are trained and logged again.
    utils.repair_log(log, next_epoch=2)
    assert [json.loads(line)['epoch'] for line in log.read_text().splitlines()] == [0, 1]
    assert 'removed the lines of epochs 2, 3, which the checkpoint does not hold (run again)' in capsys.readouterr().out
    utils.repair_log(log, next_epoch=2)
    assert capsys.readouterr().out == ''


def state_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


@pytest.mark.parametrize('opt, moments', [('adamw', 2), ('momentum', 1), ('adan', 4), ('lookahead_adamw', 3),
                                          ('adamp', 2)])
def test_the_optimizer_state_is_measured_on_the_meta_device(opt, moments):
    """Any optimizer of timm's: its state after a step on meta gradients, as a real one holds it after
    ``LOOKAHEAD_K`` steps (when Lookahead's slow weights exist); one that cannot step on the meta device (AdamP
    reads a value) counts as Adam, less its step counters."""
    def build():
        return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16))

    with torch.device('meta'):
        meta = build()
    estimate = checkpoints.training_state_bytes(meta, lambda m: create_optimizer_v2(m, opt=opt), with_ema=True)
    assert all(p.grad is None for p in meta.parameters())

    real = build()
    optimizer = create_optimizer_v2(real, opt=opt)
    real(torch.randn(2, 8)).sum().backward()
    for _ in range(LOOKAHEAD_K):
        optimizer.step()
    weights = state_bytes(real.state_dict())
    real_state = state_bytes(optimizer.state_dict()['state'])
    assert real_state >= moments * weights
    if opt == 'adamp':
        assert estimate == 2 * weights + moments * weights
    else:
        assert estimate == 2 * weights + real_state


def test_the_checkpoint_size_estimate_is_within_the_margin_of_the_saved_file(tmp_path):
    """DeiT-Ti (32 px, 10 classes) with EMA and AdamW, as ``students.checkpoint_bytes`` estimates it for the room check
    and as a run saves it after a step."""
    args = main.get_args_parser().parse_args(['--model', 'deit_tiny_patch16_224', '--input-size', '32'])
    estimate = students.checkpoint_bytes(args, num_classes=10)
    student = models.create_student(args, None, 10)
    optimizer = engine.build_optimizer(args, student, torch.device('cpu'), args.lr)
    for param in student.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    scheduler, _ = create_scheduler(args, optimizer)
    state = checkpoints.training_state(student, optimizer, scheduler, 0, ModelEmaV2(student),
                                       torch.amp.GradScaler('cpu', enabled=False), args, 0.0)
    save_checkpoint(state, tmp_path / 'checkpoint.pth')
    saved = (tmp_path / 'checkpoint.pth').stat().st_size
    assert estimate <= saved <= estimate * (1 + checkpoints.ROOM_MARGIN)


def test_the_room_check_names_the_folder_what_is_free_and_what_is_needed(tmp_path, monkeypatch):
    megabyte = int(utils.BYTES_PER_MB)
    checkpoint = 100 * megabyte
    needed = checkpoints.room_needed(tmp_path, checkpoint)
    assert needed == 315 * megabyte  # the last, the best and the one being written, and 5 %
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=200 * megabyte))
    with pytest.raises(UserError) as exc:
        checkpoints.check_room(tmp_path, checkpoints.room_needed(tmp_path, checkpoint))
    assert str(exc.value) == (f'--output_dir {tmp_path}: 200.0 MB free on its file system, 315.0 MB needed (the '
                              'last, the best and the checkpoint being written at once, and 5% more)')
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=needed - 1))
    with pytest.raises(UserError):
        checkpoints.check_room(tmp_path, checkpoints.room_needed(tmp_path, checkpoint))
    monkeypatch.setattr(shutil, 'disk_usage', lambda path: usage._replace(free=needed))
    checkpoints.check_room(tmp_path, checkpoints.room_needed(tmp_path, checkpoint))
    assert list(tmp_path.iterdir()) == []


def test_a_resumed_run_needs_room_only_for_what_its_checkpoints_do_not_hold_yet(tmp_path):
    checkpoint = 1000
    (tmp_path / 'checkpoint.pth').write_bytes(bytes(checkpoint))
    os.link(tmp_path / 'checkpoint.pth', tmp_path / 'checkpoint_best.pth')
    assert checkpoints.room_needed(tmp_path, checkpoint) == 3150 - 1000  # one file under two names
    (tmp_path / 'checkpoint_best.pth').unlink()
    (tmp_path / 'checkpoint_best.pth').write_bytes(bytes(checkpoint))
    assert checkpoints.room_needed(tmp_path, checkpoint) == 3150 - 2000


def dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, '-c', ''])
    process.wait()
    return process.pid


def test_dead_writers_temporary_files_are_removed_and_live_ones_kept(tmp_path, capsys):
    host = socket.gethostname()
    last = tmp_path / 'checkpoint.pth'
    old = tmp_path / 'checkpoint.pth.tmp.other-node.7'  # another host's writer, older than the last checkpoint
    old.write_bytes(b'x')
    before_format = tmp_path / 'checkpoint.pth.tmp.123'  # the name without a host, older too
    before_format.write_bytes(b'x')
    os.utime(old, (1, 1))
    os.utime(before_format, (1, 1))
    last.write_bytes(b'checkpoint')
    dead = tmp_path / f'checkpoint.pth.tmp.{host}.{dead_pid()}'
    dead.write_bytes(bytes(2 * 1024 * 1024))
    dead_best = tmp_path / f'checkpoint_best.pth.tmp.{host}.{dead_pid()}'
    dead_best.write_bytes(b'x')
    live = tmp_path / f'checkpoint.pth.tmp.{host}.{os.getpid()}'  # another run in this folder, writing now
    live.write_bytes(b'x')
    os.utime(live, (1, 1))  # even when older than the last checkpoint: its writer runs
    recent_elsewhere = tmp_path / 'checkpoint.pth.tmp.other-node.8'
    recent_elsewhere.write_bytes(b'x')
    unrelated = [tmp_path / 'notes.tmp.1', tmp_path / 'log.txt']
    for path in unrelated:
        path.write_bytes(b'mine')

    checkpoints.remove_dead_writers_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in [last, live, recent_elsewhere, *unrelated])
    line = capsys.readouterr().out
    assert line.count('\n') == 1 and line.startswith(f'Removed temporary files whose writer is gone from {tmp_path}: ')
    for path in (old, before_format, dead, dead_best):
        assert path.name in line
    assert f'{dead.name} (2.0 MB)' in line


def test_the_temporary_file_names_its_host_and_process(tmp_path):
    written = []

    def write(tmp: str) -> None:
        written.append(os.path.basename(tmp))
        pathlib.Path(tmp).touch()

    checkpoints.write_atomically(tmp_path / 'checkpoint.pth', write)
    assert written == [f'checkpoint.pth.tmp.{socket.gethostname()}.{os.getpid()}']
    match = checkpoints.TEMPORARY_NAME.fullmatch(written[0])
    assert (match['target'], match['host'], match['pid']) == ('checkpoint.pth', socket.gethostname(), str(os.getpid()))
