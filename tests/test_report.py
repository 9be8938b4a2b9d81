"""The run report: self-contained HTML with the key sections, and a real render in headless Chromium
(skipped where Chromium is not installed; CI installs it)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest

from evaluation import write_report
from tests.test_eval_fixtures import evaluated_run, phantom_run, write_phantom_run  # session fixtures

KEY_SECTIONS = ("summary", "data", "splits", "training", "discrimination", "operating-points", "calibration",
                "robustness", "subgroups", "explanations")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars")


def _chromium() -> str | None:
    return next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)), None)


@pytest.fixture(scope="module")
def report(evaluated_run):
    run = evaluated_run.phantom.run
    summary = run.validation / "summary.json"  # as the validation stage writes it, with its Data Docs page
    page = run.validation / "data_docs" / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("<html><body>Data Docs</body></html>")
    summary.write_text(json.dumps({"success": True, "suites": {"manifest": {
        "success": True, "rows": 10, "failed_records": 0, "failed_expectations": 0,
        "data_docs": str(page), "report_page": str(page)}}}))
    run.tune.mkdir(exist_ok=True)  # a strategy-search table as tuning.results writes it
    pd.DataFrame({"trial": ["t1", "t2"], "sampling": ["none", "over"], "loss": ["weighted", "bce"],
                  "freeze": ["partial", "partial"], "lr": [3e-4, 1e-3], "backbone": ["resnet18", "resnet18"],
                  "status": ["completed", "stopped early"], "epochs": [6, 2], "best_val_mean_auroc": [0.81, float("nan")],
                  "best_epoch": [5, None], "weakest_findings": ["Mass 0.52", ""], "error": ["", ""]}
                 ).to_csv(run.tune / "results.csv", index=False)
    return write_report(run)


def test_report_is_self_contained_with_key_sections(report):
    text = report.read_text(encoding="utf-8")
    for key in KEY_SECTIONS:
        assert f'<section id="{key}"' in text, key
    images = re.findall(r'<img [^>]*src="([^"]+)"', text)
    assert len(images) >= 8 and all(src.startswith("data:image/png;base64,") for src in images)
    assert 'href="validation/data_docs/index.html"' in text  # relative: the page and the docs move together
    for phrase in ("AUROC", "95% CI", "Pointing game", "True positives", "View shift", "Youden", "Strategy search"):
        assert phrase in text, phrase
    assert "undefined" not in text.lower() or "no positive test images" in text  # undefined findings explained


def test_report_without_evaluation_says_what_to_run(tmp_path):
    run = write_phantom_run(tmp_path / "run", n_patients=4, image_size=32)
    text = write_report(run).read_text()
    assert 'id="splits"' in text and 'id="pending"' in text and "cxr evaluate" in text
    assert 'id="discrimination"' not in text


def test_report_renders_in_chromium(report, tmp_path):
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    common = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for key in KEY_SECTIONS:
        assert f'id="{key}"' in dom.stdout, key
    shot = tmp_path / "report.png"
    subprocess.run([*common, "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
                   capture_output=True, timeout=120, check=True)
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        colors = image.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is None or len(colors) > 50  # a rendered page, not a blank one
