"""``main.py`` in which one rank's base loss term turns NaN at one step, and every rank notes its own loss.

Launched like main.py and with its flags. ``NAN_RANK`` and ``NAN_STEP`` (counted from 0 over the whole run) pick the
rank and the step whose base term is NaN. Every rank ``r`` writes ``rank{r}-losses.json`` to ``LOSSES_DIR``: its
exit code and the base term it computed at every step, to compare with what rank 0 prints.
"""
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import losses  # noqa: E402  (needs the repository on the path)
import main  # noqa: E402

NOTES_FILE = 'rank{rank}-losses.json'


class NotedCriterion(torch.nn.Module):
    """``base`` noting every value it returns, NaN at step ``nan_step`` (``None``: never)."""

    def __init__(self, base: torch.nn.Module, nan_step, noted: list[float]):
        super().__init__()
        self.base, self.nan_step, self.noted = base, nan_step, noted

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = self.base(logits, targets)
        if len(self.noted) == self.nan_step:
            value = value * float('nan')
        self.noted.append(value.item())
        return value


if __name__ == '__main__':
    rank = int(os.environ.get('RANK', '0'))
    nan_step = int(os.environ['NAN_STEP']) if rank == int(os.environ['NAN_RANK']) else None
    noted: list[float] = []
    build_base_criterion = losses.build_base_criterion
    losses.build_base_criterion = lambda args: NotedCriterion(build_base_criterion(args), nan_step, noted)
    code = main.run()
    notes = {'exit_code': code, 'base': noted}
    (Path(os.environ['LOSSES_DIR']) / NOTES_FILE.format(rank=rank)).write_text(json.dumps(notes))
    sys.exit(code)
