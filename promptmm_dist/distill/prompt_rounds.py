"""Student-task-adaptive prompt rounds (DESIGN 2): the teacher is frozen, only the prompt learns.

The prompt steps on the distillation loss between the (differentiable) teacher and the current,
fixed student, plus the teacher's BPR and prompt-BPR terms so the teacher stays accurate. The
authors' released code gives the prompt no gradient here; this is the fix.

The same function runs in one process (whole tables, `World()`) and on each rank of a partitioned
teacher (`distill.teacher_model.TeacherRank`): there the tables are the rank's rows, item tables are
gathered, the losses are weighted by the rank's share and the (replicated) prompt's gradients are
summed over ranks, as in a teacher training step. Whether a step's batch takes a training pair is
drawn from (seed, step, the pair) alone (`TrainSampler.round_batch`), so the global batch is the same
for any number of ranks and shards: W ranks make the same round as one.
"""

from __future__ import annotations


import numpy as np
import torch

from promptmm_dist.config import Config
from promptmm_dist.data.graph import GraphPropagator
from promptmm_dist.data.sampling import TrainSampler
from promptmm_dist.distill.losses import bpr_loss, embedding_kd, modality_list_kd, pairwise_kd
from promptmm_dist.models.teacher import PromptMMTeacher
from promptmm_dist.train.steps import gather_item_side, list_logits
from promptmm_dist.train.world import World


def prompt_round(teacher: PromptMMTeacher, graph: GraphPropagator, student_user: torch.Tensor,
                 student_item: torch.Tensor, student_projector: torch.nn.Module | None,
                 sampler: TrainSampler, cfg: Config, seed: int,
                 optimizer: torch.optim.Optimizer | None = None, world: World | None = None,
                 item_pos: np.ndarray | None = None) -> dict[str, float]:
    """`cfg.prompt.round_steps` optimiser steps on the prompt; returns the mean round loss.

    `student_user`/`student_item`: the student's rows of the tables this process holds (whole in one
    process); `sampler`: the training pairs of this process's users (rows = its user rows, columns =
    global item ids, users keyed by their global ids); `item_pos`: global item id -> position in the
    gathered item order (None: the same). A pure function of (teacher, prompt state, student, seed):
    the samples and the prompt's dropout draw from `seed` (torch's global RNG is left as it was), so a
    round re-run on a restarted teacher, run in-process, or on W ranks gives the same prompt."""
    world = world or World()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _prompt_round(teacher, graph, student_user, student_item, student_projector, sampler, cfg, seed,
                             optimizer, world, item_pos)


def _prompt_round(teacher: PromptMMTeacher, graph: GraphPropagator, student_user: torch.Tensor,
                  student_item: torch.Tensor, student_projector: torch.nn.Module | None,
                  sampler: TrainSampler, cfg: Config, seed: int,
                  optimizer: torch.optim.Optimizer | None, world: World,
                  item_pos: np.ndarray | None) -> dict[str, float]:
    sc, pc = cfg.student, cfg.prompt
    flags = {n: p.requires_grad for n, p in teacher.named_parameters()}
    for n, p in teacher.named_parameters():
        p.requires_grad_(n.startswith("prompt."))  # autograd to the prompt only
    teacher.eval()
    teacher.prompt.train()
    opt = optimizer or torch.optim.Adam(teacher.prompt.parameters(), lr=pc.lr)
    all_pairs = float(world.all_reduce_sum(torch.tensor([float(sampler.n_pairs)], dtype=torch.float64)).item())
    fraction = min(1.0, sc.batch_size / max(all_pairs, 1.0))
    s_user = student_user.detach()
    s_item = graph.gather_items(student_item.detach())[0]  # the whole item side, gathered order
    total = 0.0
    try:
        for step in range(pc.round_steps):
            batch = sampler.round_batch(fraction, sc.neg_sample_num, seed, step)
            users_np, items_np = batch.users, batch.items
            n_batch = len(batch)
            share = world.batch_share(n_batch)
            if item_pos is not None:
                items_np = item_pos[items_np]
            users, items = torch.from_numpy(users_np), torch.from_numpy(items_np)
            out = gather_item_side(teacher(graph), None, graph)[0]
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
            loss = loss * share if n_batch else loss.nan_to_num() * 0.0
            if sc.lambda_emb > 0 and student_projector is not None:
                # over the global batch's distinct items, which every rank holds gathered: each rank
                # takes 1/W of the term so that the summed gradients count it once
                batch_items = world.distinct_items(items[:, :2], s_item.shape[0])
                with torch.no_grad():
                    proj = student_projector(s_item[batch_items])
                loss = loss + sc.lambda_emb / world.world_size * embedding_kd(
                    {m: h[batch_items] for m, h in out.modal_item.items()}, proj, alpha=sc.emb_alpha,
                    detach_teacher=False)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            world.sync_gradients(teacher.prompt)
            opt.step()
            total += world.reduce_sums({"loss": float(loss.detach())})["loss"]
    finally:
        for n, p in teacher.named_parameters():
            p.requires_grad_(flags[n])
        teacher.eval()
    return {"round_loss": total / max(pc.round_steps, 1), "steps": pc.round_steps}
