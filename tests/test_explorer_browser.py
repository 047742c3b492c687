"""The explorer in a real browser: headless Chromium from the OS packages, driven by Selenium, on a
flux-toy sweep and capture run (skipped, saying why, where Chromium or its driver is missing).

`.ci/run` installs them (`apt-get install chromium chromium-driver`); Selenium is pointed at the
system's binaries, so it never downloads a browser or a driver.
"""

import json
import shutil
import threading
from pathlib import Path

import pytest
from PIL import Image

from flux_ir.analysis import PixelEmbedder, analyze_sweep, fisher_geometry
from flux_ir.capture import CaptureOptions, Selection
from flux_ir.explorer import Explorer, make_server
from flux_ir.sweep import GridSpec, SweepConfig, run_sweep
from flux_ir.workflows import CaptureRunOptions, capture_to_dir

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PROMPT = "a red circle on a blue background"
WAIT_S = 240  # generous: the CPU may be shared


@pytest.fixture(scope="module")
def driver():
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip(
            "Chromium is not installed (apt-get install chromium chromium-driver; .ci/run does it)"
        )
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is a dev dependency")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--disable-extensions", "--no-first-run"):  # fmt: skip
        options.add_argument(arg)
    browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(WAIT_S)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def served(toy_pipe, tmp_path_factory):
    """A 3 x 3 flux-toy sweep (2 steps, analysed, with a small Fisher geometry and two geodesics) and
    a capture run of four blocks, served."""
    pipe, spec = toy_pipe
    root = tmp_path_factory.mktemp("explored")
    cfg = SweepConfig.from_spec(
        spec, prompt=PROMPT, num_steps=2, grid=GridSpec(n_alpha=3, n_beta=3)
    )
    run_sweep(pipe, cfg, root / "sweep", batch_size=9, progress=False)
    analyze_sweep(root / "sweep", PixelEmbedder())
    fisher_geometry(
        root / "sweep",
        PixelEmbedder(8),
        width=8,
        depth=2,
        steps=4,
        metric_resolution=5,
        geodesics=[((0.0, 0.0), (1.0, 1.0)), ((1.0, 0.0), (0.0, 1.0))],
        geodesic_points=6,
        geodesic_iterations=2,
        device="cpu",
        progress=False,
    )
    opts = CaptureOptions.from_spec(spec, seed=1, num_steps=2)
    run = CaptureRunOptions(selection=Selection.parse("0,-1", "0,-1"))
    run_dir = capture_to_dir(pipe, spec, opts, root / "runs", run)
    explorer = Explorer(root, device="cpu", batch_size=2)
    explorer.models.put(pipe, "flux-toy")
    server = make_server(explorer, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"root": root, "url": f"http://127.0.0.1:{server.server_port}/", "run": run_dir}
    server.shutdown()
    server.server_close()
    explorer.close()


def loaded_images(driver) -> int:
    return driver.execute_script(
        "return [...document.querySelectorAll('#grid img.point')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length"
    )


def wait(driver, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.25).until(
        lambda d: condition(d), message=f"timed out waiting for {what}"
    )


def where(driver) -> str:
    return driver.find_element("id", "where").text


def cell(driver, index: int):
    return driver.find_element("css selector", f'#grid .cell[data-index="{index}"]')


