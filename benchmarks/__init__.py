"""Speed and memory benchmarks: fronts over one timing routine (`benchmarks.harness`)."""
