"""The prediction widget in a real browser: JupyterLab + headless Chromium (Playwright), end to end.

Trains a tiny run, starts JupyterLab on a temporary copy of notebooks/05_prediction.ipynb with
HYBRIDLIB_OUTPUTS pointing at the run's outputs folder, opens the notebook in Chromium, runs all
cells from the Run menu, types a text into the widget, clicks Predict and checks that the label and
the probability bars appear. Screenshots go to test-artifacts/ (git-ignored).

Needs Chromium at /usr/bin/chromium (or $HYBRIDLIB_CHROMIUM): `apt-get install chromium`; .ci/run
installs it; and the playwright package (`pip install -e '.[test]'`). Skipped where either is absent,
except under CI (the CI environment variable set), where it fails instead. About a minute on 2 CPU cores.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tiny_run import tiny_run

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
NOTEBOOK = "05_prediction.ipynb"
LABELS = ("sports", "business", "science")
TEXT = "The striker scored a late goal and the team won the championship match in the stadium."
TOTAL_TIMEOUT_S = 600  # the whole test, server start and all
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-dev-shm-usage"]


def find_chromium() -> str | None:
    for cand in (os.environ.get("HYBRIDLIB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return cand
    return None


CHROMIUM = find_chromium()

pytestmark = pytest.mark.browser


def browser_tools():
    """Playwright's sync API, with Chromium present: else skip, or fail under CI (where both must be installed)."""
    missing = []
    if CHROMIUM is None:
        missing.append("Chromium is not installed (/usr/bin/chromium or $HYBRIDLIB_CHROMIUM; `apt-get install "
                       "chromium`, which .ci/run does)")
    try:
        from playwright import sync_api
    except ImportError:
        missing.append("the playwright package is not installed (`pip install -e '.[test]'`)")
    if missing:
        why = "; ".join(missing) + ": the real-browser test needs it"
        if os.environ.get("CI"):
            pytest.fail(f"CI is set, so the browser test must run, but {why}.", pytrace=False)
        pytest.skip(why)
    return sync_api


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def ms(self, cap_s: float) -> float:
        """A Playwright timeout: ``cap_s`` seconds, or what is left of the deadline if less."""
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the browser test ran past its {TOTAL_TIMEOUT_S} s limit")
        return 1000 * min(cap_s, left)


def stop_process_tree(proc: subprocess.Popen) -> None:
    """Stop JupyterLab (SIGTERM: it shuts its kernels down), then kill anything of it still alive."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def jupyter_lab(tmp_path_factory, tmp_path):
    """A JupyterLab server on a free port serving a copy of 05_prediction.ipynb; yields its URL."""
    run_dir = tiny_run(tmp_path_factory)
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    config = tmp_path / "jupyter_config"
    # no "get Jupyter news?" toast over the page
    settings = config / "lab" / "user-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    env = {
        **os.environ,
        # only config and runtime are private: the data dirs (venv share/) still give the kernelspec
        # and the ipywidgets labextension
        "JUPYTER_CONFIG_DIR": str(config),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "jupyter_runtime"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "HYBRIDLIB_OUTPUTS": str(run_dir.parent),
    }
    env.pop("HYBRIDLIB_PARAMS", None)
    port = free_port()
    log_path = tmp_path / "jupyter.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip", "127.0.0.1", f"--port={port}",
         "--ServerApp.token=", "--ServerApp.password=", "--allow-root", f"--ServerApp.root_dir={root}",
         "--ServerApp.port_retries=0", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/status", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not answer within 120 s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "run_dir": run_dir, "log": log_path}
    finally:
        stop_process_tree(proc)
        log.close()


def test_prediction_widget_in_jupyterlab(request):
    sync_api = browser_tools()  # before the fixture: skip (or fail under CI) without training a run
    jupyter_lab = request.getfixturevalue("jupyter_lab")
    ARTIFACTS.mkdir(exist_ok=True)
    deadline = Deadline(TOTAL_TIMEOUT_S)
    started = time.monotonic()
    idle = re.compile(r"\|\s*Idle")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{jupyter_lab['url']}/lab/tree/{NOTEBOOK}", timeout=deadline.ms(120))
            page.locator(".jp-Notebook .jp-Cell").first.wait_for(timeout=deadline.ms(120))
            # the kernel has started and is idle (status bar: "Python 3 (ipykernel) | Idle")
            page.get_by_text(idle).first.wait_for(timeout=deadline.ms(180))

            # Run > Run All Cells
            page.locator(".lm-MenuBar-item", has_text=re.compile(r"^\s*Run\s*$")).click(timeout=deadline.ms(30))
            page.locator(".lm-Menu-item", has_text=re.compile(r"^\s*Run All Cells")).click(timeout=deadline.ms(30))

            textarea = page.locator(".hl-predict-widget .hl-textarea textarea")
            textarea.wait_for(state="visible", timeout=deadline.ms(300))
            page.get_by_text(idle).first.wait_for(timeout=deadline.ms(120))
            assert "tiny-run" in page.locator(".hl-predict-widget select").inner_text(timeout=deadline.ms(30))

            textarea.scroll_into_view_if_needed(timeout=deadline.ms(30))
            textarea.fill(TEXT, timeout=deadline.ms(30))
            page.locator(".hl-predict-widget .hl-predict-button").click(timeout=deadline.ms(30))

            label = page.locator(".hl-predict-widget .hl-label")
            label.wait_for(state="visible", timeout=deadline.ms(120))
            text = label.inner_text()
            assert re.search(r"Predicted:\s*(" + "|".join(LABELS) + r")\b", text), text
            bars = page.locator(".hl-predict-widget .hl-probs .hl-bar")
            assert bars.count() == len(LABELS)
            for i in range(len(LABELS)):
                assert bars.nth(i).is_visible()
            assert sorted(bars.nth(i).get_attribute("data-class") for i in range(len(LABELS))) == sorted(LABELS)
            assert page.locator(".hl-predict-widget .hl-token").count() > 5
            assert page.locator(".hl-predict-widget .hl-error").count() == 0

            widget = page.locator(".hl-predict-widget")
            widget.scroll_into_view_if_needed()
            page.mouse.move(0, 0)  # no hover highlight in the screenshot
            widget.screenshot(path=str(ARTIFACTS / "widget.png"))
            page.screenshot(path=str(ARTIFACTS / "browser-05_prediction.png"))
        except BaseException:
            try:
                page.screenshot(path=str(ARTIFACTS / "browser-05_prediction-failure.png"))
                shutil.copy(jupyter_lab["log"], ARTIFACTS / "browser-jupyter.log")
            except Exception:
                pass
            raise
        finally:
            browser.close()
    print(f"browser test: {time.monotonic() - started:.1f} s from opening the page")
