"""One matplotlib saver: headless (Agg) figures written atomically as PNG."""
from __future__ import annotations

import io
from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path, *, dpi: int = 110, tight: bool = True) -> Path:
    """Render `fig` to PNG in memory, close it, and write it with write-then-rename."""
    from runkit.atomic import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())
