"""Full-ranking evaluation against a brute-force reference written from the metric definitions."""

from __future__ import annotations

import argparse
import json
import math
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from promptmm_dist.data.dataset import InteractionData
from promptmm_dist.errors import DataError
from promptmm_dist.eval import evaluate as ev
from promptmm_dist.eval.evaluate import (
    EvalData,
    RankingTask,
    embedding_scorer,
    evaluate,
    evaluate_splits,
    full_ranking_sums,
)
from promptmm_dist.eval.metrics import DEFAULT_KS, add_sums, finalize, metric_keys
from promptmm_dist.eval.popularity import item_popularity, popularity_scorer, random_scorer

# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def make_data(n_users: int, n_items: int, train: dict, val: dict | None = None,
              test: dict | None = None) -> InteractionData:
    """InteractionData from {user: [items]} per split."""
    us, its, sp = [], [], []
    for code, split in enumerate([train, val or {}, test or {}]):
        for u, items in split.items():
            us += [u] * len(items)
            its += list(items)
            sp += [code] * len(items)
    return InteractionData("hand", n_users, n_items, np.array(us, np.int32), np.array(its, np.int32),
                           np.array(sp, np.int8))


def split_sets(data: InteractionData, split: str) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for u, i in zip(*data.split_pairs(split)):
        out.setdefault(int(u), set()).add(int(i))
    return out


def brute_force(score_matrix: np.ndarray, data: InteractionData, split: str,
                ks=DEFAULT_KS, users=None) -> dict[str, float]:
    """Per user: sort every non-masked item by score, compute each metric by its definition; average."""
    rel_sets = split_sets(data, split)
    train = split_sets(data, "train")
    val = split_sets(data, "val")
    evaluated = sorted(u for u in rel_sets if users is None or u in set(users))
    totals = {k: 0.0 for k in metric_keys(ks)}
    kmax = max(ks)
    for u in evaluated:
        rel = rel_sets[u]
        masked = train.get(u, set()) | (val.get(u, set()) if split == "test" else set())
        ranked = sorted((i for i in range(data.n_items) if i not in masked),
                        key=lambda i: -score_matrix[u, i])
        hits_in_list = sum(1 for i in ranked[:kmax] if i in rel)
        for k in ks:
            hits = [1 if i in rel else 0 for i in ranked[:k]]
            n_hits = sum(hits)
            dcg = sum(h / math.log2(j + 2) for j, h in enumerate(hits))
            idcg = sum(1 / math.log2(j + 2) for j in range(min(len(rel), k)))
            legacy_idcg = sum(1 / math.log2(j + 2) for j in range(min(hits_in_list, k)))
            totals[f"recall@{k}"] += n_hits / len(rel)
            totals[f"precision@{k}"] += n_hits / k
            totals[f"ndcg@{k}"] += dcg / idcg
            totals[f"hit@{k}"] += 1.0 if n_hits else 0.0
            totals[f"legacy_ndcg@{k}"] += dcg / legacy_idcg if legacy_idcg else 0.0
    out = {k: v / len(evaluated) for k, v in totals.items()}
    out["n_users"] = len(evaluated)
    return out


def matrix_scorer(matrix: np.ndarray):
    def score(users):
        return torch.from_numpy(matrix[users])
    return score


def assert_metrics_close(got: dict, want: dict, tol: float = 1e-10) -> None:
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=tol), key


def random_data(seed: int, n_users: int = 60, n_items: int = 200) -> InteractionData:
    """Random clean splits; user 0 has 70 test items (> K=50), some users have no val/test items."""
    rng = np.random.default_rng(seed)
    train, val, test = {}, {}, {}
    for u in range(n_users):
        n_test = 70 if u == 0 else int(rng.integers(0, 6))
        n_val = int(rng.integers(0, 3))
        n_train = int(rng.integers(0, 25))
        items = rng.permutation(n_items)[: n_test + n_val + n_train]
        if n_test:
            test[u] = items[:n_test].tolist()
        if n_val:
            val[u] = items[n_test:n_test + n_val].tolist()
        if n_train:
            train[u] = items[n_test + n_val:].tolist()
    return make_data(n_users, n_items, train, val, test)


