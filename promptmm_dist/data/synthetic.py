"""Deterministic synthetic multimodal recommendation data with a planted latent structure.

Why: the package needs a default dataset that is small, instant and *learnable* (tests and the quick
start must show a model beating popularity), and a generator that scales to millions of users for
benchmarks without a dense users x items matrix.

Model: items belong to latent clusters (item latent = cluster centre + noise) and have a power-law
popularity; users have a latent near one cluster centre and a power-law activity (>= 3 interactions).
Each user draws candidate items in two stages (cluster ~ softmax of user-centre affinity, then item ~
popularity inside the cluster, plus some global-popularity exploration) and keeps the top candidates by
latent affinity + Gumbel noise: a sample without replacement from softmax-ish affinities. Users are
processed in chunks, so memory is bounded by the chunk's candidates. Modality features are noisy linear
projections of the item latents: the first modality is informative, the others weakly informative.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptmm_dist.data.dataset import SPLIT_NAMES, InteractionData
from promptmm_dist.errors import ConfigError, DataError

SYNTHETIC_DEFAULT: dict = {"n_users": 2000, "n_items": 1000, "n_interactions": 40000,
                           "modalities": {"image": 64, "text": 32}, "seed": 0}
MIN_PER_USER = 3
CANDIDATE_BUDGET = 2_000_000  # candidates per chunk: bounds the generator's memory (~0.3 GiB)
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class _Knobs:
    """Shape of the planted structure (fixed; documented here rather than exposed as flags)."""

    item_noise: float = 0.6  # item latent = centre + item_noise * N(0, I)
    user_noise: float = 0.8
    popularity_exponent: float = 0.9  # Zipf exponent of item popularity
    activity_shape: float = 1.5  # Pareto (Lomax) shape of user activity
    explore: float = 0.1  # share of candidates drawn from global popularity
    affinity_scale: float = 0.35  # weight of the latent dot product in the final choice
    informative_noise: float = 0.5  # feature noise / signal std, first modality
    weak_noise: float = 3.0  # feature noise / signal std, other modalities


KNOBS = _Knobs()


def generate_synthetic(n_users: int, n_items: int, n_interactions: int,
                       modalities: dict[str, int] | None = None, seed: int = 0, latent_dim: int = 16,
                       val_frac: float = 0.1, test_frac: float = 0.1,
                       n_clusters: int | None = None) -> InteractionData:
    """Generate `n_interactions` unique (user, item) pairs (exactly) with a per-user train/val/test split."""
    modalities = dict(modalities if modalities is not None else SYNTHETIC_DEFAULT["modalities"])
    check_params(n_users, n_items, n_interactions, modalities, val_frac, test_frac, latent_dim)
    k = n_clusters or int(np.clip(round(math.sqrt(n_items) / 1.5), 2, 128))
    k = min(k, n_items)
    seeds = np.random.SeedSequence(seed).spawn(4)
    items = _make_items(np.random.default_rng(seeds[0]), n_items, k, latent_dim)
    counts = _user_activity(np.random.default_rng(seeds[1]), n_users, n_items, n_interactions)
    users, item_ids = _sample_interactions(np.random.default_rng(seeds[2]), items, counts, latent_dim)
    rng = np.random.default_rng(seeds[3])
    splits = _split_per_user(rng, users, counts, val_frac, test_frac)
    features = _make_features(rng, items["latent"], modalities)
    from promptmm_dist.data.formats import from_arrays

    return from_arrays("synthetic", users, item_ids, splits, features, "synthetic", validate=False)


def default_synthetic() -> InteractionData:
    """The package's default dataset (what `--data synthetic` means)."""
    return generate_synthetic(**SYNTHETIC_DEFAULT)


def check_params(n_users: int, n_items: int, n_interactions: int, modalities: dict[str, int],
                 val_frac: float = 0.1, test_frac: float = 0.1, latent_dim: int = 16) -> None:
    """Raise ValueError (one line) when the requested sizes cannot be generated."""
    if n_users < 1 or n_items < 2 * MIN_PER_USER or latent_dim < 1:
        raise ValueError(f"need users >= 1, items >= {2 * MIN_PER_USER}, latent_dim >= 1")
    if n_interactions < MIN_PER_USER * n_users:
        raise ValueError(f"interactions must be >= {MIN_PER_USER} x users ({MIN_PER_USER * n_users})")
    if n_interactions > n_users * _max_per_user(n_items):
        raise ValueError(f"interactions must be <= users x items/2 ({n_users * _max_per_user(n_items)})")
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ValueError("val_frac and test_frac must be in [0, 1) with a sum below 1")
    if not modalities:
        raise ValueError("at least one modality is needed")
    for name, dim in modalities.items():
        if not _NAME.fullmatch(name) or int(dim) < 1:
            raise ValueError(f"bad modality {name}:{dim} (name: letters/digits/_, dim >= 1)")


