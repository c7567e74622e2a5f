"""TensorBoard event files written without tensorboardX: read back by an independent parser."""

import io
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from train import metrics
from train import tensorboard_events

# tensorboardX's generated protos and CRC are the independent reader (its
# package import may load torch; only this test process pays for that).
event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
tbx_record_writer = pytest.importorskip("tensorboardX.record_writer")


def _read_events(logdir: str) -> list:
  """Every Event in the one event file of `logdir`, checking each record's checksums."""
  (name,) = [n for n in os.listdir(logdir) if n.startswith("events.out.tfevents.")]
  with open(os.path.join(logdir, name), "rb") as f:
    data = f.read()
  events, offset = [], 0
  while offset < len(data):
    header = data[offset:offset + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[offset + 8:offset + 12])
    assert length_crc == tbx_record_writer.masked_crc32c(header)
    body = data[offset + 12:offset + 12 + length]
    (body_crc,) = struct.unpack("<I", data[offset + 12 + length:offset + 16 + length])
    assert body_crc == tbx_record_writer.masked_crc32c(body)
    events.append(event_pb2.Event.FromString(body))
    offset += 16 + length
  return events


def _values(events) -> dict:
  """(step, tag) -> Summary.Value, over all summary events."""
  return {(event.step, value.tag): value for event in events if event.HasField("summary")
          for value in event.summary.value}


def test_crc32c_matches_the_standard_check_value():
  assert tensorboard_events.crc32c(b"123456789") == 0xE3069283


def test_scalars_arrays_and_histograms_read_back(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  big = np.linspace(-1.0, 1.0, metrics.MAX_TB_SCALARS + 36)
  writer.write(3, {"loss": 2.5, "per_layer": np.array([0.5, 1.5]), "weights": big})
  writer.write(7, {"loss": 1.25}, split="eval")
  writer.close()
  events = _read_events(str(tmp_path / "tensorboard"))
  assert events[0].file_version == "brain.Event:2"
  values = _values(events)
  assert values[(3, "train/loss")].simple_value == 2.5
  assert values[(3, "train/per_layer/1")].simple_value == 1.5
  assert values[(7, "eval/loss")].simple_value == 1.25
  histogram = values[(3, "train/weights")].histo
  assert histogram.num == big.size and sum(histogram.bucket) == big.size
  assert (histogram.min, histogram.max) == (-1.0, 1.0)
  assert histogram.bucket_limit[-1] == 1.0 and len(histogram.bucket_limit) == len(
      histogram.bucket)


def test_images_read_back_as_png(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, size=(12, 20, 3), dtype=np.uint8)
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write_images(5, {"samples/grid": grid})
  writer.close()
  image = _values(_read_events(str(tmp_path / "tensorboard")))[(5, "samples/grid")].image
  assert (image.height, image.width, image.colorspace) == (12, 20, 3)
  decoded = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)))
  np.testing.assert_array_equal(decoded, grid)


def test_images_of_the_wrong_dtype_are_refused(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  with pytest.raises(ValueError, match="uint8 of shape"):
    writer.write_images(1, {"samples": np.zeros((4, 4, 3), np.float32)})
  writer.close()


def test_writing_metrics_does_not_import_torch(tmp_path):
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from train import metrics
      writer = metrics.MetricWriter({str(tmp_path)!r})
      writer.write(1, {{"loss": 1.0, "weights": np.arange(100.0)}})
      writer.write_images(1, {{"grid": np.zeros((4, 4, 3), np.uint8)}})
      writer.close()
      assert "torch" not in sys.modules, "torch was imported"
      assert "tensorboardX" not in sys.modules, "tensorboardX was imported"
      """)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=120, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
