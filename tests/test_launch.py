"""launch.py: where a process sits in a job, from torchrun's or SLURM's environment."""
import pytest

import launch
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
