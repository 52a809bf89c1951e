"""On a GPU: mixed precision, the fp16 grad scaler, fused AdamW, --compile, NCCL, --eval, checkpoints that change
device, the pinned DataLoader and the memory of a step at the papers' batches.

Marked ``cuda``: ``python -m pytest -m cuda tests`` runs only these (``.ci/gpu-check`` runs them with the
benchmark); each is skipped where CUDA is absent. The bodies take their device from the ``device`` fixture.
"""
import copy
import functools
import json
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import timm
import torch
from timm.optim import create_optimizer_v2, optimizer_kwargs

import benchmark
import checkpoints
import dali_data
import datasets
import engine
import main
import models
import students
import utils
from benchmark import NUM_CLASSES, PAPER_CONFIGURATIONS, PaperConfiguration
from helpers import (ACCURACY_LINE, FEATURE_KD, PROBE, SHORT_DIST_TIMEOUT, assert_ranks_in_sync,  # noqa: F401
                     assert_same_tensors, check_compiled_matches_eager, free_port, keep_signal_handlers, launch,
                     make_shapes, rank_states, run_main, save_teacher, torchrun)
from launch import LaunchEnvironment
from test_golden import CASES as GOLDEN_CASES, TERM_RTOL as GOLDEN_TERM_RTOL
from test_golden import build_case as build_golden_case, seeded_batch as golden_batch
from losses import build_criterion
from shapes import make_shapes_dataset

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device (.ci/gpu-check runs these)')]

CLSKD, CLSKD_SMALL, MANIFOLD = PAPER_CONFIGURATIONS
MIXED_PRECISION_BATCH = 8  # the papers' models at 224 px; a few images keep the comparison quick
RANDOM_TOKENS_SEED = 1  # the random relation term draws its tokens: the same ones in every precision
# Every loss term under autocast against float32, relative. bf16 keeps 8 significant bits (rounding 2^-9 ~ 2e-3 per
# operation) in the models' matmuls and attention; the loss terms themselves run in float32. With CPU bf16 autocast,
# these configurations' terms moved by at most 7.2e-3 over four batches, fp16 (11 bits) by at most 7.4e-4 on one
# (measured while the loss terms' products still ran under autocast too): 2e-2 is three times the worst seen.
MIXED_PRECISION_REL = 2e-2
MAX_SCALER_BACKOFFS = 8  # fp16 steps that may overflow at the start while the scaler lowers its scale
OPTIMIZER_STEPS = 3
# Fused AdamW is the per-parameter update in one kernel: in fp32 the two differ by rounding (~1e-7 relative).
FUSED_ADAMW_RTOL, FUSED_ADAMW_ATOL = 1e-6, 1e-8
# --compile against eager, both fp32 without TF32: fusion and reduction order change the last bits (the CPU test
# holds 1e-5 on the terms; GPU reductions split differently).
COMPILE_REL, COMPILE_RTOL, COMPILE_ATOL = 1e-4, 1e-4, 1e-5
GPU_MEMORY_BYTES = 80 * 10 ** 9  # an 80 GB H100
SMALL_IMAGE_SIZE = 32
LOADER_WORKERS = 2
EVAL_CLASSES = 13  # an odd number of images and classes, so that Acc@5 is not trivially 100
# Acc@1 changes only where an image's 1st and 2nd logits swap, Acc@5 where its 5th and 6th do.
TOP_K_BOUNDARIES = (1, 5)
# The smallest gap there, as a fraction of an image's logit range, that no device or precision may close: bf16
# autocast moved logits by up to 1.5e-2 of their range on the CPU (random heads), so a gap by up to 3e-2; float32
# on another device (reduction order, cuDNN's TF32 convolutions) by far less.
SAFE_GAP = 6e-2
PERCENT = 100.0
ACCURACY_DECIMALS = 3  # DeiT prints Acc@1 and Acc@5 with three decimals
LOSS_PRINT_TOLERANCE = 1e-3  # and the loss


@pytest.fixture()
def device() -> torch.device:
    """The current GPU with its index, as ``main.process_device`` resolves ``--device cuda``."""
    return torch.device('cuda', torch.cuda.current_device())


