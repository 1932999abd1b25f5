"""End to end: the MLflow UI, served on loopback over a store filled by real runs of the runner,
shows those runs and their metrics in a real headless browser (Debian's chromium, by Playwright).

Screenshots go to ``$TEST_ARTIFACTS`` (default ``tests/artifacts/``); their paths are printed
(``pytest -rP`` shows them). Run by hand: ``apt-get install chromium`` once, then
``python -m pytest tests/test_ui.py -rP``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_sweep import sweep_runs

from conftest import ARTIFACTS
from runner import compare
from runner.app import run
from runner.report.summary import ui_link
from runner.track.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

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
LEARNING_RATES = ("0.01", "0.001")
CHAMPION = "cracks"  # the registered model's name
SWEEPS = "sweeps"  # the experiment of the sweep

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not CHROMIUM.exists(), reason=f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium; .ci/run does)"
    ),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")


@pytest.fixture
def runs(make_cfg, client, store) -> list:
    """Two real runs of the runner that differ in learning rate, as a person compares them; the best one registered."""
    for lr in LEARNING_RATES:
        run(make_cfg(f"optimizer.lr={lr}", f"tracking.run_name='linear lr={lr}'", "tracking.pictures=true", "tracking.system_metrics=true"))
    assert compare.main(["--tracking-uri", store["uri"], "--all", "--metric", "test_accuracy", "--register", CHAMPION]) == 0
    experiment = client.get_experiment_by_name("crack-classification")
    return client.search_runs([experiment.experiment_id])


@pytest.fixture
def sweep(cli, store) -> tuple[object, list]:
    """A multirun of two jobs in an experiment of its own in the same store: (the parent run, the job runs)."""
    result = cli("-m", "optimizer.lr=0.01,0.001", "trainer.epochs=1", f"tracking.experiment={SWEEPS}", "tracking.system_metrics=true")
    assert result.returncode == 0, result.stderr[-3000:]
    (parent,), jobs = sweep_runs(store["uri"], SWEEPS)
    return parent, jobs


@pytest.fixture
def mlflow_ui(runs, sweep, store, mlflow_server) -> str:
    """``mlflow server`` on 127.0.0.1 over the test's store (one server and one browser: each takes seconds to start)."""
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


