"""Loss terms of [CLS]-KD and Manifold Distillation, and the criterion that composes them.

Every term is a small pure function over float32 tensors whose docstring gives its formula.
Notation: ``norm(x)`` L2-normalises the last (feature) dim, ``mse(a, b) = mean((a - b)^2)``.
Token tensors of the ``n`` distilled layer pairs are stacked into one ``[n, B, N, D]`` tensor so that
every term is computed for all pairs at once and returns a vector of ``n`` per-pair losses.
"""
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

Logits = Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]


def per_pair_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``mse(a[k], b[k])`` for every pair ``k`` of the leading dim: returns ``[n]``."""
    return (a - b).square().flatten(1).mean(dim=1)


def gram(x: torch.Tensor) -> torch.Tensor:
    """Batched Gram matrix ``x x^T`` over the last two dims."""
    return x @ x.transpose(-1, -2)


def manifold_patch_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Intra-image relations: ``mse(F_t F_t^T, F_s F_s^T)`` per image (``[B, N, N]``), per pair.

    ``f_s``, ``f_t``: normalised tokens ``[n, B, N, D_s]`` and ``[n, B, N, D_t]``.
    """
    return per_pair_mse(gram(f_t), gram(f_s))


def manifold_sample_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """Inter-image relations: the same at every token position across the batch (``[N, B, B]``), per pair."""
    # One contiguous [n, N, B, D] copy per side; matmul on the strided transpose would copy both operands.
    return per_pair_mse(gram(f_t.transpose(1, 2).contiguous()), gram(f_s.transpose(1, 2).contiguous()))


def random_token_index(num_pairs: int, total: int, num_tokens: int, device: torch.device) -> torch.Tensor:
    """``[num_pairs, num_tokens]`` indices: a uniform random ``num_tokens``-subset of ``range(total)`` per pair.

    One draw serves all pairs (the original drew a permutation per pair: the same distribution, another stream).
    """
    return torch.rand(num_pairs, total, device=device).argsort(dim=1)[:, :num_tokens]


