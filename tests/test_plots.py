"""`dvc plots show`, run as the README says, writes a page that draws every chart with no
network: the committed .dvc/config points DVC at plots/offline.html, which carries Vega,
Vega-Lite and Vega-Embed inline (see plots/vendor.py). DVC's default page loads them from a CDN
and draws nothing offline; the last test shows that the checks here would notice."""

from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import time

import pytest

from helpers import ROOT, dvc, make_project, project_env, run, start_chromium

# The plots dvc.yaml defines, by the id DVC gives each chart's <div>.
CHARTS = ["Loss_per_epoch", "Accuracy_per_epoch", "reports_predictions_csv"]

SCRIPT_TAG = re.compile(r'<script data-package="([^"@]+)@([^"]+)">\n(.*?)</script>', re.S)

# Per vega-embed container: how many pixels of its canvas (or marks of its SVG) are coloured.
# Axes, labels and the background are grey, so coloured pixels mean the data marks drew.
COLOURED_MARKS_JS = """
return Array.from(document.querySelectorAll('.vega-embed')).map(el => {
  const id = el.id || el.parentElement.id;
  const svg = el.querySelector('svg.marks');
  if (svg) return [id, svg.querySelectorAll('.mark-line path, .mark-rect path').length];
  const canvas = el.querySelector('canvas');
  if (!canvas) return [id, 0];
  const px = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < px.length; i += 4) {
    const hi = Math.max(px[i], px[i + 1], px[i + 2]), lo = Math.min(px[i], px[i + 1], px[i + 2]);
    if (px[i + 3] > 0 && hi - lo > 60) coloured++;
  }
  return [id, coloured];
});
"""


def load_vendor():
    spec = importlib.util.spec_from_file_location("vendor", ROOT / "plots" / "vendor.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed_template_setting() -> str:
    """plots.html_template as the repository's committed .dvc/config sets it."""
    return run([sys.executable, "-m", "dvc", "config", "plots.html_template"], ROOT).stdout.strip()


def write_reports(project) -> None:
    """Small real reports in the formats train and evaluate write: no training needed."""
    reports = project / "reports"
    reports.mkdir(exist_ok=True)
    rows = ["epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr"]
    for epoch in range(1, 6):
        values = (epoch, 1.5 / epoch, 1 - 0.4 / epoch, 1.2 / epoch, 1 - 0.3 / epoch, 0.001)
        rows.append(",".join(f"{v:.4g}" for v in values))
    (reports / "train_history.csv").write_text("\n".join(rows) + "\n")
    pairs = [(i % 10, i % 10 if i % 7 else (i + 3) % 10) for i in range(200)]
    (reports / "predictions.csv").write_text(
        "actual,predicted\n" + "".join(f"{a},{p}\n" for a, p in pairs)
    )


@pytest.fixture(scope="module")
def browser():
    driver = start_chromium()
    # Chromium's own offline mode on top of the flags: a CDN script fails even where CI has a
    # network, so a page that needs one cannot pass here.
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd(
        "Network.emulateNetworkConditions",
        {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1},
    )
    yield driver
    driver.quit()


@pytest.fixture
def project(tmp_path):
    project = make_project(tmp_path / "project")
    env = project_env(project, mirror="")
    # make_project's `dvc init` writes a fresh .dvc/config: give it the committed setting.
    dvc(project, "config", "plots.html_template", committed_template_setting(), env=env)
    write_reports(project)
    return project


def coloured_marks(driver, page, expected: int, wait_s: float = 30) -> dict[str, int]:
    """Open the page (get() returns once it has loaded, scripts included) and poll until
    `expected` charts have drawn, as Vega renders asynchronously, or `wait_s` passes; return
    {chart id: coloured pixels or marks}."""
    driver.get_log("browser")  # empties the console log, so the caller reads this page's only
    driver.get(page.as_uri())
    deadline = time.monotonic() + wait_s
    while True:
        drawn = dict(driver.execute_script(COLOURED_MARKS_JS))
        if sum(n > 0 for n in drawn.values()) >= expected or time.monotonic() > deadline:
            return drawn
        time.sleep(0.2)


def test_template_carries_the_pinned_bundles_and_licences():
    vendor = load_vendor()
    page = vendor.TEMPLATE.read_text(encoding="utf-8")
    inlined = {
        name: (version, hashlib.sha256(code.encode("utf-8")).hexdigest())
        for name, version, code in SCRIPT_TAG.findall(page)
    }
    pinned = {name: (version, sha256) for name, (version, _, sha256) in vendor.PINS.items()}
    assert inlined == pinned, "plots/offline.html is stale: run `python plots/vendor.py`"
    assert list(inlined) == ["vega", "vega-lite", "vega-embed"]  # embed needs the others loaded
    # DVC puts its CDN <script> tags where the template has a scripts placeholder: none here.
    assert "{plot_divs}" in page and "{scripts}" not in page
    for name in vendor.PINS:
        assert "Redistribution and use" in (vendor.LICENSES / f"{name}.LICENSE").read_text()
    third_party = (vendor.LICENSES / "THIRD_PARTY.txt").read_text()
    assert "d3-array@" in third_party and "vega-util@" in third_party
    assert (ROOT / ".dvc" / committed_template_setting()).resolve() == vendor.TEMPLATE


@pytest.mark.slow  # a browser: left out of `make test-fast`
def test_readme_command_draws_every_chart_offline(project, browser):
    dvc(project, "plots", "show", env=project_env(project, mirror=""))  # as the README says
    page = project / "dvc_plots" / "index.html"
    html = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "the page loads a script from elsewhere"
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", html)

    drawn = coloured_marks(browser, page, expected=len(CHARTS))

    assert sorted(drawn) == sorted(CHARTS), f"charts on the page: {drawn}"
    # A line chart's two series and the matrix's cells leave thousands of coloured pixels.
    blank = {chart: n for chart, n in drawn.items() if n < 100}
    assert not blank, f"charts that drew no data marks: {blank} (all: {drawn})"
    versions = browser.execute_script("return [vega.version, vegaLite.version, vegaEmbed.version]")
    assert versions == [version for version, _, _ in load_vendor().PINS.values()]
    errors = [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors


@pytest.mark.slow  # a browser: left out of `make test-fast`
def test_dvc_default_page_draws_nothing_offline(project, browser):
    """Without the template DVC links Vega from a CDN: offline, no chart appears. This is what
    the test above guards against, and shows that its checks can fail."""
    env = project_env(project, mirror="")
    dvc(project, "config", "--unset", "plots.html_template", env=env)
    dvc(project, "plots", "show", env=env)
    page = project / "dvc_plots" / "index.html"
    assert re.search(r'<script src="https://', page.read_text(encoding="utf-8"))

    drawn = coloured_marks(browser, page, expected=len(CHARTS), wait_s=1)

    assert drawn == {}
    assert browser.execute_script("return typeof vegaEmbed") == "undefined"
    errors = " ".join(e["message"] for e in browser.get_log("browser"))
    assert "cdn.jsdelivr.net" in errors and "ERR_INTERNET_DISCONNECTED" in errors  # offline
