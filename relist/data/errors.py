"""Errors raised on bad input files, naming the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

from tqdm.auto import tqdm


class DataFormatError(ValueError):
    """A raw input file is malformed. ``str(err)`` reads ``file:line: field 'name': what is wrong``."""

    def __init__(self, path: str | Path, line: int | None, field: str | None, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field, message
        where = self.path if line is None else f"{self.path}:{line}"
        what = message if field is None else f"field '{field}': {message}"
        super().__init__(f"{where}: {what}")


UTF8_BOM = b"\xef\xbb\xbf"


def read_lines(path: Path, progress: bool | None = None) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (1-based line number, raw bytes without the newline, whether the line ended with one); a
    UTF-8 byte-order mark at the start of the file is dropped.

    Bytes, not text, so a broken encoding is reported against the field that holds it. A progress bar
    over the bytes read goes to stderr (``progress=None``: only when stderr is a terminal).
    """
    size = Path(path).stat().st_size
    with (
        open(path, "rb") as handle,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"reading {Path(path).name}",
            disable=None if progress is None else not progress,
            leave=False,
        ) as bar,
    ):
        pending = 0
        for number, raw in enumerate(handle, start=1):
            if number == 1 and raw.startswith(UTF8_BOM):  # an editor's byte-order mark, not data
                raw = raw[len(UTF8_BOM) :]
            ended = raw.endswith(b"\n")
            pending += len(raw)
            if pending > 1 << 20:
                bar.update(pending)
                pending = 0
            yield number, raw.rstrip(b"\r\n"), ended
        bar.update(pending)


def split_fields(path: Path, line: int, raw: bytes, names: Sequence[str], sep: bytes, ended: bool) -> list[str]:
    """Split a raw line into exactly ``len(names)`` decoded fields, or raise a ``DataFormatError``."""
    parts = raw.split(sep)
    if len(parts) != len(names):
        hint = " (the last line has no newline: is the file truncated?)" if not ended else ""
        raise DataFormatError(
            path,
            line,
            None,
            f"expected {len(names)} fields separated by {sep.decode()!r} ({', '.join(names)}), found "
            f"{len(parts)}{hint}",
        )
    fields = []
    for name, part in zip(names, parts):
        try:
            fields.append(part.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataFormatError(path, line, name, f"not valid UTF-8 at byte {err.start} of the field") from None
    return fields
