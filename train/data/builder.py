"""The `treadle_corpus` TFDS builder and `ensure_dataset`, which finds data.

`treadle_corpus` writes `corpus.document(split, i)` to array_record files, so
it reads through `tfds.data_source` like any prepared TFDS dataset, without
TensorFlow. Configs: `treadle_corpus` (= `treadle_corpus/default`, 50k train
documents, built in a few seconds) and `treadle_corpus/tiny` (for tests).

`ensure_dataset(config.data.name, config.data.data_dir)` builds the corpus (and
the embedded image dataset, `treadle_shapes`, see train/data/images/builder.py)
on first use; any other dataset must already be prepared in data_dir as
array_record (nothing is downloaded at run time).
"""

import dataclasses
import logging
import os
import shutil
import tempfile

import tensorflow_datasets as tfds
from etils import epath

from train.data import corpus
from train.data.images import builder as images_builder

CORPUS_NAME = "treadle_corpus"
DEFAULT_DATA_DIR = os.path.join("~", ".cache", "treadle", "tfds")
# Datasets generated here, built on first use (the import registers their builders).
EMBEDDED_NAMES = (CORPUS_NAME, images_builder.SHAPES_NAME)


@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
  """Size of a treadle_corpus variant.

  Attributes:
    num_train: documents in the 'train' split.
    num_validation: documents in the 'validation' split.
  """
  num_train: int = 50_000
  num_validation: int = 2_000


class TreadleCorpus(tfds.core.GeneratorBasedBuilder):
  """Procedural additions and grammar sentences; one feature, 'text'."""

  # tfds derives this from the package with `importlib_resources`, which need
  # not be installed; this file is the answer it would find.
  code_path = epath.Path(__file__)
  # Bump whenever `corpus` changes what it generates: a data_dir keeps one
  # build per version, so a stale build is never read for new code.
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "80% of lines are additions (was 50%): learnable in minutes."}
  BUILDER_CONFIGS = [
      CorpusConfig(name="default", description="The default training corpus."),
      CorpusConfig(name="tiny", num_train=256, num_validation=64,
                   description="A few documents, for tests."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=corpus.__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    sizes = {"train": self.builder_config.num_train,
             "validation": self.builder_config.num_validation}
    return {split: self._generate_examples(split, n) for split, n in sizes.items()}

  def _generate_examples(self, split: str, num: int):
    for i in range(num):
      yield i, {"text": corpus.document(split, i)}


def resolve_data_dir(data_dir: str) -> str:
  """'' -> $TREADLE_DATA_DIR or ~/.cache/treadle/tfds; paths are expanded."""
  if not data_dir:
    data_dir = os.environ.get("TREADLE_DATA_DIR") or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(data_dir))


def _prepared_builder(name: str, data_dir: str):
  """The builder when `name` is prepared in data_dir, else None."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    return None
  return builder if builder.is_prepared() else None


def _build_corpus(name: str, data_dir: str) -> None:
  """Builds in a private temp dir, then renames into place (atomic).

  Two processes starting at once may both build; the first rename wins and the
  other discards its copy, so readers never see a half-written dataset.
  """
  os.makedirs(data_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".treadle_build-", dir=data_dir)
  try:
    builder = tfds.builder(name, data_dir=tmp, file_format="array_record")
    builder.download_and_prepare()
    final = os.path.join(data_dir, os.path.relpath(builder.data_dir, tmp))
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
      os.rename(builder.data_dir, final)
      logging.info("Built %s into %s.", name, final)
    except OSError:
      if _prepared_builder(name, data_dir) is None:
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def ensure_dataset(name: str, data_dir: str) -> str:
  """Returns the resolved data_dir holding `name`, building embedded datasets.

  Args:
    name: config.data.name, a TFDS name such as 'treadle_corpus', 'lm1b',
      'treadle_corpus/tiny', 'treadle_shapes' or 'wiki40b/en:1.3.0'.
    data_dir: config.data.data_dir ('' for the default cache).
  Raises:
    FileNotFoundError: `name` is not prepared there and cannot be built here.
    ValueError: it is prepared, but not as array_record.
  """
  data_dir = resolve_data_dir(data_dir)
  builder = _prepared_builder(name, data_dir)
  if builder is None and name.split("/")[0].split(":")[0] in EMBEDDED_NAMES:
    _build_corpus(name, data_dir)
    builder = _prepared_builder(name, data_dir)
  if builder is None:
    raise FileNotFoundError(
        f"Dataset config.data.name={name!r} is not prepared in "
        f"config.data.data_dir={data_dir!r}, and nothing is downloaded at run "
        f"time. Fix: on a machine with internet run `tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record` (or copy the "
        f"prepared dataset into that directory), or set config.data.data_dir "
        f"to where it is prepared.")
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != "array_record":
    raise ValueError(
        f"Dataset config.data.name={name!r} in config.data.data_dir="
        f"{data_dir!r} is prepared as {file_format.value}; the input pipeline "
        f"reads array_record. Rebuild it with `tfds build {name} "
        f"--data_dir={data_dir} --file_format=array_record`.")
  return data_dir