@pytest.fixture()
def exact_fp32(monkeypatch):
    """float32 convolutions without TF32 (cuDNN's default), so that fp32 really is the reference. Matmuls are full
    fp32 by default; setting them too would mix torch's legacy and new TF32 switches, which torch refuses."""
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)


def paper_args(configuration: PaperConfiguration, device: torch.device, *flags: str):
    """A paper's training flags (README's) on ``device``, then ``flags``."""
    return main.get_args_parser().parse_args([*configuration.argv(), '--device', device.type, *flags])


@functools.cache
def paper_teacher(configuration: PaperConfiguration, device: torch.device) -> torch.nn.Module:
    """The configuration's teacher with random weights, built once per module run (it is never trained)."""
    torch.manual_seed(0)
    return models.random_teacher(paper_args(configuration, device), NUM_CLASSES).to(device)


def fresh_student(args, teacher: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.create_student(args, teacher, NUM_CLASSES).to(device)


def mixed_batch(args, device: torch.device, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and labels, mixed by DeiT's mixup/cutmix as in training (soft targets)."""
    np.random.seed(0)  # mixup draws from numpy
    torch.manual_seed(0)
    samples = torch.randn(batch_size, 3, args.input_size, args.input_size, device=device)
    targets = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    return datasets.build_mixup(args, NUM_CLASSES)(samples, targets)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def small_run(device: torch.device) -> list[str]:
    return ['--input-size', str(SMALL_IMAGE_SIZE), '--num_workers', '0', '--device', device.type, '--print-freq', '1',
            *SHORT_DIST_TIMEOUT]


@pytest.fixture(scope='module')
def small_data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp('shapes'), train_per_class=2, val_per_class=1)


@pytest.fixture(scope='module')
def small_teacher(tmp_path_factory) -> Path:
    return save_teacher(tmp_path_factory.mktemp('teacher') / 'deit_small.pth', 'deit_small_patch16_224',
                        img_size=SMALL_IMAGE_SIZE)


@pytest.mark.usefixtures('exact_fp32')
@pytest.mark.parametrize('amp_dtype', ['bfloat16', 'float16'])
@pytest.mark.parametrize('configuration', [CLSKD, MANIFOLD], ids=['clskd', 'manifold'])
def test_mixed_precision_terms_match_float32(configuration, amp_dtype, device):
    """The papers' steps under autocast: every loss term within MIXED_PRECISION_REL of the float32 step on the same
    batch and weights."""
    args = paper_args(configuration, device, '--batch-size', str(MIXED_PRECISION_BATCH))
    teacher = paper_teacher(configuration, device)
    student = fresh_student(args, teacher, device)
    criterion = build_criterion(args)
    samples, targets = mixed_batch(args, device, MIXED_PRECISION_BATCH)
    terms = {}
    for flags in (['--no-amp'], ['--amp-dtype', amp_dtype]):
        precision = engine.Precision.for_training(paper_args(configuration, device, *flags), device)
        torch.manual_seed(RANDOM_TOKENS_SEED)
        with precision.autocast():
            losses = engine.compute_losses(student, teacher, criterion, samples, targets)
        terms[precision.dtype] = {name: value.item() for name, value in losses.items()}
    reference = terms.pop(torch.float32)
    assert list(terms) == [getattr(torch, amp_dtype)]
    # The papers' alpha 1 gives the label term the weight 0; every other term must be there to compare.
    assert reference['base'] == 0 and all(value > 0 for name, value in reference.items() if name != 'base')
    assert terms[getattr(torch, amp_dtype)] == pytest.approx(reference, rel=MIXED_PRECISION_REL)


def optimizer_steps(optimizer: torch.optim.Optimizer) -> list[float]:
    return [float(state['step']) for state in optimizer.state.values()]


def test_float16_scaler_trains_and_skips_a_step_with_an_infinite_gradient(device):
    """--amp-dtype float16 (the Manifold original's precision): the grad scaler is on, steps update the weights, and
    a step whose gradient holds an inf leaves weights and optimizer state alone and lowers the scale."""
    args = paper_args(MANIFOLD, device, '--batch-size', str(MIXED_PRECISION_BATCH), '--amp-dtype', 'float16')
    precision = engine.Precision.for_training(args, device)
    assert precision.dtype == torch.float16 and precision.scaler.is_enabled()
    teacher = paper_teacher(MANIFOLD, device)
    student = fresh_student(args, teacher, device)
    criterion = build_criterion(args)
    optimizer = engine.build_optimizer(args, student, device, args.lr)
    samples, targets = mixed_batch(args, device, MIXED_PRECISION_BATCH)

    def step() -> tuple[dict, float, dict]:
        before, scale = weights(student), precision.scaler.get_scale()
        terms = engine.training_step(student, teacher, criterion, optimizer, precision, samples, targets)
        return before, scale, terms

    for _ in range(MAX_SCALER_BACKOFFS):
        before, scale, _ = step()
        if precision.scaler.get_scale() >= scale:
            break
    assert precision.scaler.get_scale() >= scale, f'{MAX_SCALER_BACKOFFS} steps in a row overflowed in fp16'
    after = weights(student)
    assert any(not torch.equal(after[name], before[name]) for name in after), 'an applied step changed nothing'
    assert all(torch.isfinite(value).all() for value in after.values())

    steps = optimizer_steps(optimizer)
    handle = student.head.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))
    try:
        before, scale, terms = step()
    finally:
        handle.remove()
    assert math.isfinite(terms['loss'].item())
    after = weights(student)
    assert all(torch.equal(after[name], before[name]) for name in after), 'the skipped step changed weights'
    assert precision.scaler.get_scale() == scale * precision.scaler.get_backoff_factor()
    assert optimizer_steps(optimizer) == steps


