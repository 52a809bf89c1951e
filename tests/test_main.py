"""End to end: the papers' commands train, write checkpoints and logs, and evaluate original-layout checkpoints."""
import argparse
import json
import math
import re

import pytest
import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

import benchmark
import datasets
import engine
import main
import models
from helpers import (ACCURACY_LINE, CLSKD_TEST, CLSKD_TRAIN, MANIFOLD_TRAIN, REPO, SPEEDUP_LINE,
                     check_compiled_matches_eager, main_argv, make_shapes, run_main, save_teacher, stub_step)
from models import random_teacher

CLSKD_TERMS = ('base', 'kd', 'mf_sample', 'mf_patch', 'mf_rand', 'cls', 'atn', 'loss')


@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    return make_shapes(tmp_path_factory.mktemp('shapes'))


@pytest.fixture(scope='module')
def base_teacher(tmp_path_factory):
    return save_teacher(tmp_path_factory.mktemp('teacher') / 'deit_base.pth', 'deit_base_patch16_224')


def test_every_seed_flag_parses():
    parser = main.get_args_parser()
    for command in (CLSKD_TRAIN, CLSKD_TEST, MANIFOLD_TRAIN):
        args = parser.parse_args(main_argv(command, output_dir='o', dataset_dir='d',
                                           path_of_teacher_checkpoint='t', path_of_distilled_model='m'))
        assert args.s_id == [0, 1, 2, 3, 8, 9, 10, 11]
    manifold = parser.parse_args(main_argv(MANIFOLD_TRAIN))
    assert (manifold.w_cls, manifold.w_atn, manifold.manifold) == (0.0, 0.0, True)
    assert parser.parse_args(['--local-rank=3']).local_rank == 3
    assert parser.parse_args(['--local_rank', '2']).local_rank == 2


