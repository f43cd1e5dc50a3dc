"""The paper-layout report (rcekd collect --runs-dir) on fabricated run directories: mean / std / t / p by
hand, the t distribution against closed forms, the paper's values, the files it writes."""
import csv
import json
import math
import os

import pytest
import yaml

from rcekd_train.cli import main
from rcekd_train.report import betainc_reg, load_paper, paired_t_test, t_two_sided_p, table_report


# --- the t distribution ------------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.1, 0.7, 1.0, 2.5, 4.3, 12.0, 150.0])
def test_t_p_value_closed_forms(t):
    assert t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-10, abs=1e-15)
    assert t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-9, abs=1e-15)
    assert t_two_sided_p(-t, 2) == t_two_sided_p(t, 2)


def test_t_p_value_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 3, 4, 7, 30):
        for t in (0.05, 0.5, 1.3, 2.0, 3.7, 9.0):
            assert t_two_sided_p(t, df) == pytest.approx(2 * stats.t.sf(t, df), rel=1e-8)


def test_betainc_identities():
    for x in (0.01, 0.3, 0.5, 0.92):
        assert betainc_reg(1, 1, x) == pytest.approx(x)
        assert betainc_reg(3, 1, x) == pytest.approx(x ** 3)
        assert betainc_reg(2.5, 0.5, x) == pytest.approx(1 - betainc_reg(0.5, 2.5, 1 - x))
    with pytest.raises(ValueError):
        betainc_reg(1, 1, 1.5)


def test_paired_t_test_by_hand():
    # d = [0.5, 0.5, 1.5]: mean 5/6, sd sqrt(1/3), t = (5/6) / (sqrt(1/3)/sqrt(3)) = 2.5, df 2
    t, df, p = paired_t_test([1.0, 2.0, 4.0], [0.5, 1.5, 2.5])
    assert (t, df) == (pytest.approx(2.5), 2)
    assert p == pytest.approx(1 - 2.5 / math.sqrt(2 + 6.25))
    assert paired_t_test([1.0], [0.0]) is None
    assert paired_t_test([1.0, 2.0], [1.0, 2.0])[2] == 1.0
    assert paired_t_test([2.0, 3.0], [1.0, 2.0])[2] == 0.0   # constant positive difference


# --- fabricated runs -----------------------------------------------------------------------------------------
def fake_run(root, name, seed, test, status="early_stop", convention="ours"):
    d = os.path.join(root, name, f"seed_{seed}")
    os.makedirs(d, exist_ok=True)
    res = {"status": status, "role": "student", "model": "mf", "kd": "x", "seed": seed, "best_epoch": 10,
           "epochs_run": 40, "mean_epoch_time_s": 1.0, "metric_convention": convention,
           "test": {"recall@10": test[0], "ndcg@10": test[1], "recall@20": test[2], "ndcg@20": test[3]},
           "valid": {"recall@10": 0.1, "ndcg@10": 0.1, "recall@20": 0.1, "ndcg@20": 0.1}}
    json.dump(res, open(os.path.join(d, "result.json"), "w"))
    yaml.safe_dump({"role": "student", "model": {"name": "mf", "dim": 20}, "data_dir": "/somewhere/data",
                    "teacher_dir": os.path.join(root, "teacher-mf", f"seed_{seed}")},
                   open(os.path.join(d, "config.yaml"), "w"))


def vals(base, seed):
    """Four metrics of a run: base + 0.001 * seed (so the seeds differ)."""
    return [base + 0.001 * seed, base / 2 + 0.0005 * seed, base * 1.5 + 0.001 * seed, base * 0.7 + 0.0004 * seed]


