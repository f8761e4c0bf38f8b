"""Progress of long explanations (#11): chunked with a tracker == all at once, exactly; ETAs per
image in `trustvision explain --no-progress` and one line per method in the audit."""

import json
import re

import pytest
import torch

from trustvision import explain, models
from trustvision._utils.progress import line_tracker, silent_tracker
from trustvision.cli import main
from trustvision.data import TensorImageDataset
from trustvision.explain import ExplanationInfo



@pytest.fixture
def sample(tiny_cnn):
    g = torch.Generator().manual_seed(3)
    ds = TensorImageDataset(torch.rand(12, 1, 8, 8, generator=g), torch.arange(12) % 3, ["a", "b", "c"], "toy", "test")
    net = tiny_cnn
    return net, explain.draw_sample(net, ds, 7, seed=0)


@pytest.mark.parametrize("method,kw", [("igos", {"iterations": 3, "ig_steps": 3}),
                                       ("igos++", {"iterations": 3, "ig_steps": 3}),
                                       ("rise", {"n_masks": 64}), ("saliency", {})])
def test_chunked_with_progress_equals_one_call(sample, method, kw):
    net, s = sample
    whole = explain.explain_images(net, s, method, seed=1, method_kw=kw)
    seen: list[str] = []
    chunked = explain.explain_images(net, s, method, seed=1, method_kw=kw,
                                     track=line_tracker(seen.append, unit="images"), chunk=3)
    # equal up to float rounding (the model's kernels may sum in another order at another batch size)
    torch.testing.assert_close(whole.heatmaps, chunked.heatmaps, atol=1e-5, rtol=0)
    assert chunked.reasons == whole.reasons and chunked.unreliable == whole.unreliable
    assert [line.split(",")[0] for line in seen] == [f"{method}: 3/7 images", f"{method}: 6/7 images",
                                                     f"{method}: 7/7 images"]
    assert "eta" in seen[0] and "eta" not in seen[-1]
    if whole.info is not None:  # pass counts add up over the chunks; the per-image lists are joined
        assert chunked.info.forward_backward_passes == whole.info.forward_backward_passes
        assert chunked.info.target == whole.info.target and len(chunked.info.constant) == 7


def test_default_chunk_is_a_quarter_and_results_keep_their_kind(sample):
    net, s = sample
    counts = []

    def track(items, total=None, description="", weight=None):
        for item in items:
            counts.append(weight(item))
            yield item

    res = explain.explain_images(net, s.take(2), explain.SAG, method_kw={"grid": 2}, track=track)
    assert counts == [1, 1] and len(res.results) == 2  # every result of each chunk is kept
    counts.clear()
    explain.explain_images(net, s, "saliency", track=track)
    assert counts == [2, 2, 2, 1]  # 7 images: chunks of ceil(7 / 4) = 2
    assert list(silent_tracker([1, 2])) == [1, 2]


def test_concat_of_infos():
    def info(n, name, fb):
        return ExplanationInfo(target=[0] * n, target_probability=[0.9] * n, predicted=[0] * n,
                               low_confidence=[False] * n, not_predicted=[False] * n, final_loss=[0.1] * n,
                               forward_backward_passes=fb, forward_passes=2 * fb, constant=[False] * n,
                               baseline_name=name)
    a, b = info(2, "blurred image", 10), info(1, "black image", 5)
    c = ExplanationInfo.concat([a, b])
    assert c.forward_backward_passes == 15 and c.forward_passes == 30 and len(c.target) == 3
    assert c.baseline_name == ["blurred image", "blurred image", "black image"]
    assert ExplanationInfo.concat([a, info(3, "blurred image", 1)]).baseline_name == "blurred image"
    with pytest.raises(ValueError):
        ExplanationInfo.concat([])


def test_explain_no_progress_prints_a_line_per_chunk_with_eta(tmp_path, capsys):
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval()
    ckpt = models.save(net, tmp_path / "m", classes=[str(i) for i in range(10)], dataset="digits")
    out = tmp_path / "ex"
    assert main(["explain", "--model", str(ckpt), "--data", "digits", "--method", "saliency", "--n", "16",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    cap = capsys.readouterr()
    lines = [line for line in cap.err.splitlines() if line.strip()]
    assert [re.match(r"saliency: (\d+)/16 images", line).group(1) for line in lines] == ["4", "8", "12", "16"]
    assert all("eta" in line for line in lines[:-1])
    assert "written to" in cap.out and json.loads((out / "scores.json").read_text())["n"] == 16


def test_audit_no_progress_logs_each_explanation_method(tmp_path, capsys):
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8).eval()
    ckpt = models.save(net, tmp_path / "m", classes=[str(i) for i in range(10)], dataset="digits")
    assert main(["audit", "--model", str(ckpt), "--data", "digits", "--out", str(tmp_path / "rep"), "--no-progress",
                 "--checks", "explanations", "-O", "explanations.methods=saliency,rise", "-O", "explanations.n=4",
                 "-O", "explanations.sag_n=1", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert re.search(r": Saliency: 4 images in \d+\.\ds", err), err
    assert re.search(r": RISE: 4 images in \d+\.\ds", err), err
    assert re.search(r": SAG: 1 images in \d+\.\ds", err), err
    assert "done explanations for" in err
