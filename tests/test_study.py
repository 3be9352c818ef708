"""experiments.study: experiments × seeds under one parent run, resumed, parallel, and its report;
experiments.compare's intervals and verdicts. Real processes against real SQLite stores.

    python -m pytest tests/test_study.py -q

The study's statistics are checked against numbers computed here from the children's own
logged metrics (numpy, scipy), not against the module's own functions.
"""
import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from scipy import stats as sps

from experiments import liveness, presets
from experiments import study as study_mod
from test_experiments import Store, _env, cli, error_lines, last_line
from test_experiments import template_db  # noqa: F401  (the fixture: one migrated database per module)

pytestmark = pytest.mark.opencl

# smoke sizes for every experiment of a study (the `smoke` preset's keys, evaluations every 5 steps)
SMALL = [f"{k}={v}" for k, v in presets.EXPERIMENTS["smoke"].overrides.items() if k != "train.eval_every"]
SMALL += ["train.eval_every=5"]
SETS = [a for kv in SMALL for a in ("--set", kv)]
EXPS = ["hybrid", "ablation_no_hebb"]


def children(cl, parent_id):
    exp = cl.get_experiment_by_name("hybrid-lm")
    return cl.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=1000)


def by_job(runs) -> dict:
    return {(r.data.params["experiment"], int(r.data.params["seed"])): r for r in runs}


