"""The report in a real browser (Debian's headless Chromium, driven from the command line).

A copy of each report gets a small probe script; Chromium runs it and dumps the DOM, and the
probe's findings are read back: no console errors, every check section present and reachable from
the table of contents, no element wider than the viewport at 1400 px and 900 px, no table cell
squeezed so narrow that its words break mid-word, every figure loaded. Screenshots are kept in
the folder the test prints (``test-artifacts/report-browser``, or
``$TRUSTVISION_ARTIFACTS/report-browser``). ``.ci/run`` installs Chromium; without it the test is
skipped locally and fails in CI.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from trustvision import audit, models

ROOT = Path(__file__).resolve().parents[2]
WIDTHS = (1400, 900)
PROBE_HEAD = """<script>
window.__tvErrors = [];
window.addEventListener('error', function (e) { window.__tvErrors.push(String(e.message || e)); }, true);
(function () { var orig = console.error; console.error = function () {
  window.__tvErrors.push(Array.prototype.join.call(arguments, ' ')); orig.apply(console, arguments); }; })();
</script>"""

PROBE_BODY = r"""<script>
window.addEventListener('load', function () {
  var vw = window.innerWidth, out = {viewport: vw, errors: window.__tvErrors};
  out.scrollWidth = document.documentElement.scrollWidth;
  function scrolls(el) {
    for (var p = el.parentElement; p; p = p.parentElement) {
      var ox = getComputedStyle(p).overflowX;
      if (ox === 'auto' || ox === 'scroll' || ox === 'hidden') return true;
    }
    return false;
  }
  var wide = [];
  document.querySelectorAll('body *').forEach(function (el) {
    if (el.id === 'tv-probe' || el.tagName === 'SCRIPT') return;
    var r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > vw + 1 && !scrolls(el)) wide.push(el.tagName + '#' + el.id + '.' + el.className);
  });
  out.wide = wide.slice(0, 20);
  // table cells squeezed below their words' width: a text drawn on more lines than it has words
  // (break opportunities: spaces, hyphens, colons, slashes) breaks a word in the middle
  var squeezed = [];
  document.querySelectorAll('td, th').forEach(function (c) {
    if (!c.checkVisibility()) return;  // (in a closed <details>: not drawn)
    var walk = document.createTreeWalker(c, NodeFilter.SHOW_TEXT), node;
    while ((node = walk.nextNode())) {
      var words = node.textContent.split(/[\s\-:\/]+/).filter(Boolean).length;
      if (!words) continue;
      var rg = document.createRange(); rg.selectNodeContents(node);
      var lines = Array.prototype.filter.call(rg.getClientRects(), function (r) { return r.width > 0; }).length;
      if (lines > words) { squeezed.push(c.textContent.trim().slice(0, 60)); break; }
    }
  });
  out.squeezed = squeezed.slice(0, 20);
  var summary = document.querySelector('table.summary');
  var wrap = summary && summary.parentElement;
  out.summaryHidden = !summary || summary.getBoundingClientRect().width > wrap.clientWidth + 1;
  var toc = {};
  document.querySelectorAll('nav.toc a[href^="#"]').forEach(function (a) { toc[a.getAttribute('href').slice(1)] = 1; });
  var sections = [], unreachable = [];
  document.querySelectorAll('section.check, details.card').forEach(function (s) {
    sections.push(s.id); if (!toc[s.id]) unreachable.push(s.id);
  });
  out.sections = sections; out.unreachable = unreachable;
  out.badLinks = Object.keys(toc).filter(function (id) { return !document.getElementById(id); });
  var imgs = Array.prototype.slice.call(document.images);
  out.images = imgs.length;
  out.brokenImages = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); }).map(function (i) { return i.alt; });
  var pre = document.createElement('pre'); pre.id = 'tv-probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    path = _browser()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("no Chromium found: .ci/run must install Debian's chromium for the browser test")
        pytest.skip("no Chromium on this machine (apt-get install chromium)")
    return path


@pytest.fixture(scope="module")
def artifacts():
    folder = Path(os.environ.get("TRUSTVISION_ARTIFACTS", ROOT / "test-artifacts")) / "report-browser"
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nreport screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def reports(tmp_path_factory, default_audit, small_options):
    default = default_audit[0]  # tests/report/conftest.py
    compare = tmp_path_factory.mktemp("compare-report")
    audit.run({"zoo:ibinn-small-digits": models.load("zoo:ibinn-small-digits")}, "digits", out=compare,
              compare=audit.AuditModel("zoo:ibinn-small-ff-digits", models.load("zoo:ibinn-small-ff-digits")),
              options=small_options, command="trustvision audit --compare (small)")
    return {"default": default, "compare": compare}


def _chromium(browser: str, args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", "--virtual-time-budget=15000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def probe(browser: str, report: Path, width: int, tmp_path: Path) -> dict:
    page = report.read_text(encoding="utf-8")
    page = page.replace("<head>", "<head>" + PROBE_HEAD, 1).replace("</body>", PROBE_BODY + "</body>", 1)
    copy = tmp_path / f"probe-{width}.html"
    copy.write_text(page, encoding="utf-8")
    proc = _chromium(browser, [f"--window-size={width},1000", "--dump-dom", copy.as_uri()])
    found = re.search(r'<pre id="tv-probe">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"the probe did not run: {proc.stderr[-2000:]}"
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.slow
@pytest.mark.parametrize("which", ["default", "compare"])
@pytest.mark.parametrize("width", WIDTHS)
def test_report_in_a_real_browser(which, width, browser, reports, artifacts, tmp_path):
    report = reports[which] / "report.html"
    r = json.loads((reports[which] / "results.json").read_text())
    got = probe(browser, report, width, tmp_path)
    assert got["errors"] == [], got["errors"]
    assert got["viewport"] <= width and got["scrollWidth"] <= got["viewport"], got
    assert got["wide"] == [], got["wide"]
    assert got["squeezed"] == [], got["squeezed"]  # no word broken letter by letter in a narrow column
    assert got["summaryHidden"] is False  # every summary column visible, none scrolled away
    checks = {name for m in r["models"] for name in m["checks"]}
    assert {f"check-{c}" for c in checks} <= set(got["sections"])
    for m in r["models"]:
        for c in m["checks"]:
            assert f"check-{c}-{m['key']}" in got["sections"]
    assert got["unreachable"] == [] and got["badLinks"] == [], got
    n_figures = sum(len(c.get("figures") or {}) for m in r["models"] for c in m["checks"].values())
    assert got["images"] == n_figures > 0 and got["brokenImages"] == []
    shot = artifacts / f"{which}-{width}.png"
    proc = _chromium(browser, [f"--window-size={width},2400", f"--screenshot={shot}", report.as_uri()])
    assert shot.is_file() and shot.stat().st_size > 10_000, proc.stderr[-2000:]
