"""The file system says no (a read-only mount, no permission, a file where a folder should be): a HybridlibError
naming the path, what was being written and the fix, exit 2, and nothing left behind that blocks the next try.

A path through a file is real here; read-only and permission refusals are simulated (the tests run as root in CI,
where permissions do not bind and mounting is not allowed), at the call the file system would refuse.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import pytest
from tiny_run import tiny_run

from hybridlib.cli import main
from hybridlib.errors import RunError
from hybridlib.files import PARAMS_FILE, write_text
from hybridlib.runlock import run_lock


def refuse(monkeypatch, target, name: str, code: int, under: Path) -> None:
    """Make ``target.name`` raise OSError(code) for paths under ``under`` (as a read-only or locked folder would)."""
    real = getattr(target, name)

    def refusing(*args, **kwargs):
        path = Path(kwargs.get("dir") or args[0])
        if str(path).startswith(str(under)):
            raise OSError(code, os.strerror(code), str(path))
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, refusing)


def test_outputs_through_a_file_is_refused_by_name(tiny_params, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    outputs = tmp_path / "afile" / "runs"
    assert main(["run", str(tiny_params), "--outputs", str(outputs), "--run-name", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot create the run folder {outputs / 'r'}: a part of the path is a file"), err
    assert "--outputs DIR" in err and "Traceback" not in err


@pytest.mark.parametrize("code,reason", [(errno.EROFS, "the file system is read-only"),
                                         (errno.EACCES, "permission denied"),
                                         (errno.ENOENT, "a folder on the path does not exist and cannot be made")])
def test_read_only_outputs_are_refused_and_nothing_is_left(tiny_params, tmp_path, capsys, monkeypatch, code, reason):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    refuse(monkeypatch, Path, "mkdir", code, outputs)
    assert main(["run", str(tiny_params), "--outputs", str(outputs), "--run-name", "r"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot create the run folder {outputs / 'r'}: {reason}"), err
    assert list(outputs.iterdir()) == []


def test_a_refused_params_yaml_leaves_no_folder_behind(tiny_params, tmp_path, monkeypatch):
    """The run folder is made, then params.yaml cannot be written: the folder goes, so the same name works later."""
    from hybridlib.config import load_config
    from hybridlib.pipeline import prepare_run

    outputs = tmp_path / "outputs"
    refuse(monkeypatch, tempfile, "mkstemp", errno.EACCES, outputs)
    with pytest.raises(RunError, match=rf"Cannot write {PARAMS_FILE} in {outputs / 'r'}: permission denied"):
        prepare_run(load_config(tiny_params), run_name="r", outputs=outputs)
    assert not (outputs / "r").exists()
    monkeypatch.undo()
    _, run_dir = prepare_run(load_config(tiny_params), run_name="r", outputs=outputs)
    assert (run_dir / PARAMS_FILE).is_file()


def test_a_run_folder_that_turned_read_only_keeps_its_files(tmp_path, monkeypatch):
    run = tmp_path / "run"
    write_text(run / "metrics.json", "{}")
    refuse(monkeypatch, tempfile, "mkstemp", errno.EROFS, run)
    with pytest.raises(RunError, match=rf"Cannot write metrics.json in {run}: the file system is read-only"):
        write_text(run / "metrics.json", '{"new": 1}')
    assert (run / "metrics.json").read_text() == "{}"


def test_the_run_lock_in_a_read_only_folder_is_refused(tmp_path, monkeypatch):
    refuse(monkeypatch, os, "open", errno.EROFS, tmp_path)
    with pytest.raises(RunError, match=rf"Cannot write run.lock in {tmp_path}: the file system is read-only"):
        with run_lock(tmp_path):
            pass


def test_compare_out_through_a_file_is_refused(tmp_path_factory, tmp_path, capsys):
    run = tiny_run(tmp_path_factory)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "cmp"
    capsys.readouterr()  # the tiny run's progress bars
    assert main(["compare", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: Cannot write comparison.md in {out}: a part of the path is a file"), err
