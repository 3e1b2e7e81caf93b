"""Partitioned execution (DESIGN 3, version 2): W ranks each own a block of users, items, adjacency
rows and embedding rows; propagation exchanges rows per hop.

plan       who owns which user and item (pure arithmetic for users, a degree-balanced map for items)
exchange   the autograd collectives: needed-rows exchange, item gather, sum over ranks
operator   a row-partitioned sparse matrix times a row-partitioned dense block
graph      `PartitionedGraph`, the `GraphPropagator` of W ranks
rank_data  what one rank reads from the canonical files: its users' interactions, its items' features
world      `PartitionedWorld`: loss shares, gradient sync of the dense modules, whole-model checkpoints

Models and losses never import this package: they see a graph object and tables indexed by the ids of
the batch, exactly as in the one-process (replicated) mode.
"""
