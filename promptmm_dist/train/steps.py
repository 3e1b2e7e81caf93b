"""One optimisation step's math for the teacher and the student, with no knowledge of distribution.

The local loop and the Ray Train worker loop both call these; they differ only in which samples a
process sees and how gradients and metrics are reduced.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from promptmm_dist.config import PromptConfig, StudentConfig, TeacherConfig
from promptmm_dist.distill.losses import (
    bpr_loss,
    embedding_kd,
    info_nce,
    l2_reg,
    modality_list_kd,
    pairwise_kd,
)
from promptmm_dist.models.teacher import TeacherOutput


def batch_bounds(n: int, n_steps: int) -> list[tuple[int, int]]:
    """(start, stop) of `n_steps` near-equal consecutive batches of `n` rows."""
    edges = np.linspace(0, n, n_steps + 1).astype(int)
    return list(zip(edges[:-1], edges[1:]))


@dataclass
class SoftRanking:
    """The frozen teacher's view of a set of samples (what the cache stores per shard and epoch).

    users (n,), items (n, 1+N) with column 0 the positive and column 1 the BPR negative, as int32 (half
    the bytes of int64 in the object store; consumers widen a batch to int64 where torch indexes);
    per-modality list logits h^m_u . h^m_i and fused logits as float16; margins s(u,i+) - s(u,i-) as float32.
    """

    users: np.ndarray
    items: np.ndarray
    modal_logits: dict[str, np.ndarray]
    fused_logits: np.ndarray
    margins: np.ndarray
    # end row of each of the epoch's training steps (the samples' steps, `TrainSampler.epoch`, and
    # several shards' rankings joined step by step, `join_by_step`); None: cut evenly (`batch_bounds`)
    step_ends: np.ndarray | None = None

    ID_DTYPE = np.int32  # class constant (no annotation: not a dataclass field)

    def __post_init__(self) -> None:
        self.users = self.compact_ids(self.users, "users")
        self.items = self.compact_ids(self.items, "items")

    @classmethod
    def compact_ids(cls, ids: np.ndarray, what: str) -> np.ndarray:
        """`ids` as int32; no copy when they already are (object-store arrays stay zero-copy).
        ValueError (one line) for ids int32 cannot hold, rather than wrapping them silently."""
        ids = np.asarray(ids)
        if ids.dtype == cls.ID_DTYPE:
            return ids
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(cls.ID_DTYPE).max):
            raise ValueError(f"SoftRanking {what}: ids in [{ids.min()}, {ids.max()}] do not fit int32")
        return ids.astype(cls.ID_DTYPE)

    def bytes_per_pair(self) -> float:
        """Cached bytes per training pair (one row: a user, its 1+N items, their logits and margin)."""
        return self.nbytes() / len(self) if len(self) else 0.0

    def step_bounds(self, n_steps: int) -> list[tuple[int, int]]:
        """(start, stop) rows of each of the epoch's `n_steps` training steps."""
        if self.step_ends is None:
            return batch_bounds(len(self), n_steps)
        if len(self.step_ends) != n_steps:
            raise ValueError(f"SoftRanking: samples drawn in {len(self.step_ends)} steps, trained in {n_steps}")
        ends = [int(e) for e in self.step_ends]
        return list(zip([0] + ends[:-1], ends))

    def take(self, rows: np.ndarray) -> "SoftRanking":
        return SoftRanking(self.users[rows], self.items[rows], {m: v[rows] for m, v in self.modal_logits.items()},
                           self.fused_logits[rows], self.margins[rows])

    def slice(self, start: int, stop: int) -> "SoftRanking":
        return SoftRanking(self.users[start:stop], self.items[start:stop],
                           {m: v[start:stop] for m, v in self.modal_logits.items()},
                           self.fused_logits[start:stop], self.margins[start:stop])

    def __len__(self) -> int:
        return len(self.users)

    def nbytes(self) -> int:
        return int(self.users.nbytes + self.items.nbytes + self.fused_logits.nbytes + self.margins.nbytes
                   + sum(v.nbytes for v in self.modal_logits.values()))


