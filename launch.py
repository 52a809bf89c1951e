"""Where this process sits in a job: read from the launcher's environment (torchrun / torch.distributed.launch, or
a task of a SLURM ``srun`` step), with the rendezvous address and port a SLURM task can derive on its own."""
import os
import re
import zlib
from dataclasses import dataclass
from typing import Mapping, Optional

from utils import UserError

# Ports derived from a SLURM job id stay clear of the well-known and registered low ports; a spread over job ids
# keeps concurrent jobs on one node apart.
SLURM_PORT_MIN = 20000
SLURM_PORT_MAX = 59999
# Step ids below this are the steps srun starts; Slurm's own steps (the batch script, salloc's interactive step, the
# extern step) have ids above it (slurm.h), which Slurm 26.05 and later export as negative numbers (-5 for the batch
# script) and earlier versions do not export at all.
SLURM_MAX_NORMAL_STEP_ID = 0xfffffff0


@dataclass(frozen=True)
class LaunchEnvironment:
    """This process's rank, the number of processes and its GPU on the node; ``launcher`` names who said so."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: Optional[str] = None  # 'torchrun', 'slurm' or None (one process)
    local_world_size: Optional[int] = None  # processes of the job on this node, where the launcher says

    @property
    def distributed(self) -> bool:
        return self.launcher is not None


def _expand_host_pattern(pattern: str) -> list[str]:
    """Expand one host pattern with zero or more bracket groups, e.g. ``rack[1-2]-n[01,03]``."""
    match = re.search(r'\[([^\]]*)\]', pattern)
    if match is None:
        return [pattern]
    head, tail = pattern[:match.start()], pattern[match.end():]
    values = []
    for item in filter(None, (part.strip() for part in match.group(1).split(','))):
        if '-' in item:
            low, high = item.split('-', 1)
            # Zero padding in the range start ("01-10") is part of the host names.
            values.extend(str(n).zfill(len(low)) for n in range(int(low), int(high) + 1))
        else:
            values.append(item)
    return [head + value + rest for value in values for rest in _expand_host_pattern(tail)]


def parse_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a compact SLURM node list (``node[01-03,07],gpu5``) into host names, in order."""
    hosts, depth, start = [], 0, 0
    # Commas inside brackets separate indices, not hosts, so split only at depth 0.
    for i, char in enumerate(nodelist + ','):
        if char == '[':
            depth += 1
        elif char == ']':
            depth -= 1
        elif char == ',' and depth == 0:
            token = nodelist[start:i].strip()
            if token:
                hosts.extend(_expand_host_pattern(token))
            start = i + 1
    return hosts


def parse_slurm_tasks_per_node(counts: str) -> list[int]:
    """Expand SLURM's tasks per node (``2(x3),1``: two tasks on each of three nodes, then one) into one count per
    node, in the order of the node list."""
    tasks = []
    for item in filter(None, (part.strip() for part in counts.split(','))):
        count, _, repeat = item.partition('(x')
        tasks.extend([int(count)] * (int(repeat.rstrip(')')) if repeat else 1))
    return tasks


def srun_step_tasks(env: Mapping[str, str]) -> int:
    """The number of tasks of the ``srun`` step this process is a task of; 0 where it is a task of none.

    ``sbatch``'s batch script and ``salloc``'s shell hold the job's ``SLURM_PROCID=0`` and ``SLURM_NTASKS`` but no
    step id of srun's (``SLURM_STEP_ID`` unset, or -5 for the batch script since Slurm 26.05); every task srun
    starts gets its step's id and ``SLURM_STEP_NUM_TASKS`` (``SLURM_NTASKS`` too, except under ``--preserve-env``).
    """
    step = env.get('SLURM_STEP_ID', env.get('SLURM_STEPID', ''))
    if 'SLURM_PROCID' not in env or not step.isdigit() or int(step) >= SLURM_MAX_NORMAL_STEP_ID:
        return 0
    return int(env.get('SLURM_STEP_NUM_TASKS') or env.get('SLURM_NTASKS') or 1)