@pytest.fixture()
def runs(tmp_path):
    root = str(tmp_path / "runs")
    for s in (0, 1, 2):
        fake_run(root, "teacher-mf", s, vals(0.03, s))
        fake_run(root, "student-mf", s, vals(0.018, s))
        fake_run(root, "cd-mf-mf", s, vals(0.024, s))
        fake_run(root, "hetcomp-mf-mf", s, vals(0.026, s))
        # RCE-KD: better than HetComp by 0.002, 0.003, 0.001 on R@10 (seeds 0, 1, 2)
        v = vals(0.026, s)
        v[0] += [0.002, 0.003, 0.001][s]
        fake_run(root, "rcekd-mf-mf", s, v)
        fake_run(root, "rcekd_l1_only-mf-mf", s, vals(0.025, s))
    fake_run(root, "rrd-mf-mf", 0, vals(0.030, 0))                # one seed only (and the best mean)
    fake_run(root, "dcd-mf-mf", 0, vals(0.05, 0), status="time_limit")   # not finished: ignored
    os.makedirs(os.path.join(root, "dcd-mf-mf", "seed_1"))              # no result at all: ignored
    return root


def test_table_report_statistics(tmp_path, runs):
    out = str(tmp_path / "res")
    rep = table_report(runs, "citeulike", out)
    mm = rep["table1"]["mf->mf"]
    r = mm["rows"]["rcekd"]
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
    x = [0.026 + 0.001 * s + [0.002, 0.003, 0.001][s] for s in range(3)]
    mean = sum(x) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in x) / 2)
    assert r["metrics"]["recall@10"]["mean"] == pytest.approx(mean)
    assert r["metrics"]["recall@10"]["std"] == pytest.approx(std)
    # the paper's value and the relative difference
    assert r["metrics"]["recall@10"]["paper"] == 0.0278
    assert r["metrics"]["recall@10"]["rel_diff"] == pytest.approx((mean - 0.0278) / 0.0278)
    # the best baseline by mean: RRD (one seed, 0.030) beats HetComp (0.027 mean); the paired test uses the
    # seeds both have: one -> no p-value
    b = mm["rcekd_vs_best"]["recall@10"]
    assert b["best_baseline"] == "rrd" and b["n_pairs"] == 1 and b["p_value"] is None
    assert b["improv"] == pytest.approx((mean - 0.030) / 0.030)
    assert (b["paper_improv"], b["paper_p_value"]) == (0.0902, 1.71e-4)
    assert mm["rows"]["dcd"]["n"] == 0 and mm["rows"]["tarec"]["n"] == 0
    # without RRD, HetComp is the best: d = [0.002, 0.003, 0.001] -> t = 0.002 / (0.001 / sqrt(3)), df 2
    rep2 = table_report(runs, "citeulike", str(tmp_path / "res2"), seeds=[1, 2], copy_runs=False)
    assert rep2["seeds"] == [1, 2]
    os.rename(os.path.join(runs, "rrd-mf-mf"), os.path.join(str(tmp_path), "rrd-away"))
    rep3 = table_report(runs, "citeulike", str(tmp_path / "res3"), copy_runs=False)
    b = rep3["table1"]["mf->mf"]["rcekd_vs_best"]["recall@10"]
    assert b["best_baseline"] == "hetcomp" and b["n_pairs"] == 3
    t = 0.002 / (0.001 / math.sqrt(3))
    assert b["t"] == pytest.approx(t) and b["df"] == 2
    assert b["p_value"] == pytest.approx(1 - t / math.sqrt(2 + t * t))
    # on N@20 RCE-KD equals HetComp on every seed: t = 0, p = 1
    assert rep3["table1"]["mf->mf"]["rcekd_vs_best"]["ndcg@20"]["p_value"] == pytest.approx(1.0)
    # a pair without any KD baseline run: the scratch student (MF here) is the comparator; no RCE-KD run of
    # that pair -> no improvement and no test
    b = rep3["table1"]["hstu->mf"]["rcekd_vs_best"]["ndcg@20"]
    assert b["best_baseline"] == "student" and b["improv"] is None and b["p_value"] is None
    assert rep3["table1"]["hstu->hstu"]["rcekd_vs_best"]["ndcg@20"]["best_baseline"] is None
    # ablation: relative to the full method, paired p-value
    ab = rep3["ablation"]["rcekd_l1_only-mf-mf"]["metrics"]["ndcg@20"]
    full = rep3["table1"]["mf->mf"]["rows"]["rcekd"]["metrics"]["ndcg@20"]["mean"]
    assert ab["rel_to_full"] == pytest.approx((ab["mean"] - full) / full)
    assert ab["p_vs_full"] == 0.0 and ab["paper"] is None  # constant difference; no CiteULike value published
    assert rep3["ablation"]["rcekd_paper-mf-mf"]["n"] == 0


