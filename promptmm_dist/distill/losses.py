"""Student training and distillation losses (DESIGN section 2, "Distillation losses").

Every KD term is a proper divergence between probability distributions built from teacher and
student scores (the authors' code applied KL to non-distributions, which pushed pairwise margins the
wrong way; see DESIGN's list of bugs not to copy). All are computed in log space (`logsigmoid`,
`log_softmax`, `logsumexp`) so large logits neither overflow nor take log(0). Teacher inputs are
detached by default and cast to the student's dtype (cached teacher logits are float16): for the
student the teacher is a fixed target. The student-task-adaptive prompt rounds pass
`detach_teacher=False` so the KD loss reaches the prompt through the (frozen) teacher (DESIGN lists "the
prompt receiving no gradient in stage 2" among the authors' bugs).

Shapes: triples are 1-D (B,); lists are (B, 1 + N) with column 0 the positive and columns 1..N the
negatives; "mean over users" is the mean over rows.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _teacher(t: Tensor, like: Tensor, detach: bool = True) -> Tensor:
    """Teacher values in the student's dtype and device; a constant target unless `detach` is False."""
    if detach:
        t = t.detach()
    return t.to(dtype=like.dtype, device=like.device)


def _check_same_shape(teacher: Tensor, student: Tensor, what: str) -> None:
    if teacher.shape != student.shape:
        raise ValueError(f"{what}: teacher shape {tuple(teacher.shape)} != student shape {tuple(student.shape)}")


# --------------------------------------------------------------------------------------------------
# Base ranking losses
# --------------------------------------------------------------------------------------------------


def bpr_loss(pos_scores: Tensor, neg_scores: Tensor) -> Tensor:
    """BPR: mean(-log sigmoid(pos - neg)) written as softplus(neg - pos), which never takes log(0)."""
    return F.softplus(neg_scores - pos_scores).mean()


def info_nce(a: Tensor, b: Tensor, tau: float) -> Tensor:
    """Symmetric-free InfoNCE of row i of `a` against row i of `b` with the other rows of `b` as
    negatives (cosine similarities / tau): mean over rows of -log softmax_j(cos(a_i, b_j) / tau)[i]."""
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).t() / tau
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def l2_reg(*tensors: Tensor, batch_size: int | None = None) -> Tensor:
    """sum_t ||t||_F^2 / batch_size.

    Convention (LightGCN's, without its factor 1/2): pass the layer-0 (ego) embedding rows used by the
    batch, e.g. user, positive and negative item rows; `batch_size` defaults to the first tensor's row
    count. Dividing by the batch size keeps the weight decay's strength independent of the batch size
    and of the number of rows each user contributes.
    """
    if not tensors:
        raise ValueError("l2_reg needs at least one tensor")
    n = int(batch_size) if batch_size is not None else int(tensors[0].shape[0]) if tensors[0].ndim else 1
    if n < 1:
        raise ValueError("batch_size must be >= 1")
    return sum(t.pow(2).sum() for t in tensors) / n


# --------------------------------------------------------------------------------------------------
# Pairwise KD
# --------------------------------------------------------------------------------------------------


def bernoulli_kl_logits(teacher_logit: Tensor, student_logit: Tensor) -> Tensor:
    """Element-wise KL(Bernoulli(sigmoid(t)) || Bernoulli(sigmoid(s))), from logits.

    log p = logsigmoid(x), log(1 - p) = logsigmoid(-x): finite for every finite logit, so the
    p * log p terms are 0 * finite (never 0 * -inf) even when sigmoid saturates.
    """
    pt = torch.sigmoid(teacher_logit)
    log_pt, log_1mpt = F.logsigmoid(teacher_logit), F.logsigmoid(-teacher_logit)
    log_ps, log_1mps = F.logsigmoid(student_logit), F.logsigmoid(-student_logit)
    return pt * (log_pt - log_ps) + (1.0 - pt) * (log_1mpt - log_1mps)


