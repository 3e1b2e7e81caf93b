"""Serving from an exported student (two embedding tables, no modality encoder).

export: reading and checking `export.npz` and the run's dataset; rank: the top-K maths; command:
`promptmm recommend`; batch: `recommend --all`, every user on Ray Data, written as Parquet.
"""

from promptmm_dist.serve.command import recommend_command

__all__ = ["recommend_command"]