def test_fused_adamw_gives_the_unfused_update(device):
    """build_optimizer's fused AdamW against timm's same optimizer as the plain per-parameter loop, same gradients."""
    args = main.get_args_parser().parse_args(['--device', device.type])
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', img_size=SMALL_IMAGE_SIZE).to(device)
    reference = copy.deepcopy(model)
    fused = engine.build_optimizer(args, model, device, args.lr)
    unfused = create_optimizer_v2(reference, **{**optimizer_kwargs(args), 'lr': args.lr}, foreach=False, fused=False)
    assert fused.defaults['fused'] and not unfused.defaults['fused']
    start = weights(model)
    generator = torch.Generator(device).manual_seed(0)
    for _ in range(OPTIMIZER_STEPS):
        for param, twin in zip(model.parameters(), reference.parameters()):
            param.grad = torch.randn(param.shape, device=device, generator=generator)
            twin.grad = param.grad.clone()
        fused.step()
        unfused.step()
    for (name, param), twin in zip(model.named_parameters(), reference.parameters()):
        assert not torch.equal(param, start[name]), name
        torch.testing.assert_close(param, twin, rtol=FUSED_ADAMW_RTOL, atol=FUSED_ADAMW_ATOL, msg=name)


@pytest.mark.usefixtures('exact_fp32')
def test_compiled_models_give_the_eager_losses_and_gradients(device):
    check_compiled_matches_eager(device, rel=COMPILE_REL, rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
    torch.compiler.reset()


@pytest.mark.parametrize('processes', [1, pytest.param(2, marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason='needs 2 GPUs'))])
def test_torchrun_trains_checkpoints_and_keeps_ranks_identical(processes, device, small_data, small_teacher,
                                                               tmp_path):
    """torchrun with NCCL on as many GPUs: an epoch of [CLS]-KD trains, rank 0 writes checkpoint.pth, and every rank
    ends with the same student, projector, EMA and optimizer state."""
    out = tmp_path / 'run'
    result = launch(torchrun(f'--nproc_per_node={processes}', f'--master_port={free_port()}')
                    + [PROBE, '--distributed', '--data-path', str(small_data), '--teacher-path', str(small_teacher),
                       '--output_dir', str(out), '--epochs', '1', *FEATURE_KD, *small_run(device)])
    backend = 'nccl' if device.type == 'cuda' else 'gloo'
    for rank in range(processes):
        assert f'| distributed init (rank {rank}): env://, backend {backend}' in result.stdout
    states = rank_states(out, processes)
    assert [state['epoch'] for state in states] == [0] * processes
    assert_ranks_in_sync(states)
    written = torch.load(out / checkpoints.CHECKPOINT_NAME, map_location='cpu', weights_only=False)
    assert_same_tensors(states[0]['model'], written['model'], 'checkpoint.pth and rank 0')


