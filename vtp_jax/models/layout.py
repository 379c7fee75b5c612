"""Converts parameter trees between the scanned layout (blocks stacked under 'blocks' with a leading
layer axis) and the unrolled one ('blocks_0', 'blocks_1', ...), so a checkpoint written with one
`precision.scan_layers` setting loads under the other."""

import re

import jax
import jax.numpy as jnp
import numpy as np

_UNROLLED = re.compile(r'^blocks_(\d+)$')


def _stack(leaves):
  if isinstance(leaves[0], np.ndarray):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _index(x, i):
  if isinstance(x, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def unstack_blocks(tree):
  """Scanned -> unrolled, recursively: every 'blocks' subtree becomes 'blocks_i' subtrees."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == 'blocks' and isinstance(value, dict):
      depth = jax.tree.leaves(value)[0].shape[0]
      for i in range(depth):
        out[f'blocks_{i}'] = jax.tree.map(lambda x, i=i: _index(x, i), value)
    else:
      out[key] = unstack_blocks(value)
  return out


def stack_blocks(tree):
  """Unrolled -> scanned, recursively: 'blocks_0..n-1' subtrees become one stacked 'blocks'."""
  if not isinstance(tree, dict):
    return tree
  indices = sorted(int(m.group(1)) for k in tree if (m := _UNROLLED.match(k)))
  out = {k: stack_blocks(v) for k, v in tree.items() if not _UNROLLED.match(k)}
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f'block indices {indices} are not 0..{len(indices) - 1}; the tree is '
                       'missing blocks.')
    per_block = [tree[f'blocks_{i}'] for i in indices]
    out['blocks'] = jax.tree.map(lambda *xs: _stack(list(xs)), *per_block)
  return out


def is_scanned(tree) -> bool:
  """True when the tree holds stacked 'blocks' (it must then not hold 'blocks_i' as well)."""
  found = []

  def visit(t):
    if isinstance(t, dict):
      for k, v in t.items():
        if k == 'blocks':
          found.append(True)
        elif _UNROLLED.match(k):
          found.append(False)
        else:
          visit(v)

  visit(tree)
  return bool(found) and all(found)


def to_layout(tree, scan: bool):
  """The tree in the scanned (`scan=True`) or unrolled layout, whichever it holds now."""
  if scan:
    return tree if is_scanned(tree) else stack_blocks(tree)
  return unstack_blocks(tree) if is_scanned(tree) else tree
