"""One JSON sanitiser for every writer of metrics.json, best.json, manifests and logs.

`to_jsonable(obj)` turns numpy/torch scalars and arrays, Paths, tuples and sets into builtins,
recursively, and non-finite floats into `nonfinite` (None by default: strict JSON has no NaN;
pass `nonfinite=str` to keep 'nan'/'inf' readable, as the JSON-lines logs do).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

_KEEP = object()


def to_jsonable(obj: Any, nonfinite: Callable[[float], Any] | None = None) -> Any:
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v, nonfinite) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v, nonfinite) for v in (sorted(obj, key=str) if isinstance(obj, (set, frozenset))
                                                    else obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and callable(obj.tolist) and not isinstance(obj, (str, bytes)):
        try:  # numpy arrays and scalars, torch tensors
            return to_jsonable(obj.tolist(), nonfinite)
        except (TypeError, ValueError, RuntimeError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if nonfinite is None else nonfinite(obj)
    return obj
