"""The shared helpers downstream uses (and pretrain/shards can switch to): JSON sanitiser, strict loader, PNG saver."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from runkit.errors import UserError


def test_to_jsonable_makes_strict_json():
    from runkit.jsonsafe import to_jsonable

    obj = {"a": np.float32(1.5), "b": np.arange(3), "c": float("nan"), 4: (Path("/x"), {2, 1}),
           "t": torch.tensor([1.0, float("inf")]), "n": np.int64(7), "s": "text"}
    out = to_jsonable(obj)
    assert json.loads(json.dumps(out, allow_nan=False)) == {"a": 1.5, "b": [0, 1, 2], "c": None, "4": ["/x", [1, 2]],
                                                            "t": [1.0, None], "n": 7, "s": "text"}
    assert to_jsonable([math.inf], nonfinite=str) == ["inf"]


def test_strict_load_names_what_does_not_match(tmp_path):
    from runkit.statedict import strict_load

    m = nn.Linear(3, 2)
    strict_load(m, {k: v.clone() for k, v in nn.Linear(3, 2).state_dict().items()}, "ok.pt")
    with pytest.raises(UserError, match=r"missing keys \['bias'\].*unexpected keys \['extra'\]"):
        strict_load(m, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "f.pt")
    with pytest.raises(UserError, match="shape mismatch"):
        strict_load(m, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "f.pt")


def test_save_png_is_a_png(tmp_path):
    from runkit.figures import pyplot, save_png

    fig, ax = pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    path = save_png(fig, tmp_path / "sub" / "f.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not list((tmp_path / "sub").glob(".*.tmp"))
