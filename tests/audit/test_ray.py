"""Sharding the audit's per-image work over Ray (issue 16) on a local 2-CPU cluster: the same
results as the single-process run (bit-identical on the CPU), a worker killed mid-run is replaced
and the audit completes with the same results, and without Ray ``--ray`` is one line."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from trustvision import audit, data, explain, models
from trustvision.cli import main

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow  # a local Ray cluster: worker processes start (seconds each)

OPTS = {"explanations.n": 8, "explanations.methods": "saliency,igos,rise", "explanations.iterations": 2,
        "explanations.sag_n": 1}


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


# Costs that follow measured speed: timings, and the passes SAG's I-GOS heatmaps spent (its line
# search scores as many trials per call as the measured pass times make cheap; the heatmaps are the
# same bits whatever that number, tests/explain/test_igos.py)
SPEED = ("duration_s", "created", "heatmap_passes")


def _strip(d):
    """The record without what follows the machine's speed."""
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if "second" not in k and k not in SPEED}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def test_sharded_explanations_equal_the_single_process_run(cluster):
    one = audit.run("zoo:small-cnn-digits", "digits", checks=["explanations"], options=OPTS)
    two = audit.run("zoo:small-cnn-digits", "digits", checks=["explanations"], options=OPTS, ray="auto",
                    ray_workers=2)
    assert one.ok and two.ok, (one.results["errors"], two.results["errors"])
    a = one.records()["explanations"]["data"]
    b = two.records()["explanations"]["data"]
    assert _strip(a) == _strip(b)  # every number, bit for bit
    assert a["methods"]["igos"]["deletion_auc"] and len(a["methods"]["igos"]["deletion_auc"]) == 8


def test_pool_results_are_in_chunk_order_and_survive_a_killed_worker(cluster):
    from trustvision.audit.distributed import RayPool

    net = models.load("zoo:small-cnn-digits").eval()
    sample = explain.draw_sample(net, data.load("digits", split="test"), 12, seed=3)
    local = explain.explain_images(net, sample, "igos", method_kw={"iterations": 2}, chunk=3,
                                   track=lambda it, total=None, description="", weight=None: it)
    pool = RayPool("zoo:small-cnn-digits", workers=2)
    pids = ray.get([a.ping.remote() for a in pool.actors])
    first = pool.actors[0]

    class Killing:
        def map(self, fn, calls):
            gen = pool.map(fn, calls)
            out = next(gen)
            ray.kill(first, no_restart=False)  # mid-run: the actor dies, Ray restarts it and retries its chunks
            yield out
            yield from gen

    remote = explain.explain_images(net, sample, "igos", method_kw={"iterations": 2}, chunk=3, executor=Killing())
    assert torch.equal(local.heatmaps, remote.heatmaps)
    assert ray.get(first.ping.remote()) != pids[0]  # a fresh process took its place
    pool.close()


def test_audit_survives_a_killed_worker(cluster, monkeypatch):
    from trustvision.audit import distributed

    original = distributed.RayPool.map
    killed = []

    def killing(self, fn, calls):
        gen = original(self, fn, calls)
        yield next(gen)
        if not killed:
            ray.kill(self.actors[-1], no_restart=False)
            killed.append(fn.__name__)
        yield from gen

    monkeypatch.setattr(distributed.RayPool, "map", killing)
    opts = {**OPTS, "explanations.methods": "saliency,igos", "explanations.sag_n": 0}
    one = audit.run("zoo:small-cnn-digits", "digits", checks=["explanations"], options=opts)
    two = audit.run("zoo:small-cnn-digits", "digits", checks=["explanations"], options=opts, ray="auto",
                    ray_workers=2)
    assert killed and two.ok, two.results["errors"]
    assert _strip(one.records()["explanations"]["data"]) == _strip(two.records()["explanations"]["data"])


