"""promptmm_dist: distributed multi-modal knowledge distillation (PromptMM) on Ray.

Pipeline, one sub-package per stage: data -> shards -> teacher -> cache -> student -> tune -> evaluate.
Importing the package has no side effects (no Ray start, no file I/O).
"""

__version__ = "0.1.0"
