"""Pictures and summaries of finished run folders: `curves.png` + `summary.md` written by every
training command, and `promptmm report RUN...` comparing several runs (matplotlib, Agg backend)."""
