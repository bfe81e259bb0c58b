"""Long runs under control in a real browser: a page reload mid-run stops that work on the server
within seconds, another user's run is not delayed by it, and a finished result survives a reload."""
import re
import time

import numpy as np
import pytest
import tifffile
from playwright.sync_api import expect

from tests.e2e.conftest import REPO, shot

pytestmark = pytest.mark.e2e
EXAMPLE = REPO / "examples" / "u2os_nuclei.tif"


def _long_stack(path, planes=80, size=512):
    """A z-stack that takes lite a minute or more plane by plane on 2 cores (uint16, nuclei-like)."""
    from cellpose_web.engine import synthetic
    rng = np.random.default_rng(0)
    base = synthetic.synthetic_sample(rng, (size, size), style="nuclei", diameter=30.0).image[0]
    stack = np.stack([np.roll(base, 3 * z, axis=1) for z in range(planes)])
    tifffile.imwrite(path, (stack / stack.max() * 60000).astype(np.uint16))
    return path


def _wait(cond, timeout, step=0.1):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        v = cond()
        if v:
            return v
        time.sleep(step)
    return None


def _open(browser, app_url):
    ctx = browser.new_context(viewport={"width": 1440, "height": 1000})
    pg = ctx.new_page()
    pg.set_default_timeout(120_000)
    pg.goto(app_url)
    pg.wait_for_selector("#seg-run")
    return ctx, pg


def _start_long_run(pg, stack, started: float):
    """Upload `stack`, press Run; the server's run once it is `started` (fraction) done, else None."""
    from cellpose_web.service import runs
    pg.set_input_files("#seg-file input[type=file]", str(stack))
    pg.wait_for_selector(f"#seg-info :text('{stack.name}')")
    pg.click("#seg-run")
    return _wait(lambda: next((r for r in runs.registry().active() if r.fraction > started), None), 240)


def _count(pg):
    pg.wait_for_function("() => { const s = document.querySelector('#seg-count strong');"
                         " return s && /^\\d+ cells?$/.test(s.innerText.trim()); }", timeout=180_000)
    return int(pg.inner_text("#seg-count strong").split()[0])


def test_reload_mid_run_stops_it_and_does_not_delay_others(browser, app_url, tmp_path):
    from cellpose_web.service import runs
    stack = _long_stack(tmp_path / "long_stack.tif")
    ctx_a, a = _open(browser, app_url)
    ctx_b, b = _open(browser, app_url)
    try:
        run = _start_long_run(a, stack, 0.08)
        assert run is not None, "the long run never got going"
        a.wait_for_selector("text=/left/")  # the progress line shows an ETA
        shot(a, "runs_01_progress_eta")
        remaining = run.elapsed() * (1 - run.fraction) / run.fraction  # what it would still take
        t_reload = time.perf_counter()
        a.reload()
        stopped = _wait(lambda: run not in runs.registry().active(), 30)
        stop_s = time.perf_counter() - t_reload
        print(f"\nreload -> server stopped the run in {stop_s:.1f} s at {100 * run.fraction:.0f} % "
              f"(it had about {remaining:.0f} s left)")
        assert stopped and run.cancelled and run.fraction < 0.9  # stopped early, well before its end

        # another user starts right away: served in about its own time, not after the abandoned stack
        b.set_input_files("#seg-file input[type=file]", str(EXAMPLE))
        b.wait_for_selector("#seg-info :text('u2os_nuclei.tif')")
        b.locator("#seg-diameter input, #seg-diameter textarea").first.fill("30")
        t0 = time.perf_counter()
        b.click("#seg-run")
        n = _count(b)
        other_s = time.perf_counter() - t0
        print(f"other user's 256x256 run: {other_s:.1f} s")
        assert n > 0  # served (timings are printed above and measured in benchmarks/load_test.py)

        # that user's finished result survives a page reload
        b.reload()
        b.wait_for_selector("#seg-run")
        assert _count(b) == n
        assert "u2os_nuclei" in b.inner_text("#seg-info")
        # ... with the form it was made with, not the defaults
        expect(b.locator("#seg-diameter input, #seg-diameter textarea").first).to_have_value("30")
        expect(b.locator("#seg-model input")).to_have_value(re.compile(r"^lite "))
        shot(b, "runs_02_result_after_reload")
    finally:
        ctx_a.close()
        ctx_b.close()


def test_cancel_button_stops_the_run(browser, app_url, tmp_path):
    from cellpose_web.service import runs
    stack = _long_stack(tmp_path / "cancel_stack.tif", planes=60, size=384)
    ctx, pg = _open(browser, app_url)
    try:
        run = _start_long_run(pg, stack, 0.05)
        assert run is not None
        t0 = time.perf_counter()
        pg.click("#seg-cancel")
        assert _wait(lambda: run not in runs.registry().active(), 30)
        print(f"\ncancel -> stopped in {time.perf_counter() - t0:.1f} s")
        pg.wait_for_selector("text=/Run cancelled/")
        assert "No result yet" in pg.inner_text("#seg-count")  # nothing half-done replaced the view
        assert "Traceback" not in pg.content()
    finally:
        ctx.close()
