"""What a user sees in the MLflow UI, checked in headless Chromium (`make ui-check`; not in CI:
it needs Debian's chromium and Playwright). Trains the smoke study into a fresh results
directory (or reads RESULTS), starts `bench ui` on it and drives the pages as a user would:

- the experiment URL `bench ui` prints opens in the "Model training" view and lists the study;
- a trial's run page, scrolled so that every lazily loaded card renders, shows each picture
  key (samples, recon, interpolation, latent; class_grid for a CVAE) as an image card with a
  step slider over every logged step, the picture loaded at the step the card opens on;
- typing the last step into a card loads that step's picture (the best model's).

Screenshots go to <results>/ui/. Exit status 1 with the failed checks listed.

    python tests/ui_check.py [RESULTS]
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "bench"]
CHROMIUM = "/usr/bin/chromium"
# Chromium flags for a closed network (no background connections, no sandbox as root)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
RUNS = int(os.environ.get("UI_CHECK_RUNS", 99))  # trial runs to check, newest first
KEYS = ("samples", "recon", "interpolation", "latent")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(results: Path, port: int) -> tuple[subprocess.Popen, str]:
    """`bench ui` on `results`; returns the process and the experiment URL it printed."""
    ui = subprocess.Popen([*BENCH, "ui", "--results", str(results), "--port", str(port)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    printed = [ui.stdout.readline(), ui.stdout.readline()]
    url = re.search(r"(http://\S+workflowType=machine_learning)", printed[1]).group(1)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return ui, url
        except OSError:
            time.sleep(0.5)
    ui.kill()
    raise SystemExit(f"bench ui did not answer on port {port} within 90 s")


def trial_runs(results: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    return client.search_runs([experiment.experiment_id], filter_string="tags.`vaebench.role` = 'trial'")


def check(results: Path) -> list[str]:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    out = results / "ui"
    out.mkdir(exist_ok=True)
    failures = []
    ui, url = start_ui(results, free_port())
    base = url.split("/#/")[0]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            page.get_by_text("study smoke").wait_for(timeout=30_000)
            page.screenshot(path=out / "experiment.png")
            body = page.inner_text("body")
            if "Model training" not in body or "GenAI" in page.url:
                failures.append("the experiment URL did not open the Model training view")
            for run in trial_runs(results)[:RUNS]:
                page.close()
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                try:
                    failures += check_run(page, base, run, out)
                except PlaywrightError as error:  # a page that never loads is a failed check
                    failures.append(f"{run.data.tags['mlflow.runName']}: {str(error).splitlines()[0]}")
                print(f"checked {run.data.tags['mlflow.runName']}: {len(failures)} failure(s) so far", flush=True)
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)  # mlflow ui runs uvicorn workers below it
        try:
            ui.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(ui.pid, signal.SIGKILL)
            ui.wait()
    return failures


def check_run(page, base: str, run, out: Path) -> list[str]:
    """Every picture key of `run` is an image card with a loaded picture and a step slider."""
    name, run_id = run.data.tags["mlflow.runName"], run.info.run_id
    keys = KEYS + (("class_grid",) if "model=cvae" in name else ())
    page.goto(f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}/model-metrics"
              f"?workflowType=machine_learning")
    page.get_by_role("tab", name="Model metrics").wait_for(timeout=30_000)
    page.mouse.move(600, 600)  # the cards render only as they scroll into view
    for _ in range(30):
        page.mouse.wheel(0, 600)
        page.wait_for_timeout(200)
    page.wait_for_timeout(2000)
    failures = []
    for key in keys:
        card = page.locator('[data-testid="experiment-view-compare-runs-card"]', has=page.locator(f'h4[title="{key}"]'))
        if card.count() != 1:
            failures.append(f"{name}: no image card for {key!r}")
            continue
        card.scroll_into_view_if_needed()
        slider = card.get_by_role("slider")
        picture = card.locator("img")
        try:
            picture.first.wait_for(timeout=45_000)  # a loaded machine renders slowly
        except Exception:  # noqa: BLE001 - reported as a failed check
            failures.append(f"{name}: the {key!r} card opens without a picture ({card.inner_text()[-60:]!r})")
            continue
        loaded = picture.first.evaluate("i => i.complete && i.naturalWidth > 0")
        last = slider.get_attribute("aria-valuemax") if slider.count() else None
        if not loaded or "%2Bstep%2B0%2B" not in picture.first.get_attribute("src"):
            failures.append(f"{name}: the {key!r} card's picture at step 0 did not load")
        if last is None or slider.get_attribute("aria-valuemin") != "0":
            failures.append(f"{name}: the {key!r} card has no step slider from step 0")
            continue
        slider.focus()  # the slider's keyboard, step by step to the last (it ignores End)
        for _ in range(int(last)):
            if slider.get_attribute("aria-valuenow") == last:
                break
            page.keyboard.press("ArrowRight")
            page.wait_for_timeout(100)
        try:
            page.wait_for_function(
                "([el, step]) => [...el.querySelectorAll('img')].some(i => i.src.includes('%2Bstep%2B' + step + '%2B')"
                " && i.complete && i.naturalWidth > 0)", arg=[card.element_handle(), last], timeout=15_000)
        except Exception:  # noqa: BLE001 - reported as a failed check
            failures.append(f"{name}: the {key!r} card shows no picture at its last step {last}")
    page.screenshot(path=out / f"run-{name.split()[0]}.png")
    return failures


def main(argv: list[str]) -> int:
    if argv:
        results = Path(argv[0]).resolve()
    else:
        results = Path(tempfile.mkdtemp(prefix="vaebench-ui-"))
        subprocess.run([*BENCH, "sweep", "smoke", "--results", str(results)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    failures = check(results)
    for failure in failures:
        print(f"FAIL {failure}")
    print(f"{'ok' if not failures else f'{len(failures)} failed check(s)'}; screenshots in {results / 'ui'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