def as_tensor(x: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Tensor from a possibly read-only (object-store, zero-copy) array, copying only the batch."""
    return torch.tensor(np.asarray(x), dtype=dtype)


def id_tensor(ids: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch's ids as int64 (what torch indexes with) on the device of the tables they index."""
    return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)


def list_logits(user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
                items: torch.Tensor) -> torch.Tensor:
    """(B, 1+N) dot-product logits of each user against its list.

    Embedding lookups + broadcast multiply: ~2.5x faster forward+backward on CPU than an einsum over
    advanced-indexed rows (whose backward is a slow accumulating index_put)."""
    return (F.embedding(users, user_emb).unsqueeze(1) * F.embedding(items, item_emb)).sum(-1)


@torch.no_grad()
def join_by_step(parts: list["SoftRanking"], n_steps: int) -> "SoftRanking":
    """Several shards' rankings on one rank: step t takes step t of every shard's ranking, so the
    global batch of step t is the same set of samples however the shards are spread over ranks (1 rank
    with N shards, or W ranks with N / W each). Rows come in step order."""
    if len(parts) == 1:
        return parts[0]
    starts = np.cumsum([0] + [len(p) for p in parts[:-1]])
    cuts = [p.step_bounds(n_steps) for p in parts]
    rows = [np.arange(start + cut[t][0], start + cut[t][1]) for t in range(n_steps) for start, cut in zip(starts, cuts)]
    joined = SoftRanking(np.concatenate([p.users for p in parts]), np.concatenate([p.items for p in parts]),
                         {m: np.concatenate([p.modal_logits[m] for p in parts]) for m in parts[0].modal_logits},
                         np.concatenate([p.fused_logits for p in parts]), np.concatenate([p.margins for p in parts]))
    out = joined.take(np.concatenate(rows))
    out.step_ends = np.cumsum([sum(c[t][1] - c[t][0] for c in cuts) for t in range(n_steps)])
    return out


@torch.no_grad()
def frozen_list_logits(user_emb: torch.Tensor, item_emb: torch.Tensor, users: torch.Tensor,
                       items: torch.Tensor) -> torch.Tensor:
    """`list_logits` without a graph: one batched matrix product over the gathered item rows, with no
    (B, 1+N, d) product temporary (the gather is the only one)."""
    return torch.bmm(F.embedding(items, item_emb), F.embedding(users, user_emb).unsqueeze(2)).squeeze(2)


def soft_ranking(out: TeacherOutput, users: np.ndarray, items: np.ndarray,
                 chunk: int = 8192, step_ends: np.ndarray | None = None) -> SoftRanking:
    """Teacher logits for every list entry, per modality and fused (teacher in eval mode). `chunk` rows
    at a time: the gathered item rows of a chunk (chunk x (1+N) x d floats) are its working memory, and
    each chunk's logits go straight into the float16 result (no float32 copy of the whole ranking)."""
    n, width = len(users), (items.shape[1] if np.ndim(items) == 2 else 0)
    fused = np.empty((n, width), np.float16)
    modal = {m: np.empty((n, width), np.float16) for m in out.modal_user}
    margins = np.empty(n, np.float32)
    for s in range(0, n, chunk):
        u = id_tensor(users[s:s + chunk], out.user.device)
        it = id_tensor(items[s:s + chunk], out.user.device)
        f = frozen_list_logits(out.user, out.item, u, it)
        margins[s:s + chunk] = (f[:, 0] - f[:, 1]).cpu().numpy()
        fused[s:s + chunk] = f.cpu().numpy()
        for m in modal:
            modal[m][s:s + chunk] = frozen_list_logits(out.modal_user[m], out.modal_item[m], u, it).cpu().numpy()
    return SoftRanking(users=users, items=items, modal_logits=modal, fused_logits=fused, margins=margins,
                       step_ends=step_ends)


