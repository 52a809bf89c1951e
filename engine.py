"""The training and evaluation loops; ``train_step`` (the teacher's forward once, then each student's step) is the
step of the loop and of the benchmark, ``compute_losses`` one student's forward pass and terms (``student_losses``
after ``teacher_forward``, as the step computes them)."""
import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, ContextManager, Iterable, Optional, Sequence

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.utils import ModelEmaV3, unwrap_model

import utils
from losses import DistillationCriterion

TOP_K = 5
FUSED_OPTIMIZER_DEVICES = ('cuda', 'cpu')
FUSED_OPTIMIZERS = ('adamw', 'adam')


@dataclass(frozen=True)
class TeacherOutput:
    """The frozen teacher's logits on a batch (None without a teacher) and the tokens of its captured blocks."""
    logits: Optional[torch.Tensor] = None
    tokens: dict[int, torch.Tensor] = field(default_factory=dict)

    def paired_with(self, blocks: Sequence[int]) -> list[torch.Tensor]:
        """The tokens of the teacher blocks a student pairs with (its ``--t-id``), in that order."""
        return [self.tokens[block] for block in blocks]


def teacher_forward(teacher: Optional[nn.Module], samples: torch.Tensor) -> TeacherOutput:
    """The frozen teacher on ``samples``: its logits and the tokens of every block it captures."""
    if teacher is None:
        return TeacherOutput()
    # No graph for the frozen teacher, the step's largest forward. Not inference mode: the (compiled) loss saves
    # teacher tokens for its backward, which inference tensors may not be.
    with torch.no_grad():
        logits = teacher(samples)
    return TeacherOutput(logits, teacher.token_capture.pop_by_block())


def student_losses(model: nn.Module, criterion: DistillationCriterion, samples: torch.Tensor, targets: torch.Tensor,
                   teacher: TeacherOutput, teacher_blocks: Sequence[int]) -> dict[str, torch.Tensor]:
    """The student on ``samples`` and every weighted term against the teacher's output (its ``teacher_blocks``
    paired with the student's captured blocks), and their sum ``loss``."""
    student = unwrap_model(model)
    outputs = model(samples)
    return criterion(outputs, targets, teacher.logits, student.token_capture.pop(), teacher.paired_with(teacher_blocks),
                     student.projector)


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
    blocks = teacher.token_capture.block_ids if teacher is not None else []
    return student_losses(model, criterion, samples, targets, teacher_forward(teacher, samples), blocks)


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


@dataclass
class Student:
    """One student of a run: its model (possibly wrapped by DDP or torch.compile), criterion, optimizer, precision
    (autocast and grad scaler), EMA, the teacher blocks its feature terms pair with (its ``--t-id``), and its own
    random stream. A run trains one, or with ``--variant`` several, on one data stream and one teacher forward per
    batch."""
    name: str
    model: nn.Module
    criterion: DistillationCriterion
    optimizer: torch.optim.Optimizer
    precision: Precision
    teacher_blocks: Sequence[int] = ()
    max_norm: Optional[float] = None
    model_ema: Any = None
    random: Optional[utils.RandomStream] = None

    def own_stream(self) -> ContextManager:
        """The student's random stream made current (nothing to swap without one)."""
        return self.random.active() if self.random is not None else contextlib.nullcontext()


