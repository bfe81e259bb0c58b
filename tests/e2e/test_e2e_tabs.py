"""Every tab opens without errors; screenshots of each for a look (test-artifacts/screenshots/)."""
import pytest

from tests.e2e.conftest import shot

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("tab", ["Segment", "Correct", "Batch", "Fine-tune", "Models"])
def test_tab_opens_clean(page, tab):
    page.get_by_role("tab", name=tab).click()
    # the tab is shown and nothing on the page is still loading (a condition, not a fixed wait)
    page.wait_for_selector(f'button[role="tab"][aria-selected="true"]:has-text("{tab}")')
    page.wait_for_function("() => document.querySelectorAll('.pending, .generating, .progress-text').length === 0")
    shot(page, f"40_tab_{tab.lower().replace('-', '')}")
    body = page.inner_text("body")
    assert "Traceback" not in body and "Error" not in body
