"""Saving and loading ONNX graphs safely: atomic writes, external data for large graphs, path checks."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx

from tmpdiff.formats.atomic import TEMP_SUFFIX, temp_prefix
from tmpdiff.formats.errors import TmpdiffError

PROTOBUF_LIMIT = 2**31 - 1


def save_onnx(model: onnx.ModelProto, path: str | Path, force_external: bool = False) -> list[Path]:
    """Write `model` to `path` (plus `path.data` when over 2 GB), each file appearing complete or not at all.

    Returns the files written. The data file is renamed into place before the graph that refers to it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    external = force_external or model.ByteSize() > PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(prefix=temp_prefix(path.name), suffix=TEMP_SUFFIX, dir=path.parent) as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        data_name = f"{path.name}.data"
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        written = []
        if external:
            os.replace(Path(tmp_dir) / data_name, path.parent / data_name)
            written.append(path.parent / data_name)
        os.replace(tmp, path)
        written.append(path)
    return written


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
    """Load and check a graph; a corrupt or truncated file is a TmpdiffError naming it."""
    path = Path(path)
    if not path.is_file():
        raise TmpdiffError("ONNX file is missing", path)
    try:
        check_external_data(path, Path(root) if root else path.parent)
        model = onnx.load(str(path))
        onnx.checker.check_model(model if model.ByteSize() < PROTOBUF_LIMIT else str(path))
    except TmpdiffError:
        raise
    except Exception as exc:  # protobuf DecodeError, onnx ValidationError, OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TmpdiffError(f"not a valid ONNX model ({first})", path) from None
    return model
