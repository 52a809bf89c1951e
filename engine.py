"""The training and evaluation loops; ``compute_losses`` is the one forward pass both the loop and tests use."""
import contextlib
import math
import statistics
import time
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import utils
from losses import DistillationCriterion
from models import captured_tokens, no_token_capture

TOP_K = 5
STEPS_PER_RATE_MEASUREMENT = 5  # --benchmark: timed steps between two measurements of the matmul rate


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
        # No graph for the frozen teacher, the step's largest forward. Not inference mode: the (compiled) loss
        # saves teacher tokens for its backward, which inference tensors may not be.
        with torch.no_grad():
            teacher_logits = teacher(samples)
        teacher_tokens = captured_tokens(teacher)
    outputs = model(samples)
    return criterion(outputs, targets, teacher_logits, captured_tokens(student), teacher_tokens,
                     getattr(student, 'projector', None))


class NonFiniteLossError(RuntimeError):
    """Raised when a step's loss is NaN or infinite; the message carries the step and every term."""


class Precision:
    """Mixed precision of the training loop: autocast around the forward, a grad scaler for float16."""

    def __init__(self, device: torch.device, enabled: bool, dtype: Optional[torch.dtype] = None):
        self.device_type = device.type
        self.dtype = dtype if dtype is not None else torch.float32
        self.enabled = enabled and self.dtype != torch.float32
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=self.enabled and self.dtype == torch.float16)

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
    with no_token_capture(utils.unwrap_model(model)):
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


def count_cpu_attention_flops() -> None:
    """Teach ``FlopCounterMode`` the CPU flash-attention kernels, which it does not count by itself.

    They get the formulas torch uses for the GPU kernels, so CPU and GPU runs count the same model FLOPs.
    """
    aten = torch.ops.aten
    formulas = {aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop,
                aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop}
    for op, formula in formulas.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)


def matmul_flops_per_second(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
    """FLOP/s of one ``a @ b`` of large square matrices: the machine's practical matmul peak at that moment.

    The product goes to a preallocated ``out`` so that the time is the product's alone, not its allocation's.
    """
    synchronize(a.device)
    start = time.perf_counter()
    torch.mm(a, b, out=out)
    synchronize(a.device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def training_step(model, teacher, criterion, optimizer, precision: Precision, samples, targets,
                  max_norm: Optional[float] = None) -> dict[str, torch.Tensor]:
    """The step of ``train_one_epoch``: losses under autocast, backward, optional clipping, optimizer step."""
    with precision.autocast():
        terms = compute_losses(model, teacher, criterion, samples, targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward_and_step(terms['loss'], optimizer, model.parameters(), max_norm)
    return terms


def benchmark(model, teacher, criterion, optimizer, precision: Precision, device: torch.device,
              batch_size: int, input_size: int, num_classes: int, steps: int, warmup: int,
              peak_flops: Optional[float] = None, mixup_fn=None, matmul_size: int = 4096) -> dict[str, float]:
    """Time the real training step on synthetic batches; FLOPs come from ``FlopCounterMode``.

    MFU is the step's model FLOP/s over ``peak_flops`` (a GPU's dense peak for the AMP dtype), or, when that
    is not given, over this machine's matmul rate in the step's dtype, measured with a ``matmul_size``-square
    product before every round of ``STEPS_PER_RATE_MEASUREMENT`` timed steps and after the last one, so that
    rate and steps see the same machine load while the steps run back to back, as in training (a product
    before every step would evict the step's data from the caches). Step time and rate are medians.
    """
    count_cpu_attention_flops()
    model.train()
    samples = torch.randn(batch_size, 3, input_size, input_size, device=device)
    targets = torch.randint(0, num_classes, (batch_size,), device=device)
    if mixup_fn is not None:
        samples, targets = mixup_fn(samples, targets)
    for _ in range(warmup):
        training_step(model, teacher, criterion, optimizer, precision, samples, targets)
    with FlopCounterMode(display=False) as counter:
        training_step(model, teacher, criterion, optimizer, precision, samples, targets)
    flops_per_step = counter.get_total_flops()
    matmul_operands = None
    if peak_flops is None:
        dtype = precision.dtype if precision.enabled else torch.float32
        matmul_operands = [torch.randn(matmul_size, matmul_size, device=device, dtype=dtype) for _ in range(3)]
        matmul_flops_per_second(*matmul_operands)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    step_seconds, matmul_rates = [], []
    for index in range(steps):
        if matmul_operands is not None and index % STEPS_PER_RATE_MEASUREMENT == 0:
            matmul_rates.append(matmul_flops_per_second(*matmul_operands))
        synchronize(device)
        start = time.perf_counter()
        training_step(model, teacher, criterion, optimizer, precision, samples, targets)
        synchronize(device)
        step_seconds.append(time.perf_counter() - start)
    seconds = statistics.median(step_seconds)
    if peak_flops is None:
        matmul_rates.append(matmul_flops_per_second(*matmul_operands))
        peak_flops = statistics.median(matmul_rates)
    memory = torch.cuda.max_memory_allocated(device) if device.type == 'cuda' else float('nan')
    return {
        'images_per_s': batch_size / seconds,
        'ms_per_step': 1000 * seconds,
        'peak_memory_gib': memory / 2 ** 30,
        'gflops_per_image': flops_per_step / batch_size / 1e9,
        'achieved_tflops': flops_per_step / seconds / 1e12,
        'peak_tflops': peak_flops / 1e12,
        'mfu': flops_per_step / seconds / peak_flops,
    }
