"""A token-by-token Mamba-1 selective scan: the oracle layers/ssm/selective_scan.py is tested
against.

Shapes (layers/__init__.py): b batch, t sequence, i inner width, N state size.
"""

import jax
import jax.numpy as jnp


def selective_scan_sequential(x, dt, a, bmat, cmat, d_skip, segment_ids=None,
                              initial_state=None):
  """h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t (reset where the segment id changes);
  y_t = h_t C_t + D x_t, all in float32.

  Args: as `layers.ssm.selective_scan.selective_scan` (x, dt [b, t, i], a [i, N],
  bmat/cmat [b, t, N], d_skip [i], segment_ids [b, t], initial_state [b, i, N]).
  Returns: (y float32 [b, t, i], final state [b, i, N]).
  """
  b, t, i = x.shape
  f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
  x, dt, a, bmat, cmat, d_skip = map(f32, (x, dt, a, bmat, cmat, d_skip))
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  keep = f32(segment_ids == previous)
  state = jnp.zeros((b, i, a.shape[-1]), jnp.float32) if initial_state is None else f32(
      initial_state)

  def step(state, inputs):
    x_t, dt_t, b_t, c_t, keep_t = inputs  # [b, i], [b, i], [b, N], [b, N], [b]
    decay = jnp.exp(dt_t[..., None] * a) * keep_t[:, None, None]  # [b, i, N]
    state = state * decay + (dt_t * x_t)[..., None] * b_t[:, None, :]
    y = jnp.einsum("biN,bN->bi", state, c_t) + d_skip * x_t
    return state, y

  inputs = [jnp.moveaxis(z, 1, 0) for z in (x, dt, bmat, cmat, keep)]
  state, ys = jax.lax.scan(step, state, inputs)
  return jnp.moveaxis(ys, 0, 1), state