def test_sweep_grid_hover_path_zoom_and_undo(driver, served, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    driver.get(served["url"] + "#sweep=sweep")
    wait(driver, lambda d: loaded_images(d) == 9, "the 3 x 3 grid's images")
    assert len(driver.find_elements("css selector", "#grid .cell")) == 9
    assert where(driver).startswith("sweep —")
    heat = driver.execute_script(
        "return getComputedStyle(document.querySelector('#grid .cell .heat')).backgroundColor"
    )
    assert heat.startswith("rgb"), "the Lipschitz overlay is painted"

    ActionChains(driver).move_to_element(cell(driver, 5)).perform()  # row 1, col 2
    wait(driver, lambda d: d.find_element("id", "inspect-alpha").text == "0.5", "the hover")
    assert driver.find_element("id", "inspect-beta").text == "1"
    src = driver.find_element("id", "inspect-img").get_attribute("src")
    assert src.endswith("/files/sweep/images/a001_b002.png")
    assert float(driver.find_element("id", "inspect-norm-after").text) > 0

    ActionChains(driver).click(cell(driver, 0)).perform()
    ActionChains(driver).click(cell(driver, 8)).perform()
    wait(driver, lambda d: d.find_element("id", "path-panel").is_displayed(), "the path")
    assert len(driver.find_elements("css selector", "#path-strip figure")) == 3
    driver.save_screenshot(str(tmp_path / "sweep.png"))

    # drag from the centre of (alpha 0.5, beta 0) to the centre of (alpha 1, beta 0.5): a 2 x 2 zoom
    driver.execute_script("document.getElementById('zoom-n').value = 2")
    start, end = cell(driver, 3), cell(driver, 7)
    ActionChains(driver).click_and_hold(start).move_by_offset(20, -20).move_to_element(
        end
    ).release().perform()
    wait(driver, lambda d: where(d).startswith("sweep-zoom1"), "the zoomed sweep's page")
    wait(driver, lambda d: loaded_images(d) == 4, "the zoomed sweep's images")
    child = served["root"] / "sweep-zoom1"
    meta = json.loads((child / "metadata.json").read_text())
    assert meta["sweep"]["grid"]["alpha"] == [0.5, 1.0]
    assert meta["sweep"]["grid"]["beta"] == [0.0, 0.5]
    assert len(list((child / "images").glob("*.png"))) == 4
    assert json.loads((child / "zoom.json").read_text())["parent"] == "../sweep"
    driver.save_screenshot(str(tmp_path / "zoom.png"))

    driver.find_element("id", "back").click()  # undo: the parent again
    wait(driver, lambda d: where(d).startswith("sweep —") and loaded_images(d) == 9, "the parent")
    driver.find_element("id", "forward").click()  # redo
    wait(driver, lambda d: where(d).startswith("sweep-zoom1") and loaded_images(d) == 4, "redo")
    driver.find_element("id", "up").click()  # the link to the parent
    wait(driver, lambda d: where(d).startswith("sweep —") and loaded_images(d) == 9, "the link")
    for name in ("sweep.png", "zoom.png"):
        assert Image.open(tmp_path / name).format == "PNG"


def test_capture_lens_viewer_and_sortable_metrics(driver, served, tmp_path):
    run = served["run"].relative_to(served["root"]).as_posix()
    driver.get(served["url"] + f"#capture={run}")
    lens_loaded = (
        "const i = document.getElementById('lens-img'); return i.complete && i.naturalWidth > 0"
    )
    wait(driver, lambda d: d.execute_script(lens_loaded), "the lens decode")
    rows = "return document.querySelectorAll('#metrics tbody tr').length"
    wait(driver, lambda d: d.execute_script(rows) == 4, "the metrics of step 0 (4 blocks, img)")
    names = [
        td.text for td in driver.find_elements("css selector", "#metrics tbody td:first-child")
    ]
    assert names == ["double 0", "double 3", "single 0", "single 7"]

    driver.find_element("css selector", '#metrics th[data-key="norm"]').click()
    norms = [
        float(td.text)
        for td in driver.find_elements("css selector", "#metrics tbody td:nth-child(4)")
    ]
    assert norms == sorted(norms)
    driver.find_element("css selector", '#metrics th[data-key="norm"]').click()
    norms = [
        float(td.text)
        for td in driver.find_elements("css selector", "#metrics tbody td:nth-child(4)")
    ]
    assert norms == sorted(norms, reverse=True)

    # the last block at the last step, target next: decoded live (the run decoded x0 only)
    driver.execute_script(
        "for (const [id, v] of [['block', 3], ['cstep', 1]]) {"
        "  const e = document.getElementById(id); e.value = v;"
        "  e.dispatchEvent(new Event('input')); }"
        "document.querySelector('input[name=target][value=next]').click();"
    )
    wait(
        driver,
        lambda d: (
            "index=7&step=1&target=next" in d.find_element("id", "lens-img").get_attribute("src")
            and d.execute_script(lens_loaded)
        ),
        "the last block's next lens",
    )
    assert driver.find_element("id", "block-value").text.startswith("single 7")
    assert (
        served["run"] / "intermediates" / "decoded_next" / "single_block_7_step_1.jpg"
    ).is_file()
    driver.save_screenshot(str(tmp_path / "capture.png"))
    assert Image.open(tmp_path / "capture.png").format == "PNG"


def test_fisher_overlay_and_geodesics(driver, served, tmp_path):
    import numpy as np
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    driver.get("about:blank")
    driver.get(served["url"] + "#sweep=sweep")
    wait(driver, lambda d: loaded_images(d) == 9, "the 3 x 3 grid's images")
    select = Select(driver.find_element("id", "overlay"))
    fisher = [o.text for o in select.options if o.text.startswith("Fisher det g")]
    assert fisher == ["Fisher det g (pixel8, log₁₀)"]
    select.select_by_visible_text(fisher[0])
    assert driver.find_element("id", "legend-label").text == "log₁₀ det g"

    with np.load(served["root"] / "sweep" / "analysis" / "fisher_pixel8.npz") as data:
        point_det = data["point_det"]
    assert (point_det > 0).sum() >= 3  # cells to paint (det g <= 0 elsewhere: left unpainted)
    for row, col in [(r, c) for r in range(3) for c in range(3)]:  # each cell's log10 det g
        ActionChains(driver).move_to_element(cell(driver, 3 * row + col)).perform()
        wait(
            driver,
            lambda d, i=3 * row + col: d.find_element("id", "inspect-index").text.startswith(
                f"{i} "
            ),
            "the hover",
        )
        shown = driver.find_element("id", "inspect-value").text
        det = point_det[row, col]
        if det > 0:  # else no logarithm: nothing shown, the cell is left unpainted
            assert float(shown) == pytest.approx(np.log10(det), rel=1e-3, abs=1e-3)
        else:
            assert shown == ""

    paths = "return document.querySelectorAll('#geodesic-layer path.' + arguments[0]).length"
    assert driver.execute_script(paths, "geodesic") == 0
    driver.find_element("id", "geodesics").click()
    assert driver.execute_script(paths, "geodesic") == 2
    assert driver.execute_script(paths, "line") == 2
    legend = driver.find_elements("css selector", "#geodesic-legend li")
    assert len(legend) == 2 and all("metric length" in li.text for li in legend)
    # geodesic 0 starts at (alpha 0, beta 0): the centre of the bottom-left cell
    start = driver.execute_script(
        "const d = document.querySelector('#geodesic-layer path.geodesic').getAttribute('d');"
        "return d.slice(1).split(' ')[0].split(',').map(Number)"
    )
    box = driver.execute_script(
        "const g = document.getElementById('grid').getBoundingClientRect();"
        "const c = document.querySelector('#grid .cell[data-index=\"0\"]').getBoundingClientRect();"
        "return [c.left - g.left - 1 + c.width / 2, c.top - g.top - 1 + c.height / 2]"
    )
    assert start == pytest.approx(box, abs=1.5)
    driver.save_screenshot(str(tmp_path / "fisher.png"))
    driver.find_element("id", "geodesics").click()
    assert driver.execute_script(paths, "geodesic") == 0
    assert not driver.find_element("id", "geodesic-panel").is_displayed()
    assert Image.open(tmp_path / "fisher.png").format == "PNG"
