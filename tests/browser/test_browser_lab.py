"""The lab as a notebook user sees it: JupyterLab in headless Chromium, driven through playwright.

One JupyterLab server (127.0.0.1, a token, a free port) and one Chromium serve the whole module.
The notebooks are copied into the test's tmp dir (JupyterLab saves what it runs), the server and
its kernels get ``MINDSPEED_LAB_SMALL=1`` and ``MINDSPEED_LAB_RUNS=<tmp>/runs``, and everything is
stopped by pid afterwards: the server (SIGTERM, then its process group), the kernels it started,
every msrun job whose run directory lies under ``<tmp>/runs`` (found by its tag) and Chromium.

Scenarios (screenshots under ``<pytest tmp>/browser*/screenshots``, each checked for content):

1. quickstart: the config builder renders; a tensor-parallel size that does not fit 2 workers
   shows its message next to the input; fixing it changes the YAML preview.
2. quickstart: the demo preset applied from the page, the launch cell run, the dashboard's image
   (loss curves and loss scale) replaced at least twice on the page; the job's Stop button ends it:
   the status line says ``stopped``, none of the job's processes is left (by pid).
3. MoE notebook: run all; the token-distribution heatmap renders.

``MINDSPEED_BROWSER_ARTIFACTS=DIR`` also copies the screenshots to ``DIR/screenshots`` (pytest
keeps only its last three tmp dirs).

Needs Chromium (``apt-get install chromium``; ``make test`` installs it) and the ``playwright``
package (the ``test`` extra). Without them these tests are skipped, unless
``MINDSPEED_REQUIRE_BROWSER=1`` (``make test`` sets it) turns that into a failure.
"""

import base64
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from mindspeed_lab.launcher import terminate_processes

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = ("01_quickstart.ipynb", "04_moe_token_distribution.ipynb")
CHROMIUM = os.environ.get("MINDSPEED_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# Without the networking flags Chromium keeps trying to reach Google's services (closed network).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
# JupyterLab settings for the test server: no news/update checks, every cell kept in the DOM.
LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension:tracker": {"windowingMode": "none"},
}
SERVER_START_S = 180
KERNEL_IDLE_S = 180
JOB_ENV_RUN_DIR = "MINDSPEED_RUN_DIR"
JOB_ENV_TAG = "MINDSPEED_JOB_TAG"


def _require_browser():
    """Skip (or fail, with MINDSPEED_REQUIRE_BROWSER=1) when Chromium or playwright is missing."""
    missing = []
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        missing.append(f"Chromium at {CHROMIUM} (apt-get install -y chromium)")
    try:
        import playwright.sync_api  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    try:
        import jupyterlab  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
        missing.append("the jupyterlab package (pip install -e '.[test]')")
    if missing:
        message = "browser tests need " + " and ".join(missing)
        if os.environ.get("MINDSPEED_REQUIRE_BROWSER") == "1":
            pytest.fail(message)
        pytest.skip(message)


