"""The `treadle_shapes` TFDS builder: `shapes.shape_example` as a dataset.

Like `treadle_corpus` it is written as array_record and read with
`tfds.data_source`, without TensorFlow; `train.data.builder.ensure_dataset`
builds it on first use. Configs: `treadle_shapes` (= `treadle_shapes/default`,
20k train / 1k validation images, built in a few seconds) and
`treadle_shapes/tiny` (for tests).

Images are stored as a `tfds.features.Image` (PNG), the feature real image
datasets (mnist, cifar10) use, so one reader serves both. tfds encodes a numpy
array to PNG through TensorFlow, but passes encoded bytes through untouched,
so the generator encodes with Pillow; reading decodes with Pillow (or OpenCV
when installed).
"""

import dataclasses
import io

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from etils import epath

from train.data.images import shapes

SHAPES_NAME = "treadle_shapes"
IMAGE_SIZE = 32


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
  """Size of a treadle_shapes variant.

  Attributes:
    num_train: images in the 'train' split.
    num_validation: images in the 'validation' split.
    image_size: height and width of the images.
  """
  num_train: int = 20_000
  num_validation: int = 1_000
  image_size: int = IMAGE_SIZE


def encode_png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (fast compression: the files are small anyway)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG", compress_level=1)
  return buffer.getvalue()


class TreadleShapes(tfds.core.GeneratorBasedBuilder):
  """One bright shape per image on a dark background; the label is its kind."""

  # tfds derives this from the package with `importlib_resources`, which need
  # not be installed; this file is the answer it would find.
  code_path = epath.Path(__file__)
  # Bump whenever `shapes` changes what it draws: a data_dir keeps one build
  # per version, so a stale build is never read for new code.
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release: 8 shape kinds, 32x32 RGB."}
  BUILDER_CONFIGS = [
      ShapesConfig(name="default", description="The default training images."),
      ShapesConfig(name="tiny", num_train=512, num_validation=128,
                   description="A few images, for tests."),
      ShapesConfig(name="64px", num_train=5_000, num_validation=500, image_size=64,
                   description="64x64 images (benchmarks, larger models)."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=shapes.__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(self.builder_config.image_size,) * 2 + (3,),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=shapes.CLASS_NAMES),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    sizes = {"train": self.builder_config.num_train,
             "validation": self.builder_config.num_validation}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num: int):
    for i in range(num):
      image, label = shapes.shape_example(split, i, self.builder_config.image_size)
      yield i, {"image": encode_png(image), "label": label}
