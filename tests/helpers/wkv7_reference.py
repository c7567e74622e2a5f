"""The RWKV-7 WKV recurrence token by token in numpy (float64): the oracle of layers/rwkv/wkv7.py.

Written from the recurrence's definition (one head's state S [d, d], value rows,
key columns): S ← S·diag(w) + (S a) bᵀ + v kᵀ, y = S r, with S reset to zero
where a new document starts.
"""

import numpy as np


def wkv7_reference(r, w, k, v, a, b, segment_ids=None, initial_state=None):
  """r, w, k, v, a, b [b, t, h, d]; segment_ids int [b, t] (None: one document);
  initial_state [b, h, d, d] -> (y [b, t, h, d], final state), float64."""
  r, w, k, v, a, b = (np.asarray(x, np.float64) for x in (r, w, k, v, a, b))
  batch, t, h, d = r.shape
  y = np.zeros((batch, t, h, d))
  states = np.zeros((batch, h, d, d)) if initial_state is None else np.array(
      initial_state, np.float64)
  for row in range(batch):
    for head in range(h):
      s = states[row, head]
      for i in range(t):
        if segment_ids is not None and i > 0 and segment_ids[row, i] != segment_ids[row, i - 1]:
          s = np.zeros((d, d))
        s = (s * w[row, i, head][None, :] + np.outer(s @ a[row, i, head], b[row, i, head])
             + np.outer(v[row, i, head], k[row, i, head]))
        y[row, i, head] = s @ r[row, i, head]
      states[row, head] = s
  return y, states
