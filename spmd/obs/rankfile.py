"""Writing a rank's trace file: fixed-width string columns, attribute values, an atomic HDF5 write."""
from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np


def encode_column(col: list[str]) -> np.ndarray:
    """UTF-8 ``S`` array (width = longest value) of a column with few distinct strings."""
    codes: dict[str, int] = {}
    idx = np.fromiter((codes.setdefault(s, len(codes)) for s in col), dtype=np.intp, count=len(col))
    return np.array([s.encode() for s in codes] or [b""], dtype=bytes)[idx]


def attr_value(v):
    """HDF5 attribute value: JSON for containers and None, the value for scalars."""
    if v is None or isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    if isinstance(v, (str, bool, int, float, np.generic)):
        return v
    return str(v)


def write_h5_atomic(path: Path, datasets: dict, attrs: dict) -> None:
    """Write datasets and file attributes to ``path`` via a hidden tmp file and os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for key, data in datasets.items():
                opts = dict(compression="gzip", compression_opts=4, shuffle=True) if len(data) else {}
                f.create_dataset(key, data=data, **opts)
            for key, value in attrs.items():
                f.attrs[key] = value
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