def read_csv(cl, run_id, path):
    local = cl.download_artifacts(run_id, path)
    with open(local, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def serial(template_db, tmp_path_factory):
    s = Store(template_db, tmp_path_factory.mktemp("study"))
    s.first = s.run("experiments.study", "t", *EXPS, "--seeds", "2", *SETS)
    assert s.first.returncode == 0, s.first.stderr[-3000:]
    s.parent = last_line(s.first.stdout)
    return s


def test_study_trains_every_experiment_and_seed_under_one_parent(serial):
    cl = serial.client
    parent = cl.get_run(serial.parent)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.runName"] == "study-t" and parent.data.tags["study_role"] == "parent"
    assert json.loads(parent.data.tags["experiments"]) == EXPS and parent.data.tags["baseline"] == "hybrid"
    assert json.loads(parent.data.tags["seeds"]) == [0, 1]
    runs = children(cl, serial.parent)
    jobs = by_job(runs)
    assert set(jobs) == {(e, s) for e in EXPS for s in (0, 1)} and len(runs) == 4
    for (e, s), r in jobs.items():
        assert r.info.status == "FINISHED" and r.data.tags["study_job"] == f"{e} s{s}"
        assert r.data.params["train.steps"] == "30" and r.data.tags["code_version"] == parent.data.tags["code_version"]
        times = [m.value for m in cl.get_metric_history(r.info.run_id, "train_time_s")]
        assert len(times) == 6 and all(b > a > 0 for a, b in zip(times, times[1:]))   # at each evaluation
    assert jobs[("hybrid", 0)].data.params["hebb.mode"] == "fast_weights"
    assert jobs[("ablation_no_hebb", 0)].data.params["hebb.mode"] == "off"
    assert len({r.data.tags["study_config"] for r in runs}) == 4


def test_study_report_holds_the_statistics_of_the_logged_metrics(serial):
    cl = serial.client
    jobs = by_job(children(cl, serial.parent))
    loss = {k: r.data.metrics["val_loss"] for k, r in jobs.items()}
    summary = {row["experiment"]: row for row in read_csv(cl, serial.parent, "report/summary.csv")}
    assert list(summary) == EXPS
    for e in EXPS:
        vals = [loss[(e, s)] for s in (0, 1)]
        row = summary[e]
        assert int(row["seeds"]) == 2
        assert float(row["val_loss_mean"]) == pytest.approx(np.mean(vals), rel=1e-12)
        lo, hi = sps.t.interval(0.95, 1, loc=np.mean(vals), scale=sps.sem(vals))
        assert (float(row["val_loss_lo"]), float(row["val_loss_hi"])) == pytest.approx((lo, hi), rel=1e-9)
        best = [min(m.value for m in cl.get_metric_history(jobs[(e, s)].info.run_id, "val_loss")) for s in (0, 1)]
        assert float(row["best_val_loss_mean"]) == pytest.approx(np.mean(best), rel=1e-12)
    comps = {(r["comparison"], r["metric"]): r for r in read_csv(cl, serial.parent, "report/comparisons.csv")}
    final = comps[("ablation_no_hebb vs hybrid", "val_loss")]
    a, b = [loss[("ablation_no_hebb", s)] for s in (0, 1)], [loss[("hybrid", s)] for s in (0, 1)]
    assert final["test"] == "paired t-test" and int(final["n"]) == 2
    assert float(final["diff"]) == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-9)
    assert float(final["p"]) == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
    parent = cl.get_run(serial.parent).data
    assert parent.metrics["ablation_no_hebb_vs_hybrid/val_loss/diff"] == pytest.approx(np.mean(np.subtract(a, b)), rel=1e-9)
    assert parent.tags["verdict.ablation_no_hebb_vs_hybrid"] == final["verdict_text"]
    assert final["verdict"] in ("better", "worse", "no difference")
    inside = float(final["ci_lo"]) <= 0 <= float(final["ci_hi"])
    assert (final["verdict"] == "no difference") == inside
    assert ("val_acc" in {m for _, m in comps}) and ("equal_time_val_loss" in {m for _, m in comps})
    md = open(cl.download_artifacts(serial.parent, "report/report.md")).read()
    assert "| ablation_no_hebb vs hybrid | final val loss | 2 |" in md
    for fig in ("validation_curves.png", "differences.png"):
        with open(cl.download_artifacts(serial.parent, f"report/figures/{fig}"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "ablation_no_hebb vs hybrid" in serial.first.stdout and "final val loss" in serial.first.stdout
    assert "study t: 4/4 runs finished (0 reused, 4 trained, 0 resumed)" in serial.first.stderr


def test_the_same_command_reuses_the_runs_and_more_seeds_train_only_the_new_ones(serial):
    again = serial.run("experiments.study", "t", *EXPS, "--seeds", "2", *SETS)
    assert again.returncode == 0, again.stderr[-3000:]
    assert last_line(again.stdout) == serial.parent
    assert "4 finished already (reused), 0 to train" in again.stderr
    assert len(children(serial.client, serial.parent)) == 4
    more = serial.run("experiments.study", "t", *EXPS, "--seeds", "3", *SETS)
    assert more.returncode == 0, more.stderr[-3000:]
    assert last_line(more.stdout) == serial.parent and "4 finished already (reused), 2 to train" in more.stderr
    jobs = by_job(children(serial.client, serial.parent))
    assert set(jobs) == {(e, s) for e in EXPS for s in (0, 1, 2)}
    summary = {row["experiment"]: row for row in read_csv(serial.client, serial.parent, "report/summary.csv")}
    assert int(summary["hybrid"]["seeds"]) == 3


def test_other_overrides_are_another_study(serial):
    other = serial.run("experiments.study", "t", "hybrid", "--seeds", "2", *SETS, "--set", "train.steps=20")
    assert other.returncode == 0, other.stderr[-3000:]
    parent = last_line(other.stdout)
    assert parent != serial.parent and "new study t" in other.stderr
    assert {r.data.params["train.steps"] for r in children(serial.client, parent)} == {"20"}


def test_two_workers_give_the_serial_results(serial, template_db, tmp_path):
    s = Store(template_db, tmp_path / "par")
    r = s.run("experiments.study", "t", *EXPS, "--seeds", "2", "--workers", "2", *SETS)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stderr.splitlines()
    started = [i for i, ln in enumerate(lines) if "(worker pid" in ln]
    done = [i for i, ln in enumerate(lines) if re.match(r"^\w+ s\d: finished in \d+:\d\d$", ln)]
    assert len(started) == 4 and started[1] < min(done), r.stderr[-3000:]   # two at once
    assert any(ln.startswith("[hybrid s0] ") for ln in lines)               # the workers' lines, prefixed
    par = by_job(children(s.client, last_line(r.stdout)))
    ser = by_job(children(serial.client, serial.parent))
    assert set(par) == {(e, x) for e in EXPS for x in (0, 1)}
    for k, run in par.items():   # same device, same configs: bit-identical
        assert run.info.status == "FINISHED"
        assert run.data.metrics["val_loss"] == ser[k].data.metrics["val_loss"], k


def _wait_for_child_checkpoint(cl, proc, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the study ended before it could be interrupted"
        exp = cl.get_experiment_by_name("hybrid-lm")
        runs = cl.search_runs([exp.experiment_id], "tags.study_job = 'hybrid s0'") if exp else []
        path = runs[0].data.tags.get("checkpoint_path", "") if runs else ""
        if path and os.path.exists(path):
            return runs[0].info.run_id
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


LONG = ["--set", "train.steps=1500", "--set", "train.eval_every=300", "--set", "train.checkpoint_every=300"]


@pytest.mark.parametrize("workers, sig", [(1, signal.SIGINT), (2, signal.SIGTERM)])
def test_an_interrupted_study_ends_killed_and_resumes_the_killed_run(template_db, tmp_path, workers, sig):
    s = Store(template_db, tmp_path / "st")
    args = ["experiments.study", "t", "hybrid", "--seeds", "1", "--workers", str(workers), *SETS, *LONG,
            "--tracking-uri", s.uri]
    with open(s.dir / "a.err", "w") as fe, open(s.dir / "a.out", "w") as fo:
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=s.dir, env=_env(), stdout=fo, stderr=fe, text=True)
    try:
        run_id = _wait_for_child_checkpoint(s.client, proc)
        proc.send_signal(sig)   # to the study only: it must stop its worker itself
        assert proc.wait(timeout=180) == 130, (s.dir / "a.err").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (s.dir / "a.err").read_text()
    assert "interrupted: study t: 0/1 runs finished" in err and "Traceback" not in err, err[-3000:]
    parent = last_line((s.dir / "a.out").read_text())
    assert s.client.get_run(parent).info.status == "KILLED"
    assert s.client.get_run(run_id).info.status == "KILLED"
    again = cli(*args, cwd=s.dir, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming run {run_id}" in again.stderr and last_line(again.stdout) == parent
    runs = children(s.client, parent)
    assert [r.info.run_id for r in runs] == [run_id]                 # resumed, not trained again
    run = s.client.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags["resumed_from_step"]) >= 300
    assert s.client.get_run(parent).info.status == "FINISHED"


def test_a_diverged_run_is_reported_and_not_retrained(template_db, tmp_path):
    s = Store(template_db, tmp_path / "nan")
    args = ["experiments.study", "boom", "hybrid", "--seeds", "1", *SETS, "--set", "optim.lr=1e30",
            "--set", "optim.clip_norm=0"]
    r = s.run(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "diverged (non-finite loss; left out): hybrid s0" in r.stdout
    parent = last_line(r.stdout)
    assert [x.info.status for x in children(s.client, parent)] == ["FAILED"]
    again = s.run(*args)
    assert again.returncode == 0 and "1 diverged" in again.stderr and "0 to train" in again.stderr
    assert len(children(s.client, parent)) == 1


@pytest.mark.parametrize("args, message", [
    (["ablatons"], "error: unknown study 'ablatons' (did you mean 'ablations'?): name the experiments to train"),
    (["t", "hybrid", "ablation_no_heb"], "error: unknown experiment 'ablation_no_heb' (did you mean"),
    (["ablations", "--seeds", "0"], "error: --seeds 0: at least 1"),
    (["ablations", "--workers", "0"], "error: --workers 0: at least 1"),
    (["ablations", "--set", "optim.lrr=1"], "error: unknown config key 'optim.lrr' (did you mean 'optim.lr'?)"),
    (["ablations", "--set", "data.path=missing.txt"], "does not exist"),
    (["bad/name", "hybrid"], "error: study name 'bad/name'"),
])
def test_bad_input_is_one_line_and_creates_nothing(tmp_path, args, message):
    r = cli("experiments.study", *args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r.stderr)
    assert len(lines) == 1 and (lines[0].startswith(message) or message in lines[0]), r.stderr
    assert os.listdir(tmp_path) == [], os.listdir(tmp_path)


def test_a_study_run_by_a_live_process_is_refused(template_db, tmp_path):
    s = Store(template_db, tmp_path / "live")
    from experiments.tracking import experiment_id
    study = study_mod.resolve_study("t", ["hybrid"], None)
    exp_id = experiment_id(s.client, "hybrid-lm")
    key = study_mod.study_key("t", [])
    parent, created = study_mod.claim_parent(s.client, exp_id, study, key, [], [0], 1)
    assert created
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        s.client.set_tag(parent, liveness.OWNER_TAG, liveness.owner(other.pid))   # another live process owns it
        with pytest.raises(study_mod.StudyError, match=r"is being run by pid \d+ on .*; wait for it or stop it"):
            study_mod.claim_parent(s.client, exp_id, study, key, [], [0], 1)
    finally:
        other.kill()
        other.wait()
    # its owner gone, the study is taken over (resumed) by the next command
    again, created = study_mod.claim_parent(s.client, exp_id, study, key, [], [0], 1)
    assert again == parent and not created
    assert s.client.get_run(parent).data.tags[liveness.OWNER_TAG] == liveness.owner()


def test_study_list_names_the_studies_and_their_comparisons(tmp_path):
    r = cli("experiments.study", "--list", cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout.splitlines()[0].startswith("ablations ")
    assert "- Hebbian memory: hybrid vs ablation_no_hebb" in r.stdout
    assert "- spikes: hybrid vs ablation_no_spikes" in r.stdout and "- prototypes: hybrid vs ablation_no_proto" in r.stdout
    assert os.listdir(tmp_path) == []


def test_compare_prints_intervals_and_verdicts_for_any_runs(serial, tmp_path):
    runs = children(serial.client, serial.parent)
    ids = [r.info.run_id for r in runs]
    out = tmp_path / "comparisons.csv"
    r = serial.run("experiments.compare", "--runs", *ids, "--report-csv", out)
    assert r.returncode == 0, r.stderr[-3000:]
    jobs = by_job(runs)
    seeds = sorted({s for _, s in jobs})
    a = [jobs[("ablation_no_hebb", s)].data.metrics["val_loss"] for s in seeds]
    b = [jobs[("hybrid", s)].data.metrics["val_loss"] for s in seeds]
    lo, hi = sps.t.interval(0.95, len(b) - 1, loc=np.mean(b), scale=sps.sem(b))
    assert f"{np.mean(b):.4f} [{lo:.4f}, {hi:.4f}]" in r.stdout
    rows = {row["metric"]: row for row in csv.DictReader(open(out))}
    d = np.subtract(a, b)
    assert float(rows["val_loss"]["diff"]) == pytest.approx(d.mean(), rel=1e-9)
    assert float(rows["val_loss"]["p"]) == pytest.approx(sps.ttest_rel(a, b).pvalue, rel=1e-9)
    assert rows["val_loss"]["comparison"] == "ablation_no_hebb vs hybrid"
    verdict = rows["val_loss"]["verdict_text"]
    assert verdict in ("better", "worse", f"no difference detectable with {len(seeds)} seeds")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("ablation_no_hebb vs hybrid  final val loss")]
    assert len(line) == 1 and verdict in line[0]
    # a baseline that is not among the runs is one line
    bad = serial.run("experiments.compare", "--runs", *ids, "--baseline", "nope")
    assert bad.returncode == 2 and error_lines(bad.stderr)[0].startswith("error: --baseline 'nope' is not among")


def test_compare_groups_runs_of_one_name_by_config(serial):
    runs = {r.info.run_id: r for r in children(serial.client, serial.parent)}
    from experiments.compare import group_labels
    labels = group_labels(list(runs.values()))
    assert set(labels.values()) == set(EXPS)   # the seed does not split a group
    fake = type("R", (), {})
    extra = fake()
    extra.info = type("I", (), {"run_id": "x"})()
    extra.data = type("D", (), {"params": {**next(iter(runs.values())).data.params, "train.steps": "99"}})()
    name = extra.data.params["experiment"]
    labels = group_labels([*runs.values(), extra])
    assert labels["x"] == f"{name} (train.steps=99)"
    assert math.isfinite(len(labels))
