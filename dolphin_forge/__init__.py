"""dolphin-forge: the Dolphin recipe end to end (curate, preprocess, train, refine, evaluate, ship)."""

__version__ = "0.1.0"
