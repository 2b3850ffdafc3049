"""Training across devices and hosts.

- `data_parallel`: the step jitted over a 1-D 'data' mesh, batch split, states replicated.
- `pipeline`: block parallelism as one SPMD program, a stage pipeline over a
  ('data', 'stage') mesh (`StagePipeline`).
- `hosts`: joining a multi-process run.
- `sizing`: per-block times, projected pipeline speed-up (and `bwbpf_jax.splits`'s
  `balanced_split_points`, re-exported).
"""

from bwbpf_jax.parallel.data_parallel import (DATA_AXIS, data_sharding,
                                              make_data_parallel_blockwise_train_step,
                                              make_data_parallel_eval_step,
                                              make_data_parallel_train_step, make_mesh,
                                              replicate, replicated_sharding, shard_batch)
from bwbpf_jax.parallel.hosts import initialize_distributed, process_info
from bwbpf_jax.parallel.pipeline import (STAGE_AXIS, PipelineState, StagePipeline, StagePlan,
                                         block_costs, make_pipeline_mesh, make_stage_plan,
                                         process_feed_slice, split_microbatches,
                                         state_bytes_per_device, step_metrics)
from bwbpf_jax.parallel.sizing import (balanced_split_points, per_block_step_times,
                                       projected_pipeline_speedup)
