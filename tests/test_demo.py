import csv

import pytest
from fmnist_files import write_fashion_mnist

from tpsvit.cli import main


@pytest.mark.parametrize("data_name", [None, "fashion-mnist"])
def test_demo_runs_on_the_shipped_models(tmp_path, capsys, data_name):
    """Default: cluttered Fashion-MNIST and its shipped models; --data fashion-mnist: the plain ones."""
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=4, n_test=40)
    out = tmp_path / "demo"
    chosen = ["--data", data_name] if data_name else []
    code = main(["demo", *chosen, "--data-dir", str(data), "--methods", "etps", "dtps", "tome", "--budgets", "0.5",
                 "--out", str(out), "--no-progress", "--batch-size", "16"])
    assert code == 0
    with open(out / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["name"] for r in rows] == ["unpatched", "etps", "dtps", "tome"]
    statuses = {r["name"]: r["status"] for r in rows}
    assert statuses["etps"] == "off-the-shelf" and statuses["dtps"].startswith("fine-tuned")
    gmacs = {r["name"]: float(r["gmacs"]) for r in rows}
    assert all(gmacs[m] <= 0.5 * gmacs["unpatched"] for m in ("etps", "dtps", "tome"))
    assert all(int(r["count"]) == 40 for r in rows)
    assert (out / "accuracy_vs_gmacs.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "token_maps").iterdir()) == [
        "test_0000_dtps.png", "test_0000_etps.png", "test_0000_tome.png"]
    printed = capsys.readouterr().out
    assert "50% budget" in printed
    model = "deit_mini_patch4_28" if data_name else "deit_mini_patch8_56"
    assert f"tpsvit demo: {model} on {data_name or 'fashion-mnist-cluttered'} test (40 images)" in printed


def test_demo_rejects_a_limit_beyond_the_test_set(tmp_path, capsys):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=4, n_test=8)
    assert main(["demo", "--data", "fashion-mnist", "--data-dir", str(data), "--limit", "20000",
                 "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--limit 20000 is outside 1..8" in err[0]


def test_demo_rejects_a_bad_budget(tmp_path, capsys):
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=4, n_test=8)
    assert main(["demo", "--data-dir", str(data), "--budgets", "1.5", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "budget 1.5 is outside (0, 1]" in err[0]


def test_demo_auto_schedule_and_random_scores(tmp_path, capsys):
    import json

    data = write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=24)
    out = tmp_path / "demo"
    code = main(["demo", "--data", "fashion-mnist", "--data-dir", str(data), "--methods", "etps", "tome",
                 "--budgets", "0.35", "--schedule", "auto", "--calib-images", "32", "--scorer", "random",
                 "--out", str(out), "--no-progress", "--batch-size", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "auto schedule etps:" in printed and "auto schedule tome:" in printed and "on 32 images" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    by_name = {r["name"]: r for r in rows}
    assert by_name["etps"]["scorer"] == "random" and by_name["tome"]["scorer"] == "default"
    assert all(r["budget"] == "35% budget, auto" for r in rows[1:])
    assert all(r["gmacs"] <= 0.35 * rows[0]["gmacs"] * 1.0001 for r in rows[1:])
