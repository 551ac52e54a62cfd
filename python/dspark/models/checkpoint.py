"""Reading model folders defensively: every failure is a CheckpointError that
names the file and the field, and nothing is allocated from a file's claims
before they have been checked against the files themselves.

- JSON files (``config.json``, the shard index, ``sts.json``) are read with a
  size limit, from regular files only (a FIFO or a device would block or never
  end), and parsed strictly (no NaN, no duplicate keys).
- A config is checked against tables of :class:`Field` s (type, range,
  default) before anything reads it (:func:`validate_fields`), and its rotary
  settings by :func:`validate_rope`.
- Safetensors headers are parsed here (8-byte little-endian length, then JSON)
  with a size limit; every tensor's dtype, shape and byte range is checked
  against its file (:class:`Checkpoint`). A config's sizes are bounded by what
  the files hold (:meth:`Checkpoint.bound`), so that the model can be built on
  the meta device; :meth:`Checkpoint.meta_tensors` gives the files' tensors as
  meta tensors (shapes and dtypes, no data), on which a loader runs its whole
  assembly once (names, shapes, dtypes through ``load_state``) before any
  memory is allocated. Only then does the safetensors library read the data.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .common import CheckpointError

PathLike = Union[str, Path]

MAX_JSON_BYTES = 64 << 20  # config.json, the shard index, sts.json
MAX_HEADER_BYTES = 100_000_000  # a safetensors header (the safetensors library's own limit)
INDEX_FILENAME = "model.safetensors.index.json"

# safetensors dtype -> (bytes per element, torch dtype or None when torch lacks it)
SAFETENSORS_DTYPES: Dict[str, Tuple[int, Optional[torch.dtype]]] = {
    "F64": (8, torch.float64), "F32": (4, torch.float32), "F16": (2, torch.float16), "BF16": (2, torch.bfloat16),
    "I64": (8, torch.int64), "I32": (4, torch.int32), "I16": (2, torch.int16), "I8": (1, torch.int8),
    "U8": (1, torch.uint8), "U16": (2, None), "U32": (4, None), "U64": (8, None), "BOOL": (1, torch.bool),
    "F8_E4M3": (1, getattr(torch, "float8_e4m3fn", None)), "F8_E5M2": (1, getattr(torch, "float8_e5m2", None)),
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ------------------------------------------------------------------ files


def _regular_file_size(path: Path, what: str) -> int:
    """The size of a regular file; anything else (missing, a directory, a FIFO,
    a device, a symlink loop, unreadable) is a CheckpointError."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: {what} does not exist") from None
    except (OSError, RuntimeError, ValueError) as e:  # ELOOP, EACCES, a name with NUL...
        raise CheckpointError(f"{path}: {what} cannot be read ({type(e).__name__}: {e})") from None
    if not stat.S_ISREG(info.st_mode):
        raise CheckpointError(f"{path}: {what} is not a regular file")
    return info.st_size


