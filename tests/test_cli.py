"""The ``jaxdec`` command and the config-driven experiment."""

import json

import numpy as np
import pytest

from jaxdec import cli


def test_topologies_lists_gaps(capsys):
    assert cli.main(["topologies", "-n", "16"]) == 0
    out = capsys.readouterr().out
    for name in ("ring", "exponential", "complete", "torus", "hypercube"):
        assert name in out
    assert "1.0000" in out  # complete graph gap


def test_run_from_config_file(tmp_path, capsys):
    cfg = {"n_workers": 8, "steps": 40, "eval_every": 20, "topology": "exponential"}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--lr", "0.1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == 0.1 and summary["config"]["n_workers"] == 8
    assert summary["steps"] == 40
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 20, 40]
    # 40 steps of SGD must beat chance (10 classes) on digits
    assert summary["avg_model_acc"] > 0.3
    assert "avg-model acc" in capsys.readouterr().out


def test_bad_config_is_reported(capsys):
    assert cli.main(["run", "--topology", "moebius", "--steps", "5"]) == 2
    assert "topology" in capsys.readouterr().err
    with pytest.raises(ValueError, match="algorithm"):
        cli.ExperimentConfig(algorithm="adam").validate()


def test_quickstart_small(tmp_path):
    summaries = cli.quickstart(tmp_path, steps=30, n_workers=8, progress=False)
    assert {s["run"] for s in summaries} == {
        "D-SGD ring",
        "D-SGD exponential",
        "D-SGD complete",
        "GT ring",
    }
    for f in ("metrics.jsonl", "summary.json", "plot.png"):
        assert (tmp_path / f).stat().st_size > 0
    by = {s["run"]: s for s in summaries}
    # consensus distance orders with connectivity
    assert by["D-SGD complete"]["consensus_distance"] < 1e-8
    assert (
        by["D-SGD exponential"]["consensus_distance"]
        < by["D-SGD ring"]["consensus_distance"]
    )
    assert np.isclose(by["D-SGD complete"]["spectral_gap"], 1.0)
