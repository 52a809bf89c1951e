"""Each claim of docs/differences.md, measured: the differences from the original code and the quirks of the
originals that are kept.

Every test here names the claim it backs; the page quotes the numbers these tests see and the bounds they assert.
"""
import copy
import json
import re
import sys

import numpy as np
import pytest
import timm
import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.data.mixup import rand_bbox
from timm.models.vision_transformer import VisionTransformer
from timm.scheduler import create_scheduler
from timm.utils import accuracy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import checkpoints
import datasets
import engine
import main
from helpers import (LAUNCH_TIMEOUT_S, SHORT_DIST_TIMEOUT, free_port, keep_signal_handlers,  # noqa: F401 (fixtures)
                     launch_env, make_shapes, one_thread, read_log, run, save_teacher, torchrun)
from launch import LaunchEnvironment
from losses import build_criterion, random_token_index
from models import check_token_shapes, create_student, random_teacher
from nan_on_one_rank import NOTES_FILE as LOSS_NOTES_FILE
from samplers import RASampler
from utils import SmoothedValue, UserError

IMAGE_SIZE = 32
NUM_CLASSES = 10
EVAL_IMAGES = 23
EVAL_BATCH_SIZES = (2, 3, EVAL_IMAGES)
# Fused attention against explicit softmax(q k^T) v: the logits' largest difference relative to their largest value
# (measured 7.8e-7 on a 2-core AMD EPYC), and fused AdamW against the per-parameter loop: the largest difference in
# any weight in float32 units in the last place (ulps) of the weight (measured 4, 6.0e-8 at most). About twice to four
# times the measurements.
FUSED_ATTENTION_RTOL = 3e-6
FUSED_ADAMW_ULPS = 8
LR_REFERENCE_BATCH = 512  # DeiT scales --lr by batch * world / 512
WORLD_SIZE = 2
# The two-process run: 20 shapes, each rank 10 a epoch (repeated augmentation), 2 steps of 4; rank 1's base term is
# NaN at the second step of the second epoch.
LAUNCH_BATCH = 4
STEPS_PER_EPOCH = 2
NAN_RANK, NAN_EPOCH, NAN_STEP_IN_EPOCH = 1, 1, 1
NAN_STEP = NAN_EPOCH * STEPS_PER_EPOCH + NAN_STEP_IN_EPOCH  # counted from the run's first step
TEACHER_WIDTH = 384  # deit_small's, to tell the teacher's forward from the student's (deit_tiny: 192)
LOCAL_BATCH = 4


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('deit_tiny_patch16_224', img_size=IMAGE_SIZE, num_classes=NUM_CLASSES).eval()


def originals_evaluation(dataset: TensorDataset, model: torch.nn.Module, batch_size: int) -> dict[str, float]:
    """DeiT's ``evaluate``: each batch's mean loss and accuracies, averaged weighting the accuracies by batch size."""
    meters = {name: SmoothedValue() for name in ('acc1', 'acc5', 'loss')}
    for images, labels in DataLoader(dataset, batch_size=batch_size):
        with torch.no_grad():
            output = model(images)
        acc1, acc5 = accuracy(output, labels, topk=(1, 5))
        meters['loss'].update(torch.nn.functional.cross_entropy(output, labels).item())
        meters['acc1'].update(acc1.item(), n=len(labels))
        meters['acc5'].update(acc5.item(), n=len(labels))
    return {name: meter.global_avg for name, meter in meters.items()}


