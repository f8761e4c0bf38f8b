"""benchmarks/gc_tradeoff.py: the beta trade-off rows, their summary and the resumable run."""

from __future__ import annotations

import json
import math

import pytest

from _benchmarks import load_benchmark  # tests/_benchmarks.py

gt = load_benchmark("gc_tradeoff.py", "tv_gc_tradeoff")

ROW_KEYS = {"data", "model", "beta", "label", "seed", "recipe", "train_seconds", "test_accuracy",
            "val_accuracy", "ece_15", "ece_15_ts", "temperature", "test_nll", "test_nll_ts",
            "test_bits_per_dim", "ood", "ood_best", "ood_generative_best", "ood_skipped"}


@pytest.fixture(scope="module")
def rows():
    """One seed, two betas and the twin on digits, 2 epochs each (~10 s on one thread)."""
    out: list[dict] = []
    gt.run_sweep("digits", [0], [0.5, 4.0], emit=out.append, epochs=2)
    return out


def test_with_beta_changes_only_beta():
    gc, ff = gt.recipes_for("digits")
    r = gt.with_beta(gc, 4)
    assert r["model_kwargs"] == {**gc.get("model_kwargs", {}), "beta": 4.0}
    assert {k: v for k, v in r.items() if k != "model_kwargs"} == {k: v for k, v in gc.items() if k != "model_kwargs"}
    assert "beta" not in gc.get("model_kwargs", {})  # the zoo recipe itself is untouched
    assert gc["model"] == "ibinn-small" and ff["model"] == "ibinn-small-ff"


def test_rows(rows):
    assert [r["label"] for r in rows] == ["0.5", "4", gt.TWIN]
    assert [r["beta"] for r in rows] == [0.5, 4.0, None]
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        json.dumps(r, allow_nan=False)  # plain, finite JSON
        assert r["test_accuracy"] > 0.8  # digits learn within 2 epochs
        assert 0 <= r["ece_15"] < 0.2 and 0 <= r["ece_15_ts"] < 0.1
        assert r["temperature"] > 0
        # the temperature was fitted on val, so the test NLL can move either way, but not by much
        assert r["test_nll_ts"] < r["test_nll"] + 0.05
        assert list(r["ood"]) == ["uniform", "faces"]
        for ood_set, per_det in r["ood"].items():
            assert all(0 <= m["auroc"] <= 1 and 0 <= m["fpr_at_95_tpr"] <= 1 for m in per_det.values())
            best = max(per_det.values(), key=lambda m: m["auroc"])["auroc"]
            assert r["ood_best"][ood_set]["auroc"] == best
            assert r["ood_best"][ood_set]["detector"] in per_det
        assert {"max-softmax", "mahalanobis", "knn"} <= set(r["ood"]["faces"])
    gcs, ff = rows[:2], rows[2]
    for r in gcs:
        assert r["model"] == "ibinn-small" and r["recipe"]["model_kwargs"]["beta"] == r["beta"]
        assert 1 < r["test_bits_per_dim"] < 16
        assert set(gt.GENERATIVE_SCORES) <= set(r["ood"]["uniform"])
        assert r["ood_generative_best"]["uniform"]["detector"] in gt.GENERATIVE_SCORES
        assert "vim" in r["ood_skipped"]  # the mixture head is not affine
        # its outputs are log-posteriors: energy and max-logit say nothing and are left out
        assert {"energy", "max-logit"} <= set(r["ood_skipped"]) and "energy" not in r["ood"]["faces"]
    # a density-weighted GC (small beta) already tells noise from digits after 2 epochs
    assert gcs[0]["ood"]["uniform"]["typicality"]["auroc"] > 0.9
    assert ff["model"] == "ibinn-small-ff" and ff["test_bits_per_dim"] is None
    assert "energy" in ff["ood"]["faces"]
    assert ff["ood_generative_best"] == {"uniform": None, "faces": None}
    assert not set(gt.GENERATIVE_SCORES) & set(ff["ood"]["faces"]) and "vim" in ff["ood"]["faces"]


def test_summary_and_tables(rows):
    summary = gt.summarise(rows[::-1])  # order of the rows does not matter
    assert [s["label"] for s in summary] == ["0.5", "4", gt.TWIN]
    assert summary[2]["test_bits_per_dim"] is None
    assert summary[0]["ece_15"] == {"mean": rows[0]["ece_15"], "std": None, "n": 1}
    text = gt.format_tables(summary, "digits")
    assert "| inf (FF twin) | 1 |" in text and "best AUROC vs faces" in text
    assert len([ln for ln in text.splitlines() if ln.startswith("| 4 |")]) == 2  # both tables


def _fake(label: str, beta, seed: int, acc: float, auroc: dict) -> dict:
    return {"data": "digits", "label": label, "beta": beta, "seed": seed, "test_accuracy": acc,
            "ece_15": 0.01, "ece_15_ts": 0.01, "temperature": 1.0, "test_nll": 0.1, "test_nll_ts": 0.1,
            "test_bits_per_dim": None if beta is None else 7.0,
            "ood": {"faces": {d: {"auroc": a} for d, a in auroc.items()}}}


def test_summarise_mean_std_and_best_by_mean():
    rows = [_fake("1", 1.0, 0, 0.90, {"typicality": 0.9, "knn": 0.2}),
            _fake("1", 1.0, 1, 0.94, {"typicality": 0.5, "knn": 0.99}),
            _fake("1", 1.0, 2, 0.98, {"typicality": 0.7, "knn": 0.1})]
    (s,) = gt.summarise(rows)
    assert s["seeds"] == [0, 1, 2]
    assert s["test_accuracy"]["mean"] == pytest.approx(0.94)
    assert s["test_accuracy"]["std"] == pytest.approx(0.04)  # sample std (ddof 1)
    # knn wins one seed by far, typicality has the best mean: the table shows typicality
    assert s["ood_best"]["faces"]["detector"] == "typicality"
    assert s["ood_best"]["faces"]["mean"] == pytest.approx(0.7)
    assert s["ood_best"]["faces"]["std"] == pytest.approx(0.2)


def test_main_resumes_from_jsonl(tmp_path, capsys, monkeypatch):
    """Rows already in --jsonl are not trained again; the table is built from them."""
    jsonl = tmp_path / "rows.jsonl"
    done = [_fake(lbl, b, 0, 0.9, {"max-softmax": 0.8}) for lbl, b in (("2", 2.0), (gt.TWIN, None))]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in done) + '{"cut short')
    monkeypatch.setattr(gt, "train_and_measure", lambda *a, **k: pytest.fail("retrained a finished row"))
    out_json = tmp_path / "all.json"
    assert gt.main(["--data", "digits", "--seeds", "0", "--betas", "2", "--jsonl", str(jsonl),
                    "--json", str(out_json)]) == 0
    assert "| 2 | 1 | 0.900 |" in capsys.readouterr().out
    saved = json.loads(out_json.read_text())
    assert [s["label"] for s in saved["summary"]] == ["2", gt.TWIN]
    assert not math.isnan(saved["summary"][0]["test_accuracy"]["mean"])
