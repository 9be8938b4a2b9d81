"""The run's HTML pages work offline and stay private: the GX Data Docs site (built by real suite
runs), report.html and eda.html load every asset from the run directory and request nothing
outside it.

Two checks, each able to fail on its own:
- static: every ``src``/``href`` of a loading tag, CSS ``url()``/``@import`` and JS ``import`` in
  every .html/.css/.js file of the run names a file inside the run directory that exists (no
  ``http(s)://``, no ``//host``); GX's own pages, before validation/offline_assets.py rewrites them,
  fail this check (so it is not vacuous);
- in a browser: each page opened in headless Chromium with name resolution disabled
  (``--host-resolver-rules``), its network log recorded (``--log-net-log``). A probe script (in a copy
  of the page beside it, so relative paths hold) reads computed styles that only the vendored
  stylesheets set (Bootstrap's flex ``.row`` and system font stack, Font Awesome's icon font, loaded)
  and checks the vendored scripts ran (jQuery, Bootstrap with Popper, bootstrap-table filled the
  index) with no script error; the log must hold no request made by the page. A page with an
  external image is checked the same way first, to show the log sees such a request.
Skipped where Chromium is not installed (CI installs it: .ci/run).
"""
from __future__ import annotations

import html
import json
import re
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from evaluation import write_report
from pipelines.eda import run_eda
from pipelines.manifest import write_table
from pipelines.rundir import RunDir
from tests.test_eda import make_manifest, write_images
from tests.test_report import CHROMIUM_FLAGS, _chromium
from tests.test_validation import image_table, manifest_frame, splits_for
from validation import validate_images, validate_manifest, validate_splits, write_summary
from validation.offline_assets import LocalizeReport, localize_site

LOADING_TAG = re.compile(r"<(script|link|img|iframe|source|embed|audio|video|track|input|object)\b([^>]*)>", re.IGNORECASE)
LOADING_ATTR = re.compile(r"""\b(src|href|srcset|poster|data)\s*=\s*["']([^"']*)["']""", re.IGNORECASE)
CSS_URL = re.compile(r"""url\(\s*["']?([^)"']*)["']?\s*\)""", re.IGNORECASE)
CSS_IMPORT = re.compile(r"""@import\s+(?:url\()?\s*["']([^"']+)["']""", re.IGNORECASE)
JS_IMPORT = re.compile(r"""\bimport\s*(?:\(\s*|[\w{}*,\s]+from\s*)["']((?:https?:)?//[^"']+)["']""")
EXTERNAL = re.compile(r"^(?:[a-z][a-z0-9+.-]*:)?//", re.IGNORECASE)


