"""Files: atomic writes leave nothing half-written behind, and checksums catch changed files."""

from __future__ import annotations

import errno
import json

import pytest
import torch

import relist.io as io


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_text("old")

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.atomic_save_tensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
    monkeypatch.setattr(io.csv, "DictWriter", disk_full)
    with pytest.raises(OSError, match="No space"):
        io.atomic_write_csv(target, [{"a": 1}])
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_checksums_name_the_changed_or_missing_file(tmp_path):
    io.save_model(tmp_path / "m", {"model": "x", "config": {}}, {"w": torch.arange(4.0)})
    sums = json.loads((tmp_path / "m" / io.CHECKSUMS).read_text())
    assert sorted(sums) == [io.MODEL_META, io.MODEL_WEIGHTS]
    meta, tensors = io.load_model(tmp_path / "m")
    assert meta["model"] == "x" and torch.equal(tensors["w"], torch.arange(4.0))
    (tmp_path / "m" / io.MODEL_META).write_text(json.dumps({"model": "y", "config": {}}))
    with pytest.raises(io.CorruptFileError, match="model.json: contents differ"):
        io.load_model(tmp_path / "m")
    (tmp_path / "m" / io.MODEL_META).unlink()
    with pytest.raises(io.CorruptFileError, match="model.json: missing"):
        io.verify(tmp_path / "m")
    (tmp_path / "m" / io.CHECKSUMS).write_text(json.dumps({"../outside": "0"}))
    with pytest.raises(io.CorruptFileError, match="lists '../outside', which is not a file of"):
        io.verify(tmp_path / "m")
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (tmp_path / "m" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (tmp_path / "m" / io.CHECKSUMS).write_text(json.dumps({"link.safetensors": "0"}))
    with pytest.raises(io.CorruptFileError, match="which is not a file of"):  # a link out of the directory
        io.verify(tmp_path / "m")
    (tmp_path / "m" / io.CHECKSUMS).write_text("[1]")
    with pytest.raises(io.CorruptFileError, match="expected a mapping of file names"):
        io.verify(tmp_path / "m")
