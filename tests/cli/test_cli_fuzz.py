"""Hypothesis-driven fuzzing of the command line: paths, option values, config.json contents and
image files. Whatever comes in, the CLI either works (exit 0) or says what is wrong in one
``error:`` line with exit 2: never a traceback, an internal error or a hang."""

from __future__ import annotations

import json
import string

import pytest
import torch
from _edge import assert_user_error, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trustvision import models

FUZZ = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

WEIRD = ["", " ", "-1", "0", "1", "3", "abc", "1e3", "0x10", "nan", "inf", "-0", str(2 ** 70), "../..", "/",
         "zoo:", "\u00e9\u00e8", "a,b", ",", "=", "x=", "=1", "a.b=c", "%s", "{}", "[]", "null"]


def _one_of(*xs):
    return st.sampled_from(list(xs))


@pytest.fixture(scope="module")
def ckpt_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    torch.manual_seed(0)
    net = models.create("small-cnn", num_classes=10, in_chans=1, image_size=8)
    return models.save(net, root / "net", classes=[str(i) for i in range(10)], dataset="digits")


def _assert_ok_or_user_error(status, err):
    if status != 0:
        assert_user_error(status, err)


@FUZZ
@given(data=st.data())
def test_fuzz_audit_options(data, tmp_path, capsys, ckpt_dir):
    out = tmp_path / f"out{data.draw(st.integers(0, 3))}"
    (tmp_path / "afile").write_text("x")
    model = data.draw(_one_of("zoo:small-cnn-digits", str(ckpt_dir), "", "zoo:../../x", "zoo:/etc", "nope",
                              str(tmp_path / "afile"), str(tmp_path), "zoo:small-cnn-digits,", "a\x00b"))
    argv = ["audit", "--model", model, "--no-progress", "--checks",
            data.draw(_one_of("accuracy", "", "bogus", "accuracy,calibration", ",accuracy", "accuracy,accuracy"))]
    argv += ["--out", data.draw(st.sampled_from([str(out), "", str(tmp_path / "afile"), str(tmp_path / "afile/x"),
                                                 str(tmp_path / ("d" * 256))]))]
    for flag in data.draw(st.lists(_one_of("--data", "--n-max", "--n-bins", "--seed", "--batch-size", "--device",
                                           "--option", "--data-dir"), max_size=4, unique=True)):
        if flag == "--data":
            value = data.draw(_one_of("digits", "faces", "", "nope", "imagefolder:/nonexistent", "mnist",
                                      "imagefolder:", "shortcut-digits"))
        elif flag == "--device":
            value = data.draw(_one_of("cpu", "meta", "cuda:9", "", "auto", "cpu:1", "gpu"))
        elif flag == "--option":
            value = data.draw(_one_of("ood.n=5", "ood.n=x", "explanations.n=0", "nope.k=1", "accuracy.k=1",
                                      "ood", "ood.sets=uniform,bogus", "ood.sets=", "calibration.x=1"))
        elif flag == "--data-dir":
            value = data.draw(_one_of(str(tmp_path), "", "/nonexistent", str(tmp_path / "afile")))
        else:
            value = data.draw(st.one_of(st.sampled_from(WEIRD), st.integers(-3, 80).map(str)))
        argv += [flag, value]
    status, _, err = run_cli(argv, capsys, seconds=120)
    _assert_ok_or_user_error(status, err)


