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
    slurm = launch_environment({'SLURM_PROCID': '5', 'SLURM_NTASKS': '6', 'SLURM_LOCALID': '2', 'SLURM_STEP_ID': '0'})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.launcher) == (5, 6, 2, 'slurm')
    # torchrun inside a SLURM allocation: torchrun's variables win.
    both = launch_environment({'RANK': '0', 'WORLD_SIZE': '2', 'LOCAL_WORLD_SIZE': '2', **SRUN_TASK})
    assert (both.world_size, both.local_world_size, both.launcher) == (2, 2, 'torchrun')


# What sbatch exports to its batch script (a job of 2 nodes x 8 tasks), as Slurm up to 25.11 does: the job's task
# count and SLURM_PROCID=0, but no step id.
SBATCH_SCRIPT = {'SLURM_JOB_ID': '4242', 'SLURM_JOBID': '4242', 'SLURM_JOB_NODELIST': 'gpu[01-02]',
                 'SLURM_NODELIST': 'gpu[01-02]', 'SLURM_NNODES': '2', 'SLURM_NTASKS': '16', 'SLURM_NPROCS': '16',
                 'SLURM_NTASKS_PER_NODE': '8', 'SLURM_TASKS_PER_NODE': '8(x2)', 'SLURM_PROCID': '0',
                 'SLURM_LOCALID': '0', 'SLURM_NODEID': '0', 'SLURM_GPUS_ON_NODE': '8'}
# What srun adds for each task of its step, here task 13 of `srun python main.py` in that script.
SRUN_TASK = {**SBATCH_SCRIPT, 'SLURM_STEP_ID': '0', 'SLURM_STEPID': '0', 'SLURM_STEP_NUM_TASKS': '16',
             'SLURM_STEP_NUM_NODES': '2', 'SLURM_STEP_NODELIST': 'gpu[01-02]', 'SLURM_STEP_TASKS_PER_NODE': '8(x2)',
             'SLURM_PROCID': '13', 'SLURM_LOCALID': '5', 'SLURM_NODEID': '1'}


@pytest.mark.parametrize('shell', [
    SBATCH_SCRIPT,
    # Slurm 26.05 and later export the batch step's id, SLURM_BATCH_SCRIPT, as a negative number.
    {**SBATCH_SCRIPT, 'SLURM_STEP_ID': '-5', 'SLURM_STEPID': '-5'},
    # salloc's interactive step (LaunchParameters=use_interactive_step), as 26.05 exports it.
    {**SBATCH_SCRIPT, 'SLURM_STEP_ID': '-6', 'SLURM_STEPID': '-6'},
    # `srun --pty bash` (or `srun -n1 python main.py`): a step of one task.
    {**SRUN_TASK, 'SLURM_STEP_NUM_TASKS': '1', 'SLURM_NTASKS': '1', 'SLURM_STEP_TASKS_PER_NODE': '1',
     'SLURM_PROCID': '0', 'SLURM_LOCALID': '0', 'SLURM_NODEID': '0'},
], ids=['sbatch', 'sbatch-26.05', 'salloc-interactive-step', 'srun-pty-bash'])
def test_a_slurm_batch_or_interactive_shell_runs_one_process(shell, monkeypatch):
    """``python main.py`` typed in a batch script or an interactive shell of a job is one process: it does not wait
    for the job's other tasks (no one starts them), and ``--benchmark`` is allowed there."""
    assert launch_environment(shell) == LaunchEnvironment()
    monkeypatch.setattr(main.os, 'environ', shell)
    args = main.get_args_parser().parse_args(['--benchmark', '--device', 'cpu', '--world_size', '1'])
    main.check_args(args)


def test_a_task_of_an_srun_step_joins_its_step():
    task = launch_environment(SRUN_TASK)
    assert task == LaunchEnvironment(13, 16, 5, 'slurm', 8)
    # `srun --ntasks=4` in that job: the step's 4 tasks, not the job's 16, also where --preserve-env keeps
    # SLURM_NTASKS; the tasks per node are the step's.
    step = {**SRUN_TASK, 'SLURM_STEP_ID': '3', 'SLURM_STEP_NUM_TASKS': '4', 'SLURM_STEP_TASKS_PER_NODE': '3,1',
            'SLURM_PROCID': '2', 'SLURM_LOCALID': '2', 'SLURM_NODEID': '0'}
    assert launch_environment(step) == LaunchEnvironment(2, 4, 2, 'slurm', 3)
    # The step id under its old name only (Slurm before 2.4); no tasks per node: the local count is unknown.
    old = {k: v for k, v in step.items() if k not in ('SLURM_STEP_ID', 'SLURM_STEP_TASKS_PER_NODE')}
    assert launch_environment(old) == LaunchEnvironment(2, 4, 2, 'slurm', None)


@pytest.mark.parametrize('counts, tasks', [('8(x2)', [8, 8]), ('2(x3),1', [2, 2, 2, 1]), ('4', [4]), ('', [])])
def test_parse_slurm_tasks_per_node(counts, tasks):
    assert launch.parse_slurm_tasks_per_node(counts) == tasks


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
    ('cuda', LaunchEnvironment(13, 16, 5, 'slurm', 8), 1, 'cuda:0'),
    ('cuda', LaunchEnvironment(6, 8, 2, 'slurm', 4), 4, 'cuda:2'),
])
def test_the_process_device_is_made_current(monkeypatch, flag, launched, visible, expected):
    cuda = CudaStub(monkeypatch, visible)
    assert main.process_device(flag, launched) == torch.device(expected)
    assert cuda.current == [torch.device(expected)]


@pytest.mark.parametrize('launched, processes, advice', [
    # Every process of the node learns it from the launcher's count, local rank 1 as well as local rank 6.
    (LaunchEnvironment(1, 8, 1, 'torchrun', 8), '8', '--nproc_per_node'),
    (LaunchEnvironment(6, 8, 6, 'slurm', 8), '8', '--gpus-per-task=1'),
    # Without a count, the local rank alone shows it.
    (LaunchEnvironment(6, 8, 6, 'slurm'), 'at least 7', '--ntasks-per-node'),
])
def test_more_processes_than_visible_gpus_on_a_node_are_refused(monkeypatch, launched, processes, advice):
    """8 processes on a node whose tasks each see 4 GPUs: ``local_rank % 4`` would put two on each GPU."""
    cuda = CudaStub(monkeypatch, 4)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '0,1,2,3')
    with pytest.raises(UserError, match=f'{processes} processes on this node, but each sees 4 GPUs '
                                        r'\(CUDA_VISIBLE_DEVICES=0,1,2,3\): a GPU for each process needs at most 4 '
                                        'per node') as refused:
        main.process_device('cuda', launched)
    assert advice in str(refused.value) and cuda.current == []


def test_a_shared_gpu_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    """Through the command line: refused before the process group is joined."""
    CudaStub(monkeypatch, 2)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    for name, value in {'RANK': '3', 'WORLD_SIZE': '4', 'LOCAL_RANK': '3', 'LOCAL_WORLD_SIZE': '4'}.items():
        monkeypatch.setenv(name, value)
    assert main.run(['--device', 'cuda', '--data-path', str(tmp_path)]) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith('error: --device cuda: torchrun started 4 processes on this node, but each sees 2 GPUs')
    assert err.count('\n') == 1 and not dist.is_initialized()


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
