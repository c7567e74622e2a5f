"""Image pipeline: batch layout, flips, exact resume, hosts, eval, any TFDS image dataset, errors."""

import io

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds
from etils import epath

from helpers.batches import assert_same_batches, take
from helpers.images import SHAPES_TINY, image_data_config
from train.data import builder
from train.data.images import pipeline
from train.data.images import shapes


class TreadleTestDigits(tfds.core.GeneratorBasedBuilder):
  """A stand-in for mnist: Image(shape=(28, 28, 1)) + ClassLabel, plus odd features."""

  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("0.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),  # As tfds's mnist declares it.
        "label": tfds.features.ClassLabel(names=["zero", "one", "two"]),
        "pixels": tfds.features.Tensor(shape=(28, 28), dtype=np.uint8),  # Grey, no channel axis.
        "thumbnail": tfds.features.Image(shape=(None, None, 1)),  # Size known per example only.
        "value": tfds.features.Scalar(np.int64),
        "caption": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples("train", 24), "test": self._generate_examples("test", 6)}

  def _generate_examples(self, split, n):
    for i in range(n):
      pixels = digit(split, i)
      yield i, {"image": _png(pixels[..., None]), "label": i % 3, "pixels": pixels,
                "thumbnail": _png(pixels[::2, ::2, None]), "value": i, "caption": f"{split} {i}"}


def digit(split, i):
  """uint8 [28, 28]: a stripe pattern unique to (split, i)."""
  rng = np.random.default_rng([len(split), i])
  return rng.integers(0, 256, size=(28, 28), dtype=np.uint8)


def _png(image):
  """tfds encodes numpy images with TensorFlow; encoded bytes pass straight through."""
  buffer = io.BytesIO()
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return builder.ensure_dataset(SHAPES_TINY, str(tmp_path_factory.mktemp("tfds")))


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("digits"))
  TreadleTestDigits(data_dir=path, file_format="array_record").download_and_prepare()
  return path


@pytest.fixture
def iterators():
  """Makes train iterators and closes them (their prefetch threads) after the test."""
  made = []

  def make(config, seed=0, process_index=0, process_count=1):
    made.append(pipeline.make_train_iterator(config, seed=seed, process_index=process_index,
                                             process_count=process_count))
    return made[-1]

  yield make
  for it in made:
    it.close()


def _as_uint8(images):
  pixels = (images + 1) * 127.5
  np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-3)  # Exact steps of 2/255.
  return np.rint(pixels).astype(np.uint8)


def _shapes_split(split, n):
  """{image bytes: label} of the first n shapes of `split` (= the tiny split when n is its size)."""
  return {shapes.shape_example(split, i)[0].tobytes(): shapes.shape_example(split, i)[1]
          for i in range(n)}


def test_first_epoch_is_the_whole_split_with_its_labels(data_dir, iterators):
  it = iterators(image_data_config(data_dir))
  batches = take(it, 512 // 16)
  seen = {}
  for batch in batches:
    assert set(batch) == {"images", "labels"}
    assert batch["images"].shape == (16, 32, 32, 3) and batch["images"].dtype == np.float32
    assert batch["labels"].shape == (16,) and batch["labels"].dtype == np.int32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    for image, label in zip(_as_uint8(batch["images"]), batch["labels"]):
      seen[image.tobytes()] = int(label)
  assert seen == _shapes_split("train", 512)  # Each image once, with its own label.
  assert len({b["labels"][:8].tobytes() for b in batches}) > 1  # Shuffled.


def test_flips_are_random_and_only_flips(data_dir, iterators):
  plain = take(iterators(image_data_config(data_dir), seed=5), 4)
  flipped = take(iterators(image_data_config(data_dir, random_flip=True), seed=5), 4)
  mirrored = 0
  for a, b in zip(plain, flipped):
    np.testing.assert_array_equal(a["labels"], b["labels"])  # Same order: flips only.
    for x, y in zip(a["images"], b["images"]):
      if np.array_equal(x, y[:, ::-1]) and not np.array_equal(x, y):
        mirrored += 1
      else:
        np.testing.assert_array_equal(x, y)
  assert 16 <= mirrored <= 48, mirrored  # About half of 64.


def test_resume_from_state_is_exact_with_flips(data_dir, iterators):
  config = image_data_config(data_dir, random_flip=True, global_batch_size=64)
  it = iterators(config, seed=3)
  first = take(it, 3)
  state = it.get_state()
  expected = take(it, 7)  # Crosses the end of the first epoch (8 batches).
  assert_same_batches(take(iterators(config, seed=3), 3), first)
  resumed = iterators(config, seed=3)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 7), expected)
  other = next(iterators(config, seed=4))
  assert not np.array_equal(other["images"], first[0]["images"])


def test_a_worker_process_yields_the_same_batches(data_dir, iterators):
  """The transforms travel to grain's worker processes (they pickle)."""
  config = image_data_config(data_dir, random_flip=True)
  expected = take(iterators(config), 2)
  config.worker_count = 1
  assert_same_batches(take(iterators(config), 2), expected)