def _read_bytes(path: Path, what: str, limit: int) -> bytes:
    size = _regular_file_size(path, what)
    if size > limit:
        raise CheckpointError(f"{path}: {what} is {size} bytes, more than the {limit} allowed")
    try:
        with open(path, "rb") as f:
            return f.read(limit + 1)
    except (OSError, RuntimeError) as e:
        raise CheckpointError(f"{path}: {what} cannot be read ({type(e).__name__}: {e})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: List[Tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(data: bytes, path: Path, what: str) -> Any:
    """Strict JSON: UTF-8, no NaN / Infinity, no duplicate keys, bounded nesting."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") \
            from None
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({type(e).__name__}: {e})") from None


def read_json(path: PathLike, what: str, limit: int = MAX_JSON_BYTES) -> Any:
    path = Path(path)
    return parse_json(_read_bytes(path, what, limit), path, what)


def read_json_object(path: PathLike, what: str) -> dict:
    value = read_json(path, what)
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {what} must be a JSON object, got {type(value).__name__}")
    return value


def read_config(folder: PathLike) -> dict:
    """``config.json`` of a model folder, as a dict (not yet validated)."""
    folder = Path(folder)
    try:
        is_dir = folder.is_dir()
    except (OSError, ValueError):
        is_dir = False
    if not is_dir:
        raise CheckpointError(f"{folder}: no config.json (not a folder)")
    path = folder / "config.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"{folder}: no config.json")
    return read_json_object(path, "config.json")


# ------------------------------------------------------------------ config fields


_INT_LIMIT = (1 << 31) - 1  # sizes and token ids are int32 in the kernels


@dataclass(frozen=True)
class Field:
    """One config key: its kind, range and default.

    kind: ``int`` (a JSON integer, not a bool nor a float), ``real`` (an integer
    or a float, finite), ``bool``, ``str``, ``int_list`` (a non-empty list of
    ints), ``str_list`` (a list of strings), ``object`` (a JSON object). ``low`` / ``high`` bound numbers (and the
    items of an int list) inclusively; ``positive`` demands > 0 for reals;
    ``choices`` lists the allowed strings. A missing key, or JSON null, takes
    ``default``; without a default the key is required.
    """

    name: str
    kind: str
    default: Any = None
    required: bool = False
    low: Optional[float] = None
    high: Optional[float] = None
    positive: bool = False
    choices: Optional[Tuple[str, ...]] = None


def _check_value(field: Field, value: Any, where: str) -> Any:
    def fail(expected: str) -> None:
        raise CheckpointError(f"{where}: field '{field.name}' must be {expected}, got {_short(value)}")

    def bounds(number: float) -> None:
        if field.low is not None and number < field.low:
            fail(f"{'an int' if field.kind in ('int', 'int_list') else 'a number'} >= {field.low:g}")
        if field.high is not None and number > field.high:
            fail(f"{'an int' if field.kind in ('int', 'int_list') else 'a number'} <= {field.high:g}")

    kind = field.kind
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an int")
        bounds(value)
        return value
    if kind == "real":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            fail("a finite number")
        if field.positive and not number > 0:
            fail("a number > 0")
        bounds(number)
        return number
    if kind == "bool":
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind == "str":
        if not isinstance(value, str):
            fail("a string" + (f" in {list(field.choices)}" if field.choices else ""))
        if field.choices is not None and value not in field.choices:
            fail(f"one of {list(field.choices)}")
        return value
    if kind == "int_list":
        if not isinstance(value, list) or not value or any(
                isinstance(x, bool) or not isinstance(x, int) for x in value):
            fail("a non-empty list of ints")
        for x in value:
            bounds(x)
        return list(value)
    if kind == "str_list":
        if not isinstance(value, list) or any(not isinstance(x, str) for x in value):
            fail("a list of strings")
        return list(value)
    if kind == "object":
        if not isinstance(value, dict):
            fail("a JSON object")
        return value
    raise AssertionError(kind)


def validate_fields(config: Mapping[str, Any], fields: Iterable[Field], where: str,
                    lookup: Optional[Callable[[str], Any]] = None) -> Dict[str, Any]:
    """The value of every field (defaults filled in), checked by kind and range.
    ``lookup(name)`` finds a key (default: ``config.get``)."""
    get = lookup if lookup is not None else config.get
    values: Dict[str, Any] = {}
    for field in fields:
        value = get(field.name)
        if value is None:
            if field.required:
                raise CheckpointError(f"{where} lacks '{field.name}'")
            values[field.name] = field.default
            continue
        values[field.name] = _check_value(field, value, where)
    return values


def size_field(name: str, required: bool = True, default: Any = None, low: int = 1) -> Field:
    return Field(name, "int", default=default, required=required, low=low, high=_INT_LIMIT)


ROPE_TYPES = ("default", "linear", "llama3", "proportional")


def validate_rope(config: Mapping[str, Any], where: str) -> dict:
    """The rotary settings of a Hugging Face config (``rope_parameters``, or the
    older ``rope_theta`` / ``rope_scaling``), checked by :func:`check_rope`."""
    from .common import rope_parameters

    for key in ("rope_parameters", "rope_scaling"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise CheckpointError(f"{where}: field '{key}' must be a JSON object, got {_short(config[key])}")
    return check_rope(rope_parameters(config), where)


def check_rope(params: Any, where: str) -> dict:
    """Rotary parameters (``rope_type``, ``rope_theta`` and the type's own
    fields) checked by type and range; returns them with numbers as floats."""
    if not isinstance(params, dict):
        raise CheckpointError(f"{where}: rotary parameters must be a JSON object, got {_short(params)}")
    params = dict(params)
    if params.get("rope_theta") is None:
        params["rope_theta"] = 10000.0
    kind = params.get("rope_type", params.get("type")) or "default"
    if not isinstance(kind, str):
        raise CheckpointError(f"{where}: field 'rope_type' must be a string, got {_short(kind)}")
    if kind not in ROPE_TYPES:
        raise CheckpointError(f"{where}: unsupported rope type {kind!r} (default, linear, llama3 and proportional "
                              "are)")
    params["rope_type"] = kind
    fields = [Field("rope_theta", "real", positive=True)]
    if kind in ("linear", "llama3"):
        fields.append(Field("factor", "real", required=True, positive=True))
    if kind == "llama3":
        fields += [Field("low_freq_factor", "real", default=1.0, positive=True),
                   Field("high_freq_factor", "real", default=4.0, positive=True),
                   Field("original_max_position_embeddings", "real", default=8192, positive=True)]
    if kind == "proportional":
        fields += [Field("partial_rotary_factor", "real", default=1.0, positive=True, high=1.0),
                   Field("factor", "real", default=1.0, positive=True)]
    params.update(validate_fields(params, fields, where))
    if kind == "llama3" and not params["high_freq_factor"] > params["low_freq_factor"]:
        raise CheckpointError(f"{where}: field 'high_freq_factor' ({params['high_freq_factor']:g}) must be greater "
                              f"than 'low_freq_factor' ({params['low_freq_factor']:g})")
    return params


# ------------------------------------------------------------------ tensors


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it (offsets relative to the data)."""

    name: str
    dtype: str
    shape: Tuple[int, ...]
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def read_safetensors_header(path: Path) -> Dict[str, TensorInfo]:
    """Every tensor of one safetensors file, checked against the file's size:
    known dtype, non-negative integer shape, byte range inside the data and of
    the size the shape and dtype need, no two tensors overlapping."""
    size = _regular_file_size(path, "safetensors file")
    if size < 8:
        raise CheckpointError(f"{path}: a safetensors file needs at least 8 bytes, the file has {size}")
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise CheckpointError(f"{path}: the header claims {length} bytes; the file holds {size - 8} after the "
                                      f"length field (and at most {MAX_HEADER_BYTES} are allowed)")
            data = f.read(length)
    except (OSError, RuntimeError, struct.error) as e:
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
    if len(data) != length:
        raise CheckpointError(f"{path}: the file ended inside its header")
    header = parse_json(data, path, "the safetensors header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header must be a JSON object, got {type(header).__name__}")
    data_size = size - 8 - length
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise CheckpointError(f"{path}: '__metadata__' must map strings to strings")
            continue
        where = f"{path}: tensor '{name}'"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: its header entry must be a JSON object, got {_short(entry)}")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{where}: unknown dtype {_short(dtype)}")
        if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative ints, got {_short(shape)}")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or any(isinstance(o, bool) or not isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be two ints, got {_short(offsets)}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] fall outside the {data_size} bytes of data "
                                  "the file holds (truncated?)")
        numel = math.prod(shape)
        need = numel * SAFETENSORS_DTYPES[dtype][0]
        if end - begin != need:
            raise CheckpointError(f"{where}: shape {shape} of {dtype} needs {need} bytes, its data_offsets give "
                                  f"{end - begin}")
        tensors[name] = TensorInfo(name, dtype, tuple(shape), path, begin, end)
    previous_end, previous = 0, None
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin < previous_end and info.nbytes > 0:
            raise CheckpointError(f"{path}: tensors '{previous}' and '{info.name}' overlap in the file")
        if info.nbytes > 0:
            previous_end, previous = info.end, info.name
    return tensors


