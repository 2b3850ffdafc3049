"""The edge of bwbpf_jax: command line, training loop, logging, plots and benchmarks."""
