"""Prepared list datasets: sources that read raw files, and the memory-mapped store they write."""

from relist.data.errors import DataFormatError
from relist.data.store import (
    ListTable,
    PreparedDataset,
    Schema,
    SparseField,
    write_dataset,
)

__all__ = ["DataFormatError", "ListTable", "PreparedDataset", "Schema", "SparseField", "write_dataset"]
