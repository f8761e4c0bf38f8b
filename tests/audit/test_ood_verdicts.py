"""The ood check states plainly, for generative classifiers, which of their own scores work and
which fail on each OOD set (issue 17): known answers on a hand-made result, the table and the
sentence on a zoo generative classifier, nothing for a feed-forward model."""

from trustvision import audit
from trustvision.audit.checks.ood import generative_verdicts
from trustvision.evaluate.ood import OODResult


def _row(det, s, a):
    return {"detector": det, "ood_set": s, "auroc": a}


def test_known_verdicts():
    res = OODResult(rows=[_row("log_px", "faces", 0.42), _row("typicality", "faces", 0.95),
                          _row("complexity", "faces", 0.7), _row("max-softmax", "faces", 0.84),
                          _row("energy", "faces", 0.8), _row("max-softmax (compare)", "faces", 0.99)])
    v = generative_verdicts(res)
    rows = {r[1]: r for r in v["table"]["rows"]}
    assert rows["log_px"][3].startswith("fails") and rows["typicality"][3] == "works" and rows["complexity"][3] == "weak"
    assert rows["log_px"][4:] == ["max-softmax", 0.84]  # the best post-hoc detector, never the compared model
    assert "typicality vs faces" in v["sentence"] and "Failing" in v["sentence"] and "log_px vs faces" in v["sentence"]
    assert generative_verdicts(OODResult(rows=[_row("max-softmax", "faces", 0.9)])) is None


def test_one_rule_for_both_checks():
    """The ood check's verdicts and the generative check's table use the same thresholds."""
    from trustvision.audit.checks import generative, ood

    assert [ood.verdict(a) for a in (0.95, 0.9, 0.75, 0.6, 0.55, 0.45)] == [
        "works", "works", "weak", "weak", "fails: near chance", "fails: scores the OOD set as more in-distribution"]
    res = OODResult(rows=[_row("log_px", "faces", 0.55), _row("typicality", "faces", 0.92)])
    row = generative._verdicts(res)["rows"][0]
    assert "works: typicality (0.92)" in row[-1] and "fails: log_px (0.55)" in row[-1]
    v = {r[1]: r[3] for r in generative_verdicts(res)["table"]["rows"]}
    assert v == {"log_px": "fails: near chance", "typicality": "works"}


def test_zoo_generative_classifier_gets_the_table_and_a_twin_does_not():
    r = audit.run({"gc": "zoo:ibinn-small-digits", "ff": "zoo:ibinn-small-ff-digits"}, "digits", checks=["ood"],
                  options={"ood.n": 80, "ood.sets": "uniform,faces"})
    gc, ff = r.records("gc")["ood"], r.records("ff")["ood"]
    table = gc["tables"]["Generative scores: which work and which fail"]
    assert {row[0] for row in table["rows"]} == {"uniform", "faces"}
    assert {row[1] for row in table["rows"]} == {"log_px", "typicality", "complexity"}
    for s, det, a, verdict, *_ in table["rows"]:
        assert verdict == ("works" if a >= 0.9 else "weak" if a >= 0.6 else verdict) and (a >= 0.6 or "fails" in verdict)
    assert "Generative scores that work" in gc["summary"]
    assert "Generative scores: which work and which fail" not in ff["tables"]
