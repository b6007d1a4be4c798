"""relist: re-ranking, learning at serving time and multi-stage cascade optimisation on PyTorch."""

import logging

from relist.batch import ListBatch, collate

__version__ = "0.1.0"
__all__ = ["ListBatch", "collate", "__version__"]

logging.getLogger("relist").addHandler(logging.NullHandler())
