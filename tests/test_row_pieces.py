"""Checkpoints in row pieces (train.row_pieces): each partitioned rank saves only its rows of the
sharded tables and their optimiser moments; the set resumes on any number of ranks, whole for one
process, and an incomplete set is refused. No Ray: the ranks' worlds are built in one process
(snapshot and restore need no collective)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from promptmm_dist.partition.plan import PartitionPlan
from promptmm_dist.partition.world import PartitionedWorld
from promptmm_dist.run_io import load_rows_of, load_state, save_checkpoint
from promptmm_dist.config import Config
from promptmm_dist.train.row_pieces import piece_path, write_piece
from promptmm_dist.train.selection import EarlyStopper
from promptmm_dist.train.state import RESUME_FILE, LoopState, Resumable
from promptmm_dist.train.world import ROW_TABLES, World

N_USERS, N_ITEMS, DIM = 11, 7, 4
DEGREE = np.array([5, 1, 3, 2, 8, 1, 4])


class Tables(nn.Module):
    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__()
        self.user_emb = nn.Embedding(n_users, DIM)
        self.item_emb = nn.Embedding(n_items, DIM)
        self.proj = nn.Linear(DIM, DIM)


def whole_reference() -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values per global row, so a row put in the wrong place shows."""
    user = torch.arange(N_USERS * DIM, dtype=torch.float32).view(N_USERS, DIM)
    item = 1000 + torch.arange(N_ITEMS * DIM, dtype=torch.float32).view(N_ITEMS, DIM)
    return user, item


def rank_loop(world: World, users: np.ndarray, items: np.ndarray) -> tuple[Resumable, Tables]:
    """A rank's model holding its rows of the reference tables, after one Adam step."""
    torch.manual_seed(0)
    model = Tables(len(users), len(items))
    user, item = whole_reference()
    with torch.no_grad():
        model.user_emb.weight.copy_(user[torch.from_numpy(users)])
        model.item_emb.weight.copy_(item[torch.from_numpy(items)])
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    ids_u, ids_i = torch.from_numpy(users), torch.from_numpy(items)
    # a loss whose gradient depends on the global id: the moments differ row by row
    loss = (model.user_emb.weight * ids_u[:, None]).sum() + (model.item_emb.weight * ids_i[:, None]).sum() ** 2
    loss = loss + model.proj.weight.sum()
    loss.backward()
    opt.step()
    return Resumable("teacher", model, {"teacher": opt}, EarlyStopper(5), world=world), model


def two_rank_worlds() -> list[PartitionedWorld]:
    plan = PartitionPlan.build(2, 2, N_USERS, DEGREE)
    return [PartitionedWorld(r, 2, plan) for r in range(2)]


def saved_by_two_ranks(folder) -> list[tuple[PartitionedWorld, Resumable, Tables]]:
    out = []
    for world in two_rank_worlds():
        loop, model = rank_loop(world, world.rows["user"], world.rows["item"])
        best = {k: v.clone() * 2 for k, v in model.state_dict().items()}
        loop.snapshot(3, False, [{"epoch": 2}], best).save(folder)
        out.append((world, loop, model))
    return out


def whole_from_ranks(ranks, pick) -> dict[str, torch.Tensor]:
    """A rank-held tensor (by `pick(loop, model)`: name -> rows) laid out whole in global id order."""
    out: dict[str, torch.Tensor] = {}
    for world, loop, model in ranks:
        for name, rows in pick(loop, model).items():
            kind = ROW_TABLES[name]
            if name not in out:
                out[name] = torch.empty((world.totals[kind],) + tuple(rows.shape[1:]))
            out[name][torch.from_numpy(world.rows[kind])] = rows
    return out


def adam_moment(loop: Resumable, model: Tables, key: str) -> dict[str, torch.Tensor]:
    opt = loop.optimizers["teacher"]
    return {name: opt.state[p][key] for name, p in model.named_parameters() if name in ROW_TABLES}