def test_hosts_read_disjoint_slices(data_dir, iterators):
  source = tfds.data_source(SHAPES_TINY, split="train", data_dir=data_dir, download=False)
  seen = []
  for index in range(2):
    batches = take(iterators(image_data_config(data_dir), process_index=index,
                              process_count=2), 256 // 8)
    assert batches[0]["images"].shape == (8, 32, 32, 3)
    images = {x.tobytes() for b in batches for x in _as_uint8(b["images"])}
    assert images == {source[i]["image"].tobytes() for i in range(index, 512, 2)}
    seen.append(images)
  assert not seen[0] & seen[1]


def test_eval_batches_are_fixed_unflipped_and_in_order(data_dir):
  config = image_data_config(data_dir, random_flip=True)
  a = pipeline.make_eval_batches(config, num_batches=9, process_index=0, process_count=1)
  b = pipeline.make_eval_batches(config, num_batches=9, process_index=0, process_count=1)
  assert_same_batches(a, b)
  source = tfds.data_source(SHAPES_TINY, split="validation", data_dir=data_dir, download=False)
  stored = [source[i % 128] for i in range(9 * 16)]  # 128 images: the 9th batch wraps around.
  np.testing.assert_array_equal(_as_uint8(np.concatenate([x["images"] for x in a])),
                                np.stack([s["image"] for s in stored]))
  np.testing.assert_array_equal(np.concatenate([x["labels"] for x in a]),
                                [s["label"] for s in stored])
  host1 = pipeline.make_eval_batches(config, num_batches=1, process_index=1, process_count=2)
  np.testing.assert_array_equal(_as_uint8(host1[0]["images"]),
                                np.stack([source[i]["image"] for i in range(1, 16, 2)]))


def test_dataset_info(data_dir, digits_dir):
  info = pipeline.dataset_info(image_data_config(data_dir))
  assert info == pipeline.ImageInfo(32, 32, 3, 8, shapes.CLASS_NAMES)
  digits = image_data_config(digits_dir, name="treadle_test_digits", image_size=28)
  assert pipeline.dataset_info(digits) == pipeline.ImageInfo(28, 28, 1, 3, ("zero", "one", "two"))
  digits.label_key = ""
  assert pipeline.dataset_info(digits) == pipeline.ImageInfo(28, 28, 1, 0, ())


@pytest.mark.parametrize("image_key", ["image", "pixels"])
def test_a_real_style_grey_dataset_by_name(digits_dir, iterators, image_key):
  config = image_data_config(digits_dir, name="treadle_test_digits", image_key=image_key,
                             image_size=28, eval_split="test", global_batch_size=8,
                             random_flip=True)
  train = {digit("train", i).tobytes(): i % 3 for i in range(24)}
  it = iterators(config)
  for batch in take(it, 3):  # One epoch.
    assert batch["images"].shape == (8, 28, 28, 1)
    for image, label in zip(_as_uint8(batch["images"])[..., 0], batch["labels"]):
      assert train.get(image.tobytes(), train.get(image[:, ::-1].tobytes())) == label
  evals = pipeline.make_eval_batches(config, num_batches=1, process_index=0, process_count=1)
  test = tfds.data_source("treadle_test_digits", split="test", data_dir=digits_dir, download=False)
  np.testing.assert_array_equal(_as_uint8(evals[0]["images"][:6, ..., 0]),
                                np.stack([digit("test", int(test[i]["value"])) for i in range(6)]))


def test_unlabelled_and_per_example_sizes(digits_dir, iterators):
  config = image_data_config(digits_dir, name="treadle_test_digits", image_key="thumbnail",
                             label_key="", image_size=14, global_batch_size=4,
                             eval_split="test")
  batch = next(iterators(config))
  assert batch["images"].shape == (4, 14, 14, 1)
  np.testing.assert_array_equal(batch["labels"], np.zeros(4, np.int32))
  config.image_size = 28  # Unknown until an image is read: the error comes then.
  with pytest.raises(ValueError, match=r"config.data.image_size=28 .*\(14, 14\)"):
    pipeline.make_eval_batches(config, num_batches=1, process_index=0, process_count=1)


@pytest.mark.parametrize("overrides, error, words", [  # process_count = global_batch_size.
    (dict(image_size=32), ValueError, ["config.data.image_size=32", "28x28", "image_size=28"]),
    (dict(train_split="training"), ValueError, ["config.data.train_split='training'"]),
    (dict(image_key="img"), KeyError, ["config.data.image_key='img'", "'image'", "'pixels'"]),
    (dict(label_key="digit"), KeyError, ["config.data.label_key='digit'", "'label'"]),
    (dict(label_key="value"), ValueError, ["config.data.label_key='value'", "ClassLabel"]),
    (dict(image_key="caption"), ValueError, ["config.data.image_key='caption'", "uint8"]),
    (dict(global_batch_size=32), ValueError, ["has 24 records", "32 processes"]),
])
def test_bad_configs_name_the_field(digits_dir, overrides, error, words):
  config = image_data_config(digits_dir, name="treadle_test_digits", image_size=28,
                             global_batch_size=1)
  config.update(overrides)
  with pytest.raises(error) as e:
    pipeline.make_train_iterator(config, seed=0, process_index=0,
                                 process_count=config.global_batch_size)
  for word in words:
    assert word in str(e.value), (word, str(e.value))
