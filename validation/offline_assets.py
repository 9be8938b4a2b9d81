"""Make a Great Expectations Data Docs site work offline and stay private.

GX's page templates load Bootstrap, jQuery, bootstrap-table, a date picker, Font Awesome and Vega
from public CDNs, and every page loads GX's logo from GX's own web-asset bucket with the data
context's id in the query string. On a hospital network without internet the pages then render as
unstyled text with dead filters, and opening one tells a third party about it.

``localize_site`` runs after every GX docs build. It copies the assets the pages need into
``<site>/static/vendor/`` and rewrites every page to load them by relative path, so the site works
from the run directory alone (moved, archived or opened from a USB stick):

- Bootstrap 4 CSS and JS (its bundle carries Popper, which GX loads separately), jQuery 3, Font
  Awesome 6 and bootstrap-datepicker come from their XStatic packages on PyPI;
- bootstrap-table 1.19.1 and its filter-control extension, which no PyPI package ships, are kept
  in this repository (``validation/vendor/bootstrap-table``, MIT, unchanged);
- the logo is GX's own ``static/images/logo-long.png``, which GX already copies into the site;
- Vega, Vega-Lite and Vega-Embed are dropped: no expectation our suites use draws a chart (a page
  that would is reported in ``LocalizeReport.charts``, and tests/test_offline_reports.py fails on it);
- the dark-mode stylesheet (``bootstrap-prefers-dark``) and the dark logo it sets as a CSS
  background are dropped: pages are always light;
- GX's newsletter footer (a link with tracking parameters) is removed.

Anything else that would load from outside the site (a ``script``, ``link``, ``img``... with an
``http(s)://`` or ``//`` address, a CSS ``url()`` or ``@import``) is removed and listed in
``LocalizeReport.unknown``: a GX upgrade that adds an asset then costs its styling, never privacy.
Plain ``<a href>`` links are left alone: following one is the reader's choice, not a request made by
opening the page.
"""
from __future__ import annotations

import importlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.atomic import staged_file, write_text

VENDOR_DIR = ("static", "vendor")  # under the site root
REPO_VENDOR = Path(__file__).resolve().parent / "vendor"
LOGO = "static/images/logo-long.png"  # GX copies it into every site (static/images)


@dataclass(frozen=True)
class Asset:
    """A file under ``static/vendor/<dest>``, copied from ``source`` inside a package's data
    directory: an XStatic package (``xstatic.pkg.<name>``, its ``BASE_DIR``) or this repository's
    ``validation/vendor`` (``package=None``)."""

    dest: str
    package: str | None
    source: str


def _xstatic(name: str, files: dict[str, str], prefix: str) -> list[Asset]:
    return [Asset(f"{prefix}/{dest}", f"xstatic.pkg.{name}", src) for dest, src in files.items()]


FONT_FILES = ("fa-brands-400", "fa-regular-400", "fa-solid-900", "fa-v4compatibility")
ASSETS: tuple[Asset, ...] = (
    *_xstatic("jquery", {"jquery.min.js": "jquery.min.js"}, "jquery"),
    *_xstatic(
        "bootstrap",
        {"css/bootstrap.min.css": "css/bootstrap.min.css", "js/bootstrap.bundle.min.js": "js/bootstrap.bundle.min.js"},
        "bootstrap",
    ),
    *_xstatic(
        "font_awesome",
        {"css/all.min.css": "css/all.min.css", "LICENSE.txt": "LICENSE.txt",
         **{f"webfonts/{f}.{ext}": f"webfonts/{f}.{ext}" for f in FONT_FILES for ext in ("woff2", "ttf")}},
        "font-awesome",
    ),
    *_xstatic(
        "bootstrap_datepicker",
        {"bootstrap-datepicker.js": "bootstrap-datepicker.js",
         "bootstrap-datepicker3.standalone.css": "bootstrap-datepicker3.standalone.css"},
        "bootstrap-datepicker",
    ),
    *(
        Asset(f"bootstrap-table/{f}", None, f"bootstrap-table/{f}")
        for f in ("bootstrap-table.min.js", "bootstrap-table.min.css", "LICENSE",
                  "extensions/filter-control/bootstrap-table-filter-control.min.js",
                  "extensions/filter-control/bootstrap-table-filter-control.min.css")
    ),
)