def _shard_names(folder: Path) -> List[str]:
    index_path = folder / INDEX_FILENAME
    if os.path.lexists(index_path):
        index = read_json_object(index_path, INDEX_FILENAME)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: field 'weight_map' must be a non-empty JSON object mapping "
                                  f"tensor names to files, got {_short(weight_map)}")
        for name, file in weight_map.items():
            if not isinstance(file, str) or not file or file in (".", "..") or "/" in file or "\\" in file \
                    or "\0" in file:
                raise CheckpointError(f"{index_path}: field 'weight_map' maps '{name}' to {_short(file)}, not a file "
                                      "name inside the folder")
        return sorted(set(weight_map.values()))
    try:
        return sorted(p.name for p in folder.glob("*.safetensors"))
    except OSError as e:
        raise CheckpointError(f"{folder}: cannot be listed ({e})") from None


class Checkpoint:
    """The safetensors files of a model folder (``model.safetensors``, all
    ``*.safetensors``, or the shards of ``model.safetensors.index.json``) and
    the tensors their headers declare, checked. Reading the headers allocates
    nothing that depends on the tensors' claimed sizes."""

    def __init__(self, folder: PathLike) -> None:
        self.folder = Path(folder)
        names = _shard_names(self.folder)
        if not names:
            raise CheckpointError(f"{self.folder}: no safetensors files")
        self.files = [self.folder / n for n in names]
        self.tensors: Dict[str, TensorInfo] = {}
        for path in self.files:
            for name, info in read_safetensors_header(path).items():
                if name in self.tensors:
                    raise CheckpointError(f"{path}: tensor '{name}' is also in {self.tensors[name].file.name}")
                self.tensors[name] = info
        index_path = self.folder / INDEX_FILENAME
        if os.path.lexists(index_path):
            weight_map = read_json_object(index_path, INDEX_FILENAME)["weight_map"]
            for name, file in weight_map.items():
                info = self.tensors.get(name)
                if info is None or info.file.name != file:
                    raise CheckpointError(f"{index_path}: field 'weight_map' puts '{name}' in {file}, which does not "
                                          "hold it")

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def bound(self, sizes: Mapping[str, int], layers: Mapping[str, int], where: str) -> None:
        """Refuses a config whose sizes the files cannot hold, before anything is
        built from it: every size in ``sizes`` (each a dimension of some tensor of a
        matching checkpoint) must be at most the largest dimension in the files,
        and every count in ``layers`` at most the number of tensors. This bounds
        building the model on the meta device (and what the engine would
        allocate) by the files' own size."""
        largest = max((max(t.shape) for t in self.tensors.values() if t.shape), default=0)
        for name, value in sizes.items():
            if value > largest:
                raise CheckpointError(f"{where}: {name} = {value}, but no tensor in the safetensors files has a "
                                      f"dimension larger than {largest}")
        for name, value in layers.items():
            if value > len(self.tensors):
                raise CheckpointError(f"{where}: {name} = {value}, but the safetensors files hold only "
                                      f"{len(self.tensors)} tensors")

    def meta_tensors(self) -> Dict[str, torch.Tensor]:
        """Every tensor as a meta tensor of its shape and dtype (no data, no memory)."""
        out = {}
        for name, info in self.tensors.items():
            dtype = SAFETENSORS_DTYPES[info.dtype][1]
            if dtype is None:
                raise CheckpointError(f"{info.file}: tensor '{name}' has dtype {info.dtype}, which dspark cannot load")
            out[name] = torch.empty(info.shape, dtype=dtype, device="meta")
        return out

    def file_of(self, name: str) -> str:
        info = self.tensors.get(name)
        return info.file.name if info is not None else "?"

    def load(self, names: Optional[Iterable[str]] = None, check_finite: bool = True) -> Dict[str, torch.Tensor]:
        """The named tensors (default: all; on the CPU), read by the safetensors
        library after the checks above; with ``check_finite``, a NaN or infinite
        float weight is an error."""
        from safetensors import safe_open

        by_file: Dict[Path, List[str]] = {}
        for name in (self.tensors if names is None else names):
            by_file.setdefault(self.tensors[name].file, []).append(name)
        out: Dict[str, torch.Tensor] = {}
        for path, wanted in by_file.items():
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in wanted:
                        out[name] = f.get_tensor(name)
            except Exception as e:  # the library's own checks (SafetensorError, OSError, ...)
                raise CheckpointError(f"{path}: the safetensors library cannot read it ({type(e).__name__}: {e})") \
                    from None
            for name in wanted:
                t, info = out[name], self.tensors[name]
                if tuple(t.shape) != info.shape:
                    raise CheckpointError(f"{path}: tensor '{name}' was read with shape {list(t.shape)}, its header "
                                          f"says {list(info.shape)}")
                if check_finite and t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                    raise CheckpointError(f"{path}: tensor '{name}' holds NaN or infinite values")
        return out
