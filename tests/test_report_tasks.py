"""The report of a task's runs (experiments.analysis, experiments.compare, experiments.study's
check): synthetic runs logged by hand into a real SQLite MLflow store, no device.

    python -m pytest tests/test_report_tasks.py -q

Embedding-task runs (model.family lattice / linear_ae) with their validation series, test
metrics and PCA baselines; the expected values are the numbers logged here, worked out by
hand in the comments. A store of character runs must render exactly the tables it rendered
before the reports became task-aware (pinned below).
"""
import math
import textwrap

import pytest
from scipy import stats as sps

from experiments import analysis, compare
from experiments import study as study_mod

SEEDS = (0, 1, 2)


def lattice_run(s):
    """lattice, seed s: evaluations at steps 10 and 20 (train_time_s 2 and 4)."""
    return {"family": "lattice", "times": (2.0, 4.0),
            "val": [dict(val_loss=0.90 + 0.01 * s, val_cos=0.50, val_mse=0.002, val_r1=0.3, val_r5=0.5),
                    dict(val_loss=0.50 + 0.01 * s, val_cos=0.80 + 0.01 * s, val_mse=0.001, val_r1=0.60 + 0.01 * s,
                         val_r5=0.9)],
            "test": dict(test_loss=0.52, test_cos=0.79 + 0.01 * s, test_mse=0.0010 + 0.0001 * s, test_r1=0.55 + 0.01 * s),
            "pca": dict(pca_val_cos=0.76, pca_test_cos=0.75, pca_test_r1=0.40, mean_test_cos=0.30)}


def linear_run(s):
    """linear_ae, seed s: twice as fast (train_time_s 1 and 2)."""
    return {"family": "linear_ae", "times": (1.0, 2.0),
            "val": [dict(val_loss=0.95, val_cos=0.40, val_mse=0.003, val_r1=0.2, val_r5=0.4),
                    dict(val_loss=0.60 + 0.01 * s, val_cos=0.78 + 0.02 * s, val_mse=0.0015, val_r1=0.50, val_r5=0.8)],
            "test": dict(test_loss=0.62, test_cos=0.70 + 0.01 * s, test_mse=0.0020, test_r1=0.45),
            "pca": dict(pca_val_cos=0.76, pca_test_cos=0.75, pca_test_r1=0.40, mean_test_cos=0.30)}


def char_run(name, s, test=False):
    off = 0.03 if name == "ablation_no_hebb" else 0.0
    val = [dict(val_loss=3.0 - 0.3 * i + off + 0.01 * s * (i + 1), val_acc=0.3 + 0.1 * i - off) for i in range(3)]
    for v in val:
        v["val_bpc"] = v["val_loss"] / math.log(2)
    return {"family": "hybrid", "times": tuple((1 + i) * (1.0 + off * 10) + 0.1 * s for i in range(3)), "val": val,
            "test": dict(test_loss=2.5 + off, test_acc=0.45, test_bpc=3.6, test_f1=0.2 - off) if test else {},
            "pca": {}}


def log_run(cl, exp_id, name, seed, spec):
    rid = cl.create_run(exp_id).info.run_id
    for k, v in {"experiment": name, "seed": str(seed), "model.family": spec["family"]}.items():
        cl.log_param(rid, k, v)
    for k, v in spec["pca"].items():
        cl.log_metric(rid, k, v, step=0)
    steps = [10 * (i + 1) for i in range(len(spec["val"]))]
    for step, t, vals in zip(steps, spec["times"], spec["val"]):
        for k, v in {**vals, "train_time_s": t}.items():
            cl.log_metric(rid, k, v, step=step)
    for k, v in spec["test"].items():
        cl.log_metric(rid, k, v, step=steps[-1])
    cl.set_terminated(rid, "FINISHED")
    return rid


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from mlflow import MlflowClient
    d = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    cl = MlflowClient(tracking_uri=uri)
    exps = {n: cl.create_experiment(n, artifact_location=str(d / "mlruns" / n)) for n in ("emb", "char", "chartest",
                                                                                          "mixed")}
    for s in SEEDS:
        for e in ("emb", "mixed"):
            log_run(cl, exps[e], "lattice", s, lattice_run(s))
            log_run(cl, exps[e], "linear_ae", s, linear_run(s))
        for name in ("hybrid", "ablation_no_hebb"):
            log_run(cl, exps["char"], name, s, char_run(name, s))
            log_run(cl, exps["chartest"], name, s, char_run(name, s, test=True))
            log_run(cl, exps["mixed"], name, s, char_run(name, s))
    return cl, uri, exps


