"""launch.py: where a process sits in a job, from torchrun's or SLURM's environment; the device each process takes
and the process group it leaves."""
import builtins
import socket

import pytest
import torch
import torch.distributed as dist

import launch
import main
import utils
from launch import LaunchEnvironment, launch_environment, parse_slurm_nodelist, slurm_master_port, slurm_rendezvous
from utils import UserError


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
    assert all(launch.SLURM_PORT_MIN <= p <= launch.SLURM_PORT_MAX for p in ports)
    assert slurm_master_port('12345') == slurm_master_port('12345')
    assert slurm_master_port('12345') != slurm_master_port('12346')
    assert launch.SLURM_PORT_MIN <= slurm_master_port('4242_7') <= launch.SLURM_PORT_MAX
    assert slurm_master_port('4242_7') == slurm_master_port('4242_7')


def test_slurm_rendezvous():
    env = {'SLURM_JOB_NODELIST': 'node[03-04]', 'SLURM_JOB_ID': '31337'}
    assert slurm_rendezvous(env, None) == ('node03', str(slurm_master_port('31337')))
    # salloc + srun from a login node: the launch node is the login node; task 0 runs on the step's first node.
    login = {**env, 'SLURM_LAUNCH_NODE_IPADDR': '10.0.0.99', 'SLURM_STEP_NODELIST': 'node[04-05]'}
    assert slurm_rendezvous(login, None)[0] == 'node04'
    assert slurm_rendezvous({**env, 'SLURM_LAUNCH_NODE_IPADDR': '10.0.0.99'}, None)[0] == 'node03'
    env = {'SLURM_LAUNCH_NODE_IPADDR': '10.0.0.5', 'SLURM_JOB_ID': '31337'}
    assert slurm_rendezvous(env, 29999) == ('10.0.0.5', '29999')
    assert slurm_rendezvous({**env, 'MASTER_PORT': '12001'}, 29999) == ('10.0.0.5', '12001')
    assert slurm_rendezvous({**env, 'MASTER_ADDR': 'head'}, None)[0] == 'head'
    with pytest.raises(UserError, match='MASTER_PORT'):
        slurm_rendezvous({'SLURM_NODELIST': 'n1'}, None)
    with pytest.raises(UserError, match='MASTER_ADDR'):
        slurm_rendezvous({'SLURM_JOB_ID': '1'}, None)


def test_launch_environment_from_torchrun_slurm_or_nothing():
    assert launch_environment({}) == LaunchEnvironment() and not LaunchEnvironment().distributed
    torchrun = launch_environment({'RANK': '3', 'WORLD_SIZE': '8', 'LOCAL_RANK': '1'})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.launcher) == (3, 8, 1, 'torchrun')
    # torch.distributed.launch without LOCAL_RANK in the environment passes --local-rank instead.
    assert launch_environment({'RANK': '3', 'WORLD_SIZE': '8'}, local_rank_flag=2).local_rank == 2
    slurm = launch_environment({'SLURM_PROCID': '5', 'SLURM_NTASKS': '6', 'SLURM_LOCALID': '2'})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.launcher) == (5, 6, 2, 'slurm')
    # torchrun inside a SLURM allocation: torchrun's variables win.
    both = launch_environment({'RANK': '0', 'WORLD_SIZE': '2', 'SLURM_PROCID': '7', 'SLURM_NTASKS': '9'})
    assert (both.world_size, both.launcher) == (2, 'torchrun')


class CudaStub:
    """``torch.cuda``'s device functions on a machine without a GPU: ``count`` visible GPUs, current device 0, and a
    record of ``set_device`` calls."""

    def __init__(self, monkeypatch, count: int):
        self.current = []
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: count)
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
        monkeypatch.setattr(torch.cuda, 'set_device', lambda device: self.current.append(torch.device(device)))


@pytest.mark.parametrize('flag, launched, visible, expected', [
    ('cuda:3', LaunchEnvironment(), 8, 'cuda:3'),
    ('cuda', LaunchEnvironment(), 8, 'cuda:0'),
    ('cuda', LaunchEnvironment(5, 8, 5, 'torchrun'), 8, 'cuda:5'),
    # SLURM binding one GPU to each task (--gpus-per-task=1): the task sees one GPU, whatever its local id.
    ('cuda', LaunchEnvironment(13, 16, 5, 'slurm'), 1, 'cuda:0'),
    ('cuda', LaunchEnvironment(6, 8, 6, 'slurm'), 4, 'cuda:2'),
])
def test_the_process_device_is_made_current(monkeypatch, flag, launched, visible, expected):
    cuda = CudaStub(monkeypatch, visible)
    assert main.process_device(flag, launched) == torch.device(expected)
    assert cuda.current == [torch.device(expected)]


def test_a_cpu_process_leaves_cuda_alone(monkeypatch):
    cuda = CudaStub(monkeypatch, 8)
    assert main.process_device('cpu', LaunchEnvironment(1, 2, 1, 'torchrun')) == torch.device('cpu')
    assert cuda.current == []


def test_every_exit_leaves_the_process_group(monkeypatch, tmp_path, capsys):
    """A launched process that stops on a user error (after joining its group) still leaves the group."""
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    for name, value in {'RANK': '0', 'WORLD_SIZE': '1', 'LOCAL_RANK': '0', 'MASTER_ADDR': '127.0.0.1',
                        'MASTER_PORT': str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(builtins, 'print', builtins.print)  # the group silences print on other ranks
    left = []
    leave = utils.leave_distributed
    monkeypatch.setattr(utils, 'leave_distributed', lambda: left.append(dist.is_initialized()) or leave())
    argv = ['--device', 'cpu', '--data-path', str(tmp_path / 'missing'), '--model', 'deit_tiny_patch16_224']
    assert main.run(argv) == main.EXIT_USER_ERROR
    assert 'not found' in capsys.readouterr().err
    assert left == [True] and not dist.is_initialized()