def slurm_node_tasks(env: Mapping[str, str]) -> Optional[int]:
    """The number of tasks of this process's step on its node (``SLURM_STEP_TASKS_PER_NODE`` at ``SLURM_NODEID``,
    the node's index in the step), None where they are not set."""
    counts = parse_slurm_tasks_per_node(env.get('SLURM_STEP_TASKS_PER_NODE', ''))
    node = env.get('SLURM_NODEID', '')
    return counts[int(node)] if node.isdigit() and int(node) < len(counts) else None


def slurm_master_port(job_id: str) -> int:
    """The rendezvous port of a SLURM job, in ``[SLURM_PORT_MIN, SLURM_PORT_MAX]``: every task derives the same one,
    consecutive job ids different ones."""
    job_id = job_id.strip()
    # crc32 rather than hash(): str hashes are salted per interpreter, and the tasks must agree.
    key = int(job_id) if job_id.isdigit() else zlib.crc32(job_id.encode())
    return SLURM_PORT_MIN + key % (SLURM_PORT_MAX - SLURM_PORT_MIN + 1)


def slurm_rendezvous(env: Mapping[str, str], dist_port: Optional[int]) -> tuple[str, str]:
    """``(MASTER_ADDR, MASTER_PORT)`` for a task started by ``srun``: the environment's, else derived.

    The host is the first of the step's nodes, where task 0 runs. ``SLURM_LAUNCH_NODE_IPADDR`` (where ``srun`` was
    typed) is the last resort: under ``salloc`` + ``srun`` from a login node it names the login node, which runs no
    task."""
    addr = env.get('MASTER_ADDR')
    if not addr:
        hosts = parse_slurm_nodelist(env.get('SLURM_STEP_NODELIST') or env.get('SLURM_NODELIST')
                                     or env.get('SLURM_JOB_NODELIST') or '')
        addr = hosts[0] if hosts else env.get('SLURM_LAUNCH_NODE_IPADDR')
        if not addr:
            raise UserError('cannot find the master node under SLURM: set MASTER_ADDR (SLURM_STEP_NODELIST, '
                            'SLURM_NODELIST, SLURM_JOB_NODELIST and SLURM_LAUNCH_NODE_IPADDR are empty)')
    port = env.get('MASTER_PORT') or (str(dist_port) if dist_port is not None else None)
    if not port:
        if not env.get('SLURM_JOB_ID'):
            raise UserError('cannot choose a port under SLURM: set MASTER_PORT or --dist-port '
                            '(SLURM_JOB_ID is not set)')
        port = str(slurm_master_port(env['SLURM_JOB_ID']))
    return addr, port


def launch_environment(env: Mapping[str, str] = os.environ, local_rank_flag: int = 0) -> LaunchEnvironment:
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when set (also inside a SLURM allocation), else, for a task
    of an ``srun`` step of several tasks, SLURM's ``SLURM_PROCID``/``SLURM_LOCALID`` and the step's number of tasks,
    else one process (a batch script or an interactive shell of a SLURM job too). ``local_rank_flag``
    (``--local_rank``) stands in for a missing ``LOCAL_RANK``."""
    if 'RANK' in env and 'WORLD_SIZE' in env:
        local_rank = int(env['LOCAL_RANK']) if 'LOCAL_RANK' in env else local_rank_flag
        local_world_size = int(env['LOCAL_WORLD_SIZE']) if 'LOCAL_WORLD_SIZE' in env else None
        return LaunchEnvironment(int(env['RANK']), int(env['WORLD_SIZE']), local_rank, 'torchrun', local_world_size)
    tasks = srun_step_tasks(env)
    if tasks > 1:
        return LaunchEnvironment(int(env['SLURM_PROCID']), tasks, int(env.get('SLURM_LOCALID', 0)), 'slurm',
                                 slurm_node_tasks(env))
    return LaunchEnvironment()
