"""Browser tests: the app runs in this process on a free port; Debian's chromium drives it
through Python playwright (no browser download). Screenshots go to test-artifacts/screenshots/.

Model: `lite` when the registry has it, else the tiny random-weight Cellpose-SAM from ../shared
(runs the real engine but finds nothing sensible). CPW_E2E_STANDIN=1 swaps in a threshold model
(only for developing these tests before the engine exists).
"""
from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = next((p for p in ("/usr/bin/chromium", shutil.which("chromium") or "") if p and Path(p).exists()), None)
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_model() -> tuple[str | None, str]:
    """(model name or path, why) for the e2e run."""
    if os.environ.get("CPW_E2E_STANDIN") == "1":
        return "standin", "stand-in threshold model (CPW_E2E_STANDIN=1)"
    try:
        import cellpose_web.models  # noqa: F401
    except ImportError:
        return None, "cellpose_web.models (the engine) is not in the repo yet"
    try:
        from cellpose_web import registry
        info = registry.resolve_model("lite")
        if info.path and Path(info.path).is_file():
            return "lite", "lite"
    except Exception:  # noqa: BLE001
        pass
    tiny = REPO.parent / "shared" / "reference" / "tiny_cpsam.pth"
    if tiny.is_file():
        return str(tiny), "tiny random-weight Cellpose-SAM (lite weights not built yet)"
    return None, "no model available (no lite weights and no ../shared/reference/tiny_cpsam.pth)"


@pytest.fixture(scope="session")
def e2e_home(tmp_path_factory):
    return tmp_path_factory.mktemp("e2e_home")


@pytest.fixture(scope="session")
def app_url(e2e_home):
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    model, why = pick_model()
    if model is None:
        pytest.skip(f"e2e tests need a segmentation model: {why}")
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLPOSE_WEB_HOME", str(e2e_home))
    if model == "standin":
        from scipy import ndimage as ndi

        from cellpose_web.service import models_cache

        class Standin:
            def eval(self, img, channel_axis=None, progress=None, **kw):
                x = np.asarray(img, np.float32)
                x = x[..., 0] if x.ndim == 3 else x
                m, _ = ndi.label(ndi.binary_opening(x > np.percentile(x, 70), iterations=2))
                return m.astype(np.uint16), [np.zeros((*m.shape, 3), np.uint8),
                                             np.zeros((2, *m.shape), np.float32), x - x.mean()], None

        cm = models_cache.CachedModel(Standin(), "standin", "0" * 64, "", "test", threading.Lock())
        mp.setattr(models_cache, "get_model", lambda name: cm)
    mp.setenv("CELLPOSE_WEB_DEFAULT_MODEL", model)
    from cellpose_web.ui.app import build_app, launch_kwargs
    demo = build_app()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs())
    print(f"e2e app on port {port} with model {why}")
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    mp.undo()


@pytest.fixture(scope="session")
def browser():
    if CHROMIUM is None:
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


@pytest.fixture
def page(browser, app_url, request):
    ctx = browser.new_context(viewport={"width": 1440, "height": 1000}, accept_downloads=True)
    pg = ctx.new_page()
    pg.set_default_timeout(60_000)
    pg.goto(app_url)
    pg.wait_for_selector("#seg-run")
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        try:
            shot(pg, f"FAILED_{request.node.name}")
        except Exception:  # noqa: BLE001
            pass
    ctx.close()


def shot(page, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    p = SHOTS / f"{name}.png"
    page.screenshot(path=str(p), full_page=True)
    return p
