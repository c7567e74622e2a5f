"""A token-by-token SSD (Mamba-2) recurrence: the oracle layers/ssm/ssd.py is tested against.

Shapes (layers/__init__.py): b batch, t sequence, h heads, d head dim, N state size,
ng B/C groups.
"""

import jax
import jax.numpy as jnp


def ssd_sequential(x, dt, a, bmat, cmat, d_skip, segment_ids=None, initial_state=None):
  """S_t = exp(dt_t a) S_{t-1} + dt_t x_t ⊗ B_t (reset where the segment id changes);
  y_t = S_t C_t + D x_t, all in float32.

  Args: as `layers.ssm.ssd.ssd` (x [b, t, h, d], dt [b, t, h], a [h], bmat/cmat
  [b, t, ng, N], d_skip [h], segment_ids [b, t], initial_state [b, h, d, N]).
  Returns: (y float32 [b, t, h, d], final state [b, h, d, N]).
  """
  b, t, h, d = x.shape
  ng, n = bmat.shape[2:]
  f32 = lambda z: z.astype(jnp.float32)  # noqa: E731
  x, dt, a, bmat, cmat, d_skip = map(f32, (x, dt, a, bmat, cmat, d_skip))
  bh = jnp.repeat(bmat, h // ng, axis=2)  # [b, t, h, N]
  ch = jnp.repeat(cmat, h // ng, axis=2)
  if segment_ids is None:
    segment_ids = jnp.ones((b, t), jnp.int32)
  previous = jnp.concatenate([segment_ids[:, :1], segment_ids[:, :-1]], axis=1)
  keep = f32(segment_ids == previous)
  state = jnp.zeros((b, h, d, n), jnp.float32) if initial_state is None else f32(initial_state)

  def step(state, inputs):
    x_t, dt_t, b_t, c_t, keep_t = inputs
    decay = jnp.exp(dt_t * a) * keep_t[:, None]  # [b, h]
    state = state * decay[..., None, None] + jnp.einsum("bhd,bhn->bhdn", x_t * dt_t[..., None],
                                                        b_t)
    y = jnp.einsum("bhdn,bhn->bhd", state, c_t) + d_skip[:, None] * x_t
    return state, y

  inputs = [jnp.moveaxis(z, 1, 0) for z in (x, dt, bh, ch, keep)]
  state, ys = jax.lax.scan(step, state, inputs)
  return jnp.moveaxis(ys, 0, 1), state