# CDN address (a regex over the whole URL) -> the vendored file that replaces it, or None to drop
# the tag. Major versions are part of the patterns: a GX that moves to Bootstrap 5 markup must not
# get Bootstrap 4 styles silently (its URLs fall through to ``unknown``).
EXTERNAL = re.compile(r"^(?:https?:)?//", re.IGNORECASE)
CDN: tuple[tuple[re.Pattern[str], str | None], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), dest)
    for pattern, dest in (
        (r"/jquery-3\.\d+\.\d+(\.min)?\.js$", "jquery/jquery.min.js"),
        (r"/jquery@3[\d.]*/dist/jquery(\.min)?\.js$", "jquery/jquery.min.js"),
        (r"/popper\.js/1\.[\d.]+/", None),  # Bootstrap's bundle below carries Popper 1
        (r"/bootstrap[/@]4\.[\d.]+/(dist/)?js/bootstrap(\.bundle)?(\.min)?\.js$", "bootstrap/js/bootstrap.bundle.min.js"),
        (r"/bootstrap[/@]4\.[\d.]+/(dist/)?css/bootstrap(\.min)?\.css$", "bootstrap/css/bootstrap.min.css"),
        (r"/bootstrap-table@1\.[\d.]+/dist/bootstrap-table(\.min)?\.js$", "bootstrap-table/bootstrap-table.min.js"),
        (r"/bootstrap-table@1\.[\d.]+/dist/bootstrap-table(\.min)?\.css$", "bootstrap-table/bootstrap-table.min.css"),
        (r"/bootstrap-table@1\.[\d.]+/dist/extensions/filter-control/bootstrap-table-filter-control(\.min)?\.js$",
         "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.js"),
        (r"/bootstrap-table@1\.[\d.]+/dist/extensions/filter-control/bootstrap-table-filter-control(\.min)?\.css$",
         "bootstrap-table/extensions/filter-control/bootstrap-table-filter-control.min.css"),
        (r"/bootstrap-datepicker/1\.[\d.]+/js/bootstrap-datepicker(\.min)?\.js$", "bootstrap-datepicker/bootstrap-datepicker.js"),
        (r"/bootstrap-datepicker/1\.[\d.]+/css/bootstrap-datepicker[\d]?(\.standalone)?(\.min)?\.css$",
         "bootstrap-datepicker/bootstrap-datepicker3.standalone.css"),
        (r"/font-awesome/6\.[\d.]+/css/all(\.min)?\.css$", "font-awesome/css/all.min.css"),
        (r"/@forevolve/bootstrap-dark@", None),  # dark theme: pages stay light
        (r"/npm/vega(-lite|-embed)?@\d", None),  # charts: see the module docstring
    )
)
GX_ASSETS = re.compile(r"^https?://great-expectations-web-assets\.", re.IGNORECASE)

# Tags that load something when the page opens (a script with its closing tag, so a dropped one
# leaves nothing behind), and the attributes that name what they load.
_SCRIPT = re.compile(r"(?P<open><(?P<tag>script)\b(?P<attrs>[^>]*)>)(?P<close>\s*</script\s*>)", re.IGNORECASE)
_TAG = re.compile(r"(?P<open><(?P<tag>link|img|iframe|source|embed|audio|video|track|input|object)\b(?P<attrs>[^>]*?)/?>)",
                  re.IGNORECASE)
_ATTR = re.compile(r"""(?P<name>[\w:-]+)\s*=\s*(?P<q>["'])(?P<value>.*?)(?P=q)""", re.DOTALL)
_LOADING_ATTRS = {"src", "href", "srcset", "poster", "data"}
_CSS_URL = re.compile(r"""url\(\s*(?P<q>["']?)(?P<url>(?:https?:)?//[^)"']*)(?P=q)\s*\)""", re.IGNORECASE)
_CSS_IMPORT = re.compile(r"""@import\s+(?:url\()?\s*["']?(?:https?:)?//[^;]*;""", re.IGNORECASE)
_NEWSLETTER = re.compile(r"<footer>(?:(?!</footer>).)*?greatexpectations\.io/newsletter(?:(?!</footer>).)*</footer>",
                         re.IGNORECASE | re.DOTALL)
_FAVICON = re.compile(r'(<link rel="shortcut icon" href=")[^"]*static/images/favicon\.ico(")')


@dataclass
class LocalizeReport:
    """What ``localize_site`` did: pages rewritten, vendored files copied, and tags it removed that
    it did not know (``unknown``: page -> URLs) or pages that would draw a chart (``charts``)."""

    pages: int = 0
    rewritten: int = 0
    copied: int = 0
    unknown: dict[str, list[str]] = field(default_factory=dict)
    charts: list[str] = field(default_factory=list)


def _asset_source(asset: Asset) -> Path:
    if asset.package is None:
        return REPO_VENDOR / asset.source
    return Path(importlib.import_module(asset.package).BASE_DIR) / asset.source


def vendor_assets(site: Path) -> int:
    """Copy every vendored asset into ``<site>/static/vendor`` (skipping files already there with
    the same size); returns how many were copied."""
    copied = 0
    vendor = Path(site, *VENDOR_DIR)
    for asset in ASSETS:
        source, target = _asset_source(asset), vendor / asset.dest
        if target.is_file() and target.stat().st_size == source.stat().st_size:
            continue
        with staged_file(target) as tmp:
            shutil.copyfile(source, tmp)
        copied += 1
    return copied