def records(cl, exp_id):
    return analysis.fetch_records(cl, cl.search_runs([exp_id], max_results=100))


LATTICE_STUDY = study_mod.STUDIES["lattice"]
PAIR = "the lattice against the linear autoencoder: lattice vs linear_ae"


def test_embedding_summary_holds_the_logged_values(store):
    cl, _, exps = store
    recs = records(cl, exps["emb"])
    assert {r.task for r in recs} == {"embed_regression"}
    df = analysis.summary_frame(recs, ["lattice", "linear_ae"], "linear_ae")
    assert df.attrs["task"] == "embed_regression" and list(df["experiment"]) == ["lattice", "linear_ae"]
    row = df.set_index("experiment").loc["lattice"]
    assert row["seeds"] == 3
    expect = {"val_loss": 0.51, "best_val_loss": 0.51, "val_cos": 0.81, "val_r1": 0.61,   # means of s = 0, 1, 2
              "test_cos": 0.80, "test_mse": 0.0011, "test_r1": 0.56, "pca_test_cos": 0.75, "pca_test_r1": 0.40}
    for col, v in expect.items():
        assert row[f"{col}_mean"] == pytest.approx(v, rel=1e-12), col
    assert row["val_cos_std"] == pytest.approx(0.01, rel=1e-9)
    half = sps.t.ppf(0.975, 2) * 0.01 / math.sqrt(3)
    assert (row["test_cos_lo"], row["test_cos_hi"]) == pytest.approx((0.80 - half, 0.80 + half), rel=1e-9)
    assert row["pca_test_cos_std"] == 0.0                        # a constant of the split
    assert row["train_time_s_mean"] == 4.0 and row["time_vs_baseline"] == 2.0   # twice linear_ae's 2 s
    assert "val_acc_mean" not in df and "val_bpc_mean" not in df and "mean_test_cos_mean" not in df


def test_embedding_comparisons_use_the_tasks_measures_and_directions(store):
    cl, _, exps = store
    recs = records(cl, exps["emb"])
    comps = analysis.comparison_frame(recs, LATTICE_STUDY.pairs())
    assert set(comps["comparison"]) == {PAIR}                  # the study's other experiments have no runs here
    row = {r["metric"]: r for _, r in comps[comps["comparison"] == PAIR].iterrows()}
    assert list(row) == ["val_loss", "val_cos", "test_cos", "equal_time_val_loss"]
    # val_loss: 0.50 + 0.01 s − (0.60 + 0.01 s) = −0.10 in every seed: lower is better
    assert row["val_loss"]["diff"] == pytest.approx(-0.10) and row["val_loss"]["verdict"] == "better"
    # val_cos: 0.80 + 0.01 s − (0.78 + 0.02 s) = +0.02, +0.01, 0: mean 0.01, sd 0.01, t = √3 on 2 df
    assert row["val_cos"]["diff"] == pytest.approx(0.01) and row["val_cos"]["verdict"] == "no difference"
    assert row["val_cos"]["p"] == pytest.approx(2 * sps.t.sf(math.sqrt(3), 2), rel=1e-6)
    # test_cos: 0.79 + 0.01 s − (0.70 + 0.01 s) = +0.09: higher is better
    assert row["test_cos"]["diff"] == pytest.approx(0.09) and row["test_cos"]["verdict"] == "better"
    # equal wall-clock: at linear_ae's 2 s lattice had its first evaluation (0.90 + 0.01 s) against 0.60 + 0.01 s
    assert row["equal_time_val_loss"]["diff"] == pytest.approx(0.30)
    assert row["equal_time_val_loss"]["verdict"] == "worse"