@pytest.mark.long
def test_mlflow_ui_shows_the_runs_their_data_metrics_the_champion_and_a_sweep_under_its_parent(mlflow_ui, runs, sweep, client):
    experiment_id = runs[0].info.experiment_id
    champion = client.get_model_version_by_alias(CHAMPION, "champion")
    best = next(r for r in runs if r.info.run_id == champion.run_id)  # a run of the best test accuracy
    assert best.data.metrics["test_accuracy"] == max(r.data.metrics["test_accuracy"] for r in runs)
    fingerprint = best.data.tags["dataset_fingerprint"]
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=BROWSER_ARGS)
        page = browser.new_page(viewport={"width": 3200, "height": 800})  # every metric column drawn (the grid draws only those in view)
        page.set_default_timeout(30_000)
        try:
            # The experiment the UI serves is tagged for model development.
            answer = page.request.get(f"{mlflow_ui}/ajax-api/2.0/mlflow/experiments/get?experiment_id={experiment_id}")
            tags = {tag["key"]: tag["value"] for tag in answer.json()["experiment"]["tags"]}
            assert tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND

            # The link a run prints opens the training runs, in a browser that never chose a view.
            page.goto(ui_link(mlflow_ui, experiment_id))
            page.get_by_role("heading", name="Runs", exact=True).wait_for()
            page.get_by_role("link", name=best.info.run_name, exact=True).wait_for()

            # A bare experiment link opens MLflow 3.17's GenAI view, whatever the tag says (the UI's toggle decides);
            # switching the toggle to "Model training" once is remembered by the browser.
            page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}")
            page.get_by_text("Training runs", exact=True).wait_for()
            screenshot(page, "mlflow_ui_bare_experiment_link.png")
            page.get_by_text("Model training", exact=True).dispatch_event("click")  # under the GenAI view's pop-over
            page.get_by_role("heading", name="Runs", exact=True).wait_for()
            page.goto(f"{mlflow_ui}/#/experiments/{experiment_id}")
            page.get_by_role("heading", name="Runs", exact=True).wait_for()

            # The runs, best test accuracy first, with the data each run saw.
            page.goto(ui_link(mlflow_ui, experiment_id) + "&orderByKey=metrics.%60test_accuracy%60&orderByAsc=false")
            for found in runs:
                page.get_by_role("link", name=found.info.run_name, exact=True).wait_for()
            close_assistant(page)
            page.get_by_role("button", name="Columns").click()
            columns = page.get_by_role("dialog")
            columns.get_by_text(re.compile(r"^Metrics \(\d+\)$")).click()
            # nothing to compare in Source, and system metrics have their own tab: room for the model's metrics
            for name in ["Source", *columns.get_by_text(re.compile(r"^system/")).all_inner_texts()]:
                columns.get_by_text(name, exact=True).click()
            page.keyboard.press("Escape")
            for found in runs:  # each run's row (its id): its name, its training data and its test accuracy
                row = page.locator(f"[role=row][row-id='{found.info.run_id}']")
                sync_api.expect(row.get_by_role("link", name=found.info.run_name, exact=True)).to_be_visible()
                sync_api.expect(row.locator("[col-id='attributes.`Dataset`']")).to_contain_text(
                    f"synthetic_cracks-train ({fingerprint})"
                )
                accuracy = row.locator("[col-id='metrics.`test_accuracy`']")
                sync_api.expect(accuracy).to_have_text(js_number(found.data.metrics["test_accuracy"]))
            screenshot(page, "mlflow_ui_runs.png")

            # The best run's own page, reached by its link: its id, its datasets and its metrics.
            page.get_by_role("link", name=best.info.run_name, exact=True).click()
            page.get_by_text(best.info.run_id, exact=True).wait_for()
            page.get_by_text(f"synthetic_cracks-train ({fingerprint})", exact=True).wait_for()
            for key in ("test_accuracy", "test_roc_auc", "val_accuracy"):  # rows of the metrics table: name, value
                value = re.escape(js_number(best.data.metrics[key]))
                page.get_by_role("row", name=re.compile(rf"^{key} {value}( |$)")).wait_for()
            close_assistant(page)
            screenshot(page, "mlflow_ui_run.png")

            # Its system metrics, charted by MLflow.
            page.get_by_role("tab", name="System metrics").click()
            page.get_by_text("cpu_utilization_percentage", exact=True).first.wait_for()
            page.locator(".js-plotly-plot").first.wait_for()  # drawn (charts below the fold are drawn when scrolled to)
            screenshot(page, "mlflow_ui_system_metrics.png")

            # Its pictures, drawn by the runner, in the run's artifacts.
            page.get_by_role("tab", name="Artifacts").click()
            page.get_by_text("plots", exact=True).click()
            for picture_name in ("learning_curves", "pr_curve"):
                page.get_by_text(f"{picture_name}.png", exact=True).click()
                picture = page.locator("img[src^='blob:']").first
                picture.wait_for()
                assert picture.evaluate("img => img.complete && img.naturalWidth") > 400
                screenshot(page, f"mlflow_ui_{picture_name}.png")

            # The registered model: the alias champion on the version registered from the best run.
            page.goto(f"{mlflow_ui}/#/models/{CHAMPION}")
            version = page.get_by_role("row", name=re.compile(r"^Version 1 "))
            sync_api.expect(version).to_contain_text("champion")
            sync_api.expect(version).to_contain_text(best.info.run_id)  # its source_run tag
            close_assistant(page)
            screenshot(page, "mlflow_ui_champion.png")

            # A multirun is one collapsed parent row ('sweep <folder>'); expanding it shows one run per job.
            parent, jobs = sweep
            page.set_viewport_size({"width": 1600, "height": 500})
            page.goto(ui_link(mlflow_ui, parent.info.experiment_id))
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
