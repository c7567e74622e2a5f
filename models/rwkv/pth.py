"""BlinkDL RWKV-7 `.pth` checkpoints (the layout the `rwkv` package loads), both ways, without torch.

A torch `.pth` is a zip archive: `<stem>/data.pkl` (a pickled dict whose
tensors are `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)` calls and whose storages are persistent ids naming `<stem>/data/<key>`),
the raw little-endian storages, and a few small marker files. `read_pth`
unpickles it with a restricted unpickler that resolves only those names (no
other class or function can load), into numpy arrays; `write_pth` writes the
same opcodes and archive layout (storages 64-byte aligned, as torch writes
them), which `torch.load` (weights_only) and the `rwkv` package read.

Key layout (C = e channels, H heads of N = d, V vocab; torch Linear weights
are [out, in], Treadle kernels [in, out]):
  emb.weight [V, C]; blocks.0.ln0.{weight, bias}; blocks.i.ln1/ln2.{weight, bias};
  blocks.i.att.x_{r,w,k,v,a,g}, w0, a0, v0, k_k, k_a [1, 1, C];
  att.w1 [C, R_w], w2 [R_w, C] (a1/a2, v1/v2, g1/g2 likewise; v* only for i > 0);
  att.r_k [H, N]; att.{receptance, key, value, output}.weight [C, C];
  att.ln_x.{weight, bias} [C]; ffn.x_k [1, 1, C]; ffn.key.weight [m, C];
  ffn.value.weight [C, m]; ln_out.{weight, bias}; head.weight [V, C].

Shapes (layers/__init__.py): e embed, v vocab, h heads, d head size, m hidden, L layers.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import jax
import ml_dtypes
import numpy as np

from models.family import Converter
from models.llama.hf import TensorReader, as_numpy
from models.rwkv.config import RwkvConfig

# torch storage class name <-> numpy dtype.
_STORAGES = {"FloatStorage": np.dtype(np.float32), "HalfStorage": np.dtype(np.float16),
             "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
             "DoubleStorage": np.dtype(np.float64), "LongStorage": np.dtype(np.int64),
             "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
             "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8),
             "BoolStorage": np.dtype(np.bool_)}
_ALIGNMENT = 64


class _StorageType:
  """Stands in for `torch.<X>Storage` while unpickling."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata.
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(storage[offset:], shape=tuple(size),
                                         strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  del unused
  return data


class _Unpickler(pickle.Unpickler):
  """Resolves only the names a torch state dict uses; anything else is an error."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, stem: str):
    super().__init__(io.BytesIO(data))
    self.archive, self.stem = archive, stem

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name in _STORAGES:
      return _StorageType(_STORAGES[name])
    raise pickle.UnpicklingError(f".pth refers to {module}.{name}, which a plain tensor "
                                 "state dict does not use; refusing to load it.")

  def persistent_load(self, pid):
    kind, storage_type, key, _, numel = pid
    if kind != "storage" or not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f"Unexpected persistent id {pid!r} in the .pth.")
    raw = self.archive.read(f"{self.stem}/data/{key}")
    return np.frombuffer(raw, storage_type.dtype, count=int(numel))


def read_pth(path: str) -> dict[str, np.ndarray]:
  """A torch-saved (zip format) dict of tensors -> {name: numpy array}."""
  with zipfile.ZipFile(path) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
    if len(pickles) != 1:
      raise ValueError(f"{path} is not a torch zip checkpoint (no single */data.pkl); "
                       "legacy (pre-1.6) .pth files are not supported.")
    stem = pickles[0][:-len("/data.pkl")]
    order = archive.read(f"{stem}/byteorder").decode() if (
        f"{stem}/byteorder" in archive.namelist()) else "little"
    if order.strip() != "little":
      raise ValueError(f"{path} is {order}-endian; only little-endian .pth files are supported.")
    tensors = _Unpickler(archive.read(pickles[0]), archive, stem).load()
  if not isinstance(tensors, dict):
    raise ValueError(f"{path} does not hold a dict of tensors.")
  return dict(tensors)


def _pickle_state_dict(tensors: dict[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
  """Protocol-2 opcodes of {name: tensor} as torch.save writes them, and the storages."""
  names = {dtype: name for name, dtype in _STORAGES.items()}
  out = io.BytesIO()
  put = out.write
  def global_(module: str, name: str):
    put(b"c" + module.encode() + b"\n" + name.encode() + b"\n")
  def text(s: str):
    raw = s.encode("utf-8")
    put(b"X" + struct.pack("<I", len(raw)) + raw)
  def integer(i: int):
    if 0 <= i < 2 ** 31:
      put(b"J" + struct.pack("<i", i))
    else:
      raw = i.to_bytes((i.bit_length() + 8) // 8, "little", signed=True)
      put(b"\x8a" + bytes([len(raw)]) + raw)
  def int_tuple(values):
    put(b"(")
    for v in values:
      integer(int(v))
    put(b"t")

  storages = []
  put(b"\x80\x02}(")  # PROTO 2, EMPTY_DICT, MARK
  for name, array in tensors.items():
    array = np.ascontiguousarray(array)
    if array.dtype not in names:
      raise ValueError(f"Tensor {name!r} has dtype {array.dtype}, which .pth cannot hold here.")
    text(name)
    global_("torch._utils", "_rebuild_tensor_v2")
    put(b"((")  # the args tuple, then the persistent id tuple
    text("storage")
    global_("torch", names[array.dtype])
    text(str(len(storages)))
    text("cpu")
    integer(array.size)
    put(b"tQ")  # TUPLE, BINPERSID
    integer(0)
    int_tuple(array.shape)
    strides = [int(np.prod(array.shape[i + 1:], dtype=np.int64)) for i in range(array.ndim)]
    int_tuple(strides)
    put(b"\x89")  # NEWFALSE (requires_grad)
    global_("collections", "OrderedDict")
    put(b")Rt")  # backward hooks = OrderedDict(); close the args tuple
    put(b"R")  # REDUCE
    storages.append(array)
  put(b"u.")  # SETITEMS, STOP
  return out.getvalue(), storages


def _write_aligned(archive: zipfile.ZipFile, name: str, data: bytes) -> None:
  """Stores `data` uncompressed with its first byte at a multiple of 64 in the file."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  start = archive.fp.tell() + 30 + len(name.encode()) + 4
  pad = (-start) % _ALIGNMENT
  info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding record
  archive.writestr(info, data)


def write_pth(path: str, tensors: dict[str, np.ndarray]) -> None:
  """Writes {name: array} as a torch zip checkpoint (`torch.load` and the `rwkv` package read it)."""
  stem = os.path.splitext(os.path.basename(path))[0] or "archive"
  pickled, storages = _pickle_state_dict(tensors)
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
    _write_aligned(archive, f"{stem}/data.pkl", pickled)
    _write_aligned(archive, f"{stem}/byteorder", b"little")
    for key, array in enumerate(storages):
      _write_aligned(archive, f"{stem}/data/{key}", array.tobytes())
    _write_aligned(archive, f"{stem}/version", b"3\n")


# ---- RWKV-7 params <-> .pth keys ---------------------------------------------------------

_LERPS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")
_LOW_RANK = (("w", "decay_rank"), ("a", "iclr_rank"), ("v", "value_rank"), ("g", "gate_rank"))


def model_config_from_pth(tensors: dict[str, np.ndarray]) -> dict:
  """`config.model` field values inferred from the .pth tensor shapes.

  Raises:
    ValueError: naming a missing key, or a DeepEmbed / other variant this family lacks.
  """
  for key in ("emb.weight", "blocks.0.att.r_k", "blocks.0.ffn.key.weight", "blocks.0.att.w1"):
    if key not in tensors:
      raise ValueError(f".pth has no {key!r}: not an RWKV-7 checkpoint in BlinkDL's layout.")
  if any(".s_emb" in k or ".s1" in k for k in tensors):
    raise ValueError(".pth is a DeepEmbed RWKV-7 (ffn.s_emb/s1/s2/s0); Treadle's RWKV-7 "
                     "has no DeepEmbed.")
  vocab, embed = tensors["emb.weight"].shape
  heads, head_size = tensors["blocks.0.att.r_k"].shape
  layers = 1 + max(int(k.split(".")[1]) for k in tensors if k.startswith("blocks."))
  ranks = {field: int(tensors[f"blocks.0.att.{c}1"].shape[1]) for c, field in _LOW_RANK
           if f"blocks.0.att.{c}1" in tensors}
  if layers > 1:
    ranks["value_rank"] = int(tensors["blocks.1.att.v1"].shape[1])
  if heads * head_size != embed:
    raise ValueError(f".pth r_k is [{heads}, {head_size}] but emb.weight is {embed} wide.")
  return dict(vocab_size=int(vocab), embed_dim=int(embed), num_layers=layers,
              head_size=int(head_size), hidden_dim=int(tensors["blocks.0.ffn.key.weight"].shape[0]),
              max_seq_len=4096, **ranks)


def _block_from_pth(reader: TensorReader, i: int, cfg: RwkvConfig) -> dict:
  e, h, d, m = cfg.embed_dim, cfg.num_heads, cfg.head_size, cfg.hidden_dim
  p = f"blocks.{i}."
  vec = lambda name: reader.take(p + name, (1, 1, e)).reshape(e)  # noqa: E731
  att = {name: vec("att." + name) for name in _LERPS + ("w0", "a0")}
  for c, field in _LOW_RANK:
    if c == "v" and i == 0:
      continue
    rank = getattr(cfg, field)
    att[f"{c}1"] = reader.take(f"{p}att.{c}1", (e, rank))
    att[f"{c}2"] = reader.take(f"{p}att.{c}2", (rank, e))
  if i > 0:
    att["v0"] = vec("att.v0")
  for name in ("k_k", "k_a"):
    att[name] = vec("att." + name).reshape(h, d)
  att["r_k"] = reader.take(p + "att.r_k", (h, d))
  for name in ("receptance", "key", "value"):
    att[name] = {"kernel": reader.take(f"{p}att.{name}.weight", (e, e)).T.reshape(e, h, d)}
  att["output"] = {"kernel": reader.take(p + "att.output.weight", (e, e)).T.reshape(h, d, e)}
  att["ln_x_scale"] = reader.take(p + "att.ln_x.weight", (e,)).reshape(h, d)
  att["ln_x_bias"] = reader.take(p + "att.ln_x.bias", (e,)).reshape(h, d)
  norm = lambda name: {"scale": reader.take(f"{p}{name}.weight", (e,)),  # noqa: E731
                       "bias": reader.take(f"{p}{name}.bias", (e,))}
  ffn = {"x_k": vec("ffn.x_k"),
         "key": {"kernel": reader.take(p + "ffn.key.weight", (m, e)).T},
         "value": {"kernel": reader.take(p + "ffn.value.weight", (e, m)).T}}
  return {"ln1": norm("ln1"), "att": att, "ln2": norm("ln2"), "ffn": ffn}


def params_from_pth(tensors: dict[str, np.ndarray], cfg: RwkvConfig) -> dict:
  """.pth tensors -> plain Treadle params in `param_dtype`, the tree of
  `nn.unbox(Rwkv(cfg).init(...)['params'])`.

  Raises:
    ValueError: naming a tensor that is missing, has the wrong shape, or is unused.
  """
  reader = TensorReader({k: np.asarray(w, np.float32) for k, w in tensors.items()})
  v, e = cfg.vocab_size, cfg.embed_dim
  blocks = [_block_from_pth(reader, i, cfg) for i in range(cfg.num_layers)]
  # Some published files carry unused value-residual weights in block 0; the package ignores them.
  reader.used.update(k for k in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")
                     if k in tensors)
  params = {"embed": {"embedding": reader.take("emb.weight", (v, e))},
            "ln0": {"scale": reader.take("blocks.0.ln0.weight", (e,)),
                    "bias": reader.take("blocks.0.ln0.bias", (e,))},
            "ln_out": {"scale": reader.take("ln_out.weight", (e,)),
                       "bias": reader.take("ln_out.bias", (e,))},
            "head": {"kernel": reader.take("head.weight", (v, e)).T},
            "layers_0": blocks[0]}
  rest = blocks[1:]
  if rest and cfg.scan_layers:
    params["layers"] = jax.tree.map(lambda *ws: np.stack(ws), *rest)
  else:
    params.update({f"layers_{i + 1}": block for i, block in enumerate(rest)})
  reader.check_all_used("RWKV-7")
  return as_numpy(params, np.dtype(jax.numpy.dtype(cfg.param_dtype)))


def pth_from_params(params, cfg: RwkvConfig) -> dict[str, np.ndarray]:
  """Treadle params (boxed or plain, any device) -> .pth tensors (float32)."""
  params = as_numpy(params, np.float32)
  e = cfg.embed_dim
  out = {"emb.weight": params["embed"]["embedding"]}
  for i in range(cfg.num_layers):
    if i == 0:
      block = params["layers_0"]
    elif cfg.scan_layers:
      block = jax.tree.map(lambda w, i=i: w[i - 1], params["layers"])
    else:
      block = params[f"layers_{i}"]
    p = f"blocks.{i}."
    if i == 0:
      out[p + "ln0.weight"], out[p + "ln0.bias"] = params["ln0"]["scale"], params["ln0"]["bias"]
    for norm in ("ln1", "ln2"):
      out[f"{p}{norm}.weight"], out[f"{p}{norm}.bias"] = (block[norm]["scale"],
                                                          block[norm]["bias"])
    att = block["att"]
    for name in _LERPS + ("w0", "a0", "k_k", "k_a") + (("v0",) if i > 0 else ()):
      out[p + "att." + name] = att[name].reshape(1, 1, e)
    for c, _ in _LOW_RANK:
      if c == "v" and i == 0:
        continue
      out[f"{p}att.{c}1"], out[f"{p}att.{c}2"] = att[f"{c}1"], att[f"{c}2"]
    out[p + "att.r_k"] = att["r_k"]
    for name in ("receptance", "key", "value"):
      out[f"{p}att.{name}.weight"] = att[name]["kernel"].reshape(e, e).T
    out[p + "att.output.weight"] = att["output"]["kernel"].reshape(e, e).T
    out[p + "att.ln_x.weight"] = att["ln_x_scale"].reshape(e)
    out[p + "att.ln_x.bias"] = att["ln_x_bias"].reshape(e)
    out[p + "ffn.x_k"] = block["ffn"]["x_k"].reshape(1, 1, e)
    out[p + "ffn.key.weight"] = block["ffn"]["key"]["kernel"].T
    out[p + "ffn.value.weight"] = block["ffn"]["value"]["kernel"].T
  out["ln_out.weight"], out["ln_out.bias"] = params["ln_out"]["scale"], params["ln_out"]["bias"]
  out["head.weight"] = params["head"]["kernel"].T
  return {name: np.ascontiguousarray(w) for name, w in out.items()}


def read_checkpoint(path: str) -> tuple[RwkvConfig, dict]:
  """A BlinkDL RWKV-7 .pth -> (model config, plain params)."""
  tensors = read_pth(path)
  cfg = RwkvConfig.from_dict(model_config_from_pth(tensors))
  return cfg, params_from_pth(tensors, cfg)


def write_checkpoint(path: str, cfg: RwkvConfig, variables: dict) -> list[str]:
  """Writes a float32 .pth that the `rwkv` package (RWKV_V7_ON=1) loads; `path` is the
  file, or a directory that gets `model.pth` (the package takes the path without '.pth')."""
  if not path.endswith(".pth"):
    os.makedirs(path, exist_ok=True)
    path = os.path.join(path, "model.pth")
  write_pth(path, pth_from_params(variables["params"], cfg))
  return [path]


RWKV7_PTH = Converter("a BlinkDL RWKV-7 .pth checkpoint (the `rwkv` package's layout; read and "
                      "written without torch)", read_checkpoint, write_checkpoint)