def references(path: Path) -> list[str]:
    """What a file makes the browser load: loading-tag attributes and inline CSS for HTML, ``url()``
    and ``@import`` for CSS, static and dynamic ``import`` of a URL for JS."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".js":
        return JS_IMPORT.findall(text)
    refs = CSS_URL.findall(text) + CSS_IMPORT.findall(text)
    if path.suffix == ".html":
        refs += [v for _, attrs in LOADING_TAG.findall(text) for _, v in LOADING_ATTR.findall(attrs)]
    return [r.strip() for r in refs if r.strip()]


def outside(run: Path) -> dict[str, list[str]]:
    """file -> references it loads that are external, or relative/file ones that leave ``run`` or
    name no file."""
    bad: dict[str, list[str]] = {}
    for path in sorted(run.rglob("*")):
        if path.suffix not in (".html", ".css", ".js") or not path.is_file():
            continue
        for ref in references(path):
            if ref.startswith(("data:", "#", "about:", "javascript:")):
                continue
            if EXTERNAL.search(ref):
                bad.setdefault(str(path.relative_to(run)), []).append(ref)
                continue
            parsed = urlparse(ref)
            if parsed.scheme not in ("", "file"):
                bad.setdefault(str(path.relative_to(run)), []).append(ref)
                continue
            target = Path(unquote(parsed.path)) if parsed.scheme == "file" else path.parent / unquote(parsed.path)
            target = target.resolve()
            if not target.is_relative_to(run.resolve()) or not target.exists():
                bad.setdefault(str(path.relative_to(run)), []).append(ref)
    return bad


def build_validation(out: Path) -> None:
    """The three suites as the stages run them, with a record failure and flags among them."""
    m = manifest_frame()
    m.loc[1, "age"] = 412
    results = [validate_manifest(m, out, source="nih", image_paths=[*m["path"], "00000777_000.png"])]
    m2 = manifest_frame(patients=20)
    results.append(validate_splits(m2, splits_for(m2, test={1, 2, 3, 4}, val={5, 6}), out, test_frac=0.2, val_frac=0.1))
    results.append(validate_images(image_table(), out, image_size=128))
    write_summary(results, out)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> RunDir:
    """A run directory with real Data Docs, an EDA page and the report."""
    run = RunDir(tmp_path_factory.mktemp("offline") / "run")
    run.ensure()
    build_validation(run.validation)
    write_table(manifest_frame(), run.manifest)
    images = run.root.parent / "images"
    write_images(images)
    run_eda(make_manifest(), images, run.eda, sample_size=8)
    write_report(run)
    return run


def test_every_page_loads_only_files_of_the_run_directory(run):
    pages = sorted(p.relative_to(run.root).as_posix() for p in run.root.rglob("*.html"))
    assert "report.html" in pages and "eda/eda.html" in pages and "validation/data_docs/index.html" in pages
    assert sum(p.startswith("validation/data_docs/validations/") for p in pages) == 4  # manifest (2 tables), splits, images
    assert outside(run.root) == {}
    text = "".join(p.read_text() for p in (run.validation / "data_docs").rglob("*.html"))
    assert "dataContextId" not in text and "great-expectations-web-assets" not in text  # no beacon with the context id
    assert "vegaEmbed(" not in text  # our suites draw no chart: Vega is not vendored (validation/offline_assets.py)


def test_gx_pages_as_gx_writes_them_load_from_cdns_and_localize_knows_each(tmp_path, monkeypatch):
    """Without the rewrite, GX's pages fail the static check; the rewrite knows every asset they
    load (none removed as unknown), and is idempotent."""
    import validation.gx_runner as gx_runner

    monkeypatch.setattr(gx_runner, "localize_site", lambda site: LocalizeReport())
    build_validation(tmp_path / "validation")
    site = tmp_path / "validation" / "data_docs"
    raw = outside(tmp_path)
    assert raw and all(any(EXTERNAL.search(r) for r in refs) for refs in raw.values())
    assert any("dataContextId" in r for refs in raw.values() for r in refs)
    report = localize_site(site)
    assert report.unknown == {} and report.charts == [] and report.pages == 9 and report.rewritten >= report.pages
    assert outside(tmp_path) == {}
    again = localize_site(site)
    assert (again.rewritten, again.copied) == (0, 0)


PROBE = """<script>
window.addEventListener('load', function () {
  document.fonts.ready.then(function () {
    var out = {errors: window.__cxrErrors || []};
    var row = document.querySelector('.row'), icon = document.querySelector('.fas'), $ = window.jQuery;
    out.rowDisplay = row ? getComputedStyle(row).display : null;
    out.bodyFont = getComputedStyle(document.body).fontFamily;
    out.iconFont = icon ? getComputedStyle(icon, '::before').fontFamily : null;
    out.iconFontLoaded = Array.from(document.fonts).some(function (f) { return f.family.indexOf('Font Awesome 6 Free') >= 0 && f.status === 'loaded'; });
    out.jquery = $ ? $.fn.jquery : null;
    out.bootstrap = $ && $.fn.tooltip ? $.fn.tooltip.Constructor.VERSION : null;
    try { if ($) { $('body').tooltip({title: 'x', trigger: 'manual'}).tooltip('show').tooltip('dispose'); } out.popper = !!$; }
    catch (e) { out.popper = String(e); }
    out.bootstrapTable = !!($ && $.fn.bootstrapTable);
    out.datepicker = !!($ && $.fn.datepicker);
    out.tableRows = Array.from(document.querySelectorAll('.bootstrap-table tbody tr')).map(function (r) { return r.innerText; });
    out.headerBackground = (function (h) { return h ? getComputedStyle(h).backgroundColor : null; })(document.querySelector('header'));
    var pre = document.createElement('pre'); pre.id = 'cxr-probe'; pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  });
});
</script>"""
ERRORS = "<script>window.__cxrErrors = []; window.addEventListener('error', function (e) { __cxrErrors.push(String(e.message)); });</script>"


def open_offline(browser: str, page: Path, profile: Path) -> tuple[dict, list[str]]:
    """Open a probed copy of ``page`` (beside it) with networking disabled: the probe's findings and
    every URL the page requested over the network."""
    probe = page.with_name(page.stem + ".probe.html")
    text = page.read_text(encoding="utf-8")
    text = re.sub(r"<head\b[^>]*>", lambda m: m.group(0) + ERRORS, text, count=1)
    probe.write_text(text.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    netlog = profile.with_suffix(".netlog.json")
    try:
        dom = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", '--host-resolver-rules=MAP * ~NOTFOUND',
             f"--log-net-log={netlog}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120)
    finally:
        probe.unlink()
    assert dom.returncode == 0, dom.stderr[-2000:]
    found = re.search(r'<pre id="cxr-probe">(.*?)</pre>', dom.stdout, re.DOTALL)
    assert found, f"probe did not run on {page}"
    return json.loads(html.unescape(found.group(1))), page_requests(netlog)


def page_requests(netlog: Path) -> list[str]:
    """URLs a page (a frame whose origin is ``file://``) asked the network stack for; Chromium's own
    background requests (initiator "not an origin") are not the page's."""
    log = json.loads(netlog.read_text())
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [e["params"]["url"] for e in log["events"]
            if e["type"] == start and "url" in e.get("params", {})
            and (e["params"].get("initiator") != "not an origin" or "file://" in e["params"].get("network_isolation_key", ""))]


@pytest.fixture(scope="module")
def browser():
    found = _chromium()
    if found is None:
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


def test_the_network_log_sees_a_page_that_calls_out(browser, tmp_path):
    page = tmp_path / "calls_out.html"
    page.write_text('<!DOCTYPE html><html><head></head><body><img src="https://cdn.example.invalid/logo.png"></body></html>')
    _, requests = open_offline(browser, page, tmp_path / "profile")
    assert requests == ["https://cdn.example.invalid/logo.png"]


def test_data_docs_render_styled_offline_and_request_nothing(browser, run, tmp_path):
    site = run.validation / "data_docs"
    pages = sorted(site.rglob("*.html"))
    assert len(pages) == 9  # index, 4 validation pages, 4 suite pages
    for k, page in enumerate(pages):
        probe, requests = open_offline(browser, page, tmp_path / f"profile{k}")
        name = page.relative_to(site).as_posix()
        assert requests == [], name
        assert probe["errors"] == [], (name, probe["errors"])
        assert probe["rowDisplay"] == "flex", name  # Bootstrap's grid
        assert probe["bodyFont"].startswith("-apple-system"), name  # Bootstrap's reboot
        assert probe["jquery"].startswith("3.") and probe["bootstrap"].startswith("4.") and probe["popper"] is True, name
        assert probe["bootstrapTable"] and probe["datepicker"], name
        if not name.startswith("expectations/"):  # suite pages show no icon
            assert probe["iconFont"] == '"Font Awesome 6 Free"' and probe["iconFontLoaded"], name
        if name == "index.html":  # filled by bootstrap-table from the page's data; three-level statuses
            statuses = sorted(re.sub(r"\s+", " ", row.split("\t")[0]).strip() for row in probe["tableRows"][:4])
            assert statuses == ["failed", "failed", "passed with 1 warning", "passed with 6 warnings"], probe["tableRows"]


def test_report_and_eda_pages_request_nothing(browser, run, tmp_path):
    probe, requests = open_offline(browser, run.report, tmp_path / "profile-report")
    assert requests == [] and probe["errors"] == []
    assert probe["headerBackground"] == "rgb(18, 53, 91)"  # the report's own inline stylesheet
    probe, requests = open_offline(browser, run.eda / "eda.html", tmp_path / "profile-eda")
    assert requests == [] and probe["errors"] == []


def _text(page: Path) -> str:
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", page.read_text())))


def test_report_says_the_three_levels_and_what_the_warnings_are(run, tmp_path):
    text = _text(run.report)
    assert "data validation failed" in text  # a record-level failure (a quarantined age) is a failure
    assert "splits passed with 6 warnings" in text and "manifest failed" in text
    assert "6 (finding, split) pairs have no positive image" in text and "change nothing" in text
    # the same run with only the split suite: passed with warnings, on the card and in the table
    summary = json.loads((run.validation / "summary.json").read_text())
    summary["suites"] = {"splits": summary["suites"]["splits"]}
    del summary["status"], summary["success"], summary["warnings"]  # the top level is recomputed from the suites
    only = RunDir(tmp_path / "run")
    only.ensure()
    only.validation.mkdir(parents=True, exist_ok=True)
    (only.validation / "summary.json").write_text(json.dumps(summary))
    write_table(manifest_frame(), only.manifest)
    text = _text(write_report(only))
    assert ("data validation passed with 6 warnings 1 passed with warnings (1 suites). Warnings (flag-level, they "
            "change nothing): splits: 6 (finding, split) pairs have no positive image.") in text
    assert "issues" not in text


def test_an_unknown_external_asset_is_removed_and_reported(tmp_path):
    """What a GX upgrade might add: an asset with no vendored copy costs its styling, never privacy."""
    from validation.offline_assets import localize_page

    page = ('<html><head><script src="https://cdn.example.com/new-lib@2/lib.min.js" integrity="sha384-x" crossorigin="anonymous">'
            '</script><link rel="stylesheet" href="//cdn.example.com/theme.css"/>'
            '<script src="https://code.jquery.com/jquery-3.7.1.min.js" integrity="sha384-y" crossorigin="anonymous"></script>'
            "<style>.x { background: url('https://tracker.example.com/p.gif') } @import url(\"https://cdn.example.com/a.css\");</style>"
            '</head><body><img src="https://cdn.example.com/pixel.gif"><a href="https://example.com/docs">docs</a></body></html>')
    text, unknown, charts = localize_page(page, "../..")
    assert sorted(unknown) == sorted(["https://cdn.example.com/new-lib@2/lib.min.js", "//cdn.example.com/theme.css",
                                      "https://tracker.example.com/p.gif", '@import url("https://cdn.example.com/a.css");',
                                      "https://cdn.example.com/pixel.gif"])
    assert not charts
    assert '<script src="../../static/vendor/jquery/jquery.min.js"></script>' in text  # no integrity: not the CDN's bytes
    assert "example.com/docs" in text  # a link is the reader's choice, not a request
    assert re.findall(r"(?:https?:)?//[\w.-]+", text.replace('href="https://example.com/docs"', "")) == []
