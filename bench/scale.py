"""Scale benchmark of partitioned training: W ranks (real gloo processes, 1 thread each) train the real
teacher and student for S steps on a synthetic dataset; per-rank memory, step speed, exchange cost.

    python bench/scale.py --users 1000000 --items 100000 --interactions 20000000 --workers 1,2 --steps 100
    python bench/scale.py --users 20000 --items 5000 --interactions 400000 --workers 2 --steps 10 --json
    python bench/scale.py --pipeline --users 250000 --items 25000 --interactions 5000000   # the whole pipeline

The data is generated once (`promptmm data synth`, in its own process) into `--data-dir` and reused.
The driver (this process) reads the manifest only: the ranks read their users' Parquet rows and their
items' feature rows themselves. Teacher and student run in separate rank processes so each stage's
peak RSS is its own. A rank draws its shards' samples in its own process first (in the product the shards
are separate actors) and its peak is counted from after they are freed, split into setup and steps
(VmHWM reset in between; the rank's peak is the larger). With every W the same global batch (N = max W user shards), so step counts and
samples agree across W. The student steps are BPR + L2 over the propagated graph (the KD terms are
elementwise on the batch; the soft-ranking cache is benchmarked in bench/cache_bench.py).

Prints a markdown table and, as the last stdout line, one JSON object: the keys of the largest W at the
top level (`rank_peak_rss_mib`, `driver_peak_rss_mib`, `teacher_steps_per_s`, `student_steps_per_s`,
...), every W under `runs`, and W-vs-1 ratios measured in this run under `ratios`.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from common import add_size_args, ensure_data  # noqa: E402 - after the repo is on the path
from promptmm_dist.data.graph import COLUMN_BLOCK  # noqa: E402
from promptmm_dist.partition.operator import EXCHANGE_MODES  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def high_water_mib() -> float | None:
    """This process's peak RSS since the last `reset_high_water` (VmHWM; None where /proc has none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_high_water() -> None:
    """Restart VmHWM from the current RSS (Linux: "5" > /proc/self/clear_refs), to split setup from steps."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def stage_rank(rank: int, world_size: int, spec: dict, num_shards: int, cfg_dict: dict, stage: str,
               steps: int, column_block: int | None = None) -> dict:
    """One rank of one stage: set up its partition, run `steps` optimiser steps, measure."""
    import numpy as np
    import torch

    import promptmm_dist.data.graph as graph_module

    if column_block:  # the CPU products' column blocks (a bench knob: 1 << 30 = one block)
        graph_module.COLUMN_BLOCK = column_block

    from promptmm_dist.config import config_from_dict
    from promptmm_dist.data.sampling import join_steps
    from promptmm_dist.data.shards import ShardState
    from promptmm_dist.distill.local_kd import epoch_seed
    from promptmm_dist.models.student import MODELS
    from promptmm_dist.partition.exchange import COLLECTIVES
    from promptmm_dist.partition.plan import rank_shards
    from promptmm_dist.partition.setup import build_rank_teacher, setup_rank
    from promptmm_dist.train.student_loop import student_step
    from promptmm_dist.train.teacher_loop import steps_per_epoch, teacher_optimizer, teacher_step
    from promptmm_dist.train.world import World

    cfg = config_from_dict(cfg_dict)
    # the samples first: in the product the shards are actors of their own, so their memory is not the
    # rank's; the rank's peak is measured from after they are gone (VmHWM reset)
    parquet = str(Path(spec["dir"]) / "interactions.parquet")
    mine = rank_shards(num_shards, rank, world_size)
    shards = [ShardState(parquet, k, num_shards, spec["n_users"], spec["n_items"]) for k in mine]
    pairs = World(rank, world_size).all_reduce_sum(
        torch.tensor([float(sum(s.sampler.n_pairs for s in shards))], dtype=torch.float64))
    batch_size = cfg.teacher.batch_size if stage == "teacher" else cfg.student.batch_size
    n_steps = steps_per_epoch(int(pairs.item()), batch_size)
    parts = [s.epoch_samples(1, epoch_seed(cfg.seed, 0), n_steps) for s in shards]
    del shards
    global_batches = join_steps(parts, n_steps)[:steps]
    del parts
    gc.collect()
    reset_high_water()
    t0 = time.perf_counter()
    rd, world, graph = setup_rank(spec, num_shards, rank, world_size, cfg.teacher.norm, cfg.dist.exchange)
    batches = [type(b)(*rd.local_ids(b.users, b.items)) for b in global_batches]
    if stage == "teacher":
        model = build_rank_teacher(rd, cfg, None)
        opt = teacher_optimizer(model, cfg)
    else:
        sc = cfg.student
        torch.manual_seed(cfg.seed)
        model = MODELS["lightgcn"](rd.n_users, rd.n_items, embed_dim=sc.embed_dim, n_layers=sc.n_layers)
        world.init_tables(model, cfg.seed)
        opt = torch.optim.Adam(model.parameters(), lr=sc.lr)
    model.train()
    setup_s = time.perf_counter() - t0
    setup_peak = high_water_mib()
    reset_high_water()
    world.barrier()
    walls, exchange, losses = [], [], []
    for batch in batches:
        world.barrier()  # steps start together: a step's time is its own, not a wait for the last one
        c0, t = COLLECTIVES.seconds, time.perf_counter()
        if stage == "teacher":
            parts_, _ = teacher_step(model, model, graph, batch, opt, cfg, world)
        else:
            parts_, _ = student_step(model, model, graph, batch, opt, cfg.student, world)
        walls.append(time.perf_counter() - t)
        exchange.append(COLLECTIVES.seconds - c0)
        losses.append(world.reduce_sums(parts_)["bpr"])
        if rank == 0 and (len(walls) % 10 == 0 or len(walls) == len(batches)):  # progress, outside the timing
            print(f"  W={world_size} {stage}: step {len(walls)}/{len(batches)}, last {walls[-1]:.1f} s",
                  file=sys.stderr, flush=True)
    timed = slice(1, None) if len(walls) > 1 else slice(None)  # the first step warms up caches
    wall = float(np.sum(walls[timed]))
    n_timed = len(walls[timed])
    stats = graph.exchange_stats()
    held = {name: tuple(p.shape) for name, p in model.named_parameters()}
    step_peak = high_water_mib()
    peak = max(setup_peak or 0.0, step_peak or 0.0) or peak_rss_mib()  # ru_maxrss follows the resets too
    return {"rank": rank, "stage": stage, "peak_rss_mib": round(peak, 1), "setup_s": round(setup_s, 2),
            "setup_peak_rss_mib": setup_peak and round(setup_peak, 1), "step_peak_rss_mib": step_peak and round(step_peak, 1),
            "steps": len(walls), "step_s": wall / max(n_timed, 1),
            "exchange_s": float(np.sum(exchange[timed])) / max(n_timed, 1),
            "bytes_received_per_hop": 4.0 * stats["values_received_per_hop"], "hops": stats["hops"],
            "users": int(rd.n_users), "items": int(rd.n_items), "adjacency_nnz": int(graph.nodes.nnz),
            "rows_held": {k: v[0] for k, v in held.items() if k in ("user_emb.weight", "item_emb.weight")},
            "losses": losses}


def run_stage(spec: dict, workers: int, num_shards: int, cfg_dict: dict, stage: str, steps: int,
              column_block: int | None = None) -> dict:
    from promptmm_dist.partition.group import run_group

    t0 = time.perf_counter()
    ranks = run_group(stage_rank, workers, spec, num_shards, cfg_dict, stage, steps, column_block, threads=1,
                      timeout_s=7200)
    step_s = max(r["step_s"] for r in ranks)  # a step ends when its slowest rank does
    exchange_s = max(r["exchange_s"] for r in ranks)
    return {"steps_per_s": 1.0 / step_s if step_s > 0 else 0.0, "step_s": step_s,
            "compute_s": max(r["step_s"] - r["exchange_s"] for r in ranks), "exchange_s": exchange_s,
            "bytes_per_hop": max(r["bytes_received_per_hop"] for r in ranks),
            "rank_peak_rss_mib": max(r["peak_rss_mib"] for r in ranks), "wall_s": time.perf_counter() - t0,
            "rank_setup_peak_mib": max((r["setup_peak_rss_mib"] or 0.0) for r in ranks),
            "rank_step_peak_mib": max((r["step_peak_rss_mib"] or 0.0) for r in ranks),
            "ranks": ranks}


def markdown(runs: dict[str, dict], sizes: str) -> str:
    head = ("| W | stage | rank peak RSS MiB (each) | peak in setup / in steps MiB (max rank) | setup s | steps/s "
            "| s/step compute | s/step exchange | MiB received per hop per rank | rows held per rank (users / items) |\n"
            "|---|---|---|---|---|---|---|---|---|---|")
    lines = [f"Synthetic data: {sizes}.", "", head]
    for w, run in runs.items():
        for stage, s in run.items():
            rss = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in s["ranks"])
            setup = max(r["setup_s"] for r in s["ranks"])
            rows = " ; ".join(f"{r['users']:,} / {r['items']:,}" for r in s["ranks"])
            phases = f"{s['rank_setup_peak_mib']:.0f} / {s['rank_step_peak_mib']:.0f}"
            lines.append(f"| {w} | {stage} | {rss} | {phases} | {setup:.1f} | {s['steps_per_s']:.3f} | {s['compute_s']:.3f} | "
                         f"{s['exchange_s']:.3f} | {s['bytes_per_hop'] / 2**20:.1f} | {rows} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if "--pipeline" in (sys.argv[1:] if argv is None else argv):  # the whole pipeline (bench/pipeline_scale.py)
        from pipeline_scale import main as pipeline_main

        return pipeline_main(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_args(p)
    p.add_argument("--workers", default="1,2", help="W values to run, comma-separated (each with the same batch)")
    p.add_argument("--steps", type=int, default=100, help="optimiser steps per stage and W (the first warms up)")
    p.add_argument("--exchange", default="cover", choices=EXCHANGE_MODES, help="per-hop row exchange")
    p.add_argument("--batch-size", type=int, default=4096, help="global batch (teacher and student)")
    p.add_argument("--dim", type=int, default=64, help="embedding size (teacher and student)")
    p.add_argument("--data-dir", default=None, help="synthetic data folder (default: runs/scale-data/<sizes>)")
    p.add_argument("--stages", default="teacher,student")
    p.add_argument("--column-block", type=int, default=None,
                   help="input rows per column block of the CPU products (default data.graph.COLUMN_BLOCK)")
    p.add_argument("--json", action="store_true", help="(the JSON line is always printed last)")
    p.add_argument("--save", default=None, help="also write NAME.json/.md under bench/results/")
    args = p.parse_args(argv)
    workers = sorted({int(w) for w in args.workers.split(",")})
    stages = [s for s in args.stages.split(",") if s]
    sizes = f"{args.users:,} users, {args.items:,} items, {args.interactions:,} interactions, {args.modalities}"
    folder = Path(args.data_dir or REPO / "runs" / "scale-data" /
                  f"u{args.users}-i{args.items}-n{args.interactions}-{args.modalities.replace(':', '').replace(',', '-')}-s{args.seed}")
    manifest = ensure_data(folder, args.users, args.items, args.interactions, args.modalities, args.seed)
    spec = {"dir": str(folder.resolve()), "n_users": manifest["n_users"], "n_items": manifest["n_items"],
            "modalities": list(manifest["modalities"]), "name": manifest.get("name", "synthetic"),
            "manifest_sha256": manifest.get("content_sha256", "")}
    from promptmm_dist.config import Config

    cfg = Config()
    cfg.teacher.embed_dim = cfg.student.embed_dim = args.dim
    cfg.teacher.batch_size = cfg.student.batch_size = args.batch_size
    cfg.teacher.dropout = cfg.prompt.prompt_dropout = 0.0  # the same numbers on every W
    cfg.dist.exchange = args.exchange
    num_shards = max(workers)
    runs: dict[str, dict] = {}
    for w in workers:
        runs[str(w)] = {}
        for stage in stages:
            print(f"W={w} {stage}: {args.steps} steps ...", file=sys.stderr, flush=True)
            runs[str(w)][stage] = run_stage(spec, w, num_shards, cfg.to_dict(), stage, args.steps, args.column_block)
            s = runs[str(w)][stage]
            print(f"W={w} {stage}: {s['steps_per_s']:.3f} steps/s, rank peak RSS {s['rank_peak_rss_mib']:.0f} MiB",
                  file=sys.stderr, flush=True)
    top = runs[str(workers[-1])]
    result = {"users": args.users, "items": args.items, "interactions": args.interactions,
              "modalities": args.modalities, "workers": workers[-1], "steps": args.steps, "exchange": args.exchange,
              "batch_size": args.batch_size, "dim": args.dim, "threads_per_rank": 1,
              "column_block": args.column_block or COLUMN_BLOCK,
              "rank_peak_rss_mib": max(s["rank_peak_rss_mib"] for s in top.values()),
              "driver_peak_rss_mib": round(peak_rss_mib(), 1),
              "object_store_bytes": 0,  # the ranks read the files themselves: nothing goes through Ray here
              **{f"{st}_steps_per_s": top[st]["steps_per_s"] for st in stages},
              **{f"{st}_exchange_bytes_per_hop": top[st]["bytes_per_hop"] for st in stages},
              "runs": runs}
    if "1" in runs and len(workers) > 1:
        one = runs["1"]
        result["ratios"] = {f"W{w}": {
            **{f"{st}_speedup": runs[str(w)][st]["steps_per_s"] / one[st]["steps_per_s"] for st in stages},
            **{f"{st}_rank_rss": runs[str(w)][st]["rank_peak_rss_mib"] / one[st]["rank_peak_rss_mib"] for st in stages},
            **{f"{st}_loss_max_rel_diff": max(abs(a - b) / max(abs(a), 1e-12) for a, b in
                                               zip(one[st]["ranks"][0]["losses"], runs[str(w)][st]["ranks"][0]["losses"]))
               for st in stages}} for w in workers if w != 1}
    table = markdown(runs, sizes)
    print(table)
    if args.save:
        out = REPO / "bench" / "results"
        (out / f"{args.save}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{args.save}.md").write_text(table + "\n\n" + ratios_lines(result) + "\n")
    print(json.dumps(result))
    return 0


def ratios_lines(result: dict) -> str:
    lines = [f"Driver peak RSS {result['driver_peak_rss_mib']:.0f} MiB; object-store bytes "
             f"{result['object_store_bytes']} (ranks read the canonical files directly)."]
    for w, r in result.get("ratios", {}).items():
        lines.append(f"{w} vs W1: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
    return "\n\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
