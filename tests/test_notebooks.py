"""The notebooks as files, and their parameters in one live kernel.

- Every notebooks/*.ipynb is valid, committed without outputs or execution counts, has exactly one
  ``parameters`` cell (its first code cell, where papermill injects after), and no other code cell
  assigns a parameter name (``params_file`` or a Config field, ``run_dir`` included).
- In ONE kernel, as papermill and then a JupyterLab user drive them: parameters injected after the
  ``parameters`` cell, Run All, scratch variables and the config cell re-run, Run All again. The config
  keeps the injected values at every step (02), and 03 keeps evaluating the run named by ``run_dir``,
  never the newest one.

What each notebook produces (files, metrics) is checked when they run under nbmake: see the root
conftest.py (`pytest --nbmake notebooks`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import time
from pathlib import Path

import nbformat
import pytest
import yaml
from tiny_run import tiny_run

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PROBE = "PROBE "


def parameter_names() -> set[str]:
    """Every name a notebook reads as a parameter: ``params_file`` and the Config fields (``run_dir`` is one)."""
    from hybridlib.config import FIELDS

    return {"params_file", *FIELDS}


def assigned_names(source: str) -> set[str]:
    """Names a code cell binds (assignments, for/with targets, imports, defs) or deletes."""
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    names: set[str] = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, ast.alias):
            names.add(node.asname or node.name.split(".")[0])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


def is_parameters_cell(cell) -> bool:
    return cell.cell_type == "code" and "parameters" in cell.metadata.get("tags", [])


def test_there_are_notebooks():
    assert [p.name[:2] for p in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"], NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_file(path: Path):
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    nbformat.validate(nb)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), "cells need ids (nbformat 4.5)"
    ids = [c.id for c in nb.cells]
    assert len(set(ids)) == len(ids), f"duplicate cell ids in {path.name}: {ids}"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"

    code = [c for c in nb.cells if c.cell_type == "code"]
    for c in code:
        assert c.outputs == [], f"{path.name} cell {c.id} has outputs: commit notebooks without outputs"
        assert c.execution_count is None, f"{path.name} cell {c.id} has an execution count"
    params = [c for c in nb.cells if is_parameters_cell(c)]
    assert len(params) == 1, f"{path.name} has {len(params)} cells tagged 'parameters', expected exactly one"
    assert code[0] is params[0], f"{path.name}: the parameters cell must be the first code cell"
    assert "NotebookParams" not in "".join(c.source for c in code)

    names = parameter_names()
    for c in code[1:]:
        clash = assigned_names(c.source) & names
        assert not clash, (
            f"{path.name} cell {c.id} assigns {sorted(clash)}: parameter names (params_file or Config fields) "
            f"are set only in the parameters cell, or re-running the notebook changes its parameters"
        )
    if re.search(r"\bnotebook_(config|run)\(globals\(\)\)", "".join(c.source for c in code)):
        extra = assigned_names(params[0].source) - names
        assert not extra, f"{path.name}: the parameters cell sets {sorted(extra)}, which are not parameters"


def test_assigned_names():
    src = "import a.b\nfrom c import d as e\nx, (y, z) = 1, (2, 3)\nfor i in []: pass\nwith f() as g: pass\n" \
          "def h(k): q = 1\n%matplotlib inline\nw += 1\ndel v"
    assert assigned_names(src) == {"a", "e", "x", "y", "z", "i", "g", "h", "q", "w", "v"}


# ----------------------------------------------------------------------------- hybridlib.notebook, without a kernel


def test_notebook_config_reads_parameters_by_name(tmp_path, tiny_data_dir, tiny_tokenizer_dir, monkeypatch):
    from fixtures import write_tiny_params

    from hybridlib.notebook import notebook_config

    monkeypatch.delenv("HYBRIDLIB_PARAMS", raising=False)
    params = write_tiny_params(tmp_path / "p.yaml", tiny_data_dir, tiny_tokenizer_dir, epochs=3, max_train_samples=120)
    namespace = {"params_file": str(params), "run_dir": None, "epochs": 1, "max_train_samples": None,
                 "x": 5, "out": {"metrics": {}}, "_private": 1, "cfg": object(), "json": json}
    for _ in range(2):  # nothing is remembered between calls
        cfg = notebook_config(namespace)
        assert (cfg.dataset, cfg.epochs, cfg.max_train_samples, cfg.run_dir) == ("tiny", 1, None, None)
    assert notebook_config({"params_file": Path(params)}).max_train_samples == 120  # absent: the file's value


def test_notebook_config_params_file_sources(monkeypatch):
    from hybridlib.config import Config
    from hybridlib.notebook import notebook_config

    monkeypatch.delenv("HYBRIDLIB_PARAMS", raising=False)
    assert notebook_config({"params_file": None}).dataset == Config().dataset
    monkeypatch.setenv("HYBRIDLIB_PARAMS", "params/tiny.yaml")  # relative: from the project root
    assert notebook_config({"params_file": None}).dataset == "tiny"
    assert notebook_config({"params_file": "params/imdb.yaml"}).dataset == "imdb"


def test_a_variable_named_like_a_field_is_a_parameter_with_a_clear_error(monkeypatch):
    from hybridlib.errors import ConfigError
    from hybridlib.notebook import notebook_config

    monkeypatch.delenv("HYBRIDLIB_PARAMS", raising=False)
    with pytest.raises(ConfigError, match=r"Parameter 'device'.*give a variable of your own another name"):
        notebook_config({"device": object()})
    with pytest.raises(ConfigError, match="params_file"):
        notebook_config({"params_file": 3})


def test_notebook_run_named_or_newest(tmp_path_factory, outputs, capsys):
    from hybridlib.errors import ConfigError, RunError
    from hybridlib.notebook import notebook_run

    source = tiny_run(tmp_path_factory)
    older, newer = outputs / "older", outputs / "newer"
    for run, age in ((older, 3600), (newer, 0)):
        shutil.copytree(source, run)
        os.utime(run / "model.pt", (time.time() - age, time.time() - age))

    cfg, run = notebook_run({"run_dir": str(older), "params_file": "ignored.yaml", "resume": True, "eval_batch_size": 7})
    assert run == older and Path(cfg.run_dir) == older
    assert (cfg.resume, cfg.eval_batch_size, cfg.dataset) == (False, 7, "tiny")
    cfg, run = notebook_run({"run_dir": None, "x": 5})
    assert run == newer.resolve()
    assert f"using the newest finished run, {newer.resolve()}" in capsys.readouterr().out
    with pytest.raises(RunError, match="there is no folder"):
        notebook_run({"run_dir": str(outputs / "nope")})
    # the run's data, model and training are its own: changing one here would score it as another run
    saved = yaml.safe_load((older / "params.yaml").read_text())
    for key, value in (("max_length", 4), ("label_names", ["a", "b", "c"]), ("embed_dim", 7), ("seed", 99)):
        with pytest.raises(ConfigError, match=f"'{key}' is .* but .* in the run's params.yaml"):
            notebook_run({"run_dir": str(older), key: value})
    cfg, _ = notebook_run({"run_dir": str(older), "max_length": saved["max_length"]})  # the same value: fine
    assert cfg.max_length == saved["max_length"]


# ----------------------------------------------------------------------------- one kernel, as a user drives it


class Kernel:
    """One kernel running one notebook's cells: Run All, single cells and extra code, as in JupyterLab."""

    def __init__(self, nb, cwd: Path):
        from nbclient import NotebookClient

        self.nb = nb
        self.client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})

    def __enter__(self):
        self._ctx = self.client.setup_kernel()
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def run_cell(self, index: int) -> str:
        cell = self.client.execute_cell(self.nb.cells[index], index)
        return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")

    def run_all(self) -> None:
        for i, c in enumerate(self.nb.cells):
            if c.cell_type == "code" and "probe" not in c.metadata.get("tags", []):
                self.run_cell(i)

    def run_code(self, source: str) -> str:
        cell = nbformat.v4.new_code_cell(source)
        cell.metadata["tags"] = ["probe"]
        self.nb.cells.append(cell)
        return self.run_cell(len(self.nb.cells) - 1)

    def probe(self, expr: str) -> dict:
        out = self.run_code(f"import json as _json\nprint({PROBE!r} + _json.dumps({expr}))")
        return json.loads(out.split(PROBE, 1)[1])