def boundary_gaps(logits: torch.Tensor) -> torch.Tensor:
    """``[images, boundaries]``: the logit gaps where Acc@1 and Acc@5 change, over each image's logit range."""
    ordered = logits.sort(dim=1, descending=True).values
    spread = ordered[:, 0] - ordered[:, -1]
    return torch.stack([ordered[:, k - 1] - ordered[:, k] for k in TOP_K_BOUNDARIES], dim=1) / spread[:, None]


class EvalCase(NamedTuple):
    data: Path
    checkpoint: Path
    accuracies: tuple[float, float]  # Acc@1 and Acc@5 of the checkpoint on the images, by construction


def accuracies(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    top = logits.topk(max(TOP_K_BOUNDARIES), dim=1).indices.eq(labels[:, None])
    return tuple(round(PERCENT * top[:, :k].any(dim=1).float().mean().item(), ACCURACY_DECIMALS)
                 for k in TOP_K_BOUNDARIES)


@pytest.fixture(scope='module')
def eval_case(tmp_path_factory) -> EvalCase:
    """Validation images and a student checkpoint whose head is solved for: each image's logits equally spaced over
    its range in a random order, image ``i``'s label at rank ``i`` (right on one image, in the top 5 on five).

    Every gap is then 1/12 of the range, above SAFE_GAP: no device or precision may print other accuracies.
    """
    root = tmp_path_factory.mktemp('eval')
    data = Path(make_shapes_dataset(str(root / 'shapes'), num_classes=EVAL_CLASSES, train_per_class=1,
                                    val_per_class=1, image_size=SMALL_IMAGE_SIZE))
    args = main.get_args_parser().parse_args(['--data-set', 'SHAPES', '--data-path', str(data), '--input-size',
                                              str(SMALL_IMAGE_SIZE)])
    val, _ = datasets.build_dataset(is_train=False, args=args)
    images = torch.stack([val[i][0] for i in range(len(val))])
    labels = torch.tensor(val.targets)
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=EVAL_CLASSES, img_size=SMALL_IMAGE_SIZE).eval()
    with torch.no_grad():
        features = model.forward_head(model.forward_features(images), pre_logits=True)
    levels = torch.linspace(1, 0, EVAL_CLASSES)  # by rank, highest first
    wanted = torch.empty(len(val), EVAL_CLASSES)
    generator = torch.Generator().manual_seed(0)
    for image, label in enumerate(labels.tolist()):
        others = [c for c in torch.randperm(EVAL_CLASSES, generator=generator).tolist() if c != label]
        rank = image % EVAL_CLASSES
        wanted[image, others[:rank] + [label] + others[rank:]] = levels
    head = torch.linalg.lstsq(features, wanted).solution.T
    with torch.no_grad():
        model.head.weight.copy_(head)
        model.head.bias.zero_()
        logits = model(images)
    assert boundary_gaps(logits).min() >= SAFE_GAP
    torch.save({'model': model.state_dict()}, root / 'student.pth')
    return EvalCase(data, root / 'student.pth', accuracies(logits, labels))


def test_eval_resume_prints_the_cpu_accuracies(eval_case, device):
    """``--eval --resume`` on the GPU, in DeiT's float16 autocast (the default), in float32 and in the training
    precision (bf16), prints the Acc@1 and Acc@5 the same checkpoint gets on the CPU for the same images."""
    argv = ['--eval', '--resume', str(eval_case.checkpoint), '--model', 'deit_tiny_patch16_224', '--data-set',
            'SHAPES', '--data-path', str(eval_case.data), '--batch-size', '4', '--input-size', str(SMALL_IMAGE_SIZE),
            '--num_workers', '0']
    printed = {}
    for name, flags in (('cpu', ['--device', 'cpu']), ('original', ['--device', device.type]),
                        ('fp32', ['--device', device.type, '--eval-precision', 'float32']),
                        ('training', ['--device', device.type, '--eval-precision', 'training'])):
        result = run_main([*argv, *flags])
        assert result.returncode == 0, result.stderr[-3000:]
        printed[name] = tuple(map(float, ACCURACY_LINE.search(result.stdout).groups()))
    assert {name: values[:2] for name, values in printed.items()} == dict.fromkeys(printed, eval_case.accuracies)
    assert printed['fp32'][2] == pytest.approx(printed['cpu'][2], abs=LOSS_PRINT_TOLERANCE)