def pairwise_kd(
    teacher_margin: Tensor, student_margin: Tensor, tau: float = 1.0, *, detach_teacher: bool = True
) -> Tensor:
    """L_pair = mean over triples of KL(Bernoulli(sigma(dT/tau)) || Bernoulli(sigma(dS/tau))).

    d = s(u, i+) - s(u, i-). The teacher's margin says how sure it is that i+ beats i-; the gradient on
    the student margin is (sigma(dS/tau) - sigma(dT/tau)) / tau per triple, so student margins move
    towards the teacher's: up where the teacher is sure, down where the teacher prefers i-.
    No tau^2 factor (DESIGN states the term without one).
    """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    t = _teacher(teacher_margin, student_margin, detach_teacher)
    _check_same_shape(t, student_margin, "pairwise_kd")
    return bernoulli_kl_logits(t / tau, student_margin / tau).mean()


# --------------------------------------------------------------------------------------------------
# List-wise KD
# --------------------------------------------------------------------------------------------------


def _kl_from_log_probs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Row-wise KL(p || q) = sum_k p_k (log p_k - log q_k) from log-probabilities (last dim)."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def _check_lists(teacher: Tensor, student: Tensor, what: str, min_cols: int = 2) -> None:
    _check_same_shape(teacher, student, what)
    if student.ndim != 2 or student.shape[1] < min_cols:
        raise ValueError(f"{what}: expected (B, 1 + N) lists with N >= {min_cols - 1}, got {tuple(student.shape)}")


def list_kl(
    teacher_logits: Tensor, student_logits: Tensor, tau: float = 1.0, *, detach_teacher: bool = True
) -> Tensor:
    """Plain list-wise KD: KL(softmax(t/tau) || softmax(s/tau)) * tau^2, mean over users.

    tau^2 keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    t = _teacher(teacher_logits, student_logits, detach_teacher)
    _check_lists(t, student_logits, "list_kl", min_cols=1)
    kl = _kl_from_log_probs(F.log_softmax(t / tau, dim=-1), F.log_softmax(student_logits / tau, dim=-1))
    return kl.mean() * tau**2


def _decoupled_parts(
    teacher_logits: Tensor, student_logits: Tensor, tau: float, detach_teacher: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-user (KL(b^T || b^S), KL(q^T || q^S), b^T_neg) of the target/non-target decomposition.

    b = [p_1, 1 - p_1] with p = softmax(y / tau); q = softmax of the negatives only. The log-masses are
    log p_1 = z_1 - lse(z) and log(1 - p_1) = lse(z_{2..}) - lse(z): no 1 - p_1 subtraction, so no
    cancellation or log(0) when the positive takes almost all the mass.
    """
    if tau <= 0:
        raise ValueError("tau must be > 0")
    t = _teacher(teacher_logits, student_logits, detach_teacher)
    _check_lists(t, student_logits, "list KD")
    zt, zs = t / tau, student_logits / tau

    def binary_and_negative(z: Tensor) -> tuple[Tensor, Tensor]:
        lse_all = torch.logsumexp(z, dim=-1)
        lse_neg = torch.logsumexp(z[:, 1:], dim=-1)
        log_b = torch.stack([z[:, 0] - lse_all, lse_neg - lse_all], dim=-1)
        log_q = z[:, 1:] - lse_neg.unsqueeze(-1)
        return log_b, log_q

    log_bt, log_qt = binary_and_negative(zt)
    log_bs, log_qs = binary_and_negative(zs)
    return _kl_from_log_probs(log_bt, log_bs), _kl_from_log_probs(log_qt, log_qs), log_bt[:, 1].exp()


def disentangled_list_kd(
    teacher_logits: Tensor, student_logits: Tensor, tau: float = 1.0, *, detach_teacher: bool = True
) -> Tensor:
    """[KL(b^T || b^S) + b^T_neg * KL(q^T || q^S)] * tau^2, mean over users.

    The b^T_neg factor is the modality-aware re-weighting: a teacher sure of the positive (b^T_neg
    small) contributes little of its negative ranking, where modality noise lives. By the chain rule of
    KL this equals `list_kl` exactly; it is written in decomposed form so the two parts can be logged
    and re-weighted (see `dkd_list_kd`).
    """
    kl_b, kl_q, b_neg = _decoupled_parts(teacher_logits, student_logits, tau, detach_teacher)
    return (kl_b + b_neg * kl_q).mean() * tau**2


