"""Every user mistake the issue lists gives one `error:` line naming the fix and exit status 2."""

import pytest
import torch

from trustvision import models
from trustvision.cli import main


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    out = {}
    for name, classes, chans, size in [("digits10", 10, 1, 8), ("digits5", 5, 1, 8),
                                       ("rgb8", 10, 3, 8), ("gray25", 10, 1, 25)]:
        net = models.create("small-cnn", num_classes=classes, in_chans=chans, image_size=size)
        out[name] = str(models.save(net, root / name, dataset="digits"))
    corrupt = root / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((root / "digits10" / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    out["corrupt"] = str(corrupt)
    return out


CASES = [
    # (argv builder, words the message must contain)
    (lambda c, t: ["audit", "--model", c["digits10"], "--data", "nope", "--out", t], ["unknown dataset", "trustvision data"]),
    (lambda c, t: ["train", "--data", "digits", "--model", "nonet", "--out", t], ["unknown model"]),
    (lambda c, t: ["audit", "--model", c["digits10"], "--data", "digits", "--checks", "bogus", "--out", t], ["unknown check"]),
    (lambda c, t: ["audit", "--model", t + "/missing", "--data", "digits", "--out", t], ["missing"]),
    (lambda c, t: ["audit", "--model", c["corrupt"], "--data", "digits", "--out", t], ["corrupt"]),
    (lambda c, t: ["audit", "--model", c["rgb8"], "--data", "digits", "--out", t], ["channel"]),
    (lambda c, t: ["audit", "--model", c["gray25"], "--data", "digits", "--out", t], ["size"]),
    (lambda c, t: ["audit", "--model", c["digits5"], "--data", "digits", "--out", t], ["label"]),
    (lambda c, t: ["explain", "--model", c["digits10"], "--data", "digits", "--method", "magic", "--out", t], ["unknown"]),
]


@pytest.mark.parametrize("build,words", CASES, ids=["dataset", "model", "check", "missing-file", "corrupt-file",
                                                    "channels", "size", "labels", "method"])
def test_user_errors_are_one_line_exit_2(build, words, ckpts, tmp_path, capsys):
    assert main(build(ckpts, str(tmp_path)) + []) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    for w in words:
        assert w in err[0].lower(), (w, err[0])