@pytest.mark.parametrize('flags, dtype', [([], torch.float16), (['--no-amp'], torch.float16),
                                          (['--eval-precision', 'training'], torch.bfloat16),
                                          (['--eval-precision', 'float32'], torch.float32)])
def test_evaluation_on_cuda_is_deits_float16_autocast_by_default(flags, dtype, device):
    """DeiT's ``evaluate`` runs the model under CUDA's float16 autocast whatever trains: so does the default here."""
    args = main.get_args_parser().parse_args(flags)
    training = engine.Precision.for_training(args, device)
    evaluation = engine.Precision.for_evaluation(args, device, training)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=EVAL_CLASSES, img_size=SMALL_IMAGE_SIZE).to(device)
    seen = []
    model.head.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = [(torch.randn(4, 3, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE), torch.randint(0, EVAL_CLASSES, (4,)))]
    stats = engine.evaluate(batch, model, device, evaluation)
    assert seen == [dtype] and math.isfinite(stats['loss'])


def test_loss_terms_with_tf32_stay_within_the_golden_tolerance(device, tmp_path, monkeypatch):
    """Whether the loss's products may use TF32 on CUDA (they do not: full float32): every golden term with TF32
    matmuls against the original code's values, at the golden tests' tolerance. Passing here is what would allow
    switching TF32 on for the loss."""
    case, reference = GOLDEN_CASES['clskd_tiny_base']['case'], GOLDEN_CASES['clskd_tiny_base']['reference']
    args, student, teacher = build_golden_case(case, tmp_path)
    samples, targets = golden_batch(case['batch'], case['seed_batch'])
    student, teacher = student.to(device), teacher.to(device)
    monkeypatch.setattr(torch.backends.cuda.matmul, 'allow_tf32', True)
    terms = engine.compute_losses(student, teacher, build_criterion(args), samples.to(device), targets.to(device))
    for key, value in reference.items():
        if key != 'grad_norm':
            assert terms[key].item() == pytest.approx(value, rel=GOLDEN_TERM_RTOL, abs=1e-12), key


@pytest.mark.usefixtures('keep_signal_handlers')
@pytest.mark.parametrize('first, second', [('cuda', 'cpu'), ('cpu', 'cuda')])
def test_checkpoint_resumes_on_the_other_device(first, second, small_data, small_teacher, tmp_path):
    """An epoch on one device, its checkpoint.pth resumed on the other: the second epoch continues the schedule and
    the optimizer state (fused AdamW's step counts)."""
    argv = [*FEATURE_KD, '--data-path', str(small_data), '--teacher-path', str(small_teacher), '--input-size',
            str(SMALL_IMAGE_SIZE), '--num_workers', '0', '--print-freq', '100']
    written = tmp_path / first / checkpoints.CHECKPOINT_NAME
    assert main.run([*argv, '--device', first, '--epochs', '1', '--output_dir', str(written.parent)]) == 0
    resumed = tmp_path / 'resumed'
    assert main.run([*argv, '--device', second, '--epochs', '2', '--output_dir', str(resumed), '--resume',
                     str(written)]) == 0
    before = torch.load(written, map_location='cpu', weights_only=False)
    after = torch.load(resumed / checkpoints.CHECKPOINT_NAME, map_location='cpu', weights_only=False)
    assert (before['epoch'], after['epoch']) == (0, 1)
    assert [json.loads(line)['epoch'] for line in (resumed / 'log.txt').read_text().splitlines()] == [1]
    steps = {float(state['step']) for state in before['optimizer']['state'].values()}
    assert {float(state['step']) for state in after['optimizer']['state'].values()} == {2 * s for s in steps}


