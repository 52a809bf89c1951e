"""The training and evaluation loops; ``compute_losses`` is the one forward pass of the loop, the benchmark and
the tests."""
import contextlib
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from timm.utils import unwrap_model

import utils
from losses import DistillationCriterion

TOP_K = 5


def compute_losses(
        model: nn.Module,
        teacher: Optional[nn.Module],
        criterion: DistillationCriterion,
        samples: torch.Tensor,
        targets: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Run the frozen teacher and the student on ``samples``; return every weighted term and their sum ``loss``.

    ``model`` and ``teacher`` are what ``models.create_student`` and ``models.create_teacher`` build (possibly
    wrapped by DDP or torch.compile): their ``token_capture`` holds the tokens of the distilled blocks.
    """
    student = unwrap_model(model)
    teacher_logits, teacher_tokens = None, []
    if teacher is not None:
        # No graph for the frozen teacher, the step's largest forward. Not inference mode: the (compiled) loss
        # saves teacher tokens for its backward, which inference tensors may not be.
        with torch.no_grad():
            teacher_logits = teacher(samples)
        teacher_tokens = teacher.token_capture.pop()
    outputs = model(samples)
    return criterion(outputs, targets, teacher_logits, student.token_capture.pop(), teacher_tokens,
                     student.projector)


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN or infinite; the message carries the step and every term."""


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPU multiplies bf16 matrices natively, several times faster than float32."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


class Precision:
    """Mixed precision of the training loop: autocast in ``dtype`` around the forward (none for float32), a grad
    scaler for float16. ``reason`` says why this dtype was chosen (printed by the benchmark)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, reason: str = ''):
        self.device_type = device.type
        self.dtype = dtype
        self.reason = reason
        self.enabled = dtype != torch.float32
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)

    def describe(self) -> str:
        name = str(self.dtype).replace('torch.', '')
        return f'{name} ({self.reason})' if self.reason else name

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)

    def backward_and_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                          parameters, max_norm: Optional[float]) -> None:
        """Backward, optional gradient-norm clipping (after unscaling), optimizer step."""
        self.scaler.scale(loss).backward()
        if max_norm:
            self.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, max_norm)
        self.scaler.step(optimizer)
        self.scaler.update()


def train_one_epoch(
        model: nn.Module,
        teacher: Optional[nn.Module],
        criterion: DistillationCriterion,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        precision: Precision,
        max_norm: Optional[float] = None,
        model_ema=None,
        mixup_fn=None,
        set_training_mode: bool = True,
        print_freq: int = 10,
        should_stop: Callable[[], bool] = lambda: False,
) -> dict[str, float]:
    """One epoch of distillation; returns the epoch's average of every loss term and the last LR.

    ``should_stop`` is polled after every step (preemption): the epoch then ends early and the caller saves.
    """
    model.train(set_training_mode)
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        terms = training_step(model, teacher, criterion, optimizer, precision, samples, targets, max_norm)
        # One host sync for all terms; a non-finite loss stops before anything is saved from this step.
        names = list(terms)
        values = torch.stack([terms[k].detach().float() for k in names]).tolist()
        if not math.isfinite(values[names.index('loss')]):
            detail = ', '.join(f'{k}={v:.6g}' for k, v in zip(names, values))
            raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, step {step}: {detail}')
        if model_ema is not None:
            model_ema.update(model)

        metric_logger.update(**dict(zip(names, values)))
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])
        if should_stop():
            break
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device,
             precision: Optional[Precision] = None, print_freq: int = 10) -> dict[str, float]:
    """Top-1/top-5 accuracy and cross-entropy; exact under distributed evaluation (sums, then all-reduce)."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1 hits, top-5 hits, images
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    for images, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        images = images.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast:
            output = model(images)
        output = output.float()
        top5 = output.topk(min(TOP_K, output.shape[1]), dim=1).indices
        hits = top5.eq(target[:, None])
        batch = torch.stack([
            nn.functional.cross_entropy(output, target, reduction='sum'),
            hits[:, 0].sum(), hits.any(dim=1).sum(), torch.tensor(float(len(target)), device=device),
        ]).double()
        totals += batch
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {'acc1': 100.0 * top1 / count, 'acc5': 100.0 * top5 / count, 'loss': loss_sum / count}
    print('* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f}'.format(**stats))
    return stats


def training_step(model, teacher, criterion, optimizer, precision: Precision, samples, targets,
                  max_norm: Optional[float] = None) -> dict[str, torch.Tensor]:
    """The step of ``train_one_epoch``: losses under autocast, backward, optional clipping, optimizer step."""
    with precision.autocast():
        terms = compute_losses(model, teacher, criterion, samples, targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward_and_step(terms['loss'], optimizer, model.parameters(), max_norm)
    return terms