def gather_item_side(out: TeacherOutput, base_items: torch.Tensor | None, graph) -> tuple[TeacherOutput, torch.Tensor | None]:
    """The teacher's item-side tables whole, for losses that index items by id: one exchange for all of
    them when the graph is partitioned, the same tensors in one process. (user side: this rank's rows)
    `base_items`: the item ID embeddings too (None: not needed, and None is returned for them)."""
    names = list(out.modal_item)
    views = list(out.views)
    tables = [out.item, *(out.modal_item[m] for m in names), out.prompt_item,
              *(out.views[v][1] for v in views), *([] if base_items is None else [base_items])]
    whole = graph.gather_items(*tables)
    n = len(names)
    item, modal, prompt_item = whole[0], whole[1:1 + n], whole[1 + n]
    view_items = whole[2 + n:2 + n + len(views)]
    gathered = TeacherOutput(out.user, item, out.modal_user, dict(zip(names, modal)), out.prompt_user, prompt_item,
                             views={v: (out.views[v][0], t) for v, t in zip(views, view_items)})
    return gathered, None if base_items is None else whole[-1]


def optimizer_step(loss: torch.Tensor, parts: dict[str, float], n: int, model: torch.nn.Module,
                   opt: torch.optim.Optimizer, world) -> tuple[dict[str, float], float]:
    """Step `model` on this rank's part (`n` samples) of the global batch: the loss is weighted by the
    rank's share, so the ranks' gradients add up to the global batch's, and the replicated modules'
    gradients are summed over ranks. A rank with no sample still runs its backward (its exchanges
    must meet the other ranks') with a zero loss. Returns (loss parts weighted by the share, share)."""
    share = world.batch_share(n)
    opt.zero_grad(set_to_none=True)
    (loss * share if n else loss.nan_to_num() * 0.0).backward()
    world.sync_gradients(model)
    opt.step()
    return {k: (v * share if n else 0.0) for k, v in parts.items()}, share


