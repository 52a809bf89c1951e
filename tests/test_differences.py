"""Each claim of README's "Where this differs from the original code", measured.

Every test here names the difference it backs; README quotes the numbers these tests see.
"""
import copy
import json

import numpy as np
import pytest
import timm
import torch
from timm.data.mixup import rand_bbox
from torch.utils.data import DataLoader, TensorDataset

import engine
import main
from helpers import keep_signal_handlers, make_shapes, one_thread, save_teacher  # noqa: F401 (fixtures)
from losses import random_token_index

IMAGE_SIZE = 32
NUM_CLASSES = 10


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model('deit_tiny_patch16_224', img_size=IMAGE_SIZE, num_classes=NUM_CLASSES).eval()


def test_eval_loss_is_the_mean_over_images_whatever_the_batch_size():
    """Ours: the mean over images. The originals: the mean of per-batch means, which moves with the batch size."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(7, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (7,), generator=generator)
    dataset = TensorDataset(images, labels)
    ours = [engine.evaluate(DataLoader(dataset, batch_size=size), model, torch.device('cpu'))['loss']
            for size in (2, 3, 7)]
    assert ours[0] == pytest.approx(ours[2], rel=1e-6) and ours[1] == pytest.approx(ours[2], rel=1e-6)

    with torch.no_grad():
        per_image = torch.nn.functional.cross_entropy(model(images), labels, reduction='none')
    def mean_of_batch_means(size: int) -> float:
        return torch.stack([chunk.mean() for chunk in per_image.split(size)]).mean().item()
    assert ours[2] == pytest.approx(per_image.mean().item(), rel=1e-6)
    assert mean_of_batch_means(2) != pytest.approx(mean_of_batch_means(3), rel=1e-4)


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
    for run in ('a', 'b'):
        out = tmp_path / run
        argv = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_tiny_patch16_224',
                '--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--K', '16',
                '--data-set', 'SHAPES', '--data-path', str(shapes), '--teacher-path', str(teacher),
                '--input-size', str(IMAGE_SIZE), '--batch-size', '4', '--epochs', '1', '--num_workers', '2',
                '--device', 'cpu', '--seed', '7', '--output_dir', str(out)]
        assert main.run(argv) == 0
        logs.append([json.loads(line) for line in (out / 'log.txt').read_text().splitlines()])
    assert logs[0] == logs[1]


def test_timm_1x_cutmix_box_is_one_pixel_larger_for_odd_cuts():
    """For the same draw, timm 1.x ends the box ``(cut + 1) // 2`` past the centre, timm 0.5.4 ``cut // 2``."""
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
        original_height = (centre_y + cut // 2) - (centre_y - cut // 2)
        original_width = (centre_x + cut // 2) - (centre_x - cut // 2)
        extra = cut % 2
        assert ((bottom - top)[inside] == original_height[inside] + extra).all()
        assert ((right - left)[inside] == original_width[inside] + extra).all()


def test_fused_attention_changes_logits_at_rounding_level():
    """timm's fused scaled_dot_product_attention against the originals' explicit softmax(q k^T) v."""
    fused = tiny_model()
    explicit = copy.deepcopy(fused)
    for block in explicit.blocks:
        block.attn.fused_attn = False
    x = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fused(x), explicit(x)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


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
        assert torch.allclose(p, q, rtol=1e-6, atol=1e-9), name


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
