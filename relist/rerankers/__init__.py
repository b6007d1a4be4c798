"""Re-rankers: one file per model, each registering itself by name in ``REGISTRY``.

Importing this package (or any module below it) imports every model, so the registry is complete
before anything is built or loaded by name. LAST's evaluator and generator are re-rankers too."""

from relist.rerankers import (  # noqa: F401  (each module registers its model)
    dlcm,
    evaluator,
    generator,
    gsf,
    midnn,
    pear,
    prm,
    raise_,
    seq2slate,
    setrank,
)
from relist.rerankers.base import (
    REGISTRY,
    Encoded,
    Reranker,
    RerankerConfig,
    build_reranker,
    check_reranker,
    load_reranker,
    reranker_class,
)

__all__ = [
    "REGISTRY",
    "Encoded",
    "Reranker",
    "RerankerConfig",
    "build_reranker",
    "check_reranker",
    "load_reranker",
    "reranker_class",
]
