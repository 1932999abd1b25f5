"""End to end: the MLflow UI, served on loopback over a store filled by real runs of the runner,
shows those runs and their metrics in a real headless browser (Debian's chromium, by Playwright).

Screenshots go to ``$TEST_ARTIFACTS`` (default ``tests/artifacts/``); their paths are printed
(``pytest -rP`` shows them). Run by hand: ``apt-get install chromium`` once, then
``python -m pytest tests/test_ui.py -rP``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from runner.app import run

CHROMIUM = Path("/usr/bin/chromium")
# Headless and quiet: no sandbox (CI runs as root), no GPU, no calls home.
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS") or Path(__file__).parent / "artifacts")
LEARNING_RATES = ("0.01", "0.001")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")


@pytest.fixture
def runs(make_cfg, client) -> list:
    """Two real runs of the runner that differ in learning rate, as a person compares them."""
    for lr in LEARNING_RATES:
        run(make_cfg(f"optimizer.lr={lr}", f"tracking.run_name='linear lr={lr}'"))
    experiment = client.get_experiment_by_name("crack-classification")
    return client.search_runs([experiment.experiment_id])


@pytest.fixture
def mlflow_ui(runs, store, mlflow_server) -> str:
    """``mlflow server`` on 127.0.0.1 over the test's store."""
    return mlflow_server("--backend-store-uri", store["uri"], "--default-artifact-root", store["artifacts"])


def js_number(value: float) -> str:
    """A metric as the UI writes it (JavaScript's Number to string): 1.0 -> '1', 0.8333333333333334 as is."""
    return str(int(value)) if value.is_integer() else repr(value)


def screenshot(page, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")
    return path


def close_assistant(page) -> None:
    """The UI opens its chat assistant on a first visit; close it so the screenshot shows the runs."""
    close = page.get_by_role("button", name="Close")
    if close.count() == 1 and close.is_visible():
        close.click()


def test_mlflow_ui_shows_the_runs_and_their_metrics(mlflow_ui, runs):
    experiment_id = runs[0].info.experiment_id
    best = max(runs, key=lambda r: r.data.metrics["test_accuracy"])
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 800})
        page.set_default_timeout(30_000)
        try:
            # The experiment's runs, best test accuracy first, as a table with the metric columns shown.
            page.goto(
                f"{mlflow_ui}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
                "&orderByKey=metrics.%60test_accuracy%60&orderByAsc=false"
            )
            for found in runs:
                page.get_by_role("link", name=found.info.run_name, exact=True).wait_for()
            close_assistant(page)
            page.get_by_role("button", name="Columns").click()
            columns = page.get_by_role("dialog")
            columns.get_by_text(re.compile(r"^Metrics \(\d+\)$")).click()
            for empty in ("Dataset", "Source"):  # nothing to compare there: room for more metrics
                columns.get_by_text(empty, exact=True).click()
            page.keyboard.press("Escape")
            for found in runs:  # each run's row (its id) holds its name and its test accuracy
                row = page.locator(f"[role=row][row-id='{found.info.run_id}']")
                sync_api.expect(row.get_by_role("link", name=found.info.run_name, exact=True)).to_be_visible()
                accuracy = row.locator("[col-id='metrics.`test_accuracy`']")
                sync_api.expect(accuracy).to_have_text(js_number(found.data.metrics["test_accuracy"]))
            screenshot(page, "mlflow_ui_runs.png")

            # The best run's own page, reached by its link: its id and its metrics.
            page.get_by_role("link", name=best.info.run_name, exact=True).click()
            page.get_by_text(best.info.run_id, exact=True).wait_for()
            for key in ("test_accuracy", "test_roc_auc", "val_accuracy"):  # rows of the metrics table: name, value
                value = re.escape(js_number(best.data.metrics[key]))
                page.get_by_role("row", name=re.compile(rf"^{key} {value}( |$)")).wait_for()
            close_assistant(page)
            screenshot(page, "mlflow_ui_run.png")

            # Its learning curves, drawn by the runner, in the run's artifacts.
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("plots", exact=True).click()
            page.get_by_text("learning_curves.png", exact=True).click()
            picture = page.locator("img[src^='blob:']").first
            picture.wait_for()
            assert picture.evaluate("img => img.complete && img.naturalWidth") > 800
            screenshot(page, "mlflow_ui_learning_curves.png")
        except Exception:
            screenshot(page, "mlflow_ui_failure.png")
            raise
        finally:
            browser.close()


def test_mlflow_ui_groups_a_sweep_under_its_parent(cli, store, mlflow_server, client):
    """A multirun is one collapsed parent row ('sweep <folder>'); expanding it shows one run per job."""
    result = cli("-m", "optimizer.lr=0.01,0.001", "trainer.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    experiment = client.get_experiment_by_name("crack-classification")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("sweep_role") == "sweep_parent"]
    jobs = [r for r in runs if r is not parent]
    url = mlflow_server("--backend-store-uri", store["uri"], "--default-artifact-root", store["artifacts"])
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 1600, "height": 500})
        page.set_default_timeout(30_000)
        try:
            page.goto(f"{url}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
            parent_row = page.locator(f"[role=row][row-id='{parent.info.run_id}']")
            parent_row.get_by_role("link", name=parent.info.run_name, exact=True).wait_for()
            close_assistant(page)
            for job in jobs:  # nested: hidden until the parent is expanded
                sync_api.expect(page.locator(f"[role=row][row-id='{job.info.run_id}']")).to_have_count(0)
            parent_row.locator("[col-id='attributes.`Run Name`'] button").first.click()
            for job in jobs:
                page.locator(f"[role=row][row-id='{job.info.run_id}']").first.wait_for()
            screenshot(page, "mlflow_ui_sweep.png")
        except Exception:
            screenshot(page, "mlflow_ui_failure.png")
            raise
        finally:
            browser.close()