def _max_per_user(n_items: int) -> int:
    return max(MIN_PER_USER, n_items // 2)


# ----------------------------------------------------------------------------------------------
# items and users
# ----------------------------------------------------------------------------------------------

def _make_items(rng: np.random.Generator, n_items: int, k: int, d: int) -> dict[str, np.ndarray]:
    centres = rng.standard_normal((k, d))
    cluster = rng.permutation(np.arange(n_items) % k)  # balanced clusters, random ids
    latent = centres[cluster] + KNOBS.item_noise * rng.standard_normal((n_items, d))
    popularity = rng.permutation(np.arange(1, n_items + 1, dtype=np.float64) ** -KNOBS.popularity_exponent)
    by_cluster = np.argsort(cluster, kind="stable")
    # per-cluster cumulative popularity in (0, 1], shifted by the cluster id: one searchsorted samples
    # an item inside any cluster
    cum = np.empty(n_items)
    sizes = np.bincount(cluster, minlength=k)
    start = 0
    for c in range(k):
        p = popularity[by_cluster[start:start + sizes[c]]]
        cum[start:start + sizes[c]] = c + np.cumsum(p) / p.sum()
        cum[start + sizes[c] - 1] = c + 1.0
        start += sizes[c]
    glob = np.cumsum(popularity) / popularity.sum()
    glob[-1] = 1.0
    return {"centres": centres, "cluster": cluster, "latent": latent.astype(np.float32),
            "by_cluster": by_cluster, "cluster_cum": cum, "global_cum": glob}


def _user_activity(rng: np.random.Generator, n_users: int, n_items: int, total: int) -> np.ndarray:
    """Power-law interaction counts, each in [3, items/2], summing exactly to `total`."""
    cap = _max_per_user(n_items)
    x = rng.pareto(KNOBS.activity_shape, n_users)
    lo, hi = 0.0, float(total)
    for _ in range(60):  # bisection on the scale so the capped counts sum to total
        mid = (lo + hi) / 2
        s = np.minimum(cap, MIN_PER_USER + mid * x).sum()
        lo, hi = (mid, hi) if s < total else (lo, mid)
    real = np.minimum(cap, MIN_PER_USER + hi * x)
    counts = np.floor(real).astype(np.int64)
    short = total - int(counts.sum())
    if short > 0:  # hand out the rounding remainder to the largest fractions below the cap
        frac = np.where(counts < cap, real - counts, -1.0)
        counts[np.argsort(-frac, kind="stable")[:short]] += 1
    elif short < 0:
        frac = np.where(counts > MIN_PER_USER, real - counts, 2.0)
        counts[np.argsort(frac, kind="stable")[:-short]] -= 1
    return counts


def _user_latents(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    home = rng.integers(len(centres), size=n)
    return (centres[home] + KNOBS.user_noise * rng.standard_normal((n, centres.shape[1]))).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# interactions
# ----------------------------------------------------------------------------------------------

def _sample_interactions(rng: np.random.Generator, items: dict[str, np.ndarray], counts: np.ndarray,
                         d: int) -> tuple[np.ndarray, np.ndarray]:
    """(users, items) sorted by (user, item), exactly counts[u] unique items per user."""
    cand_per_user = 2 * counts + 4
    bounds = _chunk_bounds(cand_per_user, CANDIDATE_BUDGET)
    out_u, out_i = [], []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        lat = _user_latents(rng, hi - lo, items["centres"])
        u, i = _sample_chunk(rng, items, lat, counts[lo:hi], d)
        out_u.append(u + lo)
        out_i.append(i)
    return np.concatenate(out_u), np.concatenate(out_i)


def _chunk_bounds(weights: np.ndarray, budget: int) -> list[int]:
    cum = np.cumsum(weights)
    cuts = np.searchsorted(cum, np.arange(budget, int(cum[-1]), budget), side="right")
    return sorted({0, *[int(c) for c in cuts if 0 < c < len(weights)], len(weights)})


def _sample_chunk(rng: np.random.Generator, items: dict[str, np.ndarray], lat: np.ndarray,
                  counts: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    n = len(counts)
    n_items = len(items["latent"])
    m = 2 * counts + 4
    cu = np.repeat(np.arange(n), m)
    ci = _propose(rng, items, lat, cu)
    score = _affinity(items["latent"], lat, cu, ci, d) + rng.gumbel(size=len(cu))
    u, i = _top_unique(cu, ci, score, counts, n_items)
    for _ in range(50):  # rare: a user's candidates had too few distinct items; top up uniformly
        deficit = counts - np.bincount(u, minlength=n)
        if not deficit.any():
            break
        need = np.flatnonzero(deficit)
        xu = np.repeat(need, 2 * deficit[need] + 4)
        xi = rng.integers(n_items, size=len(xu))
        u, i = _top_unique(np.concatenate([u, xu]), np.concatenate([i, xi]),
                           np.concatenate([np.ones(len(u)), 0.5 * rng.random(len(xu))]), counts, n_items)
    return u, i


def _propose(rng: np.random.Generator, items: dict[str, np.ndarray], lat: np.ndarray,
             cu: np.ndarray) -> np.ndarray:
    """Candidate items: cluster ~ softmax(user . centre), then popularity inside it; some global picks."""
    centres = items["centres"]
    k = len(centres)
    logits = (lat @ centres.T.astype(np.float32)) * _cluster_temperature(k, centres.shape[1])
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    cum = np.cumsum(p, axis=1) / p.sum(axis=1, keepdims=True)
    cum[:, -1] = 1.0
    flat = (cum + np.arange(len(lat))[:, None]).ravel()
    pos = np.searchsorted(flat, cu + rng.random(len(cu)), side="right")
    cluster = np.minimum(pos - cu * k, k - 1)
    ipos = np.searchsorted(items["cluster_cum"], cluster + rng.random(len(cu)), side="right")
    cand = items["by_cluster"][np.minimum(ipos, len(items["by_cluster"]) - 1)]
    explore = rng.random(len(cu)) < KNOBS.explore
    gpos = np.searchsorted(items["global_cum"], rng.random(int(explore.sum())), side="right")
    cand[explore] = np.minimum(gpos, len(items["global_cum"]) - 1)
    return cand


def _cluster_temperature(k: int, d: int) -> float:
    """Grows with log(k) so more clusters do not dilute a user's focus: the home cluster gets about
    70% of the proposal mass at k=21 (default set) and 50% at k=128 (100k items)."""
    return (0.25 + 0.05 * math.log(k)) * 16.0 / d


def _affinity(item_latent: np.ndarray, lat: np.ndarray, cu: np.ndarray, ci: np.ndarray, d: int) -> np.ndarray:
    out = np.empty(len(cu), dtype=np.float32)
    step = 1 << 18
    for s in range(0, len(cu), step):
        out[s:s + step] = np.einsum("ij,ij->i", lat[cu[s:s + step]], item_latent[ci[s:s + step]])
    return out * (KNOBS.affinity_scale / math.sqrt(d))


def _top_unique(cu: np.ndarray, ci: np.ndarray, score: np.ndarray, counts: np.ndarray,
                n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """Per user, the counts[u] highest-scoring distinct items; output sorted by (user, item).

    Scores are quantised to 20 bits and packed below the (user, item) / user key, so the work is int64
    sorts instead of (several times slower) lexsorts on float keys."""
    key = cu.astype(np.int64) * n_items + ci
    if int(key.max()) >= 1 << (62 - _SCORE_BITS):  # pragma: no cover - huge chunks only
        return _top_unique_lexsort(key, score, counts, n_items)
    q = _quantise_desc(score)  # 0 = best
    packed = np.sort((key << _SCORE_BITS) | q)
    key = packed >> _SCORE_BITS
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]  # best score of each (user, item) pair comes first
    key, q = key[first], packed[first] & _SCORE_MASK
    user = key // n_items  # sorted: key is
    order = np.argsort((user << _SCORE_BITS) | q)  # inside each user, best score first
    start = np.searchsorted(user, np.arange(len(counts)))
    rank = np.arange(len(user)) - start[user]  # user[order] == user, so rank is per position
    kept = np.sort(key[order][rank < counts[user]])
    return kept // n_items, kept % n_items


_SCORE_BITS = 20
_SCORE_MASK = (1 << _SCORE_BITS) - 1


def _quantise_desc(score: np.ndarray) -> np.ndarray:
    """Map scores to int64 in [0, 2^20) with 0 for the highest (ties at 1e-6 of the range are harmless)."""
    lo, hi = float(score.min()), float(score.max())
    scaled = (hi - score.astype(np.float64)) / max(hi - lo, 1e-12)
    return np.minimum((scaled * _SCORE_MASK).astype(np.int64), _SCORE_MASK)


def _top_unique_lexsort(key: np.ndarray, score: np.ndarray, counts: np.ndarray,
                        n_items: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover
    order = np.lexsort((-score, key))
    key, score = key[order], score[order]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    key, score = key[first], score[first]
    user = key // n_items
    order = np.lexsort((-score, user))
    user = user[order]
    start = np.searchsorted(user, np.arange(len(counts)))
    rank = np.arange(len(user)) - start[user]
    kept = np.sort(key[order][rank < counts[user]])
    return kept // n_items, kept % n_items


def _split_per_user(rng: np.random.Generator, users: np.ndarray, counts: np.ndarray,
                    val_frac: float, test_frac: float) -> np.ndarray:
    """Random per-user split with stochastically rounded val/test sizes; >= 1 train item per user.
    `users` is sorted and holds counts[u] entries of user u (u = 0..len(counts)-1)."""
    n_val = np.floor(val_frac * counts + rng.random(len(counts))).astype(np.int64)
    n_test = np.floor(test_frac * counts + rng.random(len(counts))).astype(np.int64)
    over = np.maximum(n_val + n_test - (counts - 1), 0)
    cut = np.minimum(over, n_val)
    n_val -= cut
    n_test -= over - cut
    # random rank of each interaction inside its user: sort (user, random bits) packed in one int64
    packed = (users.astype(np.int64) << 32) | rng.integers(0, 1 << 32, size=len(users), dtype=np.int64)
    order = np.argsort(packed)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(users), dtype=np.int64)
    rank[order] = np.arange(len(users)) - start[users[order]]
    splits = np.full(len(users), SPLIT_NAMES["train"], dtype=np.int8)
    splits[rank < n_test[users] + n_val[users]] = SPLIT_NAMES["val"]
    splits[rank < n_test[users]] = SPLIT_NAMES["test"]
    return splits


# ----------------------------------------------------------------------------------------------
# features
# ----------------------------------------------------------------------------------------------

def _make_features(rng: np.random.Generator, latent: np.ndarray, modalities: dict[str, int]) -> dict[str, np.ndarray]:
    """Noisy random projections of the item latents: first modality low noise, the rest high noise."""
    d = latent.shape[1]
    out = {}
    for idx, (name, dim) in enumerate(modalities.items()):
        w = rng.standard_normal((d, int(dim))).astype(np.float32) / np.float32(math.sqrt(d))
        signal = latent @ w
        noise = KNOBS.informative_noise if idx == 0 else KNOBS.weak_noise
        scale = np.float32(noise * float(signal.std()))
        out[name] = np.ascontiguousarray(signal + scale * rng.standard_normal(signal.shape, dtype=np.float32))
    return out


# ----------------------------------------------------------------------------------------------
# CLI: promptmm data synth
# ----------------------------------------------------------------------------------------------

def parse_modalities(spec: str) -> dict[str, int]:
    """'image:128,text:384' -> {'image': 128, 'text': 384}."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, dim = part.partition(":")
        if not _NAME.fullmatch(name) or not dim.isdigit() or int(dim) < 1 or name in out:
            raise ConfigError(f"--modalities: bad entry {part!r}; expected a name:dim list like image:64,text:32")
        out[name] = int(dim)
    if not out:
        raise ConfigError("--modalities: at least one name:dim entry is needed")
    return out


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def synth_command(args: argparse.Namespace) -> int:
    """`promptmm data synth OUT`: generate and write the canonical layout atomically."""
    from promptmm_dist.data.prepare import write_canonical

    modalities = parse_modalities(args.modalities)
    try:
        check_params(args.users, args.items, args.interactions, modalities)
    except ValueError as err:
        raise ConfigError(f"data synth: {err}") from None
    out = Path(args.out)
    if out.exists():
        raise DataError(out, None, "already exists; choose a new folder")
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = generate_synthetic(args.users, args.items, args.interactions, modalities, seed=args.seed)
    t1 = time.perf_counter()
    write_canonical(data, out, origin_format="synthetic")
    t2 = time.perf_counter()
    summary = {
        "out": str(out), "n_users": data.n_users, "n_items": data.n_items,
        "interactions": {s: data.n_interactions(s) for s in SPLIT_NAMES},
        "modalities": {m: int(f.shape[1]) for m, f in data.features.items()}, "seed": args.seed,
        "generate_seconds": round(t1 - t0, 3), "write_seconds": round(t2 - t1, 3),
        "seconds": round(t2 - t0, 3), "peak_rss_mib": round(peak_rss_mib(), 1),
        "manifest_sha256": data.manifest_sha256,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        inter = summary["interactions"]
        mods = ",".join(f"{m}:{d}" for m, d in summary["modalities"].items())
        print(f"wrote {out}: {data.n_users:,} users, {data.n_items:,} items, train {inter['train']:,} / "
              f"val {inter['val']:,} / test {inter['test']:,}, modalities {mods}; "
              f"{summary['seconds']:.2f} s, peak RSS {summary['peak_rss_mib']:.0f} MiB")
    return 0
