"""grain input pipeline for images: per-host, checkpointable batches.

Legend: b = global_batch_size // process_count images per host; H, W, c image
height, width and channels (3 RGB or 1 grey).

Every batch is a dict of numpy arrays:
  images: float32[b, H, W, c], pixel values mapped from [0, 255] to [-1, 1]
  labels: int32[b] (all 0 when config.data.label_key is '')

Any TFDS image dataset prepared as array_record goes through the same code:
the embedded `treadle_shapes` (built on first use) or e.g. `mnist`, `cifar10`.
Images may be stored as `tfds.features.Image` (PNG/JPEG, decoded here without
TensorFlow) or as a uint8 `tfds.features.Tensor`; labels as a `ClassLabel`.
Images must already be data.image_size square: nothing is resized.
Each process reads only its own slice of the split (records process_index,
process_index + process_count, ...).

The data config keys read here: name, data_dir, train_split, eval_split,
image_key, label_key, image_size, random_flip, global_batch_size, worker_count.

  it = make_train_iterator(config.data, seed=config.seed,
                           process_index=jax.process_index(),
                           process_count=jax.process_count())
  batch = next(it)
  # Checkpoint with grain.checkpoint.CheckpointSave(it) in an ocp.args.Composite.
"""

import dataclasses

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from train.data import builder
from train.data import sources

Batch = dict[str, np.ndarray]

@dataclasses.dataclass(frozen=True)
class ImageInfo:
  """What a model needs to know about an image dataset.

  Attributes:
    height, width, channels: the image shape H, W, c.
    num_classes: labels are in [0, num_classes); 0 when unlabelled.
    class_names: the ClassLabel's names (empty when unlabelled).
  """
  height: int
  width: int
  channels: int
  num_classes: int
  class_names: tuple[str, ...]


def _image_info(features, data_config: ml_collections.ConfigDict) -> ImageInfo:
  """Checks image_key, label_key and image_size against a FeaturesDict."""
  name, size = data_config.name, data_config.image_size
  available = list(features.keys())
  if data_config.image_key not in available:
    raise KeyError(f"config.data.image_key={data_config.image_key!r} is not a feature "
                   f"of config.data.name={name!r}; it has {available}.")
  image = features[data_config.image_key]
  shape = ()
  if isinstance(image, (tfds.features.Image, tfds.features.Tensor)):
    shape = tuple(image.shape)
    if len(shape) == 2 and not isinstance(image, tfds.features.Image):
      shape += (1,)  # A grey image stored without its channel axis.
  if (not shape or np.dtype(image.np_dtype) != np.uint8 or len(shape) != 3
      or shape[-1] not in (1, 3)):
    raise ValueError(
        f"config.data.image_key={data_config.image_key!r} of config.data.name={name!r} "
        f"is {image!r}; expected a uint8 Image or Tensor of shape [H, W, 1 or 3].")
  height, width, channels = shape
  known = tuple(d for d in (height, width) if d is not None)
  if any(d != size for d in known):
    raise ValueError(
        f"config.data.image_size={size} does not match the images of config.data.name="
        f"{name!r}, which are {height}x{width}. Set config.data.image_size={known[0]} "
        f"(nothing is resized here; a non-square dataset needs resizing offline).")
  if not data_config.label_key:
    return ImageInfo(size, size, channels, 0, ())
  if data_config.label_key not in available:
    raise KeyError(f"config.data.label_key={data_config.label_key!r} is not a feature "
                   f"of config.data.name={name!r}; it has {available}. Set it to '' "
                   f"for an unlabelled dataset.")
  label = features[data_config.label_key]
  if not isinstance(label, tfds.features.ClassLabel):
    raise ValueError(
        f"config.data.label_key={data_config.label_key!r} of config.data.name={name!r} "
        f"is {label!r}, not a ClassLabel; set config.data.label_key to a ClassLabel "
        f"feature, or to '' for unlabelled training.")
  return ImageInfo(size, size, channels, label.num_classes, tuple(label.names))