def test_eval_loss_is_the_mean_over_images_whatever_the_batch_size():
    """Ours: the loss as the mean over images. The originals: the mean of per-batch means, which moves with the batch
    size. Acc@1 and Acc@5 are the originals', and the same whatever the batch size."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(EVAL_IMAGES, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (EVAL_IMAGES,), generator=generator)
    dataset = TensorDataset(images, labels)
    ours = {size: engine.evaluate(DataLoader(dataset, batch_size=size), model, torch.device('cpu'))
            for size in EVAL_BATCH_SIZES}
    originals = {size: originals_evaluation(dataset, model, size) for size in EVAL_BATCH_SIZES}

    with torch.no_grad():
        per_image = torch.nn.functional.cross_entropy(model(images), labels, reduction='none')
    for size in EVAL_BATCH_SIZES:
        assert ours[size]['loss'] == pytest.approx(per_image.mean().item(), rel=1e-6)
        for name in ('acc1', 'acc5'):
            assert ours[size][name] == ours[EVAL_IMAGES][name]
            assert f'{ours[size][name]:.3f}' == f'{originals[size][name]:.3f}', (size, name)
    assert 0 < ours[EVAL_IMAGES]['acc1'] < ours[EVAL_IMAGES]['acc5'] < 100  # neither accuracy is trivially equal
    assert originals[2]['loss'] != pytest.approx(originals[3]['loss'], rel=1e-4)


def test_random_tokens_are_a_uniform_subset_per_pair_from_one_draw():
    """The K random tokens: one draw for all layer pairs, each pair its own uniform K-subset (the originals'
    distribution: a fresh permutation per pair)."""
    pairs, total, k, draws = 3, 20, 5, 4000
    torch.manual_seed(0)
    counts = torch.zeros(pairs, total)
    together = 0
    for _ in range(draws):
        index = random_token_index(pairs, total, k, torch.device('cpu'))
        assert all(len(set(row.tolist())) == k for row in index)
        counts.scatter_add_(1, index, torch.ones(pairs, k))
        together += len(set(index[0].tolist()) & set(index[1].tolist()))
    frequency = counts / draws
    p = k / total
    sigma = (p * (1 - p) / draws) ** 0.5
    assert (frequency - p).abs().max().item() < 5 * sigma
    # Independent pairs share k * k / total tokens on average.
    assert together / draws == pytest.approx(k * k / total, rel=0.05)


@pytest.mark.usefixtures('keep_signal_handlers')
def test_the_same_seed_repeats_a_run_exactly(tmp_path):
    """Runs repeat for a given --seed on a given machine (the originals never seed Python's random, which timm's
    crop draws from), with DataLoader workers, augmentation, mixup, drop path and the random-token term on."""
    shapes = make_shapes(tmp_path / 'shapes', train_per_class=2, val_per_class=1)
    teacher = save_teacher(tmp_path / 'teacher.pth', 'deit_tiny_patch16_224', num_classes=NUM_CLASSES,
                           img_size=IMAGE_SIZE)
    logs = []
    for name in ('a', 'b'):
        out = tmp_path / name
        argv = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224',
                '--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--K', '16',
                '--data-set', 'SHAPES', '--data-path', str(shapes), '--teacher-path', str(teacher),
                '--input-size', str(IMAGE_SIZE), '--batch-size', '4', '--epochs', '1', '--num_workers', '2',
                '--device', 'cpu', '--seed', '7', '--output_dir', str(out)]
        assert main.run(argv) == 0
        logs.append(read_log(out))
    assert logs[0] == logs[1]


def test_timm_1x_cutmix_box_is_one_pixel_larger_for_odd_cuts():
    """For the same draw, timm 1.x ends the box ``(cut + 1) // 2`` past the centre, timm 0.5.4 ``cut // 2``: away from
    the borders a cut of c pixels pastes a c x c box in timm 1.x, and in timm 0.5.4 a (c - 1) x (c - 1) box for an odd
    c, the same c x c box for an even one. The label weights follow the pasted area."""
    size = 224
    for cut in (99, 100, 101):
        lam = 1 - ((cut + 0.5) / size) ** 2
        np.random.seed(0)
        top, bottom, left, right = rand_bbox((3, size, size), lam, count=64)
        np.random.seed(0)
        centre_y = np.random.randint(0, size, size=64)
        centre_x = np.random.randint(0, size, size=64)
        inside = ((centre_y - cut // 2 >= 0) & (centre_y + cut // 2 + 1 < size)
                  & (centre_x - cut // 2 >= 0) & (centre_x + cut // 2 + 1 < size))
        assert inside.any()
        assert ((bottom - top)[inside] == cut).all() and ((right - left)[inside] == cut).all()
        original_height = (centre_y + cut // 2) - (centre_y - cut // 2)
        original_width = (centre_x + cut // 2) - (centre_x - cut // 2)
        assert (original_height[inside] == cut - cut % 2).all() and (original_width[inside] == cut - cut % 2).all()

    # CutMix alone in the training's Mixup: image 0 gets a box of image 1 (ones on zeros), its label weights the
    # box's share of the image, borders clipping it or not.
    args = main.get_args_parser().parse_args(['--mixup', '0', '--cutmix', '1', '--smoothing', '0'])
    mixup = datasets.build_mixup(args, NUM_CLASSES)
    images = torch.stack([torch.zeros(3, size, size), torch.ones(3, size, size)])
    np.random.seed(0)
    for _ in range(20):
        mixed, targets = mixup(images.clone(), torch.tensor([0, 1]))
        assert targets[0, 1].item() == pytest.approx(mixed[0].mean().item(), abs=1e-6)


def test_fused_attention_changes_logits_at_rounding_level():
    """timm's fused scaled_dot_product_attention against the originals' explicit softmax(q k^T) v."""
    fused = tiny_model()
    explicit = copy.deepcopy(fused)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fused(x), explicit(x)
    assert (a - b).abs().max().item() <= FUSED_ATTENTION_RTOL * b.abs().max().item()


def test_fused_adamw_changes_the_update_at_rounding_level():
    """Fused AdamW (one kernel) against the plain per-parameter loop the originals ran, on the same gradients."""
    model = tiny_model()
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    model.train()(x).square().mean().backward()
    updated = []
    for fused in (True, False):
        net = copy.deepcopy(model)
        for param, source in zip(net.parameters(), model.parameters()):
            param.grad = source.grad.clone()
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.05, fused=fused,
                                      foreach=None if fused else False)
        optimizer.step()
        updated.append(net)
    for (name, p), q, start in zip(updated[0].named_parameters(), updated[1].parameters(), model.parameters()):
        assert not torch.equal(p, start), name
        # A weight the step moves through zero is compared at the scale of its value before the step.
        scale = torch.maximum(start.abs(), torch.maximum(p.abs(), q.abs())).detach()
        ulp = torch.nextafter(scale, torch.tensor(float('inf'))) - scale
        assert ((p - q).abs() <= FUSED_ADAMW_ULPS * ulp).all(), name


# EMA weights after 100 updates: one batched update against the originals' per-tensor arithmetic, relative and
# absolute. Measured: 1.2e-7 at most (one float32 rounding of a weight near 1, the sum rounded once instead of twice);
# timm's ModelEmaV3 as it is (a lerp) was 2.4e-6 apart, the originals' arithmetic itself 2.1e-6 from the same EMA in
# float64.
EMA_STEPS = 100
EMA_TOLERANCE = 1e-6
WEIGHT_CHANGE_PER_STEP = 1e-3


def test_model_ema_is_the_originals_arithmetic_to_rounding():
    """The EMA of ``--model-ema`` (its default decay) against timm 0.5.4's ``ModelEma`` update, written out as the
    originals run it on every state_dict entry: ``ema = decay * ema + (1 - decay) * model``."""
    model = tiny_model()
    args = main.get_args_parser().parse_args([])
    ema = engine.build_model_ema(args, model)
    originals = {name: value.detach().clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(1)
    decay = args.model_ema_decay
    with torch.no_grad():
        for _ in range(EMA_STEPS):
            for param in model.parameters():
                param.add_(WEIGHT_CHANGE_PER_STEP * torch.randn(param.shape, generator=generator))
            ema.update(model)
            for name, value in model.state_dict().items():
                originals[name].copy_(originals[name] * decay + (1. - decay) * value)
    ours = ema.module.state_dict()
    assert list(ours) == list(originals)
    for name, value in originals.items():
        assert not torch.equal(ours[name], model.state_dict()[name]), name
        torch.testing.assert_close(ours[name], value, rtol=EMA_TOLERANCE, atol=EMA_TOLERANCE)


@pytest.mark.parametrize('flags,expected', [
    ([], torch.bfloat16),
    (['--no-amp'], torch.float32),
    (['--amp-dtype', 'float16'], torch.float16),
])
def test_precision_flags_on_cuda(flags, expected, monkeypatch):
    """On CUDA: bf16 autocast by default; --no-amp is the [CLS]-KD original's fp32, --amp-dtype float16 the
    Manifold original's fp16 autocast (with a grad scaler)."""
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    args = main.get_args_parser().parse_args(flags)
    assert engine.Precision.for_training(args, torch.device('cuda')).dtype == expected


