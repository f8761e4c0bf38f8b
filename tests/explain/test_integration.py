"""The ``explanations`` audit check and the ``trustvision explain`` command, end to end."""

import json

import numpy as np
import pytest
import torch

from trustvision import data, models
from trustvision.cli import main


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("model")
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8)
    x, y = data.load("digits", split="train").tensors()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(60):  # a few seconds: confident enough to explain
        i = torch.randint(0, len(y), (64,))
        loss = torch.nn.functional.cross_entropy(net(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    torch.set_num_threads(n_threads)
    path = models.save(net, tmp_path / "ckpt", classes=[str(i) for i in range(10)], dataset="digits")
    return net, path


def test_audit_check(digits_model):
    from trustvision.audit.context import AuditContext
    from trustvision.audit.registry import get_check

    net, _ = digits_model
    splits = {s: data.load("digits", split=s) for s in ("train", "val", "test")}
    ctx = AuditContext(model=net, model_name="m", datasets=splits,
                       check_options={"n": 3, "sag_n": 1, "iterations": 3})
    res = get_check("explanations")().run(ctx)
    methods = res.data["methods"]
    assert list(methods) == ["igos", "igos++", "saliency", "integrated-gradients", "gradcam", "occlusion",
                             "rise"]
    for m in methods.values():
        assert len(m["deletion_auc"]) == 3 and 0 <= m["insertion_mean"] <= 1
    assert len(res.tables["faithfulness"]["rows"]) == 7
    assert {"heatmaps", "sag_0"} <= set(res.figures)
    assert res.data["sag"][0]["grid"] == [4, 4]
    json.dumps(res.data)
    assert "Insertion AUC (iGOS++)" in res.metrics


def test_cli_explain_heatmaps_and_sag(digits_model, tmp_path, capsys):
    _, path = digits_model
    out = tmp_path / "out"
    code = main(["explain", "--model", str(path), "--data", "digits", "--method", "igos++",
                 "--n", "3", "--iterations", "3", "--out", str(out)])
    assert code == 0
    scores = json.loads((out / "scores.json").read_text())
    assert scores["n"] == 3 and len(scores["images"]) == 3
    assert all(0 <= r["insertion_auc"] <= 1 for r in scores["images"])
    assert np.load(out / "heatmaps.npy").shape == (3, 1, 8, 8)
    assert len(list((out / "overlays").glob("*.png"))) == 3
    assert "insertion AUC" in capsys.readouterr().out

    code = main(["explain", "--model", str(path), "--data", "digits", "--method", "sag",
                 "--n", "1", "--out", str(tmp_path / "sag")])
    assert code == 0
    files = sorted(p.suffix for p in (tmp_path / "sag" / "sag").iterdir())
    assert files == [".json", ".png", ".svg"]


@pytest.mark.parametrize("args,needle", [
    (["--method", "igos+"], "did you mean 'igos++'"),
    (["--n", "0"], "--n must be at least 1"),
    (["--data", "faces"], "25x25"),
])
def test_cli_one_line_errors(digits_model, tmp_path, capsys, args, needle):
    _, path = digits_model
    base = {"--model": str(path), "--data": "digits", "--out": str(tmp_path / "e")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    code = main(["explain"] + [a for kv in base.items() for a in kv])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