@FUZZ
@given(data=st.data())
def test_fuzz_explain_and_report(data, tmp_path, capsys, ckpt_dir):
    if data.draw(st.booleans()):
        argv = ["explain", "--model", data.draw(_one_of("zoo:small-cnn-digits", str(ckpt_dir), "", "x")),
                "--data", data.draw(_one_of("digits", "faces", "")), "--device", "cpu",
                "--method", data.draw(_one_of("saliency", "rise", "occlusion", "sag", "", "igos+", "likelihood-ratio")),
                "--n", data.draw(_one_of("1", "2", "0", "-1", "x")), "--out", str(tmp_path / "e")]
        for flag in data.draw(st.lists(_one_of("--split", "--target", "--method-kw", "--iterations", "--grid",
                                               "--batch-size", "--seed"), max_size=3, unique=True)):
            if flag == "--method-kw":
                value = data.draw(_one_of("n_masks=20", "n_masks=0", "bogus=1", "n_masks", "=", "cells=2,2",
                                          "grid=2", "baselines=blur", "window=99"))
            elif flag == "--split":
                value = data.draw(_one_of("test", "val", "train", "", "dev"))
            elif flag == "--target":
                value = data.draw(_one_of("predicted", "label", "", "3"))
            else:
                value = data.draw(_one_of("1", "2", "0", "-2", "abc", str(2 ** 70)))
            argv += [flag, value]
        if "--method-kw" not in argv and "rise" in argv:
            argv += ["--method-kw", "n_masks=20"]
        if "sag" in argv and "--grid" not in argv:
            argv += ["--grid", "2"]
    else:
        text = data.draw(st.one_of(
            st.text(alphabet=string.printable, max_size=60),
            st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                   max_size=3),
                         max_leaves=12).map(lambda obj: json.dumps({"schema_version": 1, "models": obj}))))
        (tmp_path / "results.json").write_text(text)
        argv = ["report", str(tmp_path)]
    status, _, err = run_cli(argv, capsys, seconds=120)
    _assert_ok_or_user_error(status, err)


CONFIG_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 12, 10 ** 12), st.floats(allow_nan=True),
                          st.text(max_size=12), st.lists(st.integers(-5, 50), max_size=4),
                          st.dictionaries(st.sampled_from(["pretrained", "checkpoint_path", "widths", "dropout",
                                                           "x"]), st.one_of(st.booleans(), st.integers(-2, 64),
                                                                            st.text(max_size=10)), max_size=2))


@FUZZ
@given(mutations=st.dictionaries(
    st.sampled_from(["format", "format_version", "architecture", "num_classes", "in_chans", "image_size", "classes",
                     "dataset", "kwargs", "mean", "std", "metrics", "extra"]), CONFIG_VALUES, min_size=1, max_size=3))
def test_fuzz_config_json(mutations, tmp_path, capsys, ckpt_dir):
    folder = tmp_path / "ckpt"
    folder.mkdir(exist_ok=True)
    cfg = json.loads((ckpt_dir / "config.json").read_text())
    cfg.update(mutations)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "model.safetensors").write_bytes((ckpt_dir / "model.safetensors").read_bytes())
    status, _, err = run_cli(["audit", "--model", str(folder), "--data", "digits", "--checks", "accuracy",
                              "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out"), "--n-max", "20"],
                             capsys, seconds=120)
    _assert_ok_or_user_error(status, err)


@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.sampled_from(["train", "val", "test", ""]),
                                st.sampled_from([".png", ".jpg", ".txt", ""]),
                                st.one_of(st.binary(max_size=40), st.sampled_from(["png8", "png12", "rgb8", "jpg8"]))),
                      min_size=1, max_size=8))
def test_fuzz_image_folders(files, tmp_path, capsys, ckpt_dir):
    from PIL import Image

    root = tmp_path / "imgs"
    for i, (cls, split, ext, content) in enumerate(files):
        folder = root / split / cls if split else root / cls
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i}{ext}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            size = int(content[-2:] if content[-2:].isdigit() else content[-1])
            mode = "RGB" if content.startswith("rgb") else "L"
            img = Image.new(mode, (size, size), color=(i * 20) % 255 if mode == "L" else (i, 2 * i, 3 * i))
            img.save(path, format="JPEG" if content.startswith("jpg") else "PNG")
    status, _, err = run_cli(["audit", "--model", str(ckpt_dir), "--data", f"imagefolder:{root}", "--checks",
                              "accuracy", "--no-progress", "--device", "cpu", "--out", str(tmp_path / "out")],
                             capsys, seconds=120)
    _assert_ok_or_user_error(status, err)