def dkd_list_kd(
    teacher_logits: Tensor,
    student_logits: Tensor,
    tau: float = 1.0,
    alpha: float = 1.0,
    beta: float = 8.0,
    *,
    detach_teacher: bool = True,
) -> Tensor:
    """Ablation (DKD, Zhao et al. 2022): [alpha * KL(b^T||b^S) + beta * KL(q^T||q^S)] * tau^2 with
    constant weights instead of the per-user b^T_neg factor."""
    kl_b, kl_q, _ = _decoupled_parts(teacher_logits, student_logits, tau, detach_teacher)
    return (alpha * kl_b + beta * kl_q).mean() * tau**2


def _reweighted_variant(
    t: Tensor, s: Tensor, tau: float, alpha: float = 1.0, beta: float = 8.0, *, detach_teacher: bool = True
) -> Tensor:
    """`disentangled_list_kd` with the variants' common signature (alpha, beta unused)."""
    return disentangled_list_kd(t, s, tau, detach_teacher=detach_teacher)


# name -> f(teacher_logits, student_logits, tau, alpha, beta, *, detach_teacher)
LIST_KD_VARIANTS: dict[str, Callable[..., Tensor]] = {
    "reweighted": _reweighted_variant,
    "dkd": dkd_list_kd,
}


def modality_list_kd(
    teacher_logits: Mapping[str, Tensor],
    student_logits: Tensor,
    tau: float = 1.0,
    variant: str = "reweighted",
    weights: Mapping[str, float] | None = None,
    alpha: float = 1.0,
    beta: float = 8.0,
    *,
    detach_teacher: bool = True,
) -> Tensor:
    """L_list = sum_m w_m * term(teacher_logits[m], student_logits); w defaults to 1/|M| each.

    One student list is matched against each modality teacher's list over the same items, so the
    student learns the rankings the modalities agree on.
    """
    if not teacher_logits:
        raise ValueError("modality_list_kd needs at least one modality")
    try:
        term = LIST_KD_VARIANTS[variant]
    except KeyError:
        raise ValueError(f"unknown list KD variant {variant!r} (expected one of {sorted(LIST_KD_VARIANTS)})") from None
    if weights is None:
        weights = {m: 1.0 / len(teacher_logits) for m in teacher_logits}
    elif set(weights) != set(teacher_logits):
        raise ValueError(f"weights are for {sorted(weights)} but teacher logits for {sorted(teacher_logits)}")
    total = student_logits.new_zeros(())
    for m, t in teacher_logits.items():
        total = total + float(weights[m]) * term(
            t, student_logits, tau, alpha=alpha, beta=beta, detach_teacher=detach_teacher
        )
    return total


# --------------------------------------------------------------------------------------------------
# Embedding KD
# --------------------------------------------------------------------------------------------------


def embedding_kd(
    teacher_item_emb: Mapping[str, Tensor],
    student_item_emb: Tensor,
    alpha: float = 2.0,
    *,
    detach_teacher: bool = True,
) -> Tensor:
    """L_emb = sum_m mean_i (1 - cos(h^m_i, e_i))^alpha (scaled cosine error; GraphMAE's SCE).

    `student_item_emb` is already projected to the teacher's dimension. alpha > 1 down-weights items
    the student already aligns with. 1 - cos is clamped at 0 so float error (cos = 1 + eps) cannot
    give NaN for fractional alpha.
    """
    if not teacher_item_emb:
        raise ValueError("embedding_kd needs at least one modality")
    total = student_item_emb.new_zeros(())
    for m, h in teacher_item_emb.items():
        h = _teacher(h, student_item_emb, detach_teacher)
        _check_same_shape(h, student_item_emb, f"embedding_kd[{m}]")
        cos = F.cosine_similarity(h, student_item_emb, dim=-1, eps=1e-8)
        total = total + (1.0 - cos).clamp_min(0.0).pow(alpha).mean()
    return total


# name (as in lambda_pair, lambda_list, lambda_emb) -> loss function
KD_TERMS: dict[str, Callable[..., Tensor]] = {
    "pair": pairwise_kd,
    "list": modality_list_kd,
    "emb": embedding_kd,
}
