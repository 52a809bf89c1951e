"""The training and evaluation loops; ``compute_losses`` is the one forward pass both the loop and tests use."""
from typing import Optional

import torch
import torch.nn as nn

import utils
from losses import DistillationCriterion
from models import captured_tokens


def compute_losses(
        model: nn.Module,
        teacher: Optional[nn.Module],
        criterion: DistillationCriterion,
        samples: torch.Tensor,
        targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Run the frozen teacher and the student on ``samples``; return every weighted term and their sum ``loss``."""
    student = utils.unwrap_model(model)
    teacher_logits, teacher_tokens = None, []
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = teacher(samples)
        teacher_tokens = captured_tokens(teacher)
    outputs = model(samples)
    return criterion(outputs, targets, teacher_logits, captured_tokens(student), teacher_tokens,
                     getattr(student, 'projector', None))