def test_ranks_save_only_their_rows_and_one_process_resumes_the_whole_state(tmp_path):
    ranks = saved_by_two_ranks(tmp_path)
    dense = torch.load(tmp_path / RESUME_FILE, weights_only=True)
    assert not set(dense["model"]) & set(ROW_TABLES), "rank 0's resume.pt must not hold a sharded table"
    for r, (world, _, _) in enumerate(ranks):
        piece = torch.load(piece_path(tmp_path, "resume", r), weights_only=True)
        assert piece["rows"]["model/user_emb.weight"].shape[0] == len(world.rows["user"]) < N_USERS

    state = LoopState.load(tmp_path / RESUME_FILE)
    assert state.complete()
    whole = World()
    loop, model = rank_loop(whole, np.arange(N_USERS), np.arange(N_ITEMS))
    first, history, best, _ = loop.restore(state)
    assert first == 3 and history == [{"epoch": 2}]
    params = whole_from_ranks(ranks, lambda lp, m: {n: p.detach() for n, p in m.named_parameters() if n in ROW_TABLES})
    for name, value in params.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].detach(), value, rtol=0, atol=0)
        torch.testing.assert_close(best[name], value * 2, rtol=0, atol=0)
    for key in ("exp_avg", "exp_avg_sq"):
        want = whole_from_ranks(ranks, lambda lp, m: adam_moment(lp, m, key))
        for name, value in adam_moment(loop, model, key).items():
            torch.testing.assert_close(value, want[name], rtol=0, atol=0)
    torch.testing.assert_close(model.proj.weight, ranks[0][2].proj.weight, rtol=0, atol=0)


def test_a_state_saved_by_two_ranks_resumes_on_one_partitioned_rank(tmp_path):
    ranks = saved_by_two_ranks(tmp_path)
    plan = PartitionPlan.build(1, 2, N_USERS, DEGREE)
    world = PartitionedWorld(0, 1, plan)
    loop, model = rank_loop(world, world.rows["user"], world.rows["item"])
    loop.restore(LoopState.load(tmp_path / RESUME_FILE))
    want = whole_from_ranks(ranks, lambda lp, m: {n: p.detach() for n, p in m.named_parameters() if n in ROW_TABLES})
    for name, p in model.named_parameters():
        if name in ROW_TABLES:
            ids = torch.from_numpy(world.rows[ROW_TABLES[name]])
            torch.testing.assert_close(p.detach(), want[name][ids], rtol=0, atol=0)


def test_a_piece_from_another_save_makes_the_set_incomplete(tmp_path):
    ranks = saved_by_two_ranks(tmp_path)
    world = ranks[1][0]
    write_piece(tmp_path, "resume", 1, 4, world.rows, world.totals, {})  # a later epoch's piece, alone
    state = LoopState.load(tmp_path / RESUME_FILE)
    assert not state.complete()
    loop, _ = rank_loop(World(), np.arange(N_USERS), np.arange(N_ITEMS))
    with pytest.raises(ValueError, match="another save"):
        loop.restore(state)


def test_a_checkpoint_in_pieces_loads_whole_and_by_rank(tmp_path):
    ranks = saved_by_two_ranks(tmp_path)
    for world, loop, _ in ranks:
        state = loop.snapshot(3, False, [], None)
        weights, piece = state.weights()
        save_checkpoint(tmp_path / "ckpt", "teacher", weights, Config(), {}, piece=piece)
    whole = load_state(tmp_path / "ckpt" / "teacher.pt")
    want = whole_from_ranks(ranks, lambda lp, m: {n: p.detach() for n, p in m.named_parameters() if n in ROW_TABLES})
    for name, value in want.items():
        torch.testing.assert_close(whole[name], value, rtol=0, atol=0)
    assert "__row_pieces__" not in whole and "proj.weight" in whole
    for world, _, model in ranks:  # each rank reads back exactly its rows
        mine = load_rows_of(tmp_path / "ckpt" / "teacher.pt", world)
        model.load_state_dict(mine)
        torch.testing.assert_close(mine["user_emb.weight"], want["user_emb.weight"][torch.from_numpy(world.rows["user"])])
