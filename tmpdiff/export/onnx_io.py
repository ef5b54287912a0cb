"""Saving and loading ONNX graphs safely: atomic writes, external data for large graphs, path checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from tmpdiff.formats.atomic import TEMP_SUFFIX, check_confined, temp_prefix
from tmpdiff.formats.errors import TmpdiffError

# Graphs whose tensors exceed this go to one external `.data` file. Well under protobuf's 2 GB so the graph itself
# always serialises; TMPDIFF_EXTERNAL_DATA_BYTES lowers it (tests force the large-model path on a small model).
EXTERNAL_DATA_BYTES = 2**30


def external_data_threshold() -> int:
    """Tensor bytes above which graphs are written with external data."""
    text = os.environ.get("TMPDIFF_EXTERNAL_DATA_BYTES")
    if text is None:
        return EXTERNAL_DATA_BYTES
    try:
        return max(int(text), 0)
    except ValueError:
        raise TmpdiffError(f"TMPDIFF_EXTERNAL_DATA_BYTES must be a number of bytes, got {text!r}") from None


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return list(onnx.external_data_helper._get_all_tensors(model))


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of tensor data the graph holds in memory (initializers and Constant attributes); never serialises, so it
    works on graphs over protobuf's 2 GB limit."""
    total = 0
    for tensor in _tensors(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            continue  # a reference to a file, not data in memory
        if tensor.HasField("raw_data"):
            total += len(tensor.raw_data)
        else:  # typed fields hold the data; a stub with only dims (see `weightless`) holds none
            total += 4 * (len(tensor.float_data) + len(tensor.int32_data)) + 8 * (
                len(tensor.int64_data) + len(tensor.double_data) + len(tensor.uint64_data))
    return total


def is_large(model: onnx.ModelProto) -> bool:
    """Whether `model` is saved with external data (and must not be serialised whole)."""
    return tensor_bytes(model) > external_data_threshold()


def weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph's structure with every initializer's data dropped (names, types and shapes kept): enough for shape
    and type inference, cheap to copy, serialisable at any model size."""
    out = onnx.ModelProto()
    out.ir_version = model.ir_version
    out.opset_import.extend(model.opset_import)
    graph = out.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    for tensor in model.graph.initializer:
        graph.initializer.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims)
    return out


def save_onnx(model: onnx.ModelProto, path: str | Path, force_external: bool = False,
              data_dir: Path | None = None) -> list[Path]:
    """Write `model` to `path` (plus `path.data` when large, see `is_large`), each file appearing complete or not at
    all. Returns the files written; the data file is renamed into place before the graph that refers to it.

    Tensors may already be external (references into files under `data_dir`, as torch's exporter writes a large
    model): they are streamed into `path.data` a tensor at a time, never loaded together. With external data,
    `model`'s tensors move into the file: the proto keeps only references to it, so a large graph is never held
    twice. Use the saved file (or `weightless`) afterwards, not the proto's weights.
    """
    path = Path(path)
    check_confined(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    referenced = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model))
    if referenced and data_dir is None:
        raise TmpdiffError("graph refers to external data but no directory to read it from was given", path)
    external = force_external or referenced or is_large(model)
    with tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        data_name = f"{path.name}.data"
        if external:
            _stream_tensors(model, data_dir, Path(tmp_dir) / data_name)
        onnx.save_model(model, str(tmp))
        written = []
        if external:
            os.replace(Path(tmp_dir) / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp, path)
        written.append(path)
    return written


_INLINE_BYTES = 1024  # smaller tensors stay in the graph file
_ALIGN = 4096  # each tensor starts on a page, so ONNX Runtime can map it


def _external_field(tensor: onnx.TensorProto, key: str) -> str | None:
    return next((entry.value for entry in tensor.external_data if entry.key == key), None)


def _stream_tensors(model: onnx.ModelProto, data_dir: Path | None, data_path: Path) -> None:
    """Move every initializer of at least `_INLINE_BYTES` into `data_path`, one tensor at a time: in-memory data is
    written and dropped, external data (of any tensor, Constant values included) is copied from its file under
    `data_dir`. In-memory Constant values stay inline, as ONNX's own saver leaves them."""
    initializers = list(model.graph.initializer)
    attributes = [t for t in onnx.external_data_helper._get_attribute_tensors(model)
                  if t.data_location == onnx.TensorProto.EXTERNAL]
    with data_path.open("wb") as out:
        for tensor in [*initializers, *attributes]:
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                location = _external_field(tensor, "location") or ""
                source = (Path(data_dir) / location).resolve()
                if data_dir is None or not source.is_relative_to(Path(data_dir).resolve()) or not source.is_file():
                    raise TmpdiffError(f"external data {location!r} of tensor {tensor.name!r} is missing or outside "
                                       f"{data_dir}", data_path)
                with source.open("rb") as handle:
                    handle.seek(int(_external_field(tensor, "offset") or 0))
                    length = _external_field(tensor, "length")
                    payload = handle.read(int(length)) if length is not None else handle.read()
            elif tensor.HasField("raw_data") and len(tensor.raw_data) >= _INLINE_BYTES:
                payload = tensor.raw_data
            else:
                continue  # small, or stored in typed fields (torch writes raw_data for weights)
            offset = out.seek(0, os.SEEK_END)
            if offset % _ALIGN:
                out.write(b"\0" * (_ALIGN - offset % _ALIGN))
                offset = out.tell()
            out.write(payload)
            del tensor.external_data[:]
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(len(payload)))):
                tensor.external_data.add(key=key, value=value)


def check_external_data(path: Path, root: Path) -> None:
    """Refuse graphs whose external-data locations point outside `root` (or do not exist)."""
    model = onnx.load(str(path), load_external_data=False)
    root = root.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (path.parent / location).resolve()
        if not target.is_relative_to(root):
            raise TmpdiffError(f"external data location {location!r} escapes the build directory", path)
        if not target.is_file():
            raise TmpdiffError(f"external data file {location!r} is missing", path)


def load_onnx(path: str | Path, root: str | Path | None = None) -> onnx.ModelProto:
    """Check a graph and return it (without its external data: tensors stay references to the `.data` file); a
    corrupt or truncated file is a TmpdiffError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TmpdiffError("ONNX file is missing", path)
    try:
        check_external_data(path, Path(root) if root else path.parent)
        model = onnx.load(str(path), load_external_data=False)
        external = any(t.data_location == onnx.TensorProto.EXTERNAL for t in _tensors(model))
        # by path when external: the checker then reads the data file itself instead of one >2 GB proto
        onnx.checker.check_model(str(path) if external else model)
    except TmpdiffError:
        raise
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"not a valid ONNX model ({first})", path) from None
    return model
