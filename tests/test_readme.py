"""The README's Python examples of the audit entry point and of a new check run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(marker: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    return [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if marker in b]


@pytest.mark.parametrize("marker,check", [
    ("audit.run(", "assert set(res.metrics) == {'zoo:small-cnn-digits'}\n"
                   "import pathlib; assert pathlib.Path('report-py/report.html').is_file()\n"
                   "assert png.startswith(b'\\x89PNG')\n"),
    ("@register_check(", "from trustvision import audit\n"
                         "r = audit.run('zoo:small-cnn-digits', 'digits', checks='mean-confidence', "
                         "options={'mean-confidence.split': 'val'})\n"
                         "m = r.metrics['zoo:small-cnn-digits']['Mean confidence']\n"
                         "assert 0.5 < m <= 1.0, m\n"
                         "assert 'val split' in r.results['metrics']['Mean confidence']['legend']\n"),
])
def test_readme_python_examples_run(marker, check, tmp_path):
    blocks = _blocks(marker)
    assert blocks, f"no README example with {marker!r}"
    code = "\n".join(blocks) + "\n" + check
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
