"""`TeacherGroup`: the driver's handle on the partitioned frozen teacher of a student stage, W
`TeacherRank` actors (`teacher_model.py`) joined in one gloo process group.

W is the student stage's number of ranks, so teacher rank r holds exactly the users and items that
student rank r holds (the same `PartitionPlan`): at a prompt round each student rank hands its own
rows to the teacher rank of the same partition, and nobody gathers a whole table.

The ranks' calls are collectives: every call goes to all W ranks at once, in the same order. A rank
that dies leaves the others waiting in a collective, so a lost rank is never restarted alone: the
group is killed and started again (`restart`), from the canonical files and the checkpoint, at most
`dist.max_failures` times; the call is then made again (every call is idempotent: it carries its
cache version's prompt). Blocks already made stay readable (the driver owns them).
"""

from __future__ import annotations

from promptmm_dist.actor_calls import ActorLost, bounded_get, one_line
from promptmm_dist.distill.teacher_model import PromptState, TeacherRank
from promptmm_dist.partition.plan import rank_shards


class TeacherGroup:
    """W teacher ranks; `version_tables` and `prompt_round` return object refs the caller owns."""

    def __init__(self, spec: dict, cfg_dict: dict, checkpoint: str, num_shards: int, world_size: int,
                 num_cpus: float, timeout_s: float, max_restarts: int, near_nodes: list | None = None,
                 log=print) -> None:
        """`near_nodes`: node ids to place rank r beside (its first shard's node: soft affinity)."""
        self.spec, self.cfg_dict, self.checkpoint = spec, cfg_dict, checkpoint
        self.num_shards, self.world_size = num_shards, max(1, world_size)
        self.num_cpus, self.timeout_s, self.max_restarts = num_cpus, timeout_s, max_restarts
        self.near_nodes, self.log = near_nodes or [], log
        self.restarts = 0
        self.ranks: list = []
        self._ready: list = []
        self._start()

    def _start(self) -> None:
        import ray

        from promptmm_dist.ray_setup import near

        cls = ray.remote(num_cpus=self.num_cpus)(TeacherRank)  # no actor restarts: a new group instead
        w = self.world_size
        self.ranks = [cls.options(**near(self.near_nodes, r)).remote(self.spec, self.cfg_dict, self.checkpoint,
                                                                    self.num_shards, r, w) for r in range(w)]
        if w == 1:
            self._ready = [self.ranks[0].pid.remote()]
        else:  # rank 0 names the rendezvous; every rank joins at once (each call blocks until all have)
            address, port = bounded_get(self.ranks[0].address.remote(), "the teacher group (rank 0's address)",
                                        self.timeout_s)
            self._ready = [a.join.remote(address, port, self.timeout_s) for a in self.ranks]

    def ready(self) -> list[int]:
        """Wait until every rank holds its share (the first version's forward follows at once); pids."""
        return bounded_get(self._ready, "the teacher group (setting up its ranks)", self.timeout_s)

    def restart(self, why: str) -> None:
        """Kill every rank and start the group again; `ActorLost` once the restarts are used up."""
        self.close()
        if self.restarts >= self.max_restarts:
            raise ActorLost(f"the teacher group (TeacherRank actors) failed ({why}); its restarts "
                            f"(dist.max_failures={self.max_restarts}) are used up")
        self.restarts += 1
        self.log(f"teacher group: {why}; starting it again ({self.restarts}/{self.max_restarts})")
        self._start()

    def ensure_started(self) -> None:
        """Start the ranks again after `close` (a group given back while idle; not a failure, so no
        restart is counted)."""
        if not self.ranks:
            self._start()

    def close(self) -> None:
        import ray

        for a in self.ranks:
            ray.kill(a)
        self.ranks = []

    def gather(self, refs: list, what: str) -> list:
        """The values of the ranks' result refs, raising at the *first* failure: a dead rank's ref fails
        at once while the others still wait in their collective (`ActorLost` then names it)."""
        import time

        import ray
        from ray.exceptions import RayActorError

        from promptmm_dist.actor_calls import timeout_error

        deadline = time.monotonic() + self.timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise timeout_error(what, self.timeout_s)
            try:
                ray.get(ready[0])
            except RayActorError as err:
                raise ActorLost(f"{what}: a teacher rank is gone ({one_line(err)})") from None
        return ray.get(list(refs))

    def node_ids(self) -> list:
        return bounded_get([a.node_id.remote() for a in self.ranks], "the teacher group (node ids)", self.timeout_s)

    def pids(self) -> list[int]:
        return bounded_get([a.pid.remote() for a in self.ranks], "the teacher group (pids)", self.timeout_s)

    # ---- collective calls (every rank, same order) -----------------------------------------------
    def version_tables(self, version: int, prompt, num_shards: int) -> tuple[list, list]:
        """Cache `version`'s N + 1 block refs (shard k's user block at k, the item block last) and the
        W small status refs (read these to learn whether the blocks were made: they are what fails
        when a rank died, and reading them fetches no table). `prompt`: its `PromptState` (or ref)."""
        blocks: list = [None] * (num_shards + 1)
        status = []
        for r, rank in enumerate(self.ranks):
            mine = rank_shards(num_shards, r, self.world_size)
            refs = rank.version_tables.options(num_returns=1 + len(mine) + (r == 0)).remote(version, prompt, num_shards)
            status.append(refs[0])
            for k, ref in zip(mine, refs[1:]):
                blocks[k] = ref
            if r == 0:
                blocks[num_shards] = refs[-1]
        return blocks, status

    def prompt_round(self, students: list, seed: int, base: PromptState | object | None) -> list:
        """One prompt round on every rank: `students[r]` is student rank r's rows (a ref); returns each
        rank's result ref (equal prompts: rank 0's is the one to read)."""
        if len(students) != self.world_size:
            raise ValueError(f"{len(students)} student parts for a teacher group of {self.world_size} ranks")
        return [rank.prompt_round.remote(students[r], seed, base) for r, rank in enumerate(self.ranks)]

