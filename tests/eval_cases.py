"""Evaluation batches whose padding must show: masked rows that change every sum if counted.

An evaluation of an untrained model on random labels gets most examples wrong,
so padded rows with random labels add nothing to 'correct' and a step that
forgets the mask still matches the real rows' sums. `masked_eval_case` builds
the padding so that forgetting the mask cannot go unseen: every padded row is
labelled with the class that some head predicts for it (each head gets at
least one padded hit), and every padded row has a clearly non-zero loss.

It treats the evaluation as a black box, `evaluate(batch) -> {'correct' [K],
'loss' [K], 'count'}` with the states already bound and the batch put where it
must go, so any evaluation path (one device, a data-parallel mesh, a stage
pipeline) can be checked the same way:

    case = masked_eval_case(lambda b: eval_step(states, b), model, real_batch, num_padded=8)
    chex.assert_trees_all_close(eval_step(states, case.batch), case.expected, rtol=1e-5)
"""

import dataclasses
from typing import Callable, Optional

import numpy as np

# How far (relative) the sums with the padding counted must be from the real rows' sums:
# far above the float tolerances the comparisons use (1e-5), so no rounding hides it.
MIN_RELATIVE_GAP = 1e-2


@dataclasses.dataclass(frozen=True)
class MaskedEvalCase:
  """A padded evaluation batch and the sums a correct evaluation must return for it.

  Attributes:
    batch: host arrays, the real rows first, then the padded rows; 'mask' is 1 for
      real rows and 0 for padding.
    expected: the sums of the real rows alone ('correct' [K], 'loss' [K], 'count').
    unmasked: the sums of `batch` with every row counted: what a step that ignores
      the mask returns. Its 'correct' exceeds `expected`'s by at least one in every
      block, its 'loss' by a relative `MIN_RELATIVE_GAP` or more.
    padding_labels: int [num_padded], the label of each padded row.
    predictions: int [K], the class each head predicts for the padding image.
  """
  batch: dict
  expected: dict
  unmasked: dict
  padding_labels: np.ndarray
  predictions: np.ndarray


def _host(sums: dict) -> dict:
  return {name: np.asarray(value, np.float64) for name, value in sums.items()}


def _padding_rows(real_batch: dict, num_padded: int, seed: int) -> dict:
  """`num_padded` copies of one fresh image (and its 'pixels', where the batch has them)."""
  rng = np.random.default_rng(seed)
  rows = {}
  for name, value in real_batch.items():
    value = np.asarray(value)
    if name == 'image':
      one = rng.normal(size=value.shape[1:]).astype(value.dtype)
    elif name == 'pixels':
      one = rng.integers(0, 256, value.shape[1:]).astype(value.dtype)
    elif name == 'label':
      one = np.zeros((), value.dtype)
    else:
      raise ValueError(f'masked_eval_case builds its own {name!r}; pass image, label, pixels')
    rows[name] = np.repeat(one[None], num_padded, axis=0)
  return rows


def head_predictions(evaluate: Callable, model, rows: dict) -> np.ndarray:
  """The class each head predicts for `rows`, a batch of copies of one image.

  One evaluation per class with every row labelled with that class (and counted):
  head k gets every row right for its predicted class and none for the others.
  """
  size = len(rows['label'])
  predictions = np.full(model.num_blocks, -1)
  for label in range(model.num_classes):
    probe = {**rows, 'label': np.full(size, label, rows['label'].dtype),
             'mask': np.ones(size, np.float32)}
    correct = np.asarray(evaluate(probe)['correct'])
    assert set(correct.tolist()) <= {0, size}, (
        f'rows of one image should be all right or all wrong, got {correct} of {size}')
    hit = correct == size
    assert np.all(predictions[hit] == -1), f'two classes predicted at once: {label}'
    predictions[hit] = label
  assert np.all(predictions >= 0), f'a head predicts no class: {predictions}'
  return predictions


def masked_eval_case(evaluate: Callable, model, real_batch: dict, *, num_padded: int,
                     reference: Optional[Callable] = None, seed: int = 12345) -> MaskedEvalCase:
  """Pads `real_batch` so that counting the padding changes 'correct' and 'loss' of every head.

  Args:
    evaluate: batch -> sums ('correct' [K], 'loss' [K], 'count'), states bound; it
      gets host (numpy) batches of len(real) + num_padded rows with a 'mask'.
    model: the `PartitionedModel` evaluated (its num_blocks and num_classes).
    real_batch: the real rows: 'image', 'label' and, for reconstruction losses, 'pixels'.
    num_padded: padded rows to add, at least model.num_blocks (padded row j is
      labelled with head j mod K's prediction, so every head gets a padded hit).
    reference: batch -> sums, used on the real rows alone (no mask) for `expected`;
      defaults to `evaluate`, which must then accept a batch of the real rows only.
    seed: for the padding image.

  Returns:
    A `MaskedEvalCase`; it has been checked that `unmasked` differs from `expected`
    in every block's 'correct' and 'loss' and in 'count'.
  """
  num_blocks = model.num_blocks
  if num_padded < num_blocks:
    raise ValueError(f'{num_padded} padded rows cannot give each of {num_blocks} heads a hit')
  real_batch = {name: np.asarray(value) for name, value in real_batch.items()}
  num_real = len(real_batch['label'])
  padding = _padding_rows(real_batch, num_padded, seed)
  # The probes have the final batch's size, so any batch-size rule of `evaluate` holds.
  probe_rows = {name: np.concatenate([padding[name][:1].repeat(num_real, 0), padding[name]])
                for name in padding}
  predictions = head_predictions(evaluate, model, probe_rows)
  padding['label'] = predictions[np.arange(num_padded) % num_blocks].astype(
      real_batch['label'].dtype)

  batch = {name: np.concatenate([real_batch[name], padding[name]]) for name in real_batch}
  batch['mask'] = np.concatenate([np.ones(num_real, np.float32),
                                  np.zeros(num_padded, np.float32)])
  expected = _host((reference or evaluate)(real_batch))
  unmasked = _host(evaluate({**batch, 'mask': np.ones_like(batch['mask'])}))

  # The construction bites: each sum changes, for every head, when the padding is counted.
  hits = unmasked['correct'] - expected['correct']
  assert np.all(hits >= 1), f'a head has no padded hit: {hits}'
  gap = np.abs(unmasked['loss'] - expected['loss'])
  assert np.all(gap > MIN_RELATIVE_GAP * np.maximum(np.abs(expected['loss']), 1.0)), (
      f"counting the padding barely changes 'loss': {unmasked['loss']} vs {expected['loss']}")
  assert unmasked['count'] == num_real + num_padded and expected['count'] == num_real
  return MaskedEvalCase(batch=batch, expected=expected, unmasked=unmasked,
                        padding_labels=padding['label'], predictions=predictions)