# --------------------------------------------------------------------------------------------------
# hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_hand_computed_ndcg_recall_precision_legacy():
    # 8 items; item i scores 8 - i (ranking 0 > 1 > ... > 7)
    # user 0: train {1}, test {0, 3} -> ranked list (1 masked) 0, 2, 3, ...: hits at ranks 1 and 3
    # user 1: train {0}, test {2, 5, 7} -> ranked 1, 2, 3, 4, 5, ...: hits at ranks 2, 5 (and 7 at rank 7)
    # user 2: no test items -> skipped
    data = make_data(3, 8, train={0: [1], 1: [0], 2: [4]}, test={0: [0, 3], 1: [2, 5, 7]})
    scores = np.tile(np.arange(8, 0, -1, dtype=np.float32), (3, 1))
    m = evaluate(matrix_scorer(scores), data, "test", ks=(1, 3))
    assert m["n_users"] == 2
    log2 = math.log2
    # user 0 @3: DCG = 1 + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3)
    u0_ndcg3 = 1.5 / (1 + 1 / log2(3))
    # user 1 @3: one hit at rank 2 -> DCG = 1/log2(3); IDCG (3 relevant) = 1 + 1/log2(3) + 1/2
    u1_ndcg3 = (1 / log2(3)) / (1 + 1 / log2(3) + 0.5)
    assert m["ndcg@3"] == pytest.approx((u0_ndcg3 + u1_ndcg3) / 2, abs=1e-12)
    assert m["ndcg@3"] == pytest.approx(0.6079013500570264, abs=1e-12)  # (0.91972 + 0.29608) / 2
    assert m["recall@3"] == pytest.approx((2 / 2 + 1 / 3) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["hit@3"] == 1.0
    # @1: user 0 hits (item 0 at rank 1), user 1 misses (item 1 at rank 1)
    assert m["recall@1"] == pytest.approx(0.5 / 2)
    assert m["ndcg@1"] == pytest.approx(0.5)
    assert m["hit@1"] == pytest.approx(0.5)
    # legacy: the ideal list is the top-3 hit vector sorted (max(ks) = 3).
    # user 0: 2 hits found -> same as standard. user 1: 1 hit found -> IDCG@3 = 1 -> 1/log2(3)
    assert m["legacy_ndcg@3"] == pytest.approx((u0_ndcg3 + 1 / log2(3)) / 2, abs=1e-12)
    # user 1 finds no hit within max(ks)=3 at @1, but its list has 1 hit -> legacy IDCG@1 = 1, DCG@1 = 0
    assert m["legacy_ndcg@1"] == pytest.approx(0.5)


def test_legacy_ndcg_zero_without_hits_and_overstates_single_hit():
    # one user, 4 relevant items, exactly one of them at rank 1 among 60 ranked items
    n = 60
    data = make_data(1, n, train={}, test={0: [0, 57, 58, 59]})
    scores = np.arange(n, 0, -1, dtype=np.float64)[None, :]
    m = evaluate(matrix_scorer(scores), data, "test", ks=(10, 50))
    assert m["legacy_ndcg@10"] == pytest.approx(1.0)  # one hit -> ideal is that one hit at rank 1
    assert m["ndcg@10"] == pytest.approx(1.0 / sum(1 / math.log2(j + 2) for j in range(4)))
    data_miss = make_data(1, n, train={}, test={0: [55]})
    m = evaluate(matrix_scorer(scores), data_miss, "test", ks=(10, 50))
    assert m["legacy_ndcg@10"] == 0.0 and m["ndcg@10"] == 0.0 and m["hit@50"] == 0.0


# --------------------------------------------------------------------------------------------------
# brute force on random cases
# --------------------------------------------------------------------------------------------------


def small_catalogue_data() -> InteractionData:
    """35 items < K=50: top lists contain masked (-inf) items at the tail, padded metrics."""
    rng = np.random.default_rng(3)
    train, val, test = {}, {}, {}
    for u in range(30):
        items = rng.permutation(35)[:12]
        test[u], val[u], train[u] = items[:3].tolist(), items[3:5].tolist(), items[5:].tolist()
    test.pop(7), val.pop(9)
    return make_data(30, 35, train, val, test)


@pytest.mark.parametrize("catalogue", ["large", "small"])
@pytest.mark.parametrize("split", ["val", "test"])
def test_matches_brute_force(split, catalogue):
    data = random_data(seed=2) if catalogue == "large" else small_catalogue_data()
    scores = np.random.default_rng(1).standard_normal((data.n_users, data.n_items))
    got = evaluate(matrix_scorer(scores), data, split)
    want = brute_force(scores, data, split)
    assert got["n_users"] == want["n_users"]
    assert_metrics_close(got, want)


def test_users_without_items_are_skipped():
    data = random_data(seed=5)
    n_test_users = len(np.unique(data.split_pairs("test")[0]))
    assert n_test_users < data.n_users  # the fixture does have users without test items
    m = evaluate(random_scorer(data.n_items, seed=0), data, "test")
    assert m["n_users"] == n_test_users
    task = RankingTask.from_data(data, "test")
    assert np.array_equal(task.users, np.unique(data.split_pairs("test")[0]))


def test_val_items_masked_at_test_time_only():
    # user 0: val item 3, test item 5; the scorer ranks the val item first, the test item second
    data = make_data(1, 10, train={0: [0]}, val={0: [3]}, test={0: [5]})
    scores = np.zeros((1, 10))
    scores[0, 3], scores[0, 5], scores[0, 0] = 3.0, 2.0, 10.0  # train item 0 highest of all
    fn = matrix_scorer(scores)
    assert evaluate(fn, data, "test", ks=(1,))["hit@1"] == 1.0  # val item masked -> test item first
    assert evaluate(fn, data, "val", ks=(1,))["hit@1"] == 1.0   # train masked, val item first
    # the test item is NOT masked when evaluating val: it sits at rank 2
    assert evaluate(fn, data, "val", ks=(2,))["precision@2"] == pytest.approx(0.5)
    scores2 = scores.copy()
    scores2[0, 5] = 4.0  # test item above the val item: on val it takes rank 1
    assert evaluate(matrix_scorer(scores2), data, "val", ks=(1,))["hit@1"] == 0.0


def test_chunking_and_user_partition_give_the_same_sums():
    data = random_data(seed=11)
    scores = np.random.default_rng(2).standard_normal((data.n_users, data.n_items)).astype(np.float32)
    fn = matrix_scorer(scores)
    whole, n = full_ranking_sums(fn, data, "test")
    for chunk in (1, 3, 7):
        part, m = full_ranking_sums(fn, data, "test", chunk_size=chunk)
        assert m == n
        for key in whole:
            assert part[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)
    # two disjoint user sets (plus users with no test items, who must be ignored)
    perm = np.random.default_rng(0).permutation(data.n_users)
    a, b = perm[:25], perm[25:]
    sa, sb = full_ranking_sums(fn, data, "test", users=a), full_ranking_sums(fn, data, "test", users=b)
    total, count = add_sums([sa, sb])
    assert count == n and sa[1] > 0 and sb[1] > 0
    for key in whole:
        assert total[key] == pytest.approx(whole[key], rel=1e-12, abs=1e-12)
    assert_metrics_close(finalize(total, count), finalize(whole, n))
    # the restricted evaluation agrees with brute force on that user subset
    assert_metrics_close(finalize(*sa), brute_force(scores, data, "test", users=a))


def test_eval_data_is_picklable_and_reusable():
    data = random_data(seed=4)
    ed = EvalData.from_data(data)
    ed2 = pickle.loads(pickle.dumps(ed))
    fn = random_scorer(data.n_items, seed=3)
    assert evaluate_splits(fn, ed2) == evaluate_splits(fn, data)
    shard = pickle.loads(pickle.dumps(ed.restrict(np.arange(0, data.n_users, 2))))
    assert set(shard["test"].users.tolist()) <= set(range(0, data.n_users, 2))
    with pytest.raises(ValueError):
        evaluate(fn, ed["val"], "test")


def test_scorer_output_handling():
    data = random_data(seed=8)
    scores = np.random.default_rng(0).standard_normal((data.n_users, data.n_items))
    as_numpy = evaluate(lambda u: scores[u], data, "test")
    as_torch = evaluate(matrix_scorer(scores), data, "test")
    assert as_numpy == as_torch
    # the evaluator must not write -inf into the scorer's own memory
    before = scores.copy()
    evaluate(lambda u: torch.from_numpy(scores)[torch.from_numpy(u)], data, "test")
    shared = torch.from_numpy(scores)
    evaluate(lambda u: shared[: len(u)], data, "test", chunk_size=10_000)  # a view of the scorer's table
    assert np.array_equal(scores, before)
    with pytest.raises(ValueError, match="shape"):
        evaluate(lambda u: scores[u][:, :-1], data, "test")
    nan = scores.copy()
    nan[:, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluate(lambda u: nan[u], data, "test")


def test_embedding_scorer_is_a_dot_product():
    g = torch.Generator().manual_seed(0)
    ue, ie = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    fn = embedding_scorer(ue, ie)
    assert torch.allclose(fn(np.array([1, 3])), ue[[1, 3]] @ ie.T)


def test_finalize_keys_and_empty():
    data = random_data(seed=1)
    m = evaluate(random_scorer(data.n_items), data, "val")
    for k in DEFAULT_KS:
        for name in ("recall", "ndcg", "precision", "hit", "legacy_ndcg"):
            assert f"{name}@{k}" in m
    empty = finalize(*add_sums([]))
    assert empty["n_users"] == 0 and empty["recall@20"] == 0.0


# --------------------------------------------------------------------------------------------------
# scorers
# --------------------------------------------------------------------------------------------------


def test_popularity_scorer_counts_train_only_and_breaks_ties_by_id():
    # item 2: 3 train interactions; items 0 and 4: 1 each (tie); item 1 popular only in test
    data = make_data(6, 5, train={0: [2, 0], 1: [2, 4], 2: [2]}, test={3: [1], 4: [1], 5: [1]})
    assert item_popularity(data).tolist() == [1, 0, 3, 0, 1]
    s = popularity_scorer(data)(np.array([0, 1]))
    order = torch.argsort(s[0], descending=True, stable=True).tolist()
    assert order == [2, 0, 4, 1, 3]
    assert len(set(s[0].tolist())) == 5  # tie-free scores


def test_random_scorer_is_seeded_and_chunk_invariant():
    fn = random_scorer(50, seed=7)
    full = fn(np.arange(10))
    assert torch.equal(full[3:5], fn(np.array([3, 4])))
    assert torch.equal(full, random_scorer(50, seed=7)(np.arange(10)))
    assert not torch.equal(full, random_scorer(50, seed=8)(np.arange(10)))
    assert float(full.min()) >= 0.0 and float(full.max()) < 1.0


# --------------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def fake_loader(monkeypatch):
    """Route `load_dataset` to a small in-memory dataset, whatever formats.py currently does."""
    data = random_data(seed=21)
    calls = []
    module = types.ModuleType("promptmm_dist.data.formats")

    def load_dataset(path="synthetic", format="auto", modalities=None):
        calls.append((path, format))
        return data

    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "promptmm_dist.data.formats", module)
    return data, calls


def _args(**kw) -> argparse.Namespace:
    base = dict(data="somewhere", format="auto", model="popularity", split="test", out=None,
                json=False, seed=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_evaluate_command_json_only_requested_split(fake_loader, capsys, tmp_path):
    data, calls = fake_loader
    out = tmp_path / "new" / "dir"
    assert ev.evaluate_command(_args(json=True, split="val", out=str(out))) == 0
    printed = capsys.readouterr().out
    obj = json.loads(printed)  # exactly one JSON object on stdout
    assert list(obj) == ["val"]
    assert obj["val"] == pytest.approx(evaluate(popularity_scorer(data), data, "val"))
    assert json.loads((out / "metrics.json").read_text()) == obj
    assert calls == [("somewhere", "auto")]

    assert ev.evaluate_command(_args(json=True, split="both", model="random", seed=3)) == 0
    obj = json.loads(capsys.readouterr().out)
    assert list(obj) == ["val", "test"]
    assert obj["test"]["recall@20"] == pytest.approx(
        evaluate(random_scorer(data.n_items, seed=3), data, "test")["recall@20"])


def test_evaluate_command_table_and_unknown_model(fake_loader, capsys):
    assert ev.evaluate_command(_args(split="both")) == 0
    text = capsys.readouterr().out
    assert "recall" in text and "legacy_ndcg" in text and "@20" in text and "test" in text
    with pytest.raises(DataError, match="unknown model"):
        ev.evaluate_command(_args(model="no_such_model"))


def test_cli_unknown_model_exits_2(fake_loader, capsys):
    from promptmm_dist.cli import main

    assert main(["evaluate", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# real data: Tiktok
# --------------------------------------------------------------------------------------------------


def _read_promptmm_json(path) -> InteractionData:
    """Private fallback reader for train/val/test.json (used until data/formats.py exists)."""
    us, its, sp = [], [], []
    for code, name in enumerate(["train", "val", "test"]):
        with open(path / f"{name}.json") as fh:
            for u, items in json.load(fh).items():
                us += [int(u)] * len(items)
                its += [int(i) for i in items]
                sp += [code] * len(items)
    n_items = int(np.load(path / "image_feat.npy", mmap_mode="r").shape[0])
    return InteractionData("tiktok", max(us) + 1, n_items, np.array(us, np.int32), np.array(its, np.int32),
                           np.array(sp, np.int8))


@pytest.fixture(scope="module")
def tiktok(tiktok_path) -> InteractionData:
    try:
        from promptmm_dist.data.formats import load_dataset
    except ImportError:
        return _read_promptmm_json(tiktok_path)
    return load_dataset(str(tiktok_path))


def test_tiktok_popularity_recall(tiktok):
    m = evaluate_splits(popularity_scorer(tiktok), tiktok)
    assert m["test"]["n_users"] == 6130 and m["val"]["n_users"] == 3051
    assert 0.055 <= m["test"]["recall@20"] <= 0.065, m["test"]


def test_tiktok_random_embeddings_match_brute_force(tiktok):
    g = torch.Generator().manual_seed(0)
    ue = torch.randn(tiktok.n_users, 16, generator=g)
    ie = torch.randn(tiktok.n_items, 16, generator=g)
    fn = embedding_scorer(ue, ie)
    ed = EvalData.from_data(tiktok)
    for split in ("val", "test"):
        subset = ed[split].users[:150]
        got = evaluate(fn, ed, split, users=subset, chunk_size=64)
        scores = np.zeros((tiktok.n_users, tiktok.n_items), dtype=np.float32)
        scores[subset] = (ue[subset] @ ie.T).numpy()
        want = brute_force(scores, tiktok, split, users=subset)
        assert got["n_users"] == want["n_users"] == 150
        assert_metrics_close(got, want, tol=1e-9)
