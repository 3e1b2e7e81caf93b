"""Data stage: readers, validation, canonical layout, synthetic generator, shards and the graph."""