@pytest.mark.parametrize('flags', [[], ['--amp-cpu'], ['--no-amp'], ['--amp-dtype', 'float16', '--amp-cpu']])
def test_evaluation_on_the_cpu_is_float32_whatever_trains(flags):
    """DeiT's ``evaluate`` autocasts with CUDA's autocast, which does nothing on the CPU: evaluation there is float32
    whatever precision trains, unless ``--eval-precision training`` asks for the training one."""
    cpu = torch.device('cpu')
    args = main.get_args_parser().parse_args(flags)
    training = engine.Precision.for_training(args, cpu)
    assert engine.Precision.for_evaluation(args, cpu, training).dtype == torch.float32
    args = main.get_args_parser().parse_args([*flags, '--eval-precision', 'training'])
    assert engine.Precision.for_evaluation(args, cpu, training) is training


def test_bf16_training_precision_leaves_evaluation_exact():
    """Evaluated in the default precision, a model gives exactly the float32 numbers, where bf16 autocast moves
    the loss."""
    torch.manual_seed(0)
    model = timm.create_model('deit_tiny_patch16_224', num_classes=10, img_size=32)
    loader = DataLoader(TensorDataset(torch.randn(12, 3, 32, 32), torch.randint(0, 10, (12,))), batch_size=5)
    cpu = torch.device('cpu')
    args = main.get_args_parser().parse_args(['--amp-cpu'])
    training = engine.Precision.for_training(args, cpu)
    assert training.dtype == torch.bfloat16
    exact = engine.evaluate(loader, model, cpu)
    assert engine.evaluate(loader, model, cpu, engine.Precision.for_evaluation(args, cpu, training)) == exact
    assert engine.evaluate(loader, model, cpu, training)['loss'] != exact['loss']