def _cdn_target(url: str) -> tuple[bool, str | None]:
    """(known, vendored file or None to drop) for an external URL."""
    for pattern, dest in CDN:
        if pattern.search(url):
            return True, dest
    return False, None


def _set_attr(attrs: str, name: str, value: str) -> str:
    return re.sub(rf"""(\b{name}\s*=\s*)(["']).*?\2""", lambda m: f'{m.group(1)}"{value}"', attrs, count=1,
                  flags=re.IGNORECASE | re.DOTALL)


def _drop_attrs(attrs: str, *names: str) -> str:
    for name in names:
        attrs = re.sub(rf"""\s+{name}(\s*=\s*(["']).*?\2)?(?=[\s/>]|$)""", "", attrs, flags=re.IGNORECASE | re.DOTALL)
    return attrs


def localize_css(text: str, unknown: list[str] | None = None) -> str:
    """Remove CSS that would load from outside: ``url(http...)`` becomes ``none``, ``@import`` of an
    external sheet goes. (Vendored stylesheets are copied as they are: their ``url()``s are relative.)"""
    def url(m: re.Match) -> str:
        if unknown is not None and not GX_ASSETS.search(m.group("url")):
            unknown.append(m.group("url"))
        return "none"

    text = _CSS_IMPORT.sub(lambda m: (unknown.append(m.group(0)) if unknown is not None else None) or "", text)
    return _CSS_URL.sub(url, text)


def localize_page(text: str, prefix: str) -> tuple[str, list[str], bool]:
    """One page's text with every external load replaced by the vendored file (``prefix`` is the
    relative path from the page's folder to the site root, ``.`` at the root) or removed. Returns
    (text, unknown external URLs removed, whether the page would draw a Vega chart)."""
    unknown: list[str] = []
    charts = "vegaEmbed(" in text
    vendor = "/".join((prefix, *VENDOR_DIR))

    def opening(m: re.Match) -> str | None:
        """The tag rewritten to load its vendored file, unchanged when it loads nothing from
        outside, or None to drop it."""
        name, attrs = m.group("tag"), m.group("attrs")
        external = [(a.group("name").lower(), a.group("value")) for a in _ATTR.finditer(attrs)
                    if a.group("name").lower() in _LOADING_ATTRS and EXTERNAL.search(a.group("value").strip())]
        if not external:
            return m.group("open")
        attr, url = external[0]
        if name.lower() == "img" and GX_ASSETS.search(url):  # GX's logo, with the context id: the local copy
            return f"<{name}{_set_attr(_drop_attrs(attrs, 'srcset'), 'src', f'{prefix}/{LOGO}')}>"
        known, dest = _cdn_target(url)
        if not known:
            unknown.append(url)
        if dest is None or len(external) > 1:
            return None
        attrs = _drop_attrs(attrs, "integrity", "crossorigin")  # the vendored file is not the CDN's bytes
        return f"<{name}{_set_attr(attrs, attr, f'{vendor}/{dest}')}>"

    def script(m: re.Match) -> str:  # <script src=...></script>: a dropped one leaves nothing behind
        new = opening(m)
        return "" if new is None else new + m.group("close")

    def other(m: re.Match) -> str:
        new = opening(m)
        return "" if new is None else new

    text = _SCRIPT.sub(script, text)
    text = _TAG.sub(other, text)
    text = _NEWSLETTER.sub("", text)
    text = _FAVICON.sub(lambda m: f"{m.group(1)}{prefix}/static/images/favicon.ico{m.group(2)}", text)
    text = re.sub(r"(<style\b[^>]*>)(.*?)(</style>)", lambda m: m.group(1) + localize_css(m.group(2), unknown) + m.group(3),
                  text, flags=re.IGNORECASE | re.DOTALL)
    text = re.sub(r"""(\bstyle\s*=\s*)(["'])(.*?)\2""", lambda m: m.group(1) + m.group(2) + localize_css(m.group(3), unknown) + m.group(2),
                  text, flags=re.IGNORECASE | re.DOTALL)
    return text, unknown, charts


def localize_site(site: Path) -> LocalizeReport:
    """Vendor the assets into ``site`` and rewrite every page and stylesheet of the site (idempotent:
    a page already rewritten is left as it is)."""
    site = Path(site)
    report = LocalizeReport(copied=vendor_assets(site))
    vendor = Path(site, *VENDOR_DIR)
    for path in sorted(site.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in (".html", ".htm", ".css") or path.is_relative_to(vendor):
            continue
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".css":
            new, unknown, charts = localize_css(text), [], False
        else:
            report.pages += 1
            prefix = Path(os.path.relpath(site, path.parent)).as_posix()
            new, unknown, charts = localize_page(text, prefix)
        rel = path.relative_to(site).as_posix()
        if unknown:
            report.unknown[rel] = unknown
        if charts:
            report.charts.append(rel)
        if new != text:
            write_text(path, new)
            report.rewritten += 1
    return report
