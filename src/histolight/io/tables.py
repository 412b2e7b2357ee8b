"""Tables and JSON values: typed Parquet writes, one JSON encoder for numpy/torch/paths, NaN -> None."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd

from histolight.io.atomic import atomic_write


def write_parquet(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write ``df`` (no index) as Parquet, atomically. Object/string columns stay strings even when all null,
    so tables from different slides concatenate without type conflicts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = []
    for c in df.columns:
        if df[c].dtype == object or pd.api.types.is_string_dtype(df[c].dtype):
            fields.append(pa.field(str(c), pa.string()))
        else:
            fields.append(pa.field(str(c), pa.from_numpy_dtype(df[c].dtype)))
    table = pa.Table.from_pandas(df, schema=pa.schema(fields), preserve_index=False)
    with atomic_write(path, "wb") as f:
        pq.write_table(table, f)


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)``: numpy scalars/arrays, tensors, tuples/sets and paths become JSON values."""
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if hasattr(o, "tolist"):  # torch tensors, without importing torch
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serializable")


def nan_to_none(v: Any) -> Any:
    """``None`` for a float NaN (JSON and W&B have no NaN), the value otherwise."""
    return None if isinstance(v, float) and math.isnan(v) else v


__all__ = ["write_parquet", "json_default", "nan_to_none"]