def test_pinned_loader_with_workers_feeds_a_step(device, small_data):
    """The training DataLoader on CUDA: worker processes, pinned batches, an epoch of the real loop."""
    args = main.get_args_parser().parse_args([*FEATURE_KD, '--data-path', str(small_data), '--input-size',
                                              str(SMALL_IMAGE_SIZE), '--device', device.type, '--num_workers',
                                              str(LOADER_WORKERS)])
    dataset_train, num_classes = datasets.build_dataset(is_train=True, args=args)
    dataset_val, _ = datasets.build_dataset(is_train=False, args=args)
    loader, _ = datasets.build_loaders(args, dataset_train, dataset_val, LaunchEnvironment())
    pinned = device.type == 'cuda'
    assert loader.num_workers == LOADER_WORKERS and loader.pin_memory == pinned
    assert next(iter(loader))[0].is_pinned() == pinned
    torch.manual_seed(0)
    teacher = models.random_teacher(args, num_classes).to(device)
    student = models.create_student(args, teacher, num_classes).to(device)
    trained = engine.Student('', student, build_criterion(args), engine.build_optimizer(args, student, device, args.lr),
                             engine.Precision.for_training(args, device), models.teacher_blocks(args))
    result = engine.train_one_epoch([trained], teacher, loader, device, 0,
                                    mixup_fn=datasets.build_mixup(args, num_classes))
    assert math.isfinite(result.stats[0]['loss'])


@pytest.mark.parametrize('configuration', PAPER_CONFIGURATIONS, ids=['clskd-tiny', 'clskd-small', 'manifold'])
def test_a_paper_step_fits_an_80_gb_gpu(configuration, device):
    """One training step at the paper's per-GPU batch in CUDA's default precision (bf16): its peak memory
    (``torch.cuda.max_memory_allocated``: models, optimizer state, activations) fits an 80 GB GPU."""
    args = paper_args(configuration, device)
    teacher = paper_teacher(configuration, device)
    student = fresh_student(args, teacher, device)
    criterion = build_criterion(args)
    optimizer = engine.build_optimizer(args, student, device, args.lr)
    precision = engine.Precision.for_training(args, device)
    samples, targets = mixed_batch(args, device, configuration.batch_size)
    engine.training_step(student, teacher, criterion, optimizer, precision, samples, targets)  # optimizer state
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    engine.training_step(student, teacher, criterion, optimizer, precision, samples, targets)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    assert peak < GPU_MEMORY_BYTES, f'{configuration.mode}: {peak / 2 ** 30:.1f} GiB at batch {args.batch_size}'


def students_peak_and_held(device: torch.device, *variants: str) -> tuple[int, int]:
    """The peak memory of the second shared step of the [CLS]-KD configuration's students (DeiT-Ti, and the
    ``--variant``s) on one random DeiT-B teacher at the paper's per-GPU batch, and the bytes their weights, EMA and
    optimizer states hold."""
    parser = main.command_line_parser()
    args = parser.parse_args([*CLSKD.argv(), '--device', device.type, '--benchmark', *variants])  # a random teacher
    step = benchmark.build_step(args, device, students.parse_variants(parser, args, main.check_student_args))
    built, teacher = step.students, step.teacher
    samples, targets = mixed_batch(args, device, CLSKD.batch_size)
    engine.train_step(built, teacher, samples, targets)  # the optimizers' state
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    engine.train_step(built, teacher, samples, targets)
    torch.cuda.synchronize(device)
    held = sum(t.nbytes for student in built for module in (student.model, student.model_ema.module)
               for t in module.state_dict().values())
    held += sum(t.nbytes for student in built for state in student.optimizer.state.values() for t in state.values()
                if isinstance(t, torch.Tensor))
    peak = torch.cuda.max_memory_allocated(device)
    del step, built, teacher, samples, targets
    torch.cuda.empty_cache()
    return peak, held