def test_embedding_report_renders_its_columns(store, tmp_path):
    cl, _, exps = store
    recs = records(cl, exps["emb"])
    summary = analysis.summary_frame(recs, LATTICE_STUDY.experiments, LATTICE_STUDY.baseline)
    comps = analysis.comparison_frame(recs, LATTICE_STUDY.pairs())
    head, rows = analysis.summary_rows(summary)
    assert head == ["experiment", "seeds", "final val loss [95 % CI]", "± std", "best val loss [95 % CI]",
                    "final val cos [95 % CI]", "final val r@1 [95 % CI]", "train time (s)", "× baseline"]
    assert rows[0][:2] == ["lattice", "3"] and rows[0][5].startswith("0.8100 [") and rows[0][-1] == "2.00"
    head, rows = analysis.end_rows(summary)
    assert head == ["experiment", "seeds", "test cos [95 % CI]", "test mse [95 % CI]", "test r@1 [95 % CI]",
                    "PCA test cos", "PCA test r@1"]
    assert rows[0][3].startswith("0.001100 [") and rows[0][-2:] == ["0.7500", "0.4000"]
    text = analysis.render(summary, comps, "study lattice")
    assert "negative loss, positive cosine difference = a better" in text
    assert f"{PAIR}  test cos" in text and "val_acc" not in text and "final val acc" not in text
    md = analysis.render(summary, comps, "study lattice", markdown=True)
    assert f"| {PAIR} | final val cos | 3 | +0.0100" in md and "| lattice | 3 | 0.8000 [" in md
    paths = analysis.figures(recs, comps, str(tmp_path), LATTICE_STUDY.experiments)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["validation_curves.png", "differences.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


# the tables the character report printed before it knew of tasks (same store, same numbers)
CHAR_SUMMARY = """\
experiment        seeds  final val loss [95 % CI]  ± std   best val loss [95 % CI]  final val acc [95 % CI]  train time (s)  × baseline
----------------  -----  ------------------------  ------  -----------------------  -----------------------  --------------  ----------
hybrid            3      2.4300 [2.3555, 2.5045]   0.0300  2.4300 [2.3555, 2.5045]  0.5000 [0.5000, 0.5000]  3.1             1.00
ablation_no_hebb  3      2.4600 [2.3855, 2.5345]   0.0300  2.4600 [2.3855, 2.5345]  0.4700 [0.4700, 0.4700]  4.0             1.29
"""
CHAR_COMPARISONS = """\
comparison                  measure                       n  difference [95 % CI]        p (t)   p (Holm)  p (sign-flip)  verdict  seeds needed
--------------------------  ----------------------------  -  --------------------------  ------  --------  -------------  -------  ------------
ablation_no_hebb vs hybrid  final val loss                3  +0.0300 [+0.0300, +0.0300]  <0.001  <0.001    0.250          worse    2
ablation_no_hebb vs hybrid  best val loss                 3  +0.0300 [+0.0300, +0.0300]  <0.001  <0.001    0.250          worse    2
ablation_no_hebb vs hybrid  final val acc                 3  -0.0300 [-0.0300, -0.0300]  <0.001  <0.001    0.250          worse    2
ablation_no_hebb vs hybrid  val loss at equal wall-clock  3  +0.2308 [+0.2136, +0.2480]  <0.001  <0.001    0.250          worse    2
"""


def char_report(cl, exp_id):
    recs = records(cl, exp_id)
    summary = analysis.summary_frame(recs, ["hybrid", "ablation_no_hebb"], "hybrid")
    comps = analysis.comparison_frame(recs, [("ablation_no_hebb vs hybrid", "ablation_no_hebb", "hybrid")])
    return summary, comps, analysis.render(summary, comps, "store")


def test_a_character_store_renders_as_before(store):
    cl, _, exps = store
    summary, comps, text = char_report(cl, exps["char"])
    assert text == ("store\n\n" + CHAR_SUMMARY + "\ncomparisons (a − b; negative loss difference = a better)\n\n"
                    + CHAR_COMPARISONS + "\n" + textwrap.fill(analysis.METHOD, 110) + "\n")
    assert list(summary.columns) == ["experiment", "seeds"] + [f"{c}_{s}" for c in ("val_loss", "best_val_loss",
                                     "val_acc", "val_bpc") for s in ("mean", "std", "lo", "hi")] + \
        ["train_time_s_mean", "time_vs_baseline"]
    assert list(comps["metric"].unique()) == [c for c, _, _ in analysis.COMPARED]


def test_character_test_metrics_are_a_second_table_only(store):
    cl, _, exps = store
    summary, comps, text = char_report(cl, exps["chartest"])
    assert CHAR_SUMMARY in text and CHAR_COMPARISONS in text            # the same tables, unchanged
    head, rows = analysis.end_rows(summary)
    assert head == ["experiment", "seeds", "test loss [95 % CI]", "test acc [95 % CI]", "test F1 [95 % CI]"]
    assert rows == [["hybrid", "3", "2.5000 [2.5000, 2.5000]", "0.4500 [0.4500, 0.4500]", "0.2000 [0.2000, 0.2000]"],
                    ["ablation_no_hebb", "3", "2.5300 [2.5300, 2.5300]", "0.4500 [0.4500, 0.4500]",
                     "0.1700 [0.1700, 0.1700]"]]
    assert "test split (end of run)" in text and "test_bpc_mean" not in summary


def test_runs_of_two_tasks_are_refused_in_one_report(store):
    cl, _, exps = store
    recs = records(cl, exps["mixed"])
    with pytest.raises(analysis.ReportError, match=r"^runs of different tasks cannot share a report: char_lm "
                       r"\(ablation_no_hebb, hybrid\); embed_regression \(lattice, linear_ae\)"):
        analysis.summary_frame(recs)
    with pytest.raises(analysis.ReportError):
        analysis.comparison_frame(recs, [("lattice vs hybrid", "lattice", "hybrid")])
    study = study_mod.resolve_study("mix", ["hybrid", "lattice"], None)
    with pytest.raises(study_mod.StudyError, match=r"^study 'mix' mixes tasks: char_lm \(hybrid\); "
                       r"embed_regression \(lattice\); a study's experiments must share one task$"):
        study_mod.plan(study, 1, [])


def test_compare_shows_the_embedding_metrics_and_a_report_per_task(store, capsys):
    cl, uri, exps = store
    assert compare.main(["--tracking-uri", uri, "--experiment-name", "emb", "--baseline", "linear_ae"]) == 0
    out = capsys.readouterr().out
    table = out.split("\n\n")[0].splitlines()
    assert table[0].split()[:12] == ["run_id", "experiment", "seed", "status", "reproduces", "model.family",
                                     "val_loss", "val_cos", "val_mse", "val_r1", "test_cos", "test_mse"]
    assert "val_acc" not in table[0] and "pca_test_cos" in table[0]
    assert "6 finished runs in 2 groups, baseline linear_ae, task embed_regression" in out
    assert "lattice vs linear_ae  test cos" in out and "PCA test cos" in out
    assert compare.main(["--tracking-uri", uri, "--experiment-name", "mixed", "--baseline", "linear_ae"]) == 0
    out = capsys.readouterr().out
    assert "6 finished runs in 2 groups, baseline hybrid, task char_lm" in out
    assert "6 finished runs in 2 groups, baseline linear_ae, task embed_regression" in out
    assert "ablation_no_hebb vs hybrid  final val acc" in out and "lattice vs linear_ae  final val cos" in out
