"""A real browser drives 30_passk in JupyterLab: run all cells, untick a method in the Pass@k
explorer, and check that the plot redraws. Headless Debian Chromium through Selenium and
chromedriver; JupyterLab on loopback with a token. A screenshot is kept in test-artifacts/.

Needs /usr/bin/chromium, /usr/bin/chromedriver (apt: chromium chromium-driver) and selenium
(tools/install-browser-deps.sh installs all three); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

import nbtools
from nbhelpers.config import REPO_ROOT

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO_ROOT / "test-artifacts"
SERVER_START_S = 90
PAGE_LOAD_S = 60
NOTEBOOK_RUN_S = 240
REDRAW_S = 60
STOP_S = 15
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage",  # containers often have a tiny /dev/shm
                  "--window-size=1400,1800")
METHODS = {"grpo": 0.45, "psr": 0.6, "nsr": 0.3}

pytestmark = pytest.mark.browser


def _missing_dependency() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found (apt-get install chromium chromium-driver; tools/install-browser-deps.sh)"
    if not CHROMEDRIVER.exists():
        return f"{CHROMEDRIVER} not found (apt-get install chromium-driver; tools/install-browser-deps.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "the selenium package is not installed (tools/install-browser-deps.sh)"
    return None


MISSING = _missing_dependency()
if MISSING:
    pytest.skip(MISSING, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_server(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"JupyterLab did not answer {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=STOP_S)


@pytest.fixture
def lab(tmp_path):
    """JupyterLab serving ``tmp_path/lab`` on a free loopback port with a random token, with
    30_passk parameterised for three small samples files; yields (base URL, token); stops it."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    root, home = tmp_path / "lab", tmp_path / "jupyter"
    files = [str(nbtools.write_samples(tmp_path / "samples" / f"{m}.jsonl", m, share, seed=i))
             for i, (m, share) in enumerate(METHODS.items())]
    notebook = parameterize_notebook(
        load_notebook_node(str(nbtools.NOTEBOOKS_DIR / "30_passk.ipynb")),
        {"samples_files": files, "labels": list(METHODS), "bootstrap": 50, "live_widgets": True})
    root.mkdir()
    nbformat.write(notebook, root / "30_passk.ipynb")
    settings = home / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"), "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces")}
    log = tmp_path / "jupyterlab.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
             *(["--allow-root"] if os.geteuid() == 0 else [])],
            stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_for_server(f"{base}/api/status?token={token}", process, log)
        yield base, token
    finally:
        _stop(process)


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_S)
    driver.set_script_timeout(PAGE_LOAD_S)
    try:
        yield driver
    finally:
        driver.quit()


def _plot_source(driver) -> str | None:
    images = driver.find_elements(By.CSS_SELECTOR, ".chartrl-passk-explorer-output img")
    return images[0].get_attribute("src") if images else None


def _save_screenshot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_passk_explorer_redraws_when_a_method_is_unticked(lab, browser):
    base, token = lab
    browser.get(f"{base}/lab/tree/30_passk.ipynb?token={token}")
    WebDriverWait(browser, PAGE_LOAD_S).until(lambda d: d.execute_script(
        "const app = window.jupyterapp; return !!(app && app.shell.currentWidget"
        " && app.shell.currentWidget.sessionContext && app.shell.currentWidget.sessionContext.session"
        " && app.shell.currentWidget.sessionContext.session.kernel);"))
    browser.execute_script("window.jupyterapp.commands.execute('notebook:run-all-cells');")
    try:
        WebDriverWait(browser, NOTEBOOK_RUN_S).until(lambda d: _plot_source(d))
        before = _plot_source(browser)
        boxes = {box.text.strip(): box
                 for box in browser.find_elements(By.CSS_SELECTOR, ".chartrl-method-select-item")}
        assert set(boxes) == set(METHODS), f"method checkboxes {sorted(boxes)}"
        checkbox = boxes["nsr"].find_element(By.CSS_SELECTOR, "input[type=checkbox]")
        assert checkbox.is_selected()
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", checkbox)
        checkbox.click()
        WebDriverWait(browser, REDRAW_S).until(lambda d: _plot_source(d) not in (None, before))
    except Exception:
        _save_screenshot(browser, "browser-30_passk-failure.png")
        raise
    assert not checkbox.is_selected()
    screenshot = _save_screenshot(browser, "browser-30_passk-nsr-unticked.png")
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    assert _plot_source(browser).startswith("data:image/png")

