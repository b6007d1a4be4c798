"""HTTP service around a generator, an evaluator and LAST: ``relist serve RUN_DIR`` (see ``app``)."""

from relist.serve.settings import ServeSettings

__all__ = ["ServeSettings"]
