"""The training and evaluation loops; ``compute_losses`` is the one forward pass of the loop, the benchmark and
the tests."""
import contextlib
import math
from typing import ContextManager, Iterable, Optional

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.utils import ModelEmaV3, unwrap_model

import utils
from losses import DistillationCriterion

TOP_K = 5
FUSED_OPTIMIZER_DEVICES = ('cuda', 'cpu')
FUSED_OPTIMIZERS = ('adamw', 'adam')


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
    """Mixed precision of a loop: autocast in ``dtype`` around the forward (none for float32), a grad scaler for
    float16. ``reason`` says why this dtype was chosen (printed by the benchmark and the evaluation)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32, reason: str = ''):
        self.device_type = device.type
        self.dtype = dtype
        self.reason = reason
        self.enabled = dtype != torch.float32
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=dtype == torch.float16)

    @classmethod
    def for_training(cls, args, device: torch.device) -> 'Precision':
        """The training autocast from the flags: float32 with ``--no-amp``; on CUDA bfloat16 where supported, else
        float16 (with a grad scaler); on the CPU bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX:
        several times the float32 matmul rate), float32 elsewhere unless ``--amp-cpu``."""
        if not args.amp:
            return cls(device, torch.float32, '--no-amp')
        explicit = getattr(torch, args.amp_dtype) if args.amp_dtype != 'auto' else None
        if device.type == 'cpu':
            if not (cpu_has_native_bf16() or args.amp_cpu):
                return cls(device, torch.float32, 'no native bf16 on this CPU; --amp-cpu autocasts anyway')
            if explicit is not None:
                return cls(device, explicit, f'--amp-dtype {args.amp_dtype}')
            return cls(device, torch.bfloat16,
                       '--amp-cpu' if args.amp_cpu else 'native on this CPU; --no-amp for float32')
        if explicit is not None:
            return cls(device, explicit, f'--amp-dtype {args.amp_dtype}')
        if not torch.cuda.is_bf16_supported():
            return cls(device, torch.float16, 'no bf16 on this GPU; float16 with a grad scaler')
        return cls(device, torch.bfloat16, 'the CUDA default; --no-amp for float32')

    @classmethod
    def for_evaluation(cls, args, device: torch.device, training: 'Precision') -> 'Precision':
        """The evaluation arithmetic from ``--eval-precision``: ``original`` (the default) is that of DeiT's
        ``evaluate``, which the papers' numbers come from: float16 autocast on CUDA, float32 on the CPU (CUDA's
        autocast does nothing there), whatever precision trains; ``training`` evaluates in ``training``'s
        precision, ``float32`` without autocast."""
        if args.eval_precision == 'training':
            return training
        if args.eval_precision == 'float32':
            return cls(device, torch.float32, '--eval-precision float32')
        if device.type == 'cuda':
            return cls(device, torch.float16, "DeiT's evaluate; --eval-precision training for the training one")
        return cls(device, torch.float32, "DeiT's evaluate on the CPU; --eval-precision training for the "
                                          'training one')

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
        stop: Optional['StopSignal'] = None,
) -> tuple[dict[str, float], bool]:
    """One epoch of distillation; returns the epoch's average of every loss term and the last LR, and whether it
    ended early because a process was asked to stop (``stop``, polled after every step: preemption), in which case
    the caller saves.
    """
    stop = stop or StopSignal()
    model.train(set_training_mode)
    metric_logger = utils.MetricLogger(delimiter='  ')
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    stopping = 0.0
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with stop.waiting_on_peers():
            terms = training_step(model, teacher, criterion, optimizer, precision, samples, targets, max_norm,
                                  model_ema)
            names = list(terms)
            *values, stopping = step_values_over_processes(terms.values(), stop.requested())
        # A non-finite loss on any process stops every process at this step, before anything is saved from it.
        if not math.isfinite(values[names.index('loss')]):
            detail = ', '.join(f'{k}={v:.6g}' for k, v in zip(names, values))
            raise NonFiniteLossError(f'non-finite loss at epoch {epoch}, step {step}: {detail}')

        metric_logger.update(**dict(zip(names, values)))
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])
        if stopping:
            break
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}, bool(stopping)


def step_values_over_processes(terms: Iterable[torch.Tensor], stop_requested: bool) -> list[float]:
    """Each term averaged over the processes, then the number of processes asked to stop: one all-reduce and the
    step's one host sync (the flag is filled on the device, so no host-to-device copy either)."""
    local = torch.stack([term.detach().float() for term in terms])
    values = torch.cat([local, local.new_full((1,), float(stop_requested))])
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(values)
        values[:-1] /= torch.distributed.get_world_size()
    return values.tolist()


