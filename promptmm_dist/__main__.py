"""`python -m promptmm_dist` is the same as the `promptmm` console script."""

from promptmm_dist.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
