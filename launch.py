"""Where this process sits in a job: read from the launcher's environment (torchrun / torch.distributed.launch, or
SLURM's ``srun``), with the rendezvous address and port a SLURM task can derive on its own."""
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


@dataclass(frozen=True)
class LaunchEnvironment:
    """This process's rank, the number of processes and its GPU on the node; ``launcher`` names who said so."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: Optional[str] = None  # 'torchrun', 'slurm' or None (one process)

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
    """torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` when set (also inside a SLURM allocation), else SLURM's
    ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, else one process. ``local_rank_flag`` (``--local_rank``)
    stands in for a missing ``LOCAL_RANK``."""
    if 'RANK' in env and 'WORLD_SIZE' in env:
        local_rank = int(env['LOCAL_RANK']) if 'LOCAL_RANK' in env else local_rank_flag
        return LaunchEnvironment(int(env['RANK']), int(env['WORLD_SIZE']), local_rank, 'torchrun')
    if 'SLURM_PROCID' in env:
        return LaunchEnvironment(int(env['SLURM_PROCID']), int(env.get('SLURM_NTASKS', 1)),
                                 int(env.get('SLURM_LOCALID', 0)), 'slurm')
    return LaunchEnvironment()
