"""Files: atomic writes, and the one format of every saved model, with checksums verified on load.

- Atomic writes: a reader (or a resumed run) never sees a half-written file or output directory; a
  failed write leaves no temporary file behind.
- Saved models (re-rankers, LAST's models, initial rankers, simulators, checkpoints): a directory with
  ``model.json`` (what the model is: its name, configuration and feature schema), its weights as
  ``model.safetensors`` (or a library's own file, such as LightGBM's ``model.txt``) and ``checksums.json``,
  the SHA-256 of every file the directory's writers listed. ``verify`` checks them and names the first
  file that is missing or differs; directories written before checksums existed load unchecked.
- Nothing is unpickled: JSON and safetensors only.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

CHECKSUMS = "checksums.json"
MODEL_META = "model.json"
MODEL_WEIGHTS = "model.safetensors"


class CorruptFileError(ValueError):
    """A saved file that is missing, truncated or not what its checksum says; the message names it."""


def _naming(err: OSError, path: Path) -> OSError:
    """``err`` with ``path`` as its file name when the system's error names none (a full disk's ENOSPC);
    errors raised with a message of their own are kept as they are."""
    if err.filename is not None or err.errno is None:
        return err
    return OSError(err.errno, err.strerror or str(err), str(path))


@contextmanager
def _temporary_beside(path: Path, mode: str = "w", **kwargs) -> Iterator[tuple[Any, str]]:
    """An open temporary file beside ``path`` and its name, renamed over ``path`` when the block ends. If
    the block, the close or the rename fails (a full disk), the temporary file is removed and an OSError
    names ``path``."""
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    except OSError as err:
        raise _naming(err, path) from err
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle, tmp
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise _naming(err, path) from err
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    with _temporary_beside(Path(path), "w", encoding="utf-8", newline="") as (handle, _):
        handle.write(text)


def atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors`` file written beside ``path``, then renamed over it."""
    with _temporary_beside(Path(path), "wb") as (_, tmp):
        save_file(tensors, tmp, metadata=metadata)


def atomic_write_csv(path: Path, rows: list[dict]) -> None:
    """Rows of dicts as CSV (the union of their keys, in first-seen order), written atomically."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with _temporary_beside(Path(path), "w", newline="", encoding="utf-8") as (handle, _):
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


# ---- checksums --------------------------------------------------------------------------------------------
def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def seal(directory: Path, names: Iterable[str]) -> None:
    """Record the SHA-256 of ``directory``'s files ``names`` in its ``checksums.json`` (others kept)."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    sums = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    sums.update({name: file_digest(directory / name) for name in names})
    atomic_write_text(path, json.dumps(dict(sorted(sums.items())), indent=1))


def verify(directory: Path) -> None:
    """Raise ``CorruptFileError`` naming the first file of ``directory``'s checksums.json that is missing or
    differs. A directory without checksums.json (written before they existed) passes unchecked."""
    directory = Path(directory)
    path = directory / CHECKSUMS
    if not path.is_file():
        return
    try:
        sums = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not a readable checksum file ({err})") from None
    if not isinstance(sums, dict) or not all(isinstance(v, str) for v in sums.values()):
        raise CorruptFileError(f"{path}: expected a mapping of file names to SHA-256 digests")
    inside = directory.resolve()
    for name, expected in sums.items():
        target = directory / name
        if Path(name).is_absolute() or ".." in Path(name).parts or inside not in target.resolve().parents:
            raise CorruptFileError(f"{path}: lists {name!r}, which is not a file of {directory}")
        if not target.is_file():
            raise CorruptFileError(f"{target}: missing (listed in {path})")
        if file_digest(target) != expected:
            raise CorruptFileError(f"{target}: contents differ from the checksum written with it (corrupted?)")


def read_json(path: Path) -> Any:
    """A JSON file; a missing, truncated or malformed one is an error that names it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err})") from None


def load_tensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file; a truncated or malformed one is an error that names it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CorruptFileError(f"{path}: not a readable safetensors file ({err})") from None


# ---- the model format -------------------------------------------------------------------------------------
def save_model(directory: Path, meta: dict, tensors: dict[str, Tensor] | None = None) -> None:
    """``meta`` as model.json and ``tensors`` (if any) as model.safetensors in ``directory``, each written
    atomically, then sealed. A model whose weights are another library's file writes it first and passes
    its name through ``seal`` itself (``relist.rankers.lambdamart``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names = [MODEL_META]
    if tensors is not None:
        atomic_save_tensors({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, directory / MODEL_WEIGHTS)
        names.append(MODEL_WEIGHTS)
    atomic_write_text(directory / MODEL_META, json.dumps(meta, indent=2, default=str))
    seal(directory, names)


def load_model(directory: Path, legacy_meta: str | None = None) -> tuple[dict, dict[str, Tensor] | None]:
    """(model.json, model.safetensors or None) of a directory ``save_model`` wrote, checksums verified.
    ``legacy_meta`` names the file older versions wrote instead of model.json."""
    directory = Path(directory)
    verify(directory)
    meta_path = directory / MODEL_META
    if not meta_path.is_file() and legacy_meta and (directory / legacy_meta).is_file():
        meta_path = directory / legacy_meta
    if not meta_path.is_file():
        raise FileNotFoundError(f"{directory} holds no saved model (no {MODEL_META})")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or "model" not in meta:
        raise CorruptFileError(f"{meta_path}: expected a mapping naming its model")
    weights = directory / MODEL_WEIGHTS
    return meta, load_tensors(weights) if weights.is_file() else None


@contextmanager
def atomic_directory(out: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``out``; when the block ends without an error it replaces
    ``out`` (a previous ``out`` is removed only then), and on any error it is removed and ``out`` is untouched
    (an OSError that names no file, such as a full disk's, is raised naming ``out``)."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:
        raise _naming(err, out) from err
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise _naming(err, out) from err
        raise
