"""The one split search (bwbpf_jax/splits.py): its objective, its tie-break, and its layer."""

import ast
import itertools
import os
import random

from absl.testing import absltest
from absl.testing import parameterized

from bwbpf_jax import splits
from bwbpf_jax.errors import UsageError

LIBRARY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'bwbpf_jax')


def _group_costs(costs, points) -> list:
  bounds = [0, *points, len(costs)]
  return [sum(costs[start:stop]) for start, stop in zip(bounds[:-1], bounds[1:])]


def _every_cut(num_items, num_groups):
  return itertools.combinations(range(1, num_items), num_groups - 1)


class BalancedSplitPointsTest(parameterized.TestCase):

  def test_objective_and_tie_break_against_brute_force(self):
    """Small integer costs (many ties, exact sums): every cut is tried."""
    rng = random.Random(23)
    for _ in range(400):
      num_items = rng.randint(1, 8)
      num_groups = rng.randint(1, num_items)
      costs = [rng.randint(0, 5) for _ in range(num_items)]
      points = splits.balanced_split_points(costs, num_groups)
      cuts = list(_every_cut(num_items, num_groups))
      smallest_largest = min(max(_group_costs(costs, cut)) for cut in cuts)
      self.assertEqual(max(_group_costs(costs, points)), smallest_largest, (costs, num_groups))
      # The tie-break: sorted group costs (largest first) smallest, then the earliest points.
      expected = min(cuts, key=lambda cut: (sorted(_group_costs(costs, cut), reverse=True), cut))
      self.assertEqual(points, expected, (costs, num_groups))

  @parameterized.parameters(
      # VGG-19's stages: 4, 4, 8 (the paper's cut), not the also optimal 2, 6, 8 or 8, 4, 4.
      ([2, 2, 4, 4, 4], 3, (2, 3)),
      ([1, 1, 1, 1], 3, (1, 2)),           # 1, 1, 2 three ways: the earliest points.
      ([3, 1, 1, 3], 2, (2,)),             # The objective: 4, 4 (the other cuts reach 5).
      ([5, 0, 0, 5], 2, (1,)),             # 5, 5 with the zeros anywhere: the earliest.
      ([7, 3], 1, ()),
  )
  def test_tie_break(self, costs, num_groups, expected):
    self.assertEqual(splits.balanced_split_points(costs, num_groups), expected)

  def test_float_costs_reach_the_brute_force_objective(self):
    rng = random.Random(5)
    for _ in range(100):
      costs = [rng.random() for _ in range(rng.randint(2, 7))]
      num_groups = rng.randint(1, len(costs))
      points = splits.balanced_split_points(costs, num_groups)
      best = min(max(_group_costs(costs, cut)) for cut in _every_cut(len(costs), num_groups))
      self.assertAlmostEqual(max(_group_costs(costs, points)), best, places=12)

  def test_impossible_requests(self):
    with self.assertRaisesRegex(UsageError, 'cannot cut 2 units into 3 blocks'):
      splits.balanced_split_points([1, 1], 3)
    with self.assertRaisesRegex(UsageError, 'non-negative'):
      splits.balanced_split_points([1, float('nan')], 2)


class LayerTest(absltest.TestCase):

  def test_no_module_outside_parallel_imports_parallel_and_splits_imports_only_errors(self):
    """The library's layers point one way: parallel/ builds on the rest, never the reverse."""
    for folder, _, files in os.walk(LIBRARY):
      for name in files:
        if not name.endswith('.py'):
          continue
        path = os.path.join(folder, name)
        imported = set()
        for node in ast.walk(ast.parse(open(path).read())):
          if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
            imported.update(f'{node.module}.{alias.name}' for alias in node.names)
          elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
        library = {m for m in imported if m.startswith('bwbpf_jax')}
        if os.path.relpath(path, LIBRARY) == 'splits.py':
          self.assertEqual(library, {'bwbpf_jax.errors', 'bwbpf_jax.errors.UsageError'})
        # The package's __init__ is the public facade over every layer (bw.parallel).
        if not os.path.relpath(path, LIBRARY).startswith(('parallel', '__init__.py')):
          self.assertEmpty({m for m in library if m.startswith('bwbpf_jax.parallel')}, path)


if __name__ == '__main__':
  absltest.main()
