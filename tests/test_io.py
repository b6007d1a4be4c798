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


class FullDisk:
    """A file whose every write fails as on a full disk."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def test_a_full_disk_is_an_error_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    """ENOSPC while writing a text, CSV or tensor file, or a dataset directory: the OSError keeps its errno
    and names the file being written; the old file stays and no temporary file or directory is left."""
    target = tmp_path / "metrics.json"
    target.write_text("old")
    real_fdopen = io.os.fdopen
    with monkeypatch.context() as patch:
        patch.setattr(io.os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
        for write in (lambda: io.atomic_write_text(target, "new"), lambda: io.atomic_write_csv(target, [{"a": 1}])):
            with pytest.raises(OSError) as err:
                write()
            assert err.value.errno == errno.ENOSPC and str(target) in str(err.value)
    with monkeypatch.context() as patch:
        patch.setattr(io, "save_file", lambda *a, **k: FullDisk(None).write())
        with pytest.raises(OSError) as err:
            io.atomic_save_tensors({"w": torch.zeros(3)}, tmp_path / "w.safetensors")
        assert err.value.errno == errno.ENOSPC and str(tmp_path / "w.safetensors") in str(err.value)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]

    from relist.data import store
    from relist.data.prepare import PrepareConfig, prepare

    monkeypatch.setattr(store.np, "save", lambda *a, **k: FullDisk(None).write())  # numpy's, restored after
    with pytest.raises(OSError) as err:
        prepare(PrepareConfig(source="synthetic", out=tmp_path / "data", n_lists=50, n_users=10, n_items=40))
    assert err.value.errno == errno.ENOSPC and str(tmp_path / "data") in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]  # no partial dataset directory


def test_a_full_disk_through_the_command_line_is_a_message_and_exit_status_2(tmp_path, monkeypatch, capsys):
    """The same ENOSPC from `relist data prepare`: one line naming the directory, exit 2, not a traceback."""
    from relist.cli import main
    from relist.data import store

    monkeypatch.setattr(store.np, "save", lambda *a, **k: FullDisk(None).write())
    argv = ["data", "prepare", "synthetic", "--out", str(tmp_path / "data"), "--n-lists", "50", "--n-users", "10"]
    assert main([*argv, "--n-items", "40"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("relist: error: ") and "No space left" in err and str(tmp_path / "data") in err, err
    assert not (tmp_path / "data").exists()


def test_an_unknown_or_mistyped_setting_in_model_json_is_an_error_naming_the_file(tmp_path):
    """A hand-edited model.json (a misspelt setting, a number written as a string) is refused with the file
    and the key, not a TypeError from the model's constructor."""
    from relist.config import ConfigError
    from relist.data.store import Schema, SparseField
    from relist.rerankers import build_reranker, load_reranker

    schema = Schema((SparseField("item_id", 10),), ("x",), (SparseField("user_id", 10),), ())
    build_reranker("prm", schema).save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    pristine = json.loads(path.read_text())
    (tmp_path / "m" / "checksums.json").unlink()  # as a hand edit would leave it, unchecked
    cases = (("d_modle", 8, r"config: unknown option\(s\) \['d_modle'\]"), ("d_model", "32", "d_model: expected int"))
    for key, value, message in cases:
        path.write_text(json.dumps({**pristine, "config": {**pristine["config"], key: value}}))
        with pytest.raises((ConfigError, ValueError), match=message) as err:
            load_reranker(tmp_path / "m")
        assert str(path) in str(err.value)


def test_an_unknown_top_level_key_in_model_json_is_an_error_naming_the_file(tmp_path):
    """A misspelt or foreign top-level key of a re-ranker's model.json is refused with the file and the key
    (it was ignored, so a hand edit such as ``"shema"`` beside the real schema went unnoticed)."""
    from relist.data.store import Schema, SparseField
    from relist.rerankers import build_reranker, load_reranker

    schema = Schema((SparseField("item_id", 10),), ("x",), (SparseField("user_id", 10),), ())
    build_reranker("prm", schema).save(tmp_path / "m")
    path = tmp_path / "m" / "model.json"
    pristine = json.loads(path.read_text())
    (tmp_path / "m" / "checksums.json").unlink()  # as a hand edit would leave it, unchecked
    load_reranker(tmp_path / "m")  # the pristine file loads
    path.write_text(json.dumps({**pristine, "shema": pristine["schema"]}))
    with pytest.raises(io.CorruptFileError, match=r"unknown key\(s\) \['shema'\]") as err:
        load_reranker(tmp_path / "m")
    assert str(path) in str(err.value)