# ---------------------------------------------------------------------------------------------
# Two processes: progress lines, a non-finite loss on one of them, the LR scaling and EMA defaults
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def nan_launch(tmp_path_factory) -> dict:
    """torchrun, 2 processes, default flags but a short run: rank 1's base term is NaN at epoch 1, step 1. Returns the
    launch's output, every rank's notes (exit code, its own base term per step) and the output folder."""
    root = tmp_path_factory.mktemp('nan-launch')
    shapes = make_shapes(root / 'shapes', train_per_class=2, val_per_class=1)
    out = root / 'run'
    argv = ['--model', 'deit_tiny_patch16_224', '--data-set', 'SHAPES', '--data-path', str(shapes), '--input-size',
            str(IMAGE_SIZE), '--batch-size', str(LAUNCH_BATCH), '--epochs', '3', '--warmup-epochs', '0', '--device',
            'cpu', '--num_workers', '0', '--print-freq', '1', '--output_dir', str(out), '--distributed',
            *SHORT_DIST_TIMEOUT]
    result = run([sys.executable, *torchrun(f'--nproc_per_node={WORLD_SIZE}', f'--master_port={free_port()}'),
                  'tests/nan_on_one_rank.py', *argv], LAUNCH_TIMEOUT_S,
                 launch_env(NAN_RANK=str(NAN_RANK), NAN_STEP=str(NAN_STEP), LOSSES_DIR=str(root)))
    notes = [json.loads((root / LOSS_NOTES_FILE.format(rank=rank)).read_text()) for rank in range(WORLD_SIZE)]
    return {'result': result, 'notes': notes, 'out': out, 'args': main.get_args_parser().parse_args(argv)}


