"""A small classifier probe: did the diffusion model learn the classes?

Fitted in seconds on CPU on real labelled images, it then scores generated
ones. The diffusion task's closing report prints three accuracies:

  probe = fit_probe(real_train_images, real_train_labels, num_classes=8, seed=0)
  probe.accuracy(real_heldout_images, real_heldout_labels)  # High: the probe works.
  probe.accuracy(samples, sample_labels)                    # The score.
  probe.accuracy(noise, sample_labels)                      # About chance.

A class-conditional model whose samples the probe labels as asked has learned
what the classes look like. The network downsamples to about 16 pixels a
side, applies two 3x3 convolutions with a max pool between them, then a
global max pool (so position does not matter) and a linear head; it is
trained with Adam on random mini-batches, all steps in one `lax.scan`.

Legend: b images, H, W, c image height, width and channels.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

_BATCH_SIZE = 64
_LEARNING_RATE = 3e-3


class PatchConv(nn.Module):
  """A 3x3 'SAME' convolution written as 9 shifted copies and one Dense.

  Same maths as nn.Conv(features, (3, 3)); on XLA:CPU its gradient is about
  ten times faster than the convolution's at these few channels (measured),
  which is what keeps fitting the probe to a few seconds.

  Attributes:
    features: output channels.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [b, H, W, c] -> [b, H, W, features]."""
    _, height, width, _ = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([padded[:, i:i + height, j:j + width]
                               for i in range(3) for j in range(3)], axis=-1)
    return nn.Dense(self.features)(patches)


class ProbeNet(nn.Module):
  """avg-pool to ~16 px -> conv(16) -> max-pool -> conv(32) -> global max -> Dense.

  Attributes:
    num_classes: logits per image.
  """
  num_classes: int

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images float [b, H, W, c] in [-1, 1] -> logits float32 [b, num_classes]."""
    x = images.astype(jnp.float32)
    factor = max(1, round(min(x.shape[1:3]) / 16))
    if factor > 1:
      x = nn.avg_pool(x, (factor, factor), strides=(factor, factor))
    x = nn.relu(PatchConv(16)(x))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.relu(PatchConv(32)(x))
    return nn.Dense(self.num_classes)(x.max(axis=(1, 2)))


@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _train(images, labels, key, *, num_classes: int, steps: int):
  """Initialises, then takes `steps` Adam steps on random mini-batches; returns params.

  One compiled program: eager init would compile each of its ops separately.
  """
  net = ProbeNet(num_classes)
  init_key, key = jax.random.split(key)
  params = net.init(init_key, images[:1])["params"]
  optimizer = optax.adam(optax.cosine_decay_schedule(_LEARNING_RATE, steps))

  def loss_fn(params, x, y):
    logits = net.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, step_key):
    params, opt_state = carry
    index = jax.random.randint(step_key, (_BATCH_SIZE,), 0, images.shape[0])
    grads = jax.grad(loss_fn)(params, images[index], labels[index])
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)),
                                jax.random.split(key, steps))
  return params


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _predict(params, images, *, num_classes: int):
  return jnp.argmax(ProbeNet(num_classes).apply({"params": params}, images), axis=-1)


@dataclasses.dataclass(frozen=True)
class Probe:
  """A fitted classifier.

  Attributes:
    params: ProbeNet parameters.
    num_classes: classes it tells apart.
  """
  params: dict
  num_classes: int

  def predict(self, images: np.ndarray) -> np.ndarray:
    """float [b, H, W, c] in [-1, 1] -> int32 [b] predicted classes."""
    return np.asarray(_predict(self.params, jnp.asarray(images, jnp.float32),
                               num_classes=self.num_classes), np.int32)

  def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images [b, H, W, c] predicted as their labels [b]."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),):
      raise ValueError(f"labels must be [b] for {len(images)} images; got {labels.shape}.")
    return float(np.mean(self.predict(images) == labels))


def fit_probe(images: np.ndarray, labels: np.ndarray, *, num_classes: int,
              seed: int = 0, steps: int = 300) -> Probe:
  """Trains a ProbeNet on labelled real images.

  Args:
    images: float [b, H, W, c] in [-1, 1] (any H, W; c 1 or 3).
    labels: int [b] in [0, num_classes).
    num_classes: > 1.
    seed: initialisation and mini-batch order.
    steps: Adam steps of 64 images (300 take a few seconds on a CPU core).
  """
  images = jnp.asarray(images, jnp.float32)
  labels = np.asarray(labels)
  if images.ndim != 4 or labels.shape != (images.shape[0],) or not len(labels):
    raise ValueError(f"fit_probe takes images [b, H, W, c] and labels [b]; got "
                     f"{images.shape} and {labels.shape}.")
  if num_classes < 2 or labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"labels must lie in [0, num_classes={num_classes}) with "
                     f"num_classes >= 2; got labels in [{labels.min()}, {labels.max()}].")
  params = _train(images, jnp.asarray(labels, jnp.int32), jax.random.key(seed),
                  num_classes=num_classes, steps=steps)
  return Probe(params=params, num_classes=num_classes)