def test_clskd_train_command_trains_one_epoch(shapes, base_teacher, tmp_path):
    out = tmp_path / 'run'
    argv = main_argv(CLSKD_TRAIN, output_dir=out, dataset_dir=shapes, path_of_teacher_checkpoint=base_teacher)
    result = run_main(argv + ['--epochs', '1', '--device', 'cpu'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Not using distributed mode' in result.stdout
    assert ACCURACY_LINE.search(result.stdout)

    log = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert len(log) == 1 and log[0]['epoch'] == 0
    for term in CLSKD_TERMS:
        assert f'train_{term}' in log[0]
    assert 0.0 <= log[0]['test_acc1'] <= 100.0

    checkpoint = torch.load(out / 'checkpoint.pth', weights_only=False)
    assert {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'} <= set(checkpoint)
    assert checkpoint['epoch'] == 0 and isinstance(checkpoint['args'], argparse.Namespace)
    assert 'projector.fc1.weight' in checkpoint['model'] and 'blocks.11.mlp.fc2.bias' in checkpoint['model']


def original_layout_checkpoint(path, model: torch.nn.Module) -> None:
    """A [CLS]-KD release: timm ViT keys + ``projector.*``, DeiT's entries, ``args`` a Namespace."""
    optimizer = torch.optim.AdamW(model.parameters())
    torch.save({
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': {'t_initial': 300},
        'epoch': 299,
        'model_ema': model.state_dict(),
        'scaler': {},
        'args': argparse.Namespace(model='deit_tiny_patch16_224', lr=5e-4, s_id=[0, 1], output_dir='/x'),
    }, path)


def test_clskd_test_command_evaluates_original_checkpoint(shapes, tmp_path):
    """README's test command prints the line float32 evaluation gives (the original code's arithmetic on the CPU),
    also where training would autocast to bf16 (``--amp-cpu`` forces that on any CPU)."""
    student = timm.create_model('deit_tiny_patch16_224', num_classes=1000)
    student.projector = torch.nn.Sequential()
    student.projector.fc1 = torch.nn.Linear(192, 480)
    student.projector.fc2 = torch.nn.Linear(480, 768)
    checkpoint = tmp_path / 'deit_base_to_tiny_75.1.pth'
    original_layout_checkpoint(checkpoint, student)

    argv = main_argv(CLSKD_TEST, output_dir=tmp_path / 'out', dataset_dir=shapes,
                     path_of_teacher_checkpoint=tmp_path / 'absent-teacher.pth',
                     path_of_distilled_model=checkpoint)
    result = run_main(argv + ['--device', 'cpu', '--num_workers', '0', '--amp-cpu'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Evaluation precision: float32' in result.stdout

    # The same checkpoint evaluated directly in float32 gives the same line: the weights really were loaded, and
    # bf16 training precision did not leak into the evaluation.
    args = main.get_args_parser().parse_args(argv + ['--device', 'cpu'])
    val, _ = datasets.build_dataset(False, args)
    loader = torch.utils.data.DataLoader(val, batch_size=64)
    del student.projector
    stats = engine.evaluate(loader, student, torch.device('cpu'))
    assert ACCURACY_LINE.search(result.stdout).group(0) == '* Acc@1 {acc1:.3f} Acc@5 {acc5:.3f} loss {loss:.3f}'.format(
        **stats)


def test_eval_without_projector_flags_skips_projector_keys(shapes, tmp_path):
    student = timm.create_model('deit_tiny_patch16_224', num_classes=1000)
    state = student.state_dict()
    state['projector.fc1.weight'] = torch.zeros(480, 192)
    torch.save({'model': state}, tmp_path / 'ckpt.pth')
    result = run_main(['--eval', '--model', 'deit_tiny_patch16_224', '--data-path', str(shapes),
                       '--resume', str(tmp_path / 'ckpt.pth'), '--device', 'cpu', '--num_workers', '0'])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'the projector is only used in training' in result.stdout
    assert ACCURACY_LINE.search(result.stdout)


def test_benchmark_reports_throughput_flops_and_mfu(shapes, capsys):
    argv = ['--benchmark', '--device', 'cpu', '--model', 'deit_tiny_patch16_224', '--teacher-model',
            'deit_small_patch16_224', '--distillation-type', 'soft', '--s-id', '0', '11', '--t-id', '0', '11',
            '--w-cls', '1', '--w-atn', '1', '--input-size', '32', '--batch-size', '4', '--benchmark-steps', '1',
            '--benchmark-warmup', '1', '--data-path', str(shapes), '--num_workers', '0']
    assert main.run(argv) == 0
    out = capsys.readouterr().out
    report = re.search(r'([\d.]+) images/s, ([\d.]+) ms/step, .* ([\d.]+) GFLOPs/image, .* MFU ([\d.]+)% of', out)
    assert report, out
    images_per_s, ms_per_step, gflops, mfu = map(float, report.groups())
    assert images_per_s > 0 and ms_per_step > 0 and 0 < mfu
    # Student fwd+bwd (3x) plus teacher fwd of DeiT-Ti/S at 32 px: a fraction of a GFLOP per image.
    assert 0.05 < gflops < 1.0
    loader = re.search(r'data \(pil, 0 workers\): ([\d.]+) images/s, ([\d.]+) ms CPU per image, ([\d.]+) cores busy', out)
    assert loader and float(loader[1]) > 0 and float(loader[2]) > 0, out
    fed = re.search(r'the step fed from files: ([\d.]+) images/s, (\d+)% of the synthetic batch', out)
    assert fed and 0 < float(fed[1]) and 0 < int(fed[2]) <= 150, out


def test_the_benchmarks_step_is_trainings_with_its_ema_update():
    """The timed step is what training does per step: ``engine.train_step`` with the EMA update
    (``--model-ema`` is the default) and the host sync."""
    args = main.get_args_parser().parse_args(['--device', 'cpu', '--model', 'deit_tiny_patch16_224', '--input-size',
                                              '32', '--batch-size', '2', '--no-amp'])
    step = benchmark.build_step(args, torch.device('cpu'))
    model_ema = step.students[0].model_ema
    assert model_ema is not None
    before = {name: value.clone() for name, value in model_ema.module.state_dict().items()}
    samples, targets = torch.randn(2, 3, 32, 32), torch.randint(0, 1000, (2,))
    benchmark.run_step(step, *step.mixup_fn(samples, targets))
    after = model_ema.module.state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)


def test_papers_mode_takes_only_run_flags(capsys):
    """``benchmark.py --papers`` sets the models, losses and batches itself: another such flag is one line, exit 2."""
    argv = ['--benchmark', '--papers', '--device', 'cpu', '--model', 'deit_small_patch16_224']
    assert main.run(argv) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('error: --papers sets') and 'drop --model' in err


def test_papers_table_rows_fit_the_readme_table():
    """The printed header is the Performance table's header (docs/performance.md), and a row has its columns in its format."""
    assert benchmark.TABLE_HEADER.splitlines()[0] in (REPO / 'docs' / 'performance.md').read_text()
    stats = {'images_per_s': 6.61, 'ms_per_step': 1210.4, 'peak_memory_gib': math.nan, 'gflops_per_image': 43.84,
             'peak_tflops': 0.401, 'mfu': 0.7221}
    row = benchmark.table_row('[CLS]-KD, DeiT-B → DeiT-Ti', torch.device('cpu'), torch.float32, 8, stats)
    assert row.endswith('| fp32 | 8 | 6.6 | 1210 | n/a | 43.8 | 72.2% of 401 GFLOP/s |')
    assert row.count('|') == benchmark.TABLE_HEADER.splitlines()[0].count('|')


def test_papers_mode_prints_a_row_per_configuration_and_mode(monkeypatch, capsys):
    """Every configuration eager and compiled, each row with its precision; the steps themselves are stubbed."""
    stats = {'images_per_s': 6.61, 'ms_per_step': 1210.4, 'peak_memory_gib': math.nan, 'gflops_per_image': 43.84,
             'peak_tflops': 0.401, 'mfu': 0.7221}
    built = []
    monkeypatch.setattr(benchmark, 'build_step', lambda args, device, variants=None: built.append(variants) or
                        stub_step(args, device))
    monkeypatch.setattr(benchmark, 'time_training_step', lambda *args, **kwargs: stats)
    monkeypatch.setattr(benchmark, 'speedup_report', lambda *args, **kwargs: SPEEDUP_LINE)
    assert main.run(['--benchmark', '--papers', '--device', 'cpu', '--no-amp']) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith('| ') and '→' in line]
    assert len(rows) == 2 * len(benchmark.PAPER_CONFIGURATIONS) + 1
    assert all('| fp32 |' in row for row in rows) and sum('`--compile`' in row for row in rows) == 3
    # The two [CLS]-KD headline students on one teacher: DeiT-Ti (the base) and DeiT-S, at the paper's batch.
    assert rows[-1].startswith(f'| {benchmark.SHARED_MODE} |') and '| 128 |' in rows[-1]
    assert [(v.name, v.args.model) for v in built[-1]] == [('base', 'deit_tiny_patch16_224'),
                                                           ('small', 'deit_small_patch16_224')]
    assert f'{benchmark.SHARED_MODE}: {SPEEDUP_LINE}' in out


def test_flop_count_includes_cpu_attention():
    # DeiT-Ti forward at 32 px (4 patches + [CLS]): patch conv, 12 blocks of linears and attention, head.
    tokens, width, depth, mlp, classes, patches = 5, 192, 12, 768, 1000, 4
    conv = 2 * width * 3 * 16 * 16 * patches
    linears = 2 * tokens * (3 * width * width + width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * tokens * width  # q k^T and the weighted sum of v, over all heads
    expected = conv + depth * (linears + attention) + 2 * width * classes
    model = timm.create_model('deit_tiny_patch16_224', img_size=32).eval()
    benchmark.count_cpu_attention_flops()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize('opt, fused', [('adamw', True), ('sgd', None)])
def test_adam_optimizers_are_fused_on_cpu(opt, fused):
    args = main.get_args_parser().parse_args(['--opt', opt])
    optimizer = engine.build_optimizer(args, timm.create_model('deit_tiny_patch16_224', img_size=32),
                                      torch.device('cpu'), args.lr)
    assert optimizer.defaults.get('fused') is fused


def test_compiled_models_give_the_eager_losses_and_gradients():
    check_compiled_matches_eager(torch.device('cpu'), rel=1e-5, rtol=1e-4, atol=1e-5)


def test_teacher_weights_stored_in_the_autocast_dtype_give_the_same_results():
    """A frozen teacher's Linear/Conv2d weights stored in bf16 give autocast's logits and tokens bit for bit."""
    argv = ['--model', 'deit_tiny_patch16_224', '--teacher-model', 'deit_small_patch16_224', '--distillation-type',
            'soft', '--s-id', '0', '11', '--t-id', '0', '11', '--input-size', '32']
    args = main.get_args_parser().parse_args(argv)
    torch.manual_seed(0)
    teacher = random_teacher(args, 10)
    torch.manual_seed(0)
    stored = models.store_matmul_weights_in(random_teacher(args, 10), torch.bfloat16)
    assert stored.model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16 and stored.model.norm.weight.dtype == torch.float32
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        expected, expected_tokens = teacher(x), teacher.token_capture.pop()
        logits, tokens = stored(x), stored.token_capture.pop()
    assert torch.equal(logits, expected)
    assert all(torch.equal(a, b) for a, b in zip(tokens, expected_tokens))


@pytest.mark.parametrize('name, tflops', [
    ('NVIDIA H100 80GB HBM3', 989), ('NVIDIA H100 PCIe', 756), ('NVIDIA H100 NVL', 835), ('NVIDIA H200', 989),
    ('NVIDIA H200 NVL', 835), ('NVIDIA GH200 480GB', 989), ('NVIDIA A100-SXM4-80GB', 312),
    ('NVIDIA A100-SXM4-40GB', 312), ('NVIDIA A100-PCIE-40GB', 312), ('NVIDIA A100 80GB PCIe', 312),
    ('NVIDIA L40S', 362), ('NVIDIA A10', 125), ('NVIDIA A10G', 70), ('NVIDIA B200', 2250),
])
def test_gpu_peaks_by_exact_device_name(name, tflops):
    """The names torch.cuda.get_device_name gives; a PCIe or NVL card no longer gets the SXM peak."""
    assert benchmark.gpu_peak_flops(name) == tflops * 1e12


@pytest.mark.parametrize('name', ['NVIDIA H100 80GB HBM3 MIG 1g.10gb', 'NVIDIA RTX 6000 Ada Generation', 'H100'])
def test_an_unknown_gpu_asks_for_its_peak(name, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda device=None: name)
    assert benchmark.gpu_peak_flops(name) is None
    assert benchmark.peak_flops(torch.device('cuda', 0), None) == (None, 'measured matmul rate')
    assert f'no dense peak is known for the GPU "{name}"' in capsys.readouterr().out
    assert benchmark.peak_flops(torch.device('cuda', 0), 500.0) == (500e12, 'given peak')


def test_benchmark_under_a_launcher_is_one_line(monkeypatch, capsys):
    """``--benchmark`` times one process on one device: launched as several, it says so instead of putting every
    rank on one GPU."""
    for name, value in {'RANK': '1', 'WORLD_SIZE': '2', 'LOCAL_RANK': '1'}.items():
        monkeypatch.setenv(name, value)
    assert main.run(['--benchmark', '--device', 'cpu', '--model', 'deit_tiny_patch16_224']) == main.EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and '--benchmark times the step of one process' in err and 'torchrun' in err