def test_sharded_attacks_equal_the_single_process_run(cluster):
    opts = {"adversarial.n": 24, "adversarial.steps": 3, "adversarial.minimal_eps": False, "adversarial.explain_n": 0,
            "adversarial.attacks": "fgsm,pgd-linf,pgd-l2", "batch_size": 8}
    one = audit.run("zoo:small-cnn-digits", "digits", checks=["adversarial"], options=opts)
    two = audit.run("zoo:small-cnn-digits", "digits", checks=["adversarial"], options=opts, ray="auto",
                    ray_workers=2)
    assert one.ok and two.ok, (one.results["errors"], two.results["errors"])
    a, b = one.records()["adversarial"]["data"]["attacks"], two.records()["adversarial"]["data"]["attacks"]
    assert a == b and a["pgd-linf"]["accuracy"][-1] < a["pgd-linf"]["accuracy"][0]


def test_ray_cli_and_its_errors(tmp_path, capsys, cluster):
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--checks", "explanations",
               "-O", "explanations.n=4", "-O", "explanations.methods=saliency", "-O", "explanations.sag_n=0",
               "--ray", "auto", "--ray-workers", "2", "--out", str(tmp_path / "r"), "--no-progress"])
    assert rc == 0
    assert json.loads((tmp_path / "r" / "results.json").read_text())["status"] == "ok"
    capsys.readouterr()
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--checks", "explanations",
               "--ray", "auto", "--ray-workers", "64", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "more than the cluster's 2 CPUs" in err[0]


def test_without_ray_it_is_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    rc = main(["audit", "--model", "zoo:small-cnn-digits", "--data", "digits", "--checks", "explanations",
               "--ray", "auto", "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and 'pip install "trustvision[ray]"' in err[0]


UNIT_OPTS = {"corruptions.n": 40, "corruptions.types": "gaussian-noise,fog,elastic-transform", "corruptions.severities": "1,3,5",
             "overinterpretation.n": 12, "overinterpretation.retrain": False, "overinterpretation.border": False,
             "overinterpretation.remedies": False, "concepts.epochs": 5, "concepts.explain_n": 1, "batch_size": 16}


def test_sharded_units_equal_the_single_process_run(cluster):
    """Corruptions (one batch under one corruption and severity a unit), SIS (one chunk of images
    a unit) and the XNN's heatmaps (gallery rows, marker batches) on the actors: the same records."""
    checks = ["corruptions", "overinterpretation", "concepts"]
    src = "zoo:small-cnn-shortcut-digits"
    ds = {s: data.load("shortcut-digits", split=s, marker_fraction=0.5) for s in ("train", "val", "test")}
    one = audit.run(src, ds, checks=checks, options={**UNIT_OPTS, "n_max": 200})
    two = audit.run(src, ds, checks=checks, options={**UNIT_OPTS, "n_max": 200}, ray="auto", ray_workers=2)
    assert one.ok and two.ok, (one.results["errors"], two.results["errors"])
    for c in checks:
        assert _strip(one.records()[c]["data"]) == _strip(two.records()[c]["data"]), c
    d = one.records()
    assert set(d["corruptions"]["data"]["accuracy"]) == {"gaussian-noise", "fog", "elastic-transform"}
    assert d["overinterpretation"]["data"]["sis"]["n"] == 12
    assert d["concepts"]["data"]["marker"] and len(d["concepts"]["data"]["marker"]) == 5


def test_units_survive_a_killed_worker(cluster, monkeypatch):
    from trustvision.audit import distributed

    original = distributed.RayPool.map
    killed = []

    def killing(self, fn, calls):
        gen = original(self, fn, calls)
        yield next(gen)
        if not killed:
            ray.kill(self.actors[-1], no_restart=False)  # its submitted units are retried on the restarted actor
            killed.append(fn.__name__)
        yield from gen

    monkeypatch.setattr(distributed.RayPool, "map", killing)
    opts = {"corruptions.n": 40, "corruptions.types": "gaussian-noise,fog", "corruptions.severities": "1,5",
            "batch_size": 8}
    one = audit.run("zoo:small-cnn-digits", "digits", checks=["corruptions"], options=opts)
    two = audit.run("zoo:small-cnn-digits", "digits", checks=["corruptions"], options=opts, ray="auto", ray_workers=2)
    assert killed == ["_corrupt_predict"] and two.ok, two.results["errors"]
    assert _strip(one.records()["corruptions"]["data"]) == _strip(two.records()["corruptions"]["data"])
