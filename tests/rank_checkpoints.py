"""``main.py`` in which every rank also saves the state it would checkpoint, so that tests can compare ranks.

Launched exactly like main.py (torch.distributed.launch, torchrun, srun) and with its flags. Rank 0 still
writes ``checkpoint.pth``; in addition each rank ``r`` writes ``rank{r}-checkpoint.pth`` next to it, built
from its own replicas of the model, EMA and optimizer, plus ``sampler_log``: for every epoch trained, the
epoch, the epoch its train sampler was set to and the sample indices the sampler dealt to this rank.
"""
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import checkpoints  # noqa: E402  (needs the repository on the path)
import main  # noqa: E402
import utils  # noqa: E402

RANK_FILE = 'rank{rank}-{name}'
save_on_master = checkpoints.save_on_master
train_one_epoch = main.train_one_epoch
sampler_log: list[dict] = []


def rank_path(path: Path, rank: int) -> Path:
    """Where rank ``rank`` saves its copy of ``path``."""
    return path.with_name(RANK_FILE.format(rank=rank, name=path.name))


def save_on_every_rank(state: dict, path) -> None:
    """Save this rank's copy (with the sampler log), then do what main.py does (rank 0 writes ``path``)."""
    checkpoints.save_checkpoint({**state, 'sampler_log': sampler_log}, rank_path(Path(path), utils.get_rank()))
    save_on_master(state, path)


def logging_train_one_epoch(students, teacher, data_loader, device, epoch: int, *args, **kwargs):
    """``engine.train_one_epoch`` after noting what the sampler deals this rank (drawing no random numbers)."""
    sampler = data_loader.sampler
    sampler_log.append({'epoch': epoch, 'sampler_epoch': getattr(sampler, 'epoch', None),
                        'indices': list(sampler)})
    return train_one_epoch(students, teacher, data_loader, device, epoch, *args, **kwargs)


if __name__ == '__main__':
    checkpoints.save_on_master = save_on_every_rank
    main.train_one_epoch = logging_train_one_epoch
    sys.exit(main.run())
