"""Student-task-adaptive prompt rounds (DESIGN 2): the teacher is frozen, only the prompt learns.

The prompt steps on the distillation loss between the (differentiable) teacher and the current,
fixed student, plus the teacher's BPR and prompt-BPR terms so the teacher stays accurate. The
authors' released code gives the prompt no gradient here; this is the fix.
"""

from __future__ import annotations

import numpy as np
import torch

from promptmm_dist.config import Config
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.losses import bpr_loss, embedding_kd, modality_list_kd, pairwise_kd
from promptmm_dist.models.teacher import PromptMMTeacher
from promptmm_dist.train.steps import list_logits


def prompt_round(teacher: PromptMMTeacher, graph: GraphPropagator, student_user: torch.Tensor,
                 student_item: torch.Tensor, student_projector: torch.nn.Module | None,
                 sampler: TrainSampler, cfg: Config, seed: int,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    """`cfg.prompt.round_steps` optimiser steps on the prompt; returns the mean round loss.

    A pure function of (teacher, prompt state, student, seed): the samples and the prompt's dropout
    both draw from `seed` (torch's global RNG is left as it was), so a round run by a TeacherWorker,
    re-run on a restarted one, or run in-process gives the same prompt."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _prompt_round(teacher, graph, student_user, student_item, student_projector, sampler, cfg, seed,
                             optimizer)


def _prompt_round(teacher: PromptMMTeacher, graph: GraphPropagator, student_user: torch.Tensor,
                  student_item: torch.Tensor, student_projector: torch.nn.Module | None,
                  sampler: TrainSampler, cfg: Config, seed: int,
                  optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
    sc, pc = cfg.student, cfg.prompt
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    for n, p in teacher.named_parameters():
        p.requires_grad_(n.startswith("prompt."))  # autograd to the prompt only
    teacher.eval()
    teacher.prompt.train()
    opt = optimizer or torch.optim.Adam(teacher.prompt.parameters(), lr=pc.lr)
    rng = np.random.default_rng(seed)
    s_user, s_item = student_user.detach(), student_item.detach()
    total = 0.0
    try:
        for step in range(pc.round_steps):
            pick = rng.integers(0, sampler.n_pairs, size=min(sc.batch_size, sampler.n_pairs))
            users_np = sampler.pair_users[pick]
            negs = sampler.sample_negatives(users_np, sc.neg_sample_num, rng)
            items_np = np.concatenate([sampler.pair_items[pick][:, None], negs], axis=1)
            users, items = torch.from_numpy(users_np), torch.from_numpy(items_np)
            out = teacher(graph)
            s_logits = list_logits(s_user, s_item, users, items)
            t_fused = list_logits(out.user, out.item, users, items)
            t_modal = {m: list_logits(out.modal_user[m], out.modal_item[m], users, items) for m in out.modal_user}
            loss = bpr_loss(t_fused[:, 0], t_fused[:, 1])
            ps = list_logits(out.prompt_user, out.prompt_item, users, items[:, :2])
            loss = loss + pc.lambda_p * bpr_loss(ps[:, 0], ps[:, 1])
            if sc.lambda_pair > 0:
                loss = loss + sc.lambda_pair * pairwise_kd(t_fused[:, 0] - t_fused[:, 1],
                                                           s_logits[:, 0] - s_logits[:, 1], sc.tau,
                                                           detach_teacher=False)
            lists, weights = {}, {}
            if sc.list_modal_weight > 0:
                lists.update(t_modal)
                weights.update({m: sc.list_modal_weight / len(t_modal) for m in t_modal})
            if sc.list_fused_weight > 0:
                lists["__fused__"], weights["__fused__"] = t_fused, sc.list_fused_weight
            if sc.lambda_list > 0 and lists:
                loss = loss + sc.lambda_list * modality_list_kd(lists, s_logits, sc.tau, variant=sc.list_kd,
                                                                weights=weights, alpha=sc.dkd_alpha,
                                                                beta=sc.dkd_beta, detach_teacher=False)
            if sc.lambda_emb > 0 and student_projector is not None:
                batch_items = torch.unique(items[:, :2])
                with torch.no_grad():
                    proj = student_projector(s_item[batch_items])
                loss = loss + sc.lambda_emb * embedding_kd({m: h[batch_items] for m, h in out.modal_item.items()},
                                                           proj, alpha=sc.emb_alpha, detach_teacher=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
    finally:
        for n, p in teacher.named_parameters():
            p.requires_grad_(flags[n])
        teacher.eval()
    return {"round_loss": total / max(pc.round_steps, 1), "steps": pc.round_steps}