class StopSignal:
    """What ``train_one_epoch`` asks of a stop request: ``requested()`` after every step, and ``waiting_on_peers()``
    around the step, whose collectives (DDP's gradient all-reduce, the terms' all-reduce) wait on every process.
    This one never asks to stop; ``main.PreemptionFlag`` is set by preemption signals."""

    def requested(self) -> bool:
        return False

    def waiting_on_peers(self) -> ContextManager:
        return contextlib.nullcontext()


@torch.no_grad()
def evaluate(data_loader: Iterable, model: nn.Module, device: torch.device,
             precision: Optional[Precision] = None, print_freq: int = 10) -> dict[str, float]:
    """Top-1/top-5 accuracy and cross-entropy in ``precision`` (float32 without one); exact under distributed
    evaluation (sums, then one all-reduce). The sums stay on the device until the end: no host sync and no
    host-to-device copy per batch."""
    model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 hits, top-5 hits
    images = 0
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    for samples, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        samples = samples.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with autocast:
            output = model(samples)
        output = output.float()
        top5 = output.topk(min(TOP_K, output.shape[1]), dim=1).indices
        hits = top5.eq(target[:, None])
        sums += torch.stack([nn.functional.cross_entropy(output, target, reduction='sum'),
                             hits[:, 0].sum(), hits.any(dim=1).sum()]).double()
        images += len(target)
    totals = torch.cat([sums, sums.new_tensor([images])])
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, top1, top5, count = totals.tolist()
    count = max(count, 1.0)
    stats = {'acc1': 100.0 * top1 / count, 'acc5': 100.0 * top5 / count, 'loss': loss_sum / count}
    print('* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f}'.format(**stats))
    return stats


def build_optimizer(args, model: nn.Module, device: torch.device, lr: float) -> torch.optim.Optimizer:
    """timm's optimizer factory with DeiT's flags; Adam(W) on CUDA and the CPU as one fused kernel."""
    fused = device.type in FUSED_OPTIMIZER_DEVICES and args.opt.lower() in FUSED_OPTIMIZERS
    return create_optimizer_v2(model, **{**optimizer_kwargs(args), 'lr': lr}, **({'fused': True} if fused else {}))


class OriginalsModelEma(ModelEmaV3):
    """timm's ``ModelEmaV3`` (every weight updated by one batched ``torch._foreach_*`` operation, not a Python loop
    of three kernels per tensor) in the originals' arithmetic, timm 0.5.4's ``ModelEma``:
    ``ema = decay * ema + (1 - decay) * model``. V3's own ``lerp`` rounds otherwise (2.4e-6 apart after 100 steps);
    this is one rounding of the sum apart (1.2e-7). The students have no buffers, which the originals averaged too."""

    def _foreach_lerp_(self, ema_values: list[torch.Tensor], model_values: list[torch.Tensor],
                       weight: float) -> None:
        torch._foreach_mul_(ema_values, 1. - weight)
        torch._foreach_add_(ema_values, model_values, alpha=weight)

    def _lerp_(self, ema_value: torch.Tensor, model_value: torch.Tensor, weight: float) -> None:
        ema_value.mul_(1. - weight).add_(model_value.to(dtype=ema_value.dtype), alpha=weight)


def build_model_ema(args, model: nn.Module) -> Optional[OriginalsModelEma]:
    """The model EMA of ``--model-ema`` (DeiT's default), built before DDP or torch.compile wrap the model;
    ``--model-ema-force-cpu`` keeps it on the CPU (then updated tensor by tensor)."""
    if not args.model_ema:
        return None
    return OriginalsModelEma(model, decay=args.model_ema_decay,
                             device=torch.device('cpu') if args.model_ema_force_cpu else None)


def training_step(model, teacher, criterion, optimizer, precision: Precision, samples, targets,
                  max_norm: Optional[float] = None,
                  model_ema: Optional[OriginalsModelEma] = None) -> dict[str, torch.Tensor]:
    """The step of ``train_one_epoch`` and of the benchmark: losses under autocast, backward, optional clipping,
    optimizer step, the EMA update (queued before the step's host sync, so that its launches overlap the GPU's
    work on the step)."""
    with precision.autocast():
        terms = compute_losses(model, teacher, criterion, samples, targets)
    optimizer.zero_grad(set_to_none=True)
    precision.backward_and_step(terms['loss'], optimizer, model.parameters(), max_norm)
    if model_ema is not None:
        model_ema.update(model)
    return terms
