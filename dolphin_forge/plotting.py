"""The one way every stage writes a figure: headless matplotlib (Agg), tight layout, 120 dpi PNG, figure closed.

Stages import matplotlib through `pyplot()` only when they draw, so commands that never plot do not pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display needed; servers and CI have none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
