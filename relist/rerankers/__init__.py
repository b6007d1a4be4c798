"""Re-rankers: one file per model, each registering itself by name in ``REGISTRY``."""

from relist.rerankers.base import (REGISTRY, Encoded, Reranker, RerankerConfig, build_reranker, check_reranker,
                                   load_reranker, reranker_class)
from relist.rerankers import dlcm, gsf, midnn, pear, prm, raise_, seq2slate, setrank  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Encoded", "Reranker", "RerankerConfig", "build_reranker", "check_reranker", "load_reranker",
           "reranker_class"]