# ------------------------------------------------------------------------------------------------
# processes, by pid
# ------------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(proc: psutil.Process) -> bool:
    """Whether this very process (pid and start time) still runs (zombies count as gone)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _descendants(pid: int):
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _terminate(procs, grace_s: float = 5.0):
    """SIGTERM the given processes, SIGKILL what is left after ``grace_s``; returns the survivors."""
    procs = [p for p in procs if _alive(p)]
    terminate_processes(procs, grace_s)
    return [p for p in procs if _alive(p)]


def job_processes(runs_root: Path):
    """Live processes of lab jobs whose run directory lies under ``runs_root`` (by environment)."""
    root = os.path.realpath(str(runs_root)) + os.sep
    found = []
    for proc in psutil.process_iter(["pid"]):
        if proc.pid == os.getpid():
            continue
        try:
            env = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
        run_dir = env.get(JOB_ENV_RUN_DIR)
        if run_dir and env.get(JOB_ENV_TAG) and os.path.realpath(run_dir).startswith(root) and _alive(proc):
            found.append(proc)
    return found


def is_worker(proc: psutil.Process) -> bool:
    """An msrun worker: ``MS_ROLE=MS_WORKER`` and a Python interpreter (msrun's ``tail`` helpers
    that follow the worker logs inherit the worker's environment)."""
    try:
        return (proc.environ().get("MS_ROLE") == "MS_WORKER"
                and os.path.realpath(proc.exe()) == os.path.realpath(sys.executable))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
        return False


# ------------------------------------------------------------------------------------------------
# screenshots
# ------------------------------------------------------------------------------------------------

def _pixels(png: bytes) -> np.ndarray:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def assert_not_blank(png: bytes, what: str, min_colors: int = 16):
    """A screenshot with content: not one flat colour, some spread of colours."""
    pixels = _pixels(png)
    assert pixels.shape[0] > 50 and pixels.shape[1] > 50, f"{what}: tiny screenshot {pixels.shape}"
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    assert pixels.std() > 10 and colours >= min_colors, f"{what}: blank screenshot ({colours} colours, std {pixels.std():.1f})"
    return pixels


def count_near(pixels: np.ndarray, rgb, tol: int = 40) -> int:
    """Number of pixels within ``tol`` (per channel) of a colour."""
    return int((np.abs(pixels - np.array(rgb, dtype=np.int16)) <= tol).all(axis=-1).sum())


def shoot(target, path: Path) -> bytes:
    """Screenshot a page or locator into ``path`` and return the PNG bytes."""
    png = target.screenshot(path=str(path))
    print(f"screenshot: {path}")
    return png


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------

class LabServer:
    """A JupyterLab server started for the tests (its own session, so its group can be killed)."""

    def __init__(self, root: Path):
        self.root = root
        self.work = root / "notebooks"
        self.runs = root / "runs"
        self.shots = root / "screenshots"
        for path in (self.work, self.runs, self.shots):
            path.mkdir()
        for name in NOTEBOOKS:
            shutil.copy(REPO / "notebooks" / name, self.work / name)
        config = root / "jupyter-config"
        (config / "labconfig").mkdir(parents=True)
        (config / "labconfig" / "default_setting_overrides.json").write_text(json.dumps(LAB_OVERRIDES))
        self.env = dict(os.environ)
        self.env.update({
            "JUPYTER_CONFIG_DIR": str(config),
            "JUPYTER_DATA_DIR": str(root / "jupyter-data"),
            "JUPYTER_RUNTIME_DIR": str(root / "jupyter-runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(root / "lab-user-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(root / "lab-workspaces"),
            "IPYTHONDIR": str(root / "ipython"),
            "MINDSPEED_LAB_SMALL": "1",
            "MINDSPEED_LAB_RUNS": str(self.runs),
            "MPLBACKEND": "Agg",
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
            "GLOG_v": "3",
        })
        self.token = secrets.token_hex(16)
        self.port = None
        self.proc = None
        self.started = []          # every process seen below the server (kernels, msrun, ...)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self):
        last_log = ""
        for attempt in range(3):    # a port taken between _free_port() and the bind: try another
            self.port = _free_port()
            log_path = self.root / f"jupyterlab-{attempt}.log"
            cmd = [sys.executable, "-m", "jupyterlab", "--ip=127.0.0.1", f"--port={self.port}",
                   "--ServerApp.port_retries=0", "--no-browser", "--allow-root",
                   f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.work}",
                   "--ServerApp.terminals_enabled=False", "--LabApp.expose_app_in_browser=True"]
            with open(log_path, "wb") as log:
                self.proc = subprocess.Popen(cmd, cwd=self.work, env=self.env, stdout=log,  # pylint: disable=consider-using-with
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             start_new_session=True)
            deadline = time.monotonic() + SERVER_START_S
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=5) as r:
                        if r.status == 200:
                            return self
                except (urllib.error.URLError, OSError):
                    pass
                time.sleep(0.5)
            last_log = log_path.read_text(errors="replace")[-3000:]
            self.stop()
        raise RuntimeError(f"JupyterLab did not start; its log ends with:\n{last_log}")

    def remember_children(self):
        """Note the server's current descendants (kernels, and what they started)."""
        if self.proc is not None:
            known = {(p.pid, p.create_time()) for p in self.started if _alive(p)}
            for proc in _descendants(self.proc.pid):
                try:
                    if (proc.pid, proc.create_time()) not in known:
                        self.started.append(proc)
                except psutil.NoSuchProcess:
                    pass

    def stop(self):
        """Jobs by tag, then the server (SIGTERM, then its group), then its kernels, by pid.
        Returns what is still alive (nothing, normally)."""
        self.remember_children()
        _terminate(job_processes(self.runs), grace_s=3.0)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)   # stops its kernels too
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(10)
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)   # anything left in the server's group
            except (ProcessLookupError, PermissionError):
                pass
        left = _terminate(self.started, grace_s=3.0)
        left += _terminate(job_processes(self.runs), grace_s=3.0)
        return left


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    _require_browser()
    server = LabServer(tmp_path_factory.mktemp("browser"))
    try:
        t0 = time.monotonic()
        server.start()
        print(f"JupyterLab up on port {server.port} after {time.monotonic() - t0:.1f} s")
        yield server
    finally:
        left = server.stop()
        keep = os.environ.get("MINDSPEED_BROWSER_ARTIFACTS")
        if keep:   # pytest keeps only its last three tmp dirs: CI can ask for a copy elsewhere
            shutil.copytree(server.shots, Path(keep) / "screenshots", dirs_exist_ok=True)
        assert not left, f"processes left after the browser tests: {[p.pid for p in left]}"