def teacher_loss(out: TeacherOutput, base: list[torch.Tensor], users: torch.Tensor,
                 items: torch.Tensor, cfg: TeacherConfig, prompt_cfg: PromptConfig,
                 view_rows: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """BPR on fused + lambda_m * sum_m BPR on h^m + lambda_p * prompt BPR + L2 (DESIGN 2), plus the
    views' InfoNCE for contrastive backbones. `view_rows`: each view's (user rows, item rows) of the
    batch's distinct users and positives, when the caller selects them (a rank holding part of the
    global batch passes the whole batch's); default: this batch's, from `out.views`."""
    pos, neg = items[:, 0], items[:, 1]
    pair = items[:, :2]
    fused = list_logits(out.user, out.item, users, pair)
    loss_bpr = bpr_loss(fused[:, 0], fused[:, 1])
    loss_modal = fused.new_zeros(())
    for m in out.modal_user:
        s = list_logits(out.modal_user[m], out.modal_item[m], users, pair)
        loss_modal = loss_modal + bpr_loss(s[:, 0], s[:, 1])
    ps = list_logits(out.prompt_user, out.prompt_item, users, pair)
    loss_prompt = bpr_loss(ps[:, 0], ps[:, 1])
    reg = l2_reg(F.embedding(users, base[0]), F.embedding(pos, base[1]), F.embedding(neg, base[1]))
    loss = loss_bpr + cfg.lambda_m * loss_modal + prompt_cfg.lambda_p * loss_prompt + cfg.weight_decay * reg
    parts = {"bpr": float(loss_bpr.detach()), "modal_bpr": float(loss_modal.detach()),
             "prompt_bpr": float(loss_prompt.detach())}
    if out.views and cfg.lambda_cl > 0:
        if view_rows is None:
            view_rows = batch_view_rows(out.views, torch.unique(users), torch.unique(pos))
        loss_cl = view_alignment(view_rows, cfg.cl_tau)
        loss = loss + cfg.lambda_cl * loss_cl
        parts["cl"] = float(loss_cl.detach())
    return loss, parts


def batch_view_rows(views: dict[str, tuple[torch.Tensor, torch.Tensor]], users: torch.Tensor,
                    items: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each view's rows of the given users and items (the InfoNCE rows)."""
    return {v: (u[users], i[items]) for v, (u, i) in views.items()}


def view_alignment(rows: dict[str, tuple[torch.Tensor, torch.Tensor]], tau: float) -> torch.Tensor:
    """InfoNCE between each pair of views, on their rows of the batch's distinct users and positive
    items (row k of every view is the same user / item; the order does not matter)."""
    names = list(rows)
    loss = rows[names[0]][0].new_zeros(())
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            loss = loss + info_nce(rows[a][0], rows[b][0], tau)
            loss = loss + info_nce(rows[a][1], rows[b][1], tau)
    return loss


def list_targets(teacher: SoftRanking, cfg: StudentConfig) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Teacher lists for the list-wise KD: each modality's (weight list_modal_weight / |M|) and,
    optionally, the fused teacher's (weight list_fused_weight)."""
    t_logits: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    if cfg.list_modal_weight > 0:
        for m, v in teacher.modal_logits.items():
            t_logits[m] = as_tensor(v)
            weights[m] = cfg.list_modal_weight / len(teacher.modal_logits)
    if cfg.list_fused_weight > 0:
        t_logits["__fused__"] = as_tensor(teacher.fused_logits)
        weights["__fused__"] = cfg.list_fused_weight
    return t_logits, weights


def student_loss(user_emb: torch.Tensor, item_emb: torch.Tensor, base: list[torch.Tensor],
                 item_proj: torch.Tensor | None, users: torch.Tensor, items: torch.Tensor,
                 cfg: StudentConfig, teacher: SoftRanking | None = None,
                 teacher_items: dict[str, torch.Tensor] | None = None,
                 emb_items: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """BPR + L2 + lambda_pair L_pair + lambda_list L_list + lambda_emb L_emb (DESIGN 2).

    With `teacher=None` this is plain LightGCN/MF BPR training (the no-KD baseline). `item_proj`: the
    item table projected to the teacher size (None: the sizes agree, items are used as they are).
    `emb_items`: the distinct items the embedding KD averages over (default: this batch's positives and
    negatives; a rank holding part of the global batch passes the whole batch's).
    """
    logits = list_logits(user_emb, item_emb, users, items)
    loss_bpr = bpr_loss(logits[:, 0], logits[:, 1])
    reg = l2_reg(F.embedding(users, base[0]), F.embedding(items[:, :2], base[1]))
    loss = loss_bpr + cfg.weight_decay * reg
    parts = {"bpr": float(loss_bpr.detach())}
    if teacher is None:
        return loss, parts
    if cfg.lambda_pair > 0:
        t_margin = as_tensor(teacher.margins)
        l_pair = pairwise_kd(t_margin, logits[:, 0] - logits[:, 1], cfg.tau)
        loss = loss + cfg.lambda_pair * l_pair
        parts["pair_kd"] = float(l_pair.detach())
    if cfg.lambda_list > 0 and (cfg.list_modal_weight > 0 or cfg.list_fused_weight > 0):
        t_logits, weights = list_targets(teacher, cfg)
        l_list = modality_list_kd(t_logits, logits, cfg.tau, variant=cfg.list_kd, weights=weights,
                                  alpha=cfg.dkd_alpha, beta=cfg.dkd_beta)
        loss = loss + cfg.lambda_list * l_list
        parts["list_kd"] = float(l_list.detach())
    if cfg.lambda_emb > 0 and teacher_items:
        batch_items = torch.unique(items[:, :2]) if emb_items is None else emb_items
        proj = (item_emb if item_proj is None else item_proj)[batch_items]
        l_emb = embedding_kd({m: h[batch_items.to(h.device)] for m, h in teacher_items.items()}, proj,
                             alpha=cfg.emb_alpha)
        loss = loss + cfg.lambda_emb * l_emb
        parts["emb_kd"] = float(l_emb.detach())
    return loss, parts
