"""The README's Python examples of the audit entry point and of a new check run as written."""

from __future__ import annotations

import importlib.util
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
    ("XNN(net", "assert m.agreement >= 0.95 and len(r.values) == 5 and tuple(idx.shape) == (5, 6)\n"
                "assert abs(sum(r.contributions) - r.estimate) < 1e-3\n"
                "assert XNN.load('xnn-digits', net).metrics(test).agreement == m.agreement\n"),
    ("mmd_critic(", "assert len(res.prototypes) == 50 and len(res.criticisms) == 50\n"
                    "r = sum(v['rate'] for v in enrich.values()) / 10\n"
                    "assert r > 1.5 * float((~test.marked).double().mean()), r  # criticisms enriched for unmarked\n"),
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


# -- every shell example, at small sizes ------------------------------------------------------------

#: lines not run here, and why: installing and the whole test suite (that is this run), multi-process
#: training (tests/train/test_train_distributed.py runs torchrun), benchmarks and zoo builds (minutes)
SKIP = ("pip ", "pytest", "torchrun ", "python benchmarks/", "python scripts/")
SMALL_AUDIT = ["--n-max", "60", "-O", "explanations.n=2", "-O", "explanations.sag_n=1", "-O",
               "explanations.iterations=2", "-O", "ood.n=30", "-O", "generative.ood_n=30", "-O",
               "generative.counterfactual_n=2", "-O", "overinterpretation.n=12", "-O", "overinterpretation.train_n=60",
               "-O", "overinterpretation.epochs=1", "-O", "overinterpretation.ensemble=2",
               "-O", "adversarial.n=8", "-O", "adversarial.explain_n=2", "-O", "adversarial.pairs=1",
               "-O", "corruptions.n=8", "--no-progress"]


def _shell_lines() -> list[str]:
    text = README.read_text(encoding="utf-8")
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part:
                    lines.append(part)
    return lines


def _small(argv: list[str]) -> list[str]:
    """The same command at a small size: 1 epoch, 2 images, cpu, small audit options."""
    import torch

    out = list(argv)
    for flag, value in (("--epochs", "1"), ("--n", "2"), ("--ensemble", "2")):
        if flag in out:
            out[out.index(flag) + 1] = value
    if "--device" in out and out[out.index("--device") + 1].startswith("cuda") and not torch.cuda.is_available():
        out[out.index("--device") + 1] = "cpu"
    if out[:1] == ["audit"] and "--list-checks" not in out:
        out += SMALL_AUDIT
    if out[:1] == ["explain"] and "igos++" in out:
        out += ["--iterations", "2"]
    if out[:1] == ["train"]:
        out += ["--no-progress"]
    return out


@pytest.mark.slow
def test_readme_shell_examples_run(tmp_path, monkeypatch, capsys):
    import shlex

    from trustvision.cli import main

    monkeypatch.chdir(tmp_path)
    lines = [ln for ln in _shell_lines() if not ln.startswith(SKIP)]
    assert sum(ln.startswith("trustvision ") for ln in lines) >= 15, lines
    pending = [shlex.split(ln) for ln in lines]
    assert all(argv[0] == "trustvision" for argv in pending), [a for a in pending if a[0] != "trustvision"]
    done: list[str] = []
    for _ in range(2):  # a command naming a run folder an example further down makes waits for it
        waiting = []
        for argv in pending:
            if "--ray" in argv and importlib.util.find_spec("ray") is None:
                continue  # the Ray extra is not installed here (CI installs it: .ci/run)
            paths = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a in ("--model", "--compare")]
            if any(p.startswith("runs/") and not (tmp_path / p).exists() for p in paths):
                waiting.append(argv)
                continue
            status = main(_small(argv[1:]))
            err = capsys.readouterr().err
            assert status == 0, (shlex.join(argv), err[-2000:])
            done.append(shlex.join(argv))
        pending = waiting
    assert not pending, pending
    assert (tmp_path / "trustvision-report" / "report.html").is_file()
    assert (tmp_path / "runs" / "ens5" / "model.safetensors").is_file()
    assert (tmp_path / "rise" / "heatmaps.npy").is_file() and (tmp_path / "sag").is_dir()
