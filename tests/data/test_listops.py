"""ListOps: labels against an independent evaluator, and the LRA generator's rules."""

import statistics

import numpy as np
import pytest

from attnzoo.data import ListOps
from attnzoo.data.listops import decode


def evaluate(expression: str) -> tuple[int, int, int]:
  """Independent stack evaluator: (value, operator nesting depth, most arguments)."""
  stack: list[tuple[str, list[int]]] = []
  result, depth, widest = None, 0, 0
  for token in expression.split():
    if token.startswith("["):
      stack.append((token, []))
      depth = max(depth, len(stack))
      continue
    if token == "]":
      op, args = stack.pop()
      widest = max(widest, len(args))
      value = {
        "[MAX": max,
        "[MIN": min,
        "[SM": lambda a: sum(a) % 10,
        "[MED": lambda a: int(statistics.median(a)),
      }[op](args)
    else:
      value = int(token)
    if stack:
      stack[-1][1].append(value)
    else:
      assert result is None, f"two top-level expressions in {expression!r}"
      result = value
  assert not stack and result is not None, f"unbalanced {expression!r}"
  return result, depth, widest


def test_known_expressions():
  assert evaluate("[MAX 2 9 [MIN 4 7 ] 0 ]") == (9, 2, 4)
  assert evaluate("[MED 3 4 ]")[0] == 3  # even count: mean of the middle two, truncated
  assert evaluate("[SM 9 9 9 ]")[0] == 7


@pytest.mark.parametrize(
  "config",
  [
    {"seq_len": 128, "max_depth": 5, "max_args": 5, "min_length": 20, "max_length": 128},
    {"seq_len": 40, "max_depth": 3, "max_args": 10, "min_length": 0, "max_length": 30},
  ],
)
def test_labels_equal_an_independent_evaluator(config):
  ds = ListOps(**config)
  b = ds.batch(0, 64)
  for tokens, label in zip(b["inputs"], b["targets"], strict=True):
    length = int((tokens != ds.pad_id).sum())
    assert np.all(tokens[length:] == ds.pad_id), "padding is trailing only"
    assert ds.min_length < length < ds.max_length
    value, depth, widest = evaluate(decode(tokens))
    assert value == label
    assert depth <= ds.max_depth - 1  # operators only above the last level
    assert widest <= ds.max_args


def test_lra_default_lengths_and_labels():
  ds = ListOps()  # LRA: depth 10, 10 args, 500 < length < 2000
  b = ds.batch(0, 8)
  lengths = (b["inputs"] != 0).sum(axis=1)
  assert lengths.min() > 500 and lengths.max() < 2000
  for tokens, label in zip(b["inputs"], b["targets"], strict=True):
    assert evaluate(decode(tokens))[0] == label


def test_node_is_an_operator_with_probability_one_quarter():
  """LRA's VALUE_P: below max_depth a node is a digit with probability 0.75."""
  ds = ListOps(seq_len=4096, max_depth=3, max_args=4, min_length=0, max_length=4096)
  lengths = (ds.batch(0, 4000)["inputs"] != 0).sum(axis=1)
  np.testing.assert_allclose((lengths == 1).mean(), 0.75, atol=0.025)


def test_argument_counts_are_uniform():
  ds = ListOps(seq_len=64, max_depth=2, max_args=5, min_length=1, max_length=64)
  lengths = (ds.batch(0, 4000)["inputs"] != 0).sum(axis=1)
  # depth 2: a root operator over digits, so length = 2 + args with args uniform in 2..5.
  freq = np.bincount(lengths - 2, minlength=6)[2:] / lengths.size
  np.testing.assert_allclose(freq, 0.25, atol=0.03)


def test_validation():
  with pytest.raises(ValueError, match="seq_len=100 must be >= 1999"):
    ListOps(seq_len=100)
  with pytest.raises(ValueError, match="max_length=10 must be >= 12"):
    ListOps(seq_len=64, min_length=10, max_length=10)
  with pytest.raises(ValueError, match="no tree is longer than 4 tokens"):
    ListOps(seq_len=64, max_depth=2, max_args=2, min_length=4, max_length=64)
  ds = ListOps(seq_len=64, max_depth=3, max_args=2, min_length=9, max_length=64)
  assert ds.longest_tree() == 10  # [OP [OP d d ] [OP d d ] ]