PROGRESS_LINE = re.compile(r'^Epoch: \[(\d+)\]  \[\s*(\d+)/\d+\]  .*$', re.M)


def test_progress_lines_show_each_term_averaged_over_the_processes(nan_launch):
    """Rank 0 prints, for every term, the median and average over the epoch's steps of the mean over processes (the
    originals: of its own values); log.txt's epoch average is that mean either way."""
    own = [notes['base'] for notes in nan_launch['notes']]
    means = [(torch.tensor(a) + torch.tensor(b)).div(WORLD_SIZE).item() for a, b in zip(*own)]  # gloo's float32 sum
    printed = PROGRESS_LINE.findall(nan_launch['result'].stdout)
    lines = [m.group(0) for m in PROGRESS_LINE.finditer(nan_launch['result'].stdout)]
    assert [(int(e), int(i)) for e, i in printed] == [(0, 0), (0, 1), (NAN_EPOCH, 0)]

    def shown(values: list[float], epoch: int, step: int) -> str:
        meter = SmoothedValue()
        for value in values[epoch * STEPS_PER_EPOCH:epoch * STEPS_PER_EPOCH + step + 1]:
            meter.update(value)
        return str(meter)

    differs_from_rank_0s = False
    for line, (epoch, step) in zip(lines, printed):
        expected = shown(means, int(epoch), int(step))
        assert f'  base: {expected}  ' in line and f'  loss: {expected}  ' in line, line
        differs_from_rank_0s |= shown(own[0], int(epoch), int(step)) != expected
    assert differs_from_rank_0s  # rank 0's own values would have shown otherwise
    logged = read_log(nan_launch['out'])[0]
    assert logged['train_loss'] == pytest.approx(sum(means[:STEPS_PER_EPOCH]) / STEPS_PER_EPOCH, rel=1e-6)


def test_a_non_finite_loss_on_one_process_stops_every_process_at_that_step(nan_launch):
    """Rank 1 alone computes a NaN; both ranks stop at that step with exit code 3 and the step's line, and the last
    checkpoint (epoch 0) and log.txt's line stay as they were."""
    result, notes = nan_launch['result'], nan_launch['notes']
    assert result.returncode != 0
    assert [rank_notes['exit_code'] for rank_notes in notes] == [main.EXIT_NON_FINITE] * WORLD_SIZE, result.stderr
    assert [len(rank_notes['base']) for rank_notes in notes] == [NAN_STEP + 1] * WORLD_SIZE
    assert all(v == v for v in notes[0]['base']) and [v != v for v in notes[1]['base']].index(True) == NAN_STEP
    errors = [line for line in result.stderr.splitlines() if line.startswith('error: ')]
    assert errors == [f'error: non-finite loss at epoch {NAN_EPOCH}, step {NAN_STEP_IN_EPOCH}: base=nan, loss=nan. '
                      'The last good checkpoint is kept.'] * WORLD_SIZE, result.stderr[-3000:]
    assert checkpoints.load_checkpoint(str(nan_launch['out'] / checkpoints.CHECKPOINT_NAME))['epoch'] == 0
    assert [line['epoch'] for line in read_log(nan_launch['out'])] == [0]


def test_the_lr_is_scaled_by_batch_times_world_over_512(nan_launch):
    """Kept quirk: ``--lr`` is for a global batch of 512. Two processes of batch 4 train epoch 0 (no warm-up) at
    ``lr * 4 * 2 / 512``."""
    args = nan_launch['args']
    logged = read_log(nan_launch['out'])[0]
    assert logged['train_lr'] == pytest.approx(args.lr * LAUNCH_BATCH * WORLD_SIZE / LR_REFERENCE_BATCH, rel=1e-12)


def test_model_ema_is_on_by_default(nan_launch):
    """Kept quirk: a run without EMA flags keeps an EMA of the student, saved with every checkpoint."""
    assert main.get_args_parser().parse_args([]).model_ema
    checkpoint = checkpoints.load_checkpoint(str(nan_launch['out'] / checkpoints.CHECKPOINT_NAME))
    assert checkpoint['model_ema'].keys() == checkpoint['model'].keys()
    assert not all(torch.equal(checkpoint['model_ema'][k], v) for k, v in checkpoint['model'].items())


