"""The command-line tools over the library: python -m resnet_jax.tools.<tool> (evaluate, bn_stats,
convert, predict, summary). They parse flags and report mistakes in one sentence; the work is the
library's. resnet_jax.main, the training job, shares their flag helpers (cli)."""