def dataset_info(data_config: ml_collections.ConfigDict) -> ImageInfo:
  """The image shape and classes of data.name (built first if embedded)."""
  data_dir = builder.ensure_dataset(data_config.name, data_config.data_dir)
  info = tfds.builder(data_config.name, data_dir=data_dir).info
  return _image_info(info.features, data_config)


@dataclasses.dataclass(frozen=True)
class _Decode(grain.transforms.Map):
  """A TFDS example -> {'image': uint8[H, W, c], 'label': int32[]}."""
  image_key: str
  label_key: str
  image_size: int
  name: str

  def map(self, example):
    image = np.asarray(example[self.image_key])
    if image.ndim == 2:
      image = image[..., None]
    if image.shape[:2] != (self.image_size, self.image_size):
      raise ValueError(
          f"config.data.image_size={self.image_size} does not match an image of "
          f"config.data.name={self.name!r} of shape {image.shape[:2]}; nothing is "
          f"resized here.")
    label = example[self.label_key] if self.label_key else 0
    return {"image": image, "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class _RandomFlip(grain.transforms.RandomMap):
  """Mirrors half the images left-right; the rng comes from (seed, position)."""

  def random_map(self, element, rng: np.random.Generator):
    if rng.random() < 0.5:
      element = {**element, "image": element["image"][:, ::-1]}
    return element


@dataclasses.dataclass(frozen=True)
class _ToBatch(grain.transforms.Map):
  """Stacked uint8 images and labels -> the `Batch` layout."""

  def map(self, stacked):
    images = stacked["image"].astype(np.float32) * np.float32(2 / 255) - np.float32(1)
    return {"images": images, "labels": stacked["label"].astype(np.int32)}


def _host_source(data_config: ml_collections.ConfigDict, split: str, split_field: str,
                 process_index: int, process_count: int) -> grain.MapDataset:
  """This host's decoded examples of `split`, as a grain MapDataset."""
  records, features = sources.host_records(data_config, split, split_field, process_index,
                                           process_count)
  _image_info(features, data_config)
  decode = _Decode(data_config.image_key, data_config.label_key,
                   data_config.image_size, data_config.name)
  return records.map(decode)


def make_train_iterator(data_config: ml_collections.ConfigDict, *, seed: int,
                        process_index: int, process_count: int) -> grain.DatasetIterator:
  """Endless shuffled batches of data.train_split for this host.

  Args:
    data_config: config.data.
    seed: config.seed; orders records (reshuffled every epoch) and draws flips.
    process_index, process_count: this host and the number of hosts.
  Returns:
    A grain DatasetIterator of `Batch`es of b images, with get_state/set_state:
    after set_state(s) it yields exactly what it yielded after get_state() == s.
    A flip depends only on (seed, the image's position in the stream).
  """
  batch_size = sources.per_host_batch_size(data_config, process_count)
  ds = _host_source(data_config, data_config.train_split, "train_split",
                    process_index, process_count)
  ds = ds.seed(seed % 2**32).shuffle().repeat()
  if data_config.random_flip:
    ds = ds.random_map(_RandomFlip())
  ds = ds.batch(batch_size, drop_remainder=True).map(_ToBatch())
  return sources.prefetched(ds.to_iter_dataset(sources.READ_OPTIONS),
                           data_config.worker_count)


def make_eval_batches(data_config: ml_collections.ConfigDict, *, num_batches: int,
                      process_index: int, process_count: int) -> list[Batch]:
  """The first `num_batches` batches of data.eval_split for this host, in order.

  Deterministic (no shuffling, no flips); wraps around the split if it is too short.
  """
  batch_size = sources.per_host_batch_size(data_config, process_count)
  ds = _host_source(data_config, data_config.eval_split, "eval_split",
                    process_index, process_count)
  ds = ds.repeat().batch(batch_size, drop_remainder=True).map(_ToBatch())
  return [ds[i] for i in range(num_batches)]
