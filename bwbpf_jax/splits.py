"""The one split search: contiguous groups of costed items whose costliest group is cheapest.

Three callers cut a sequence into K contiguous groups so that the largest
group's cost is as small as possible: the paper's default partition groups
stages by unit count (`partition.default_split_points`), the activation cut
groups units by activation memory (`cost.activation_balanced_split_points`),
and the stage pipeline groups blocks by FLOPs or time
(`parallel.pipeline.make_stage_plan`). They share this function, so a cut is
the same whoever asks. It depends on nothing else in the library, so every
layer may import it.

The objective is min over cuts of max_k sum(costs in group k). Many cuts
often reach it (equal costs, one dominant item), and the two searches this
module replaced broke those ties differently, so the rule is explicit:

1. the most balanced of the optimal cuts: the group costs, sorted from the
   largest down, are lexicographically smallest (the smallest largest group,
   then the smallest second largest, and so on);
2. among cuts with the same sorted group costs, the earliest split points.

Rule 1 is the paper's partition: grouping VGG-19's stages of 2, 2, 4, 4, 4
convolutions into 3 blocks gives 4, 4, 8, not 2, 6, 8, though both have a
largest block of 8. For a pipeline every optimal cut runs at the same pace;
the balanced one leaves the least idle time if the costs are estimates.
"""

from typing import Sequence

import numpy as np

from bwbpf_jax.errors import UsageError


def balanced_split_points(costs: Sequence[float], num_groups: int) -> tuple:
  """Split points cutting `costs` into `num_groups` contiguous groups with the smallest largest cost.

  A pipeline runs at the pace of its costliest stage and the block-wise step's
  peak memory follows its largest block, so the cut minimises max_k sum(costs
  in group k), breaking ties by the module's rule (the most balanced cut, then
  the earliest split points): a dynamic programme over suffixes, O(K^2 n^2 log K)
  for n items, milliseconds for the library's sizes. Group costs are
  differences of one prefix sum, so equal groups compare equal.

  Args:
    costs: n finite, non-negative costs, e.g. seconds, FLOPs or bytes per unit.
    num_groups: K, between 1 and n.

  Returns:
    K-1 strictly increasing indices where groups 1..K-1 start (as `build_model`'s
    `split_points` when the items are units).

  Raises:
    UsageError: K outside 1..n, or a negative or non-finite cost.
  """
  costs = [float(c) for c in costs]
  num_items = len(costs)
  if not 1 <= num_groups <= num_items:
    raise UsageError(f'cannot cut {num_items} units into {num_groups} blocks')
  if any(not np.isfinite(c) or c < 0 for c in costs):
    raise UsageError(f'unit costs must be finite and non-negative, got {costs}')
  prefix = np.concatenate([[0.0], np.cumsum(costs)]).tolist()
  # best[k][i]: (group costs sorted from the largest down, split points) of the tie-break's
  # choice when items i..n-1 form k groups. Suffixes compose: adding the same group cost to
  # two sorted cost lists keeps their order, so the best suffix is part of the best cut.
  best = [[None] * (num_items + 1) for _ in range(num_groups + 1)]
  best[0][num_items] = ((), ())
  for k in range(1, num_groups + 1):
    for i in range(num_items - k, -1, -1):
      for j in range(i + 1, num_items - k + 2):  # Group [i, j), then k-1 groups from j.
        if best[k - 1][j] is None:  # No k-1 groups end exactly at n from j (k = 1, j < n).
          continue
        rest_costs, rest_points = best[k - 1][j]
        group_costs = tuple(sorted(rest_costs + (prefix[j] - prefix[i],), reverse=True))
        # Strictly smaller only: on equal costs the earlier j (earlier split point) stays.
        if best[k][i] is None or group_costs < best[k][i][0]:
          best[k][i] = (group_costs, ((j,) if k > 1 else ()) + rest_points)
  return best[num_groups][0][1]
