"""relist: re-ranking, learning at serving time and multi-stage cascade optimisation on PyTorch."""

import logging

__version__ = "0.1.0"
__all__ = ["ListBatch", "collate", "__version__"]

logging.getLogger("relist").addHandler(logging.NullHandler())


def __getattr__(name: str):
    # ListBatch and collate import torch; `relist --version` and `relist --help` should not have to
    if name in ("ListBatch", "collate"):
        from relist import batch

        return getattr(batch, name)
    raise AttributeError(f"module 'relist' has no attribute {name!r}")