def student_step(student: Student, teacher: TeacherOutput, samples: torch.Tensor,
                 targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """One student's step on a batch the teacher has seen, in the student's own random stream: losses under
    autocast, backward, optional clipping, optimizer step; then the EMA update. Returns the terms, detached: the student's graph and its
    gradients are freed before the next student runs, so that students between their steps hold only their
    weights, EMA and optimizer state."""
    with student.own_stream():
        with student.precision.autocast():
            terms = student_losses(student.model, student.criterion, samples, targets, teacher, student.teacher_blocks)
        student.precision.backward_and_step(terms['loss'], student.optimizer, student.model.parameters(),
                                            student.max_norm)
        student.optimizer.zero_grad(set_to_none=True)
    if student.model_ema is not None:
        # Queued before the step's host sync, so that its launches overlap the GPU's work on the step.
        student.model_ema.update(student.model)
    return {name: value.detach() for name, value in terms.items()}


class PhaseTimer:
    """The time of each phase of a step (the teacher's forward, each student's step), summed: CUDA events on a GPU,
    read once the step's host sync has passed them (no sync of their own), the host clock on a CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == 'cuda'
        self.seconds: dict[str, float] = defaultdict(float)
        self._marks: list = []

    def mark(self, phase: Optional[str] = None) -> None:
        """The end of ``phase`` (None: the start of the first phase)."""
        if self.cuda:
            point = torch.cuda.Event(enable_timing=True)
            point.record()
        else:
            point = time.perf_counter()
        self._marks.append((phase, point))

    def collect(self) -> None:
        """Add the marked phases to ``seconds``; after the step's host sync."""
        for (_, start), (phase, end) in zip(self._marks, self._marks[1:]):
            self.seconds[phase] += start.elapsed_time(end) / 1000.0 if self.cuda else end - start
        self._marks.clear()


TEACHER_PHASE = 'teacher'


def train_step(students: Sequence[Student], teacher: Optional[nn.Module], samples: torch.Tensor,
               targets: torch.Tensor, timer: Optional[PhaseTimer] = None) -> list[dict[str, torch.Tensor]]:
    """The teacher's forward, once, then every student's step on the batch, one after the other (so that one
    student's activations are alive at a time); each student's terms. ``timer``, where given, marks the phases."""
    if timer is not None:
        timer.mark()
    # The students' precisions differ only in their grad scalers: one autocast serves the teacher.
    with students[0].precision.autocast():
        output = teacher_forward(teacher, samples)
    if timer is not None:
        timer.mark(TEACHER_PHASE)
    terms = []
    for student in students:
        terms.append(student_step(student, output, samples, targets))
        if timer is not None:
            timer.mark(student.name)
    return terms


@dataclass
class EpochResult:
    """What ``train_one_epoch`` returns: each student's epoch averages (every term, and the last LR), the seconds of
    each phase of the steps (``TEACHER_PHASE`` and each student's name; timed only with several students, for
    ``variants.md``), and whether it ended early because a process was asked to stop (preemption), in which case the
    caller saves."""
    stats: list[dict[str, float]]
    seconds: dict[str, float]
    stopped: bool


def train_one_epoch(
        students: Sequence[Student],
        teacher: Optional[nn.Module],
        data_loader: Iterable,
        device: torch.device,
        epoch: int,
        mixup_fn=None,
        set_training_mode: bool = True,
        print_freq: int = 10,
        stop: Optional['StopSignal'] = None,
) -> EpochResult:
    """One epoch of distillation of every student on one data stream, ``stop`` polled after every step."""
    stop = stop or StopSignal()
    for student in students:
        student.model.train(set_training_mode)
    # Several students' meters are told apart by a "name/" prefix; one student's keep DeiT's names.
    prefixes = [f'{student.name}/' if len(students) > 1 else '' for student in students]
    metric_logger = utils.MetricLogger(delimiter='  ')
    for prefix in prefixes:
        metric_logger.add_meter(f'{prefix}lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    header = f'Epoch: [{epoch}]'
    timer = PhaseTimer(device) if len(students) > 1 else None
    stopping = 0.0
    for step, (samples, targets) in enumerate(metric_logger.log_every(data_loader, print_freq, header)):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)

        with stop.waiting_on_peers():
            terms = train_step(students, teacher, samples, targets, timer)
            *values, stopping = step_values_over_processes([v for t in terms for v in t.values()], stop.requested())
        if timer is not None:
            timer.collect()
        for student, student_terms, prefix in zip(students, terms, prefixes):
            named = dict(zip(student_terms, values[:len(student_terms)]))
            values = values[len(student_terms):]
            # A non-finite loss on any process stops every process at this step, before anything is saved from it.
            if not math.isfinite(named['loss']):
                detail = ', '.join(f'{k}={v:.6g}' for k, v in named.items())
                who = f'student {student.name}: ' if prefix else ''
                raise NonFiniteLossError(f'{who}non-finite loss at epoch {epoch}, step {step}: {detail}')
            metric_logger.update(**{prefix + k: v for k, v in named.items()})
            metric_logger.update(**{f'{prefix}lr': student.optimizer.param_groups[0]['lr']})
        if stopping:
            break
    metric_logger.synchronize_between_processes()
    print('Averaged stats:', metric_logger)
    averages = {k: meter.global_avg for k, meter in metric_logger.meters.items()}
    stats = [{k.removeprefix(prefix): v for k, v in averages.items() if k.startswith(prefix)
              and (prefix or '/' not in k)} for prefix in prefixes]
    return EpochResult(stats, dict(timer.seconds) if timer is not None else {}, bool(stopping))


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
    return evaluate_students(data_loader, [model], device, precision, print_freq)[0]


@torch.no_grad()
def evaluate_students(data_loader: Iterable, models: Sequence[nn.Module], device: torch.device,
                      precision: Optional[Precision] = None, print_freq: int = 10,
                      names: Sequence[str] = ()) -> list[dict[str, float]]:
    """``evaluate`` of several models in one pass over the data (each batch read once); DeiT's line per model,
    after ``[name]`` where ``names`` are given."""
    for model in models:
        model.eval()
    metric_logger = utils.MetricLogger(delimiter='  ')
    # Per model: loss, top-1 hits, top-5 hits.
    sums = torch.zeros(len(models), 3, dtype=torch.float64, device=device)
    images = 0
    autocast = precision.autocast() if precision is not None else contextlib.nullcontext()
    for samples, target in metric_logger.log_every(data_loader, print_freq, 'Test:'):
        samples = samples.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        for index, model in enumerate(models):
            with autocast:
                output = model(samples)
            output = output.float()
            top5 = output.topk(min(TOP_K, output.shape[1]), dim=1).indices
            hits = top5.eq(target[:, None])
            sums[index] += torch.stack([nn.functional.cross_entropy(output, target, reduction='sum'),
                                        hits[:, 0].sum(), hits.any(dim=1).sum()]).double()
        images += len(target)
    totals = torch.cat([sums.flatten(), sums.new_tensor([images])])
    if utils.is_dist_avail_and_initialized():
        torch.distributed.all_reduce(totals)
    *values, count = totals.tolist()
    count = max(count, 1.0)
    results = []
    for index, name in enumerate(names or [''] * len(models)):
        loss_sum, top1, top5 = values[3 * index:3 * index + 3]
        stats = {'acc1': 100.0 * top1 / count, 'acc5': 100.0 * top5 / count, 'loss': loss_sum / count}
        print((f'[{name}] ' if name else '') + '* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f}'.format(**stats))
        results.append(stats)
    return results


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
    """One student's ``train_step`` (the teacher's forward and the student's step, its EMA updated), built from its
    parts: the benchmark's and the tests' step of one student."""
    blocks = teacher.token_capture.block_ids if teacher is not None else ()
    student = Student('', model, criterion, optimizer, precision, blocks, max_norm, model_ema)
    return train_step([student], teacher, samples, targets)[0]
