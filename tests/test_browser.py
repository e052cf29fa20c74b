"""The Explain tab in a real browser: Debian's Chromium, driven by Playwright, uploads an image,
clicks Explain and waits for every model's map and top-k chart.

``KD_APP_URL=<url>`` drives an app that is already running instead of starting one on tiny
checkpoints; ``KD_SCREENSHOT=<file.png>`` also saves the page, 1400 px wide (the README's
screenshot is taken this way, never in CI).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import CAT, build_bench, start_app, stop_app

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
TIMEOUT_MS = 60_000

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason=f"no {CHROMIUM}: install Debian's browser with `apt-get install -y chromium`")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

# Per visible model column: whether its map has loaded (and at what size) and how many bars its chart has.
PANELS_JS = """() => [...document.querySelectorAll('.model-panel')]
    .filter(panel => panel.offsetParent !== null)
    .map(panel => {
        const map = panel.querySelector('.cam-panel img');
        return {caption: panel.innerText.split('\\n')[0],
                map: map && map.complete ? [map.naturalWidth, map.naturalHeight] : null,
                bars: panel.querySelectorAll('.js-plotly-plot .bars .point').length};
    })"""


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if os.environ.get("KD_APP_URL"):
        yield os.environ["KD_APP_URL"]
        return
    bench = build_bench(tmp_path_factory.mktemp("browser"))
    process, url = start_app(bench.env, bench.root / "app.log")
    yield url
    stop_app(process, bench.runs)


@pytest.fixture(scope="module")
def page(app_url):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(app_url)
        yield page
        browser.close()


def test_explain_tab_shows_a_map_and_a_chart_per_model(page):
    page.locator(".upload-panel input[type=file]").set_input_files(str(CAT))
    page.locator(".upload-panel .image-frame img").wait_for(state="visible")
    page.get_by_role("button", name="Explain", exact=True).click()

    page.wait_for_function(f"""() => {{
        const panels = ({PANELS_JS})();
        return panels.length >= 2 && panels.every(panel => panel.map && panel.bars > 0);
    }}""", timeout=TIMEOUT_MS)

    panels = page.evaluate(PANELS_JS)
    assert panels[0]["caption"].startswith("teacher: ")
    assert [panel["caption"].split(":")[0] for panel in panels[1:]] == [f"student {n}" for n in range(1, len(panels))]
    for panel in panels:
        assert panel["map"] == [32, 32]  # the map over the 32 x 32 upload, at its own size
        assert panel["bars"] == 5  # top-5, the default
    agreement = page.locator(".block").filter(has_text="How far each student agrees with the teacher")
    listed = agreement.last.locator("[role=gridcell][data-col='0']").all_inner_texts()
    assert listed == [panel["caption"].split(": ")[1].split(" (")[0] for panel in panels[1:]]
    if os.environ.get("KD_SCREENSHOT"):
        page.screenshot(path=os.environ["KD_SCREENSHOT"], full_page=True)


def choose(page, label: str, names: list[str]) -> None:
    """Pick ``names`` in the dropdown labelled ``label`` (a multiselect loses its current picks first)."""
    block = page.locator(".block").filter(has=page.get_by_label(label, exact=True)).last
    while block.locator(".token-remove").count():
        block.locator(".token-remove").first.click()
    field = page.get_by_label(label, exact=True)
    for name in names:
        field.click()
        field.fill(name)
        page.locator("ul[role=listbox] li", has_text=name).first.click()


def test_a_digit_is_explained_with_a_cam_for_the_cnn_and_saliency_for_the_mlp(page, tmp_path):
    from PIL import Image

    from kd_core.data import load_data

    digit = tmp_path / "digit.png"
    Image.fromarray(load_data("digits").test.images[3, 0].numpy()).resize((64, 64), Image.Resampling.NEAREST).save(digit)
    choose(page, "Teacher", ["digits-teacher"])
    choose(page, "Students (up to 3)", ["digits-student"])
    page.locator(".upload-panel input[type=file]").set_input_files(str(digit))
    page.get_by_role("button", name="Explain", exact=True).click()
    page.wait_for_function(f"""() => {{
        const panels = ({PANELS_JS})();
        return panels.length === 2 && panels[1].caption.includes("digits-student")
            && panels.every(panel => panel.map && panel.map[0] === 64);
    }}""", timeout=TIMEOUT_MS)
    panels = page.evaluate(PANELS_JS)
    assert panels[0]["caption"].startswith("teacher: digits-teacher") and panels[0]["map"] == [64, 64]
    mlp_panel = page.locator(".model-panel").filter(has_text="student 1: digits-student")
    assert "input-gradient saliency, not a CAM" in mlp_panel.inner_text()