@pytest.fixture(scope="module")
def browser(lab):
    from playwright.sync_api import sync_playwright  # pylint: disable=import-outside-toplevel

    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    pw = sync_playwright().start()
    context = None
    try:
        context = pw.chromium.launch_persistent_context(
            str(lab.root / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(60_000)
        ours = [p for p in me.children(recursive=True) if p.pid not in before]
        yield context
    finally:
        ours = [p for p in me.children(recursive=True) if p.pid not in before]
        if context is not None:
            context.close()
        pw.stop()
        left = _terminate(ours, grace_s=5.0)   # the playwright driver and Chromium, by pid
        assert not left, f"Chromium/playwright processes left: {[p.pid for p in left]}"


# ------------------------------------------------------------------------------------------------
# JupyterLab page helpers
# ------------------------------------------------------------------------------------------------

KERNEL_IDLE_JS = """() => {
  const app = window.jupyterapp; const w = app && app.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
}"""


def open_notebook(context, lab_server, name, workspace):
    """A new browser tab with JupyterLab showing notebook ``name`` (its own workspace), kernel idle."""
    page = context.new_page()
    page.goto(f"{lab_server.url}/lab/workspaces/{workspace}/tree/{name}?reset&token={lab_server.token}",
              wait_until="domcontentloaded")
    page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first.wait_for(timeout=120_000)
    page.wait_for_function(KERNEL_IDLE_JS, timeout=KERNEL_IDLE_S * 1000, polling=500)
    lab_server.remember_children()
    return page


def cell(page, index):
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(index)


def run_cell(page, index):
    """Select a cell by clicking its prompt (command mode) and press Shift+Enter, as a user does."""
    c = cell(page, index)
    c.scroll_into_view_if_needed()
    c.locator(".jp-InputPrompt").click()
    page.keyboard.press("Shift+Enter")


def wait_executed(page, index, timeout_s=KERNEL_IDLE_S):
    """Wait until a code cell shows an execution count (not ``[*]``) and the kernel is idle."""
    prompt = cell(page, index).locator(".jp-InputPrompt")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip()) and page.evaluate(KERNEL_IDLE_JS):
            return
        time.sleep(0.5)
    raise AssertionError(f"cell {index} did not finish within {timeout_s} s: {cell(page, index).inner_text()[-2000:]}")


def assert_no_error(page, index):
    errors = cell(page, index).locator('.jp-OutputArea-output[data-mime-type="application/vnd.jupyter.stderr"]')
    texts = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not texts, f"cell {index} failed: {texts[0][-3000:]}"


def code_cells_until(page, last):
    """Indices of the code cells up to ``last``."""
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    return [i for i in range(last + 1) if "jp-CodeCell" in (cells.nth(i).get_attribute("class") or "")]


def wait_text(locator, text, timeout_s=60.0, present=True):
    """Poll until the locator's text contains (or, ``present=False``, no longer contains) ``text``.
    The locator is resolved again at every poll: widgets replace their DOM when they update."""
    deadline = time.monotonic() + timeout_s
    current = ""
    while time.monotonic() < deadline:
        try:
            current = locator.inner_text(timeout=5_000)
        except Exception:  # pylint: disable=broad-except  # re-rendered or not there yet
            current = ""
        if (text in current) == present:
            return current
        time.sleep(0.25)
    raise AssertionError(f"{'no' if present else 'still'} {text!r} after {timeout_s} s in: {current[-2000:]}")


def img_srcs(locator):
    return locator.evaluate_all("els => els.map(e => e.getAttribute('src') || '')")


def data_url_png(src: str) -> bytes:
    assert src.startswith("data:image/png;base64,"), src[:60]
    return base64.b64decode(src.split(",", 1)[1])


# ------------------------------------------------------------------------------------------------
# scenarios
# ------------------------------------------------------------------------------------------------

def find_code_cell(page, needle, after=-1):
    """Index of the first code cell after ``after`` whose source contains ``needle``."""
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    for index in code_cells_until(page, cells.count() - 1):
        if index > after and needle in cells.nth(index).locator(".jp-InputArea").inner_text():
            return index
    raise AssertionError(f"no code cell with {needle!r} in the notebook")


class Quickstart:
    """The quickstart notebook's page and the cells the scenarios use (found by their source)."""

    def __init__(self, page):
        self.page = page
        self.builder_cell = find_code_cell(page, "ConfigBuilder(")        # displays the builder
        self.code_api_cell = find_code_cell(page, "builder.set(", self.builder_cell)
        self.launch_cell = find_code_cell(page, "builder.launch(", self.code_api_cell)   # + JobControl, dashboard

    @property
    def form(self):
        return cell(self.page, self.builder_cell).locator(".jp-OutputArea")


@pytest.fixture(scope="module")
def quickstart(lab, browser):
    """The quickstart notebook open in a tab, its cells up to the builder's code-API cell run."""
    t0 = time.monotonic()
    page = open_notebook(browser, lab, "01_quickstart.ipynb", "quickstart")
    t_open = time.monotonic() - t0
    assert "Quickstart" in cell(page, 0).inner_text()
    qs = Quickstart(page)
    for index in code_cells_until(page, qs.code_api_cell):
        run_cell(page, index)
    wait_executed(page, qs.code_api_cell)
    lab.remember_children()
    for index in code_cells_until(page, qs.code_api_cell):
        assert_no_error(page, index)
    print(f"quickstart: open, kernel idle {t_open:.1f} s; cells up to {qs.code_api_cell} run "
          f"{time.monotonic() - t0 - t_open:.1f} s")
    yield qs
    page.close()


def test_quickstart_builder_validation_and_yaml_preview(lab, quickstart):
    t0 = time.monotonic()
    page, form = quickstart.page, quickstart.form
    form.get_by_role("tab", name="Parallel", exact=True).click()
    tp = form.get_by_label("tensor_model_parallel_size", exact=True)
    tp.wait_for()
    # the input's row: the input and its message side by side (inner locators are relative)
    row = form.locator(".widget-hbox").filter(has=page.get_by_label("tensor_model_parallel_size", exact=True))
    message = row.locator(".widget-html")
    form.get_by_text("YAML preview", exact=True).click()
    preview = form.locator(".widget-html pre").filter(has_text="device_target")
    assert "tensor_model_parallel_size" not in preview.inner_text()      # tp = 1 is the default

    # a person types 3: three does not divide the 2 workers (nor the 4 heads)
    tp.fill("3")
    tp.press("Enter")
    wait_text(message, "tensor_model_parallel_size=3")
    assert "must be divisible by tensor_model_parallel_size=3" in message.inner_text()
    assert "must divide the world size 2" in form.inner_text()           # next to the workers input
    input_box, message_box = tp.bounding_box(), message.bounding_box()
    assert message_box["x"] >= input_box["x"] + input_box["width"] - 1, (input_box, message_box)  # right of it
    assert abs(message_box["y"] - input_box["y"]) < 40, (input_box, message_box)                  # same row
    wait_text(preview, "tensor_model_parallel_size: 3")
    preview.scroll_into_view_if_needed()
    assert_not_blank(shoot(preview, lab.shots / "1b-yaml-preview-tp3.png"), "YAML preview, tp=3")
    message.scroll_into_view_if_needed()
    shot = assert_not_blank(shoot(row, lab.shots / "1a-builder-tp3-message.png"), "tp=3 row")
    # the message's colour (the builder's world-size style, #b35900) is on the picture
    assert count_near(shot, (0xb3, 0x59, 0x00)) > 50, "no message text visible next to the input"
    assert_not_blank(shoot(page, lab.shots / "1c-builder-tp3-page.png"), "tp=3 page")

    # fixed: 2 divides the workers; the message goes away, the preview says 2
    tp.fill("2")
    tp.press("Enter")
    wait_text(preview, "tensor_model_parallel_size: 2")
    assert wait_text(message, "tensor_model_parallel_size=3", present=False).strip() == ""
    assert "valid for 2 workers" in form.inner_text()
    preview.scroll_into_view_if_needed()
    assert_not_blank(shoot(preview, lab.shots / "1d-yaml-preview-fixed.png"), "YAML preview")
    assert_not_blank(shoot(page, lab.shots / "1e-builder-fixed-page.png"), "fixed page")
    print(f"scenario 1: {time.monotonic() - t0:.1f} s")


def test_quickstart_launch_live_dashboard_and_stop(lab, quickstart):
    t0 = time.monotonic()
    page, form = quickstart.page, quickstart.form
    # the demo preset (emulated float16, dynamic loss scaling, tens of steps) chosen on the page
    form.get_by_label("preset", exact=True).select_option("demo")
    form.get_by_role("button", name="Apply preset").click()
    wait_text(form, "loaded preset demo")
    assert "valid for 2 workers" in form.inner_text()

    run_cell(page, quickstart.launch_cell)
    launch = cell(page, quickstart.launch_cell)
    image = launch.locator(".jp-OutputArea-output img")
    seen, first_image_at = [], None
    deadline = time.monotonic() + 240
    workers = {}
    while time.monotonic() < deadline:
        for proc in job_processes(lab.runs):
            if is_worker(proc):
                workers[proc.pid] = proc
        srcs = img_srcs(image)
        assert len(srcs) <= 1, "the dashboard must keep one output"
        if srcs and srcs[0] and (not seen or srcs[0] != seen[-1]):
            seen.append(srcs[0])
            first_image_at = first_image_at or time.monotonic()
            if _changes_in_both_panels(seen) >= 2 and len(workers) >= 2:
                break
        assert "Traceback" not in launch.inner_text(), launch.inner_text()[-3000:]
        time.sleep(0.3)
    lab.remember_children()
    for i, src in enumerate(seen):
        (lab.shots / f"2-dashboard-image-{i}.png").write_bytes(data_url_png(src))
    assert _changes_in_both_panels(seen) >= 2, f"the dashboard image changed {len(seen) - 1} times"
    assert len(workers) == 2, f"worker processes seen: {sorted(workers)}"
    image.scroll_into_view_if_needed()
    shot = assert_not_blank(shoot(image, lab.shots / "2a-dashboard-live.png"), "live dashboard", min_colors=64)
    assert shot.shape[0] > shot.shape[1] * 0.8, "the loss-scale panel is not below the training panel"
    assert_not_blank(shoot(page, lab.shots / "2b-dashboard-live-page.png"), "live page")

    # the launch cell returned (the dashboard draws from a thread): the kernel is free for the click
    wait_executed(page, quickstart.launch_cell, timeout_s=60)
    status = launch.locator(".mindspeed-job-status")
    assert "quickstart" in status.inner_text() and "running" in status.inner_text(), status.inner_text()
    assert all(_alive(p) for p in workers.values()), "the job ended before the stop"
    launch.get_by_role("button", name="Stop").click()
    wait_text(status, ": stopped", timeout_s=90)
    assert launch.get_by_role("button", name="Stop").is_disabled()
    for pid, proc in workers.items():
        assert not _alive(proc), f"worker {pid} still running after stop"
    assert not job_processes(lab.runs), "a process of the job is still running"
    job_json = json.loads(next(lab.runs.glob("quickstart*/job.json")).read_text())
    assert job_json.get("status") == "stopped", job_json
    status.scroll_into_view_if_needed()
    assert_not_blank(shoot(launch, lab.shots / "2c-stopped-cell.png"), "stopped cell")
    print(f"scenario 2: {time.monotonic() - t0:.1f} s, {len(seen)} dashboard images, "
          f"first after {first_image_at - t0 if first_image_at else float('nan'):.1f} s")


def _changes_in_both_panels(srcs):
    """How many times the dashboard image changed in its top part (loss curves) and its bottom
    part (the loss-scale panel, stacked below) at once, between consecutive images of equal size."""
    count = 0
    arrays = [_pixels(data_url_png(s)) for s in srcs[-12:]]
    for old, new in zip(arrays, arrays[1:]):
        if old.shape != new.shape or new.shape[0] < new.shape[1] * 0.8:
            continue
        h = new.shape[0]
        top = (old[: h // 2] != new[: h // 2]).any()
        bottom = (old[int(h * 0.75):] != new[int(h * 0.75):]).any()
        count += bool(top and bottom)
    return count


def test_moe_notebook_heatmap(lab, browser):
    t0 = time.monotonic()
    page = open_notebook(browser, lab, "04_moe_token_distribution.ipynb", "moe")
    t_open = time.monotonic() - t0
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell")
    code = code_cells_until(page, cells.count() - 1)
    figure_cell = next(i for i in code if "moe_distribution_figure" in cell(page, i).locator(".jp-InputArea").inner_text())
    # the heatmap cell and everything above it: select the cell below it, Run > Run All Above Selected Cell
    cell(page, figure_cell + 1).locator(".jp-InputPrompt").click()
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Above Selected Cell$")).click()
    wait_executed(page, figure_cell, timeout_s=300)
    lab.remember_children()
    for index in code:
        if index <= figure_cell:
            assert_no_error(page, index)
    heatmap = cell(page, figure_cell).locator(".jp-OutputArea-output img").first
    heatmap.scroll_into_view_if_needed()
    size = heatmap.evaluate("el => [el.complete, el.naturalWidth, el.naturalHeight]")
    assert size[0] and size[1] > 200 and size[2] > 200, size
    shot = assert_not_blank(shoot(heatmap, lab.shots / "3a-moe-heatmap.png"), "heatmap", min_colors=64)
    # a heatmap: large areas of saturated colour map (line plots on white have ~1 % of such pixels)
    colourful = ((shot.max(axis=-1) - shot.min(axis=-1)) > 60).mean()
    assert colourful > 0.25, f"only {colourful:.1%} of the figure is coloured: no heatmap"
    assert len(np.unique(shot.reshape(-1, 3), axis=0)) > 200
    assert_not_blank(shoot(page, lab.shots / "3b-moe-page.png"), "MoE page")
    page.close()
    print(f"scenario 3: {time.monotonic() - t0:.1f} s (notebook open, kernel idle: {t_open:.1f} s)")