def injected(path: Path, parameters: dict):
    """The notebook as papermill runs it: a cell with the parameters right after the parameters cell."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    nb = parameterize_notebook(load_notebook_node(str(path)), parameters, kernel_name="python3", language="python")
    params = next(i for i, c in enumerate(nb.cells) if is_parameters_cell(c))
    config_cell = next(i for i, c in enumerate(nb.cells) if i > params and c.cell_type == "code"
                       and "injected-parameters" not in c.metadata.get("tags", []))
    return nb, config_cell


@pytest.fixture
def outputs(tmp_path, monkeypatch) -> Path:
    """A private outputs folder for the kernel (which inherits this environment), and no $HYBRIDLIB_PARAMS."""
    out = tmp_path / "outputs"
    out.mkdir()
    monkeypatch.setenv("HYBRIDLIB_OUTPUTS", str(out))
    monkeypatch.delenv("HYBRIDLIB_PARAMS", raising=False)
    return out


def test_training_notebook_keeps_its_parameters_in_one_kernel(tmp_path, outputs, tiny_data_dir, tiny_tokenizer_dir):
    """02: injected values survive Run All, scratch variables, re-running the config cell and Run All again.

    The params file says epochs 3 and max_train_samples 120; the injected epochs = 1, seed = 7 and
    max_train_samples = None (a None that overrides) must win every time, and each Run All trains a new
    run with them."""
    from fixtures import write_tiny_params

    params = write_tiny_params(tmp_path / "p.yaml", tiny_data_dir, tiny_tokenizer_dir, epochs=3, max_train_samples=120)
    nb, config_cell = injected(ROOT / "notebooks" / "02_training.ipynb",
                               {"params_file": str(params), "epochs": 1, "seed": 7, "max_train_samples": None,
                                "run_dir": None})
    want = {"dataset": "tiny", "epochs": 1, "seed": 7, "max_train_samples": None}
    probe = "{k: getattr(cfg, k) for k in ['dataset', 'epochs', 'seed', 'max_train_samples', 'run_dir']}"

    def runs() -> set[str]:
        return {p.name for p in outputs.iterdir()}

    def check_trained(run_dir: str, step: str) -> None:
        run = Path(run_dir)
        assert run.parent == outputs and (run / "model.pt").is_file(), f"{step}: no trained run in {run}"
        saved = yaml.safe_load((run / "params.yaml").read_text())
        assert {k: saved[k] for k in want} == want, f"{step}: {run}/params.yaml has {saved}"
        log = (run / "training_log.csv").read_text().strip().splitlines()
        assert len(log) == 2, f"{step}: {run}/training_log.csv should have a header and one epoch: {log}"

    with Kernel(nb, tmp_path) as k:
        k.run_all()  # papermill / first Run All
        got = k.probe(probe)
        assert {key: got[key] for key in want} == want, f"first Run All: {got}"
        check_trained(got["run_dir"], "first Run All")
        first = set(runs())

        k.run_code("x = 5\nout = {}\nnote = 'scratch'")  # a user's scratch variables
        k.run_cell(config_cell)  # re-run the config cell
        got = k.probe(probe)
        assert {key: got[key] for key in want} == want, f"config cell re-run after scratch variables: {got}"
        assert Path(got["run_dir"]).name not in first, "re-running the config cell reused a finished run"

        before = set(runs())
        k.run_all()  # "Run All" again in the same kernel
        got = k.probe(probe)
        assert {key: got[key] for key in want} == want, f"second Run All in the same kernel: {got}"
        assert Path(got["run_dir"]).name not in before, "the second Run All did not train a new run"
        check_trained(got["run_dir"], "second Run All")


def test_evaluation_notebook_keeps_its_run_in_one_kernel(tmp_path, tmp_path_factory, outputs, tiny_params):
    """03: the run named by run_dir is the one evaluated at every step, though another run is newer."""
    source = tiny_run(tmp_path_factory)
    chosen, newer = outputs / "chosen-run", outputs / "newer-run"
    shutil.copytree(source, chosen)
    shutil.copytree(source, newer)
    now = time.time()
    os.utime(chosen / "model.pt", (now - 3600, now - 3600))
    os.utime(newer / "model.pt", (now, now))  # run_dir = None would pick this one
    nb, config_cell = injected(ROOT / "notebooks" / "03_evaluation.ipynb",
                               {"params_file": str(tiny_params), "run_dir": str(chosen), "baseline": False,
                                "device": "cpu", "num_threads": 1})
    old = 1_000_000_000  # 2001: a metrics.json newer than this was written by the step under test

    def reset() -> None:
        for run in (chosen, newer):
            os.utime(run / "metrics.json", (old, old))

    def check(step: str) -> None:
        assert (chosen / "metrics.json").stat().st_mtime > old, f"{step}: the run named by run_dir was not evaluated"
        assert (newer / "metrics.json").stat().st_mtime == old, f"{step}: evaluated the newest run, not run_dir"
        got = k.probe("{'baseline': cfg.baseline, 'resume': cfg.resume, 'device': cfg.device}")
        assert got == {"baseline": False, "resume": False, "device": "cpu"}, f"{step}: {got}"

    with Kernel(nb, tmp_path) as k:
        reset()
        k.run_all()
        check("first Run All")

        reset()
        k.run_code("x = 5\nout = {}")
        k.run_cell(config_cell)
        check("config cell re-run after scratch variables")

        reset()
        k.run_all()
        check("second Run All in the same kernel")