def test_table_report_files(tmp_path, runs):
    out = str(tmp_path / "res")
    assert main(["collect", "--runs-dir", runs, "--dataset", "citeulike", "--out", out]) == 0
    md = open(os.path.join(out, "summary.md")).read()
    assert "Metric convention: **ours**" in md and "| MF→MF | Teacher |" in md and "*p-value*" in md
    assert "0.0278" in md and "TARec" in md and "w/o S (L1 only)" in md and "summary.png" in md
    # RRD has one seed (0.030): its cell is the value alone, with no spread; three seeds show mean ± std
    rrd = next(line for line in md.splitlines() if "| RRD |" in line)
    assert rrd.split("|")[3].strip() == "0.0300" and "±" not in rrd
    rk_line = next(line for line in md.splitlines() if "| RCE-KD |" in line)
    assert "±" in rk_line.split("|")[3]
    rows = list(csv.DictReader(open(os.path.join(out, "summary.csv"))))
    rk = [r for r in rows if r["section"] == "table1" and r["pair"] == "mf->mf" and r["row"] == "rcekd"]
    assert len(rk) == 4 and rk[0]["best_baseline"] == "rrd"
    j = json.load(open(os.path.join(out, "summary.json")))
    assert j["metric_convention"] == ["ours"] and j["dataset"] == "citeulike"
    # the settings that are not the authors' are listed, each from its "# ours" mark in the packaged config
    from rcekd_train.config import marked_ours
    assert j["not_authors"] == marked_ours("citeulike") and len(j["not_authors"]) >= 1
    assert "## Settings that are not the authors'" in md
    for r in j["not_authors"]:
        assert f"* `{r['key']}: {r['value']}`: {r['why']}" in md
    try:
        import matplotlib  # noqa: F401
        assert os.path.getsize(os.path.join(out, "summary.png")) > 1000
    except ImportError:
        pass
    # the runs' files, without machine paths
    cfg = open(os.path.join(out, "runs", "rcekd-mf-mf", "seed_1", "config.yaml")).read()
    assert "/somewhere" not in cfg and "teacher_dir: teacher-mf/seed_1" in cfg
    assert "runs_dir" in j and os.sep not in j["runs_dir"]
    # errors name the problem
    assert main(["collect", "--runs-dir", runs, "--out", out]) == 2
    assert main(["collect", "--runs-dir", str(tmp_path / "empty"), "--dataset", "citeulike", "--out", out]) == 2


def test_mixed_conventions_are_reported(tmp_path, runs):
    fake_run(runs, "student-lightgcn", 0, vals(0.02, 0), convention="authors")
    rep = table_report(runs, "citeulike", str(tmp_path / "r"), copy_runs=False)
    assert rep["metric_convention"] == ["authors", "ours"]


def test_paper_values_transcribed():
    cul, meta = load_paper("citeulike")
    assert meta["columns"] == ["recall@10", "ndcg@10", "recall@20", "ndcg@20"]
    t1 = cul["table1"]
    assert set(t1) == {"mf->mf", "lightgcn->lightgcn", "hstu->hstu", "lightgcn->mf", "hstu->mf"}
    for pair, rows in t1.items():
        for name, v in rows.items():
            assert len(v) == 4, (pair, name)
        # the paper's Improv.b is RCE-KD over the best of its baselines (TARec included), to rounding
        base = ["cd", "rrd", "dcd", "hetcomp", "tarec"]
        for c in range(4):
            best = max(rows[b][c] for b in base)
            assert (rows["rcekd"][c] - best) / best == pytest.approx(rows["improv_b"][c], abs=6e-3), (pair, c)
    assert cul["ablation"] is None
