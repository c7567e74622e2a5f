"""TensorBoard event files, written directly: TFRecord framing around `Event` protos.

A training process writes its summaries here without TensorFlow or tensorboardX
(whose package import pulls torch into the process when torch is installed).
The few protobuf fields needed are encoded by hand; the field numbers are those
of TensorBoard's `event.proto` and `summary.proto`:

  Event          wall_time 1 (double), step 2 (int64), file_version 3, summary 5
  Summary        value 1 (repeated Value)
  Summary.Value  tag 1, simple_value 2 (float), image 4, histo 5
  Summary.Image  height 1, width 2, colorspace 3, encoded_image_string 4
  HistogramProto min 1, max 2, num 3, sum 4, sum_squares 5,
                 bucket_limit 6, bucket 7 (packed doubles)

Each record on disk is: uint64 length, uint32 masked CRC-32C of the length,
the bytes, uint32 masked CRC-32C of the bytes (little-endian).
"""

import io
import os
import socket
import struct
import time

import numpy as np

# Protobuf wire types.
_VARINT, _FIXED64, _LENGTH_DELIMITED, _FIXED32 = 0, 1, 2, 5
_HISTOGRAM_BUCKETS = 30
_COLORSPACES = {1: 1, 3: 3, 4: 4}  # Channels -> Summary.Image colorspace (grey, RGB, RGBA).


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord files use."""
  crc, table = 0xFFFFFFFF, _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
  crc = crc32c(data)
  return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, its checksum, the data, its checksum."""
  length = struct.pack("<Q", len(data))
  return length + _masked_crc(length) + data + _masked_crc(data)


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # Negative int64s take ten bytes, as in protobuf.
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _bytes_field(field: int, data: bytes) -> bytes:
  return _key(field, _LENGTH_DELIMITED) + _varint(len(data)) + data


def _double_field(field: int, value: float) -> bytes:
  return _key(field, _FIXED64) + struct.pack("<d", value)


def _int_field(field: int, value: int) -> bytes:
  return _key(field, _VARINT) + _varint(int(value))


def _packed_doubles(field: int, values: np.ndarray) -> bytes:
  return _bytes_field(field, np.asarray(values, "<f8").tobytes())


def scalar_value(tag: str, value: float) -> bytes:
  """A `Summary.Value` holding one scalar (stored as float32, as TensorBoard does)."""
  return _bytes_field(1, tag.encode()) + _key(2, _FIXED32) + struct.pack("<f", float(value))


def histogram_value(tag: str, values: np.ndarray) -> bytes | None:
  """A `Summary.Value` holding a histogram of the finite entries of `values`
  (None when there are none)."""
  values = np.asarray(values, np.float64).ravel()
  values = values[np.isfinite(values)]
  if not values.size:
    return None
  counts, edges = np.histogram(values, bins=_HISTOGRAM_BUCKETS)
  histogram = b"".join([
      _double_field(1, values.min()), _double_field(2, values.max()),
      _double_field(3, values.size), _double_field(4, values.sum()),
      _double_field(5, np.square(values).sum()),
      _packed_doubles(6, edges[1:]), _packed_doubles(7, counts)])
  return _bytes_field(1, tag.encode()) + _bytes_field(5, histogram)


def image_value(tag: str, image: np.ndarray) -> bytes:
  """A `Summary.Value` holding `image`, a uint8 array of shape (height, width, channels)
  with 1, 3 or 4 channels, PNG-encoded."""
  from PIL import Image  # pylint: disable=import-outside-toplevel  (only image logging needs it)
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in _COLORSPACES:
    raise ValueError(f"Image {tag!r} has dtype {image.dtype} and shape {image.shape}; "
                     "expected uint8 of shape (height, width, 3) (or 1 or 4 channels): "
                     "scale to [0, 255] and cast with .astype(np.uint8).")
  height, width, channels = image.shape
  png = io.BytesIO()
  Image.fromarray(image[..., 0] if channels == 1 else image).save(png, format="PNG")
  encoded = b"".join([_int_field(1, height), _int_field(2, width),
                      _int_field(3, _COLORSPACES[channels]), _bytes_field(4, png.getvalue())])
  return _bytes_field(1, tag.encode()) + _bytes_field(4, encoded)


def _event(step: int, payload: bytes) -> bytes:
  return _double_field(1, time.time()) + _int_field(2, step) + payload


class EventFileWriter:
  """Appends events to `logdir/events.out.tfevents.<time>.<host>.<pid>`, synchronously.

  >>> writer = EventFileWriter(logdir)
  >>> writer.write(10, [scalar_value('train/loss', 2.5)])
  >>> writer.close()
  """

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "ab")  # pylint: disable=consider-using-with
    self._file.write(tfrecord(_event(0, _bytes_field(3, b"brain.Event:2"))))

  def write(self, step: int, values: list[bytes]) -> None:
    """Writes one event holding the `Summary.Value`s made by the functions above."""
    summary = b"".join(_bytes_field(1, value) for value in values)
    self._file.write(tfrecord(_event(step, _bytes_field(5, summary))))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
