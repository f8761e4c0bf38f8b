"""The HTML report: escaping, self-containment, re-rendering."""

import base64
import re

import pytest

from trustvision.audit import run_audit
from trustvision.cli import main
from trustvision.errors import TrustVisionError
from trustvision.report import load_results, render_html, render_report

XSS = "<script>alert(1)</script>"


@pytest.fixture
def audited(tmp_path, tiny_model, splits_factory):
    splits = splits_factory(classes=("a", XSS, "c"), name=f"toy{XSS}")
    run_audit({f"tiny{XSS}": tiny_model}, splits, tmp_path, checks=["accuracy", "calibration"], progress=False,
              command=f"trustvision audit {XSS}")
    return tmp_path


def test_user_strings_are_escaped(audited):
    html = (audited / "report.html").read_text(encoding="utf-8")
    assert XSS not in html
    assert "<script" not in html.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("&lt;script&gt;") >= 4  # model name, dataset name, class name, command


def test_report_is_self_contained(audited):
    html = (audited / "report.html").read_text(encoding="utf-8")
    assert 'src="http' not in html and "href=\"http" not in html and "<link" not in html
    assert "@import" not in html and "url(" not in html
    srcs = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    assert len(srcs) == 2  # confusion matrix + reliability diagram
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
    assert "15 equal-width bins" in html
    assert "<style>" in html


def test_report_contents(audited):
    html = (audited / "report.html").read_text(encoding="utf-8")
    r = load_results(audited)
    acc = r["models"][0]["metrics"]["Accuracy"]
    assert f"{acc:.4f}" in html
    assert "trustvision " + r["trustvision_version"] in html
    for title in ("Summary", "Accuracy", "Calibration", "Per-class accuracy"):
        assert title in html


def test_rerender_from_results_dir(audited, capsys):
    first = (audited / "report.html").read_text(encoding="utf-8")
    (audited / "report.html").unlink()
    assert main(["report", str(audited)]) == 0
    assert "report.html" in capsys.readouterr().out
    assert (audited / "report.html").read_text(encoding="utf-8") == first
    other = render_report(audited, audited / "copy.html")
    assert other.read_text(encoding="utf-8") == first


def test_missing_figure_renders_note(audited):
    r = load_results(audited)
    rel = r["models"][0]["checks"]["accuracy"]["figures"]["confusion_matrix"]
    (audited / rel).unlink()
    html = render_html(r, audited)
    assert "figure file missing" in html
    assert len(re.findall(r"<img ", html)) == 1


def test_report_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(TrustVisionError, match="results.json not found"):
        load_results(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(TrustVisionError, match="not a trustvision results file"):
        load_results(tmp_path)
