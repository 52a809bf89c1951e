"""The batched loss terms equal a plain per-pair reading of SPEC section 4, for the modes the golden cases skip."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import losses
import main
from timm.layers import Mlp

N_PAIRS, BATCH, TOKENS_S, TOKENS_T, DIM_S, DIM_T = 3, 4, 6, 5, 8, 12


def mse(a, b):
    return ((a - b) ** 2).mean()


def tokens(generator, n_tokens, dim):
    return [torch.randn(BATCH, n_tokens, dim, generator=generator) for _ in range(N_PAIRS)]


@pytest.fixture
def pairs():
    g = torch.Generator().manual_seed(0)
    return tokens(g, TOKENS_S, DIM_S), tokens(g, TOKENS_T, DIM_T)


def reference_ald(values, last_w):
    n = len(values)
    weighted = [v * (v / sum(values) * n) for v in values]
    weighted[-1] = weighted[-1] * last_w
    return sum(weighted) / n


def test_manifold_terms_per_pair(pairs):
    student, teacher = pairs
    e = TOKENS_S - TOKENS_T
    s = torch.stack(student)[:, :, e:]
    t = torch.stack(teacher)
    f_s, f_t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    for k in range(N_PAIRS):
        a, b = f_s[k], f_t[k]
        assert losses.manifold_patch_loss(f_s, f_t)[k] == pytest.approx(mse(b @ b.mT, a @ a.mT).item(), rel=1e-5)
        a_p, b_p = a.permute(1, 0, 2), b.permute(1, 0, 2)
        assert losses.manifold_sample_loss(f_s, f_t)[k] == pytest.approx(
            mse(b_p @ b_p.mT, a_p @ a_p.mT).item(), rel=1e-5)
        flat_a, flat_b = a.reshape(-1, DIM_S), b.reshape(-1, DIM_T)
        assert losses.manifold_random_loss(f_s, f_t, BATCH * TOKENS_T)[k] == pytest.approx(
            mse(flat_b @ flat_b.T, flat_a @ flat_a.T).item(), rel=1e-5)


def test_random_term_uses_the_same_tokens_for_student_and_teacher():
    g = torch.Generator().manual_seed(1)
    same = F.normalize(torch.randn(N_PAIRS, BATCH, TOKENS_T, DIM_S, generator=g), dim=-1)
    # Identical student and teacher tokens: any shared subset gives exactly zero.
    assert torch.all(losses.manifold_random_loss(same, same.clone(), num_tokens=5) == 0)
    different = F.normalize(torch.randn(N_PAIRS, BATCH, TOKENS_T, DIM_S, generator=g), dim=-1)
    assert torch.all(losses.manifold_random_loss(same, different, num_tokens=5) > 0)


def test_ald_weights_carry_gradient():
    values = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    result = losses.adaptive_layer_weighting(values, last_weight=4.0)
    assert result.item() == pytest.approx(reference_ald(values.tolist(), 4.0), rel=1e-6)
    result.backward()
    detached = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    w = (3 * detached / detached.sum()).detach()
    (w * detached * torch.tensor([1.0, 1.0, 4.0])).sum().div(3).backward()
    assert not torch.allclose(values.grad, detached.grad), 'the ALD weights must not be detached'


def make_args(**overrides) -> argparse.Namespace:
    argv = ['--distillation-type', 'soft', '--s-id', '0', '1', '2', '--t-id', '0', '1', '2', '--mixup', '0',
            '--cutmix', '0', '--smoothing', '0']
    args = main.get_args_parser().parse_args(argv)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def criterion_terms(args, pairs, projector=None):
    student, teacher = pairs
    logits_s, logits_t = torch.randn(BATCH, 10), torch.randn(BATCH, 10)
    targets = torch.randint(0, 10, (BATCH,))
    return losses.build_criterion(args)(logits_s, targets, logits_t, student, teacher, projector)


def test_cls_projector_and_attention_with_ald():
    # The attention maps of both models must have as many patches, as for a DeiT student and teacher.
    g = torch.Generator().manual_seed(2)
    student, teacher = tokens(g, TOKENS_T, DIM_S), tokens(g, TOKENS_T, DIM_T)
    torch.manual_seed(0)
    projector = Mlp(DIM_S, (DIM_S + DIM_T) // 2, DIM_T)
    terms = criterion_terms(make_args(w_cls=1.5, w_atn=2.0, last_w=4.0), (student, teacher), projector)
    cls = [mse(projector(F.normalize(s[:, 0], dim=-1)), F.normalize(t[:, 0], dim=-1)) for s, t in zip(student, teacher)]
    atn = []
    for s, t in zip(student, teacher):
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
        atn.append(mse(t[:, :1] @ t[:, 1:].mT, s[:, :1] @ s[:, 1:].mT))
    assert terms['cls'].item() == pytest.approx(1.5 * reference_ald(cls, 4.0).item(), rel=1e-5)
    assert terms['atn'].item() == pytest.approx(2.0 * reference_ald(atn, 4.0).item(), rel=1e-5)
    assert terms['loss'].item() == pytest.approx(sum(v.item() for k, v in terms.items() if k != 'loss'), rel=1e-6)


def test_cls_relation_and_both_and_norm(pairs):
    student, teacher = pairs
    relation = []
    for s, t in zip(student, teacher):
        c_s, c_t = F.normalize(s[:, 0], dim=-1), F.normalize(t[:, 0], dim=-1)
        relation.append(mse(c_t @ c_t.T, c_s @ c_s.T))
    terms = criterion_terms(make_args(w_cls=1.0, dim_match='relation', last_w=2.0), pairs)
    assert terms['cls'].item() == pytest.approx(reference_ald(relation, 2.0).item(), rel=1e-5)

    torch.manual_seed(0)
    projector = Mlp(DIM_S, (DIM_S + DIM_T) // 2, DIM_T)
    both = criterion_terms(make_args(w_cls=1.0, dim_match='both', w_proj=0.5, w_relation=3.0), pairs, projector)
    proj = [mse(projector(F.normalize(s[:, 0], dim=-1)), F.normalize(t[:, 0], dim=-1)) for s, t in zip(student, teacher)]
    assert both['cls_proj'].item() == pytest.approx(0.5 * (sum(proj) / N_PAIRS).item(), rel=1e-5)
    assert both['cls_relation'].item() == pytest.approx(3.0 * (sum(relation) / N_PAIRS).item(), rel=1e-5)
    assert 'cls' not in both

    # The norm term slices both models with the student's extra-token count, so it needs equal counts.
    g = torch.Generator().manual_seed(3)
    student, teacher = tokens(g, TOKENS_T, DIM_S), tokens(g, TOKENS_T, DIM_T)
    norm = []
    for s, t in zip(student, teacher):
        v_s = F.normalize(s.norm(dim=-1), dim=-1)
        v_t = F.normalize(t.norm(dim=-1), dim=-1)
        norm.append(mse(v_t, v_s))
    norm[-1] = norm[-1] * 4.0
    terms = criterion_terms(make_args(norm_distill=True, w_norm=0.7, last_w=4.0), (student, teacher))
    assert terms['norm'].item() == pytest.approx(0.7 * (sum(norm) / N_PAIRS).item(), rel=1e-5)


def test_no_teacher_and_no_feature_terms():
    args = main.get_args_parser().parse_args(['--mixup', '0', '--cutmix', '0', '--smoothing', '0'])
    terms = losses.build_criterion(args)(torch.randn(BATCH, 10), torch.randint(0, 10, (BATCH,)))
    assert set(terms) == {'base', 'loss'}
    args = make_args(s_id=None, t_id=None)
    terms = criterion_terms(args, ([], []))
    assert set(terms) == {'base', 'kd', 'loss'}


def test_loss_math_runs_in_float32_for_bf16_tokens(pairs):
    student, teacher = pairs
    low = ([s.bfloat16() for s in student], [t.bfloat16() for t in teacher])
    terms = criterion_terms(make_args(w_cls=1.0, dim_match='relation'), low)
    assert all(v.dtype == torch.float32 for v in terms.values())


def test_loss_math_is_float32_inside_autocast(pairs):
    """The training step calls the criterion inside autocast: its Gram products, attention maps and projector must
    still run in float32, giving exactly the terms of a call outside autocast."""
    student, teacher = pairs
    low = ([s.bfloat16() for s in student], [t.bfloat16() for t in teacher])
    args = make_args(w_cls=1.0, dim_match='relation')
    torch.manual_seed(0)
    outside = criterion_terms(args, low)
    torch.manual_seed(0)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        inside = criterion_terms(args, low)
    assert set(inside) == set(outside)
    for name in outside:
        assert torch.equal(inside[name], outside[name]), name