def test_repeated_augmentation_is_on_by_default():
    """Kept quirk: every rank of a launch draws from DeiT's RASampler (each image 3 times, dealt round the ranks)
    unless ``--no-repeated-aug``; one process shuffles plainly, as DeiT."""
    parser = main.get_args_parser()
    args = parser.parse_args([])
    assert args.repeated_aug
    images = TensorDataset(torch.zeros(12))
    for rank in range(WORLD_SIZE):
        launched = LaunchEnvironment(rank, WORLD_SIZE, rank, 'torchrun')
        train, _ = datasets.build_samplers(args, images, images, launched)
        assert isinstance(train, RASampler) and train.num_repeats == 3
        plain, _ = datasets.build_samplers(parser.parse_args(['--no-repeated-aug']), images, images, launched)
        assert isinstance(plain, DistributedSampler)


def test_the_schedule_is_stepped_with_the_finished_epochs_index(tmp_path):
    """Kept quirk (DeiT): after epoch e the schedule is stepped with e, not e + 1, so epoch e + 1 trains at the
    schedule's LR of epoch e and the first two epochs both at the warm-up's start."""
    shapes = make_shapes(tmp_path / 'shapes', train_per_class=1, val_per_class=1)
    argv = ['--model', 'deit_tiny_patch16_224', '--data-set', 'SHAPES', '--data-path', str(shapes), '--input-size',
            str(IMAGE_SIZE), '--batch-size', '4', '--epochs', '3', '--warmup-epochs', '2', '--device', 'cpu',
            '--num_workers', '0', '--output_dir', str(tmp_path / 'run')]
    assert main.run(argv) == 0
    logged = [line['train_lr'] for line in read_log(tmp_path / 'run')]
    args = main.get_args_parser().parse_args(argv)

    def schedule(step_index) -> list[float]:
        """The LR of each epoch under timm's scheduler stepped with ``step_index(epoch)`` after each epoch."""
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)],
                                    lr=args.lr * args.batch_size / LR_REFERENCE_BATCH)
        scheduler, _ = create_scheduler(args, optimizer)
        lrs = []
        for epoch in range(args.epochs):
            lrs.append(optimizer.param_groups[0]['lr'])
            scheduler.step(step_index(epoch))
        return lrs

    assert logged == pytest.approx(schedule(lambda epoch: epoch), rel=1e-12)
    assert logged != pytest.approx(schedule(lambda epoch: epoch + 1), rel=1e-3)
    assert logged[0] == logged[1] == args.warmup_lr


@pytest.mark.usefixtures('keep_signal_handlers')
def test_the_teacher_sees_the_mixed_up_batch(tmp_path, monkeypatch):
    """Kept quirk: at every training step the teacher's input is the student's, the batch after mixup/cutmix."""
    shapes = make_shapes(tmp_path / 'shapes', train_per_class=1, val_per_class=1)
    teacher = save_teacher(tmp_path / 'teacher.pth', 'deit_small_patch16_224', num_classes=NUM_CLASSES,
                           img_size=IMAGE_SIZE)
    seen = {'raw': [], 'mixed': [], 'student': [], 'teacher': []}
    mix = Mixup.__call__

    def noting_mix(self, x, target):
        seen['raw'].append(x.clone())
        mixed = mix(self, x, target)
        seen['mixed'].append(mixed[0].clone())
        return mixed

    def note_input(module, args) -> None:
        if isinstance(module, VisionTransformer) and (module.training or module.embed_dim == TEACHER_WIDTH):
            seen['teacher' if module.embed_dim == TEACHER_WIDTH else 'student'].append(args[0].clone())

    monkeypatch.setattr(Mixup, '__call__', noting_mix)
    hook = torch.nn.modules.module.register_module_forward_pre_hook(note_input)
    try:
        assert main.run(['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_small_patch16_224',
                         '--teacher-path', str(teacher), '--distillation-type', 'soft', '--data-set', 'SHAPES',
                         '--data-path', str(shapes), '--input-size', str(IMAGE_SIZE), '--batch-size', '4',
                         '--epochs', '1', '--device', 'cpu', '--num_workers', '0', '--output_dir',
                         str(tmp_path / 'run')]) == 0
    finally:
        hook.remove()
    steps = len(seen['mixed'])
    assert steps > 1 and [len(seen[k]) for k in ('raw', 'student', 'teacher')] == [steps] * 3
    for raw, mixed, student, teacher_input in zip(seen['raw'], seen['mixed'], seen['student'], seen['teacher']):
        assert not torch.equal(mixed, raw)
        assert torch.equal(student, mixed) and torch.equal(teacher_input, mixed)