def manifold_random_loss(f_s: torch.Tensor, f_t: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Relations among ``K`` tokens drawn from the ``B*N`` flattened tokens: ``mse`` of two ``[K, K]`` Grams.

    Student and teacher use the same indices; each pair draws its own. When ``K >= B*N`` all tokens are used
    (the relation mean does not depend on their order).
    """
    n, batch, tokens = f_s.shape[:3]
    f_s = f_s.reshape(n, batch * tokens, -1)
    f_t = f_t.reshape(n, batch * tokens, -1)
    if num_tokens < batch * tokens:
        index = random_token_index(n, batch * tokens, num_tokens, f_s.device)
        f_s = f_s.gather(1, index[..., None].expand(-1, -1, f_s.shape[-1]))
        f_t = f_t.gather(1, index[..., None].expand(-1, -1, f_t.shape[-1]))
    return per_pair_mse(gram(f_t), gram(f_s))


def cls_projection_loss(projected_cls_s: torch.Tensor, cls_t: torch.Tensor) -> torch.Tensor:
    """``mse(projector(norm(S_cls)), norm(T_cls))`` per pair; inputs ``[n, B, D_t]``, the student's already projected."""
    return per_pair_mse(projected_cls_s, F.normalize(cls_t, dim=-1))


def cls_relation_loss(cls_s: torch.Tensor, cls_t: torch.Tensor) -> torch.Tensor:
    """``mse(C_t C_t^T, C_s C_s^T)`` with ``C = norm([CLS])`` over the batch (``[B, B]``), per pair."""
    return per_pair_mse(gram(F.normalize(cls_t, dim=-1)), gram(F.normalize(cls_s, dim=-1)))


def cls_patch_attention_loss(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """CLS-patch attention maps ``a = F[:, :1] @ F[:, 1:]^T`` (``[B, 1, N-1]``): ``mse(a_t, a_s)`` per pair.

    ``f_s``, ``f_t``: normalised tokens ``[n, B, N, D]`` (all of them). Exactly the first token is treated as
    [CLS] for both models (a distilled student keeps its dist token among the "patches"; a CaiT teacher's
    first patch acts as [CLS]), as in the original.
    """
    def attention(f: torch.Tensor) -> torch.Tensor:
        return f[:, :, :1] @ f[:, :, 1:].transpose(-1, -2)

    return per_pair_mse(attention(f_t), attention(f_s))


def token_norm_loss(tokens_s: torch.Tensor, tokens_t: torch.Tensor) -> torch.Tensor:
    """``v = norm(||X||)``: per-token feature norms, normalised over the tokens; ``mse(v_t, v_s)`` per pair.

    The caller slices both inputs with the student's extra-token count ``e`` (the original's quirk).
    """
    v_s = F.normalize(tokens_s.norm(dim=-1), dim=-1)
    v_t = F.normalize(tokens_t.norm(dim=-1), dim=-1)
    return per_pair_mse(v_t, v_s)


def emphasise_last(losses: torch.Tensor, last_weight: float) -> torch.Tensor:
    """Multiply the last pair's loss by ``last_weight`` (``--last-w``)."""
    scale = torch.ones_like(losses)
    scale[-1] = last_weight
    return losses * scale


def adaptive_layer_weighting(losses: torch.Tensor, last_weight: float) -> torch.Tensor:
    """ALD: ``w_k = n * L_k / sum_j L_j``; result ``sum_k(w_k L_k [* last_w for k = n]) / n``.

    The weights are NOT detached, so the gradient flows through them, as in the original.
    """
    n = losses.numel()
    weights = n * losses / losses.sum()
    return emphasise_last(weights * losses, last_weight).sum() / n


def soft_distillation_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, tau: float) -> torch.Tensor:
    """``KL(log_softmax(t/tau) || log_softmax(s/tau))`` with ``batchmean``, times ``tau^2`` (DeiT)."""
    return F.kl_div(
        F.log_softmax(logits_s / tau, dim=1),
        F.log_softmax(logits_t / tau, dim=1),
        reduction='batchmean',
        log_target=True,
    ) * (tau * tau)


def hard_distillation_loss(logits_s: torch.Tensor, logits_t: torch.Tensor) -> torch.Tensor:
    """``cross_entropy(s, argmax t)`` (DeiT hard distillation)."""
    return F.cross_entropy(logits_s, logits_t.argmax(dim=1))


class BinaryCrossEntropy(nn.Module):
    """DeiT III's ``--bce-loss``: BCE on one-hot (or thresholded mixed-up) targets."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dim() == 1:
            targets = F.one_hot(targets, logits.shape[-1])
        return F.binary_cross_entropy_with_logits(logits, targets.gt(0.0).to(logits.dtype))


def build_base_criterion(args) -> nn.Module:
    """DeiT's choice: BCE if asked, soft-target CE under mixup/cutmix, label smoothing, else plain CE."""
    mixup_active = args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None
    if args.bce_loss:
        return BinaryCrossEntropy()
    if mixup_active:
        return SoftTargetCrossEntropy()
    if args.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    return nn.CrossEntropyLoss()


def feature_distillation(args) -> bool:
    """Feature terms (Manifold, CLS, attention, norm) need a teacher and both ``--s-id`` and ``--t-id``."""
    return args.distillation_type != 'none' and bool(args.s_id) and bool(args.t_id)


@dataclass(frozen=True)
class LossWeights:
    """The weights and switches of every term, read from the command line."""
    distillation_type: str = 'none'
    alpha: float = 0.5
    tau: float = 1.0
    beta: float = 1.0
    feature_distillation: bool = False
    manifold: bool = True
    w_sample: float = 0.1
    w_patch: float = 4.0
    w_rand: float = 0.2
    num_random_tokens: int = 192
    w_cls: float = 0.0
    dim_match: str = 'projector'
    w_proj: float = 1.0
    w_relation: float = 1.0
    w_atn: float = 0.0
    norm_distill: bool = False
    w_norm: float = 1.0
    last_w: float = 4.0

    @classmethod
    def from_args(cls, args) -> 'LossWeights':
        return cls(
            distillation_type=args.distillation_type,
            alpha=args.distillation_alpha,
            tau=args.distillation_tau,
            beta=args.distillation_beta,
            feature_distillation=feature_distillation(args),
            manifold=args.manifold,
            w_sample=args.w_sample,
            w_patch=args.w_patch,
            w_rand=args.w_rand,
            num_random_tokens=args.K,
            w_cls=args.w_cls,
            dim_match=args.dim_match,
            w_proj=args.w_proj,
            w_relation=args.w_relation,
            w_atn=args.w_atn,
            norm_distill=args.norm_distill,
            w_norm=args.w_norm,
            last_w=args.last_w,
        )


class DistillationCriterion(nn.Module):
    """Composes the base, logit-KD, Manifold and [CLS]-KD terms into a dict of weighted contributions.

    Keys: ``base, kd, mf_sample, mf_patch, mf_rand, cls | cls_proj + cls_relation, atn, norm`` (those that
    apply) and their sum under ``loss``. All loss math runs in float32.
    """

    def __init__(self, base_criterion: nn.Module, weights: LossWeights):
        super().__init__()
        self.base_criterion = base_criterion
        self.weights = weights

    def forward(
            self,
            outputs: Logits,
            targets: torch.Tensor,
            teacher_logits: Optional[torch.Tensor] = None,
            student_tokens: Sequence[torch.Tensor] = (),
            teacher_tokens: Sequence[torch.Tensor] = (),
            projector: Optional[nn.Module] = None,
    ) -> dict[str, torch.Tensor]:
        logits, logits_kd = outputs if isinstance(outputs, (tuple, list)) else (outputs, outputs)
        # Inside an autocast region the .float() inputs alone would still have their products (Gram matrices,
        # attention maps, the projector) run in bf16/fp16: autocast is switched off for the loss math.
        with torch.autocast(logits.device.type, enabled=False):
            return self.weighted_terms(logits, logits_kd, targets, teacher_logits, student_tokens, teacher_tokens,
                                       projector)

    def weighted_terms(
            self,
            logits: torch.Tensor,
            logits_kd: torch.Tensor,
            targets: torch.Tensor,
            teacher_logits: Optional[torch.Tensor],
            student_tokens: Sequence[torch.Tensor],
            teacher_tokens: Sequence[torch.Tensor],
            projector: Optional[nn.Module],
    ) -> dict[str, torch.Tensor]:
        """Every weighted contribution and their sum, in float32."""
        w = self.weights
        base = self.base_criterion(logits.float(), targets)
        if w.distillation_type == 'none':
            return {'base': base, 'loss': base}

        logits_kd, teacher_logits = logits_kd.float(), teacher_logits.float()
        if w.distillation_type == 'soft':
            kd = soft_distillation_loss(logits_kd, teacher_logits, w.tau)
        else:
            kd = hard_distillation_loss(logits_kd, teacher_logits)
        terms = {'base': (1 - w.alpha) * base, 'kd': w.alpha * kd}
        if w.feature_distillation:
            terms.update(self.feature_terms(student_tokens, teacher_tokens, projector))
        terms['loss'] = sum(terms.values())
        return terms

    def feature_terms(
            self,
            student_tokens: Sequence[torch.Tensor],
            teacher_tokens: Sequence[torch.Tensor],
            projector: Optional[nn.Module],
    ) -> dict[str, torch.Tensor]:
        """Manifold, CLS, attention and norm terms over the stacked ``(s_k, t_k)`` layer pairs."""
        w = self.weights
        tokens_s = torch.stack(list(student_tokens)).float()
        tokens_t = torch.stack(list(teacher_tokens)).float()
        extra = tokens_s.shape[2] - tokens_t.shape[2]
        terms = {}
        if w.manifold or w.w_atn > 0:
            # Normalisation is per token, so one pass serves both terms (Manifold drops the extra tokens after).
            normed_s, normed_t = F.normalize(tokens_s, dim=-1), F.normalize(tokens_t, dim=-1)
        if w.manifold:
            f_s, f_t = normed_s[:, :, extra:], normed_t
            terms['mf_sample'] = w.beta * w.w_sample * manifold_sample_loss(f_s, f_t).mean()
            terms['mf_patch'] = w.beta * w.w_patch * manifold_patch_loss(f_s, f_t).mean()
            terms['mf_rand'] = w.beta * w.w_rand * manifold_random_loss(f_s, f_t, w.num_random_tokens).mean()
        if w.w_cls > 0:
            cls_s, cls_t = tokens_s[:, :, 0], tokens_t[:, :, 0]
            if w.dim_match in ('projector', 'both'):
                projected = F.normalize(cls_s, dim=-1)
                if projector is not None:
                    projected = projector(projected).float()
                proj = cls_projection_loss(projected, cls_t)
            if w.dim_match == 'projector':
                terms['cls'] = w.w_cls * adaptive_layer_weighting(proj, w.last_w)
            elif w.dim_match == 'relation':
                terms['cls'] = w.w_cls * adaptive_layer_weighting(cls_relation_loss(cls_s, cls_t), w.last_w)
            else:
                terms['cls_proj'] = w.w_proj * proj.mean()
                terms['cls_relation'] = w.w_relation * cls_relation_loss(cls_s, cls_t).mean()
        if w.w_atn > 0:
            terms['atn'] = w.w_atn * adaptive_layer_weighting(
                cls_patch_attention_loss(normed_s, normed_t), w.last_w)
        if w.norm_distill:
            norm = token_norm_loss(tokens_s[:, :, extra:], tokens_t[:, :, extra:])
            terms['norm'] = w.w_norm * emphasise_last(norm, w.last_w).mean()
        return terms


def build_criterion(args) -> DistillationCriterion:
    """The criterion of the training loop, configured by the command line."""
    return DistillationCriterion(build_base_criterion(args), LossWeights.from_args(args))