def test_students_share_one_teacher_within_one_students_activations(device):
    """The two [CLS]-KD headline students (DeiT-Ti and DeiT-S) on one DeiT-B forward at batch 128: the peak stays
    below that of DeiT-S alone plus both students' weights, EMA and optimizer states (one student's activations and
    gradients alive at a time)."""
    alone, _ = students_peak_and_held(device, '--model', 'deit_small_patch16_224')
    shared, held = students_peak_and_held(device, '--variant', 'small: --model deit_small_patch16_224')
    assert shared < alone + held, f'{shared / 2 ** 30:.2f} GiB shared, {alone / 2 ** 30:.2f} GiB alone'


# nvJPEG on the GPU and libjpeg-turbo on the CPU round differently, the resampling is the same: the normalised pixels
# of an image may differ by about a level of 255 on average (0.02 std units) and a few levels at edges.
DALI_DEVICE_MEAN_TOLERANCE = 0.03
DALI_DEVICE_MAX_TOLERANCE = 0.6


def dali_args(data: Path, device: torch.device, *flags: str):
    args = main.get_args_parser().parse_args(['--data-set', 'IMNET', '--data-path', str(data), '--input-size', '64',
                                              '--device', device.type, '--batch-size', '8', '--num_workers', '2',
                                              '--data-backend', 'dali', *flags])
    main.check_args(args)
    return args


@pytest.fixture(scope='module')
def small_jpegs(tmp_path_factory) -> Path:
    return Path(make_shapes_dataset(str(tmp_path_factory.mktemp('jpegs')), num_classes=4, train_per_class=8,
                                    val_per_class=4, image_size=(200, 150), jpeg_quality=90))


def test_dali_decodes_on_the_gpu_and_agrees_with_its_cpu_backend(small_jpegs, device):
    """The mixed pipeline hands batches on the GPU; its evaluation outputs are the CPU backend's within the decoders'
    rounding, and its training batches have the CPU backend's shape and labels."""
    outputs = {}
    for name in ('cpu', 'cuda'):
        where = torch.device(name) if name == 'cpu' else device
        args = dali_args(small_jpegs, where)
        train, _ = datasets.build_dataset(True, args)
        val, _ = datasets.build_dataset(False, args)
        loader_train, loader_val = dali_data.build_dali_loaders(args, train, val, LaunchEnvironment(), where)
        images, targets = next(iter(loader_train))
        assert images.device == targets.device == where and images.shape == (8, 3, 64, 64)
        assert loader_train._built.device_id == where.index  # the pipeline itself is on that GPU (None: the CPU)
        outputs[name] = torch.cat([images.cpu() for images, _ in loader_val])
    difference = (outputs['cuda'] - outputs['cpu']).abs()
    assert difference.mean(dim=(1, 2, 3)).max() <= DALI_DEVICE_MEAN_TOLERANCE
    assert difference.max() <= DALI_DEVICE_MAX_TOLERANCE


def test_a_dali_run_trains_on_the_gpu(small_jpegs, tmp_path, device):
    result = run_main(['--data-set', 'IMNET', '--data-path', str(small_jpegs), '--input-size', '64', '--device',
                       device.type, '--batch-size', '8', '--num_workers', '2', '--data-backend', 'dali', '--model',
                       'deit_tiny_patch16_224', '--epochs', '1', '--output_dir', str(tmp_path / 'run')])
    assert result.returncode == 0, result.stderr[-3000:]
    assert ACCURACY_LINE.search(result.stdout)


def test_random_states_are_this_processs_gpus_and_a_students_own_stream(device):
    """A checkpoint keeps the CUDA random state of the process's own GPU (whatever GPUs another launch shows it) and
    restores it there; a student's stream resumed from a CPU run's state starts its CUDA draws from its own seed,
    not from the data's stream."""
    saved = checkpoints.rng_state()
    first = torch.rand(4, device=device)
    torch.rand(16, device=device)
    checkpoints.set_rng_state(saved)
    assert torch.equal(torch.rand(4, device=device), first)

    fresh = utils.RandomStream(3, 0, device)
    resumed = utils.RandomStream(3, 0, device)
    resumed.load_state_dict({**fresh.state_dict(), 'cuda': None})
    torch.manual_seed(0)
    with fresh.active():
        expected = torch.rand(4, device=device)
    with resumed.active():
        assert torch.equal(torch.rand(4, device=device), expected)
    assert not torch.equal(torch.rand(4, device=device), expected)