def _relation_terms_on_rank(rank: int, init_file: str, results) -> None:
    """Rank ``rank`` of two: the DDP-wrapped student and the teacher on its half of one batch."""
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=WORLD_SIZE)
    try:
        torch.set_num_threads(1)
        args, student, teacher, samples, targets = relation_setup()
        model = torch.nn.parallel.DistributedDataParallel(student)
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        terms = engine.compute_losses(model, teacher, build_criterion(args), samples[local], targets[local])
        results[rank] = {name: terms[name].item() for name in ('mf_sample', 'mf_rand')}
    finally:
        dist.destroy_process_group()


def relation_setup():
    """A student and a teacher (the same weights on every process), and one batch of two processes' halves."""
    args = main.get_args_parser().parse_args([
        '--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224', '--distillation-type',
        'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--K', '100000', '--input-size', str(IMAGE_SIZE),
        '--drop-path', '0', '--mixup', '0', '--cutmix', '0'])
    torch.manual_seed(0)
    teacher = random_teacher(args, NUM_CLASSES)
    student = create_student(args, teacher, NUM_CLASSES)
    generator = torch.Generator().manual_seed(1)
    samples = torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    targets = torch.randint(0, NUM_CLASSES, (WORLD_SIZE * LOCAL_BATCH,), generator=generator)
    return args, student, teacher, samples, targets


def test_the_sample_and_random_relations_use_each_processs_local_batch(tmp_path):
    """Kept quirk: on two processes (DDP, gloo) each computes the inter-image and random-token relations over its
    own half of the batch, as one process does on that half, not over the whole batch (K covers every token, so the
    random term draws nothing)."""
    results = torch.multiprocessing.Manager().dict()
    # Forked: the processes start with this one's modules instead of importing them again (seconds each).
    torch.multiprocessing.start_processes(_relation_terms_on_rank, args=(str(tmp_path / 'init'), results),
                                          nprocs=WORLD_SIZE, start_method='fork')
    args, student, teacher, samples, targets = relation_setup()
    criterion = build_criterion(args)
    whole = engine.compute_losses(student, teacher, criterion, samples, targets)
    for rank in range(WORLD_SIZE):
        local = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        alone = engine.compute_losses(student, teacher, criterion, samples[local], targets[local])
        for name, value in results[rank].items():
            assert value == pytest.approx(alone[name].item(), rel=1e-5), (rank, name)
            assert value != pytest.approx(whole[name].item(), rel=1e-2), (rank, name)


def test_norm_distill_needs_equal_token_counts():
    """Kept quirk: the norm term slices the teacher with the student's extra-token count ``e`` too, which only equal
    counts (``e = 0``) allow: a distilled student (one token more) with a DeiT teacher is refused in one line."""
    flags = ['--model', 'deit_tiny_distilled_patch16_224', '--teacher-model', 'deit_tiny_patch16_224',
             '--distillation-type', 'soft', '--s-id', '0', '--t-id', '0', '--norm-distill', '--input-size',
             str(IMAGE_SIZE)]
    with pytest.raises(UserError, match='--norm-distill needs equal token counts'):
        check_token_shapes(main.get_args_parser().parse_args(flags), num_classes=NUM_CLASSES)
    check_token_shapes(main.get_args_parser().parse_args([*flags, '--model', 'deit_tiny_patch16_224']),
                       num_classes=NUM_CLASSES)
