"""The group report in a real headless Chromium: load, sort, filter, rate, and the rating reaches the table."""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from pipeline.core.config import Config

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason="needs Debian packages chromium and chromium-driver",
)

# The default configuration: all four layers (the shipped reference and classifier).
SYNTHETIC_CFG = Config()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str]]:
    from qc.group import run_group
    from qc.review import make_server
    from test_reports import make_synthetic_output

    out = make_synthetic_output(tmp_path_factory.mktemp("browser"))
    run_group(out, SYNTHETIC_CFG)
    server = make_server(out, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield out, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="nc-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,1000",
    ):
        opts.add_argument(flag)
    drv = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=opts)
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait(drv, condition, timeout: float = 20.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(condition)


def _visible_paths(drv) -> list[str]:
    return drv.execute_script(
        "return Array.from(document.querySelectorAll('#scans tbody tr')).filter(r => !r.hidden)"
        ".map(r => r.dataset.path);"
    )


def test_sort_filter_and_rate(served: tuple[Path, str], driver) -> None:
    from selenium.webdriver.common.by import By

    out, url = served
    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    assert "neurocurate group QC report" in driver.title
    rows = driver.find_elements(By.CSS_SELECTOR, "#scans tbody tr")
    assert len(rows) == 5
    # The hostile site string is shown as text, never run.
    assert driver.execute_script("return window.__pwned === undefined") is True
    assert '<script>alert("x")</script>' in driver.find_element(By.ID, "scans").text

    # Sort by snr ascending: scans without an snr (BOLD, time series) go last.
    header = next(th for th in driver.find_elements(By.CSS_SELECTOR, "#scans th") if th.text.strip() == "snr")
    col = driver.execute_script("return Array.from(arguments[0].parentNode.children).indexOf(arguments[0])", header)
    header.click()
    values = driver.execute_script(
        "return Array.from(document.querySelectorAll('#scans tbody tr')).map(r => r.cells[arguments[0]].dataset.sort)",
        col,
    )
    nums = [float(v) for v in values if v != "n/a"]
    assert nums == sorted(nums) and len(nums) == 3 and values[-2:] == ["n/a", "n/a"]
    header.click()
    values = driver.execute_script(
        "return Array.from(document.querySelectorAll('#scans tbody tr')).map(r => r.cells[arguments[0]].dataset.sort)",
        col,
    )
    assert [float(v) for v in values[:3]] == sorted(nums, reverse=True)

    # Filter: failing scans only, then text.
    driver.find_element(By.CSS_SELECTOR, "#status option[value='pass']").click()
    passing = _visible_paths(driver)
    table = pd.read_parquet(out / "curation" / "curation.parquet")
    assert sorted(passing) == sorted(table.loc[table["qc_pass"], "path"])
    driver.find_element(By.CSS_SELECTOR, "#status option[value='all']").click()
    driver.find_element(By.ID, "filter").send_keys("timeseries")
    assert len(_visible_paths(driver)) == 1
    driver.find_element(By.ID, "filter").clear()
    driver.execute_script("document.getElementById('filter').dispatchEvent(new Event('input'))")

    # Rate a passing scan "exclude" with a comment.
    target = "sub-01/anat/sub-01_space-MNI152NLin6Asym_res-2_desc-preproc_T1w.nii.gz"
    row = driver.find_element(By.CSS_SELECTOR, f"#scans tbody tr[data-path='{target}']")
    assert row.find_element(By.CSS_SELECTOR, "td.include").text == "yes"
    row.find_element(By.CSS_SELECTOR, "select.decision option[value='exclude']").click()
    row.find_element(By.CSS_SELECTOR, "input.comment").send_keys("ghosting in frontal lobe")
    driver.find_element(By.ID, "reviewer").send_keys("tester")
    row.find_element(By.CSS_SELECTOR, "button.save").click()
    _wait(driver, lambda d: row.find_element(By.CSS_SELECTOR, ".saved-state").text != "")
    assert row.find_element(By.CSS_SELECTOR, ".saved-state").text == "saved"
    assert row.find_element(By.CSS_SELECTOR, "td.include").text == "no"

    table = pd.read_parquet(out / "curation" / "curation.parquet").set_index("path")
    assert table.loc[target, "override"] == "exclude"
    assert table.loc[target, "override_comment"] == "ghosting in frontal lobe"
    assert not table.loc[target, "include"] and table.loc[target, "qc_pass"]
    tsv = pd.read_csv(out / "curation" / "curation.tsv", sep="\t", keep_default_na=False).set_index("path")
    assert tsv.loc[target, "override"] == "exclude"

    # Reload: the page shows the stored rating.
    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    row = driver.find_element(By.CSS_SELECTOR, f"#scans tbody tr[data-path='{target}']")
    assert row.find_element(By.CSS_SELECTOR, "select.decision").get_attribute("value") == "exclude"
    assert row.find_element(By.CSS_SELECTOR, "input.comment").get_attribute("value") == "ghosting in frontal lobe"


def test_subject_link_opens_report(served: tuple[Path, str], driver) -> None:
    from selenium.webdriver.common.by import By

    _, url = served
    driver.get(url)
    _wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
    driver.find_element(By.LINK_TEXT, "sub-01").click()
    _wait(driver, lambda d: "sub-01" in d.title)
    assert len(driver.find_elements(By.CSS_SELECTOR, "figure img")) == 6
