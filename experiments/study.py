"""Ablation studies: experiments × seeds as tracked runs under one parent, and a report that
says when a difference is larger than the seed-to-seed noise.

    python -m experiments.study --list
    python -m experiments.study ablations --seeds 3
    python -m experiments.study seed_claims --set data.path=english.txt
    python -m experiments.study mine hybrid ablation_no_proto --seeds 5 --workers 2

Every experiment is trained for every seed (seed, seed+1, ...; `--set seed=S` moves the
first) as an ordinary tracked run (`experiments.run`'s runner) under one parent MLflow run
`study-<NAME>`. A study is its NAME and its `--set` overrides: the same command again is the
same study and resumes it. A run already FINISHED with the same resolved config, data and
code version (`tracking.code_version`: engine/ and kernels/ sources) is reused, not
retrained; a KILLED or FAILED one (or one whose process died) is resumed from its
checkpoint, or trained again if it has none; one that diverged (non-finite loss) is an
outcome, reported, not retried. `--seeds 5` after `--seeds 3` trains the two new seeds only.

`--workers K` trains K runs at once, each in its own process, on one store; their progress
lines are prefixed with the run they belong to. Wall-clock figures (the equal-time
comparison, the time ratio) are only fair with one worker: K runs share the machine.

The report (`experiments.analysis`, `experiments.stats`) is on the measures of the
experiments' task (one task per study: a study mixing them is refused), printed, and logged
on the parent run under `report/`: summary.csv, comparisons.csv, runs.csv, report.md and
figures/validation_curves.png, figures/differences.png. The last line of standard output
is the parent run id.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from engine.checkpoint import CheckpointError
from engine.config import Config, ConfigError, apply_overrides, with_overrides
from engine.device import DeviceError
from engine.tasks import task_of
from engine.train import Trainer, format_duration

from . import analysis, liveness, presets
from . import run as runner
from .tracking import (TrackingError, check_store, client, code_version, experiment_id, owner_tags,
                       resolve_tracking_uri, run_is_stale)

DEFAULT_SEEDS = 3
PARENT_ROLE = "parent"
WAIT_POLL_S = 5.0        # how often a run trained by another process is looked at
TERM_WAIT_S = 120.0      # after a stop request, how long workers get to write their checkpoints


class StudyError(RuntimeError):
    """The study cannot start or go on; the message is one line."""


USER_ERRORS = runner.USER_ERRORS + (StudyError,)


@dataclass(frozen=True)
class Study:
    name: str
    description: str
    experiments: tuple
    baseline: str
    comparisons: tuple = ()   # (label, a, b): a against b; default: each experiment against the baseline

    def pairs(self) -> list[tuple[str, str, str]]:
        chosen = [c for c in self.comparisons if c[1] in self.experiments and c[2] in self.experiments]
        return chosen or [(f"{e} vs {self.baseline}", e, self.baseline) for e in self.experiments
                          if e != self.baseline]


STUDIES: dict[str, Study] = {s.name: s for s in [
    Study("ablations", "hybrid against each of its ablations and the controls",
          ("hybrid", "ablation_no_hebb", "ablation_no_proto", "ablation_no_spikes", "gradient_only", "seed",
           "control_modulate"), "hybrid"),
    Study("seed_claims", "each mechanism the seed design credits (Hebbian memory, prototypes, spikes) against "
          "the run without it, and the seed's own wiring of all three against none",
          ("hybrid", "ablation_no_hebb", "ablation_no_proto", "ablation_no_spikes", "seed", "gradient_only"),
          "hybrid",
          (("Hebbian memory: hybrid vs ablation_no_hebb", "hybrid", "ablation_no_hebb"),
           ("prototypes: hybrid vs ablation_no_proto", "hybrid", "ablation_no_proto"),
           ("spikes: hybrid vs ablation_no_spikes", "hybrid", "ablation_no_spikes"),
           ("the seed's wiring: seed vs gradient_only", "seed", "gradient_only"))),
    Study("layers", "the composable layers: stacked bio layers and the new memory and prototype wirings "
          "against hybrid, and each prototype wiring against the same model without prototypes",
          ("hybrid", "stack2", "stack3", "hebb_layernorm", "hebb_delta", "proto_token", "proto_key",
           "ablation_no_proto"), "hybrid",
          (("2 layers: stack2 vs hybrid", "stack2", "hybrid"), ("3 layers: stack3 vs hybrid", "stack3", "hybrid"),
           ("layernorm: hebb_layernorm vs hybrid", "hebb_layernorm", "hybrid"),
           ("delta rule: hebb_delta vs hybrid", "hebb_delta", "hybrid"),
           ("token prototypes: proto_token vs ablation_no_proto", "proto_token", "ablation_no_proto"),
           ("key prototypes: proto_key vs ablation_no_proto", "proto_key", "ablation_no_proto"),
           ("feature prototypes: hybrid vs ablation_no_proto", "hybrid", "ablation_no_proto"))),
    Study("transformer", "the transformer baseline (nanoGPT's baby GPT) against the hybrids with the local rules "
          "inside its blocks, each rule against the hybrid without it, and the bio models at the same schedule",
          ("attention_baseline", "transformer_hebb_activity", "transformer_proto", "transformer_hebb_proto",
           "hybrid_b12", "stack3_b12", "transformer_hebb", "transformer_hebb_prenorm", "transformer_proto_prenorm",
           "transformer_hebb_proto_prenorm"), "attention_baseline",
          (("Hebbian branch (activity values): transformer_hebb_activity vs attention_baseline",
            "transformer_hebb_activity", "attention_baseline"),
           ("Hebbian branch (spike values): transformer_hebb vs attention_baseline", "transformer_hebb",
            "attention_baseline"),
           ("prototype features: transformer_proto vs attention_baseline", "transformer_proto", "attention_baseline"),
           ("both: transformer_hebb_proto vs attention_baseline", "transformer_hebb_proto", "attention_baseline"),
           ("prototypes with the memory: transformer_hebb_proto vs transformer_hebb", "transformer_hebb_proto",
            "transformer_hebb"),
           ("the memory with prototypes: transformer_hebb_proto vs transformer_proto", "transformer_hebb_proto",
            "transformer_proto"),
           ("spikes as values: transformer_hebb vs transformer_hebb_activity", "transformer_hebb",
            "transformer_hebb_activity"),
           ("pre-normalised memory: transformer_hebb_prenorm vs attention_baseline", "transformer_hebb_prenorm",
            "attention_baseline"),
           ("pre-normalised prototypes: transformer_proto_prenorm vs attention_baseline", "transformer_proto_prenorm",
            "attention_baseline"),
           ("both pre-normalised: transformer_hebb_proto_prenorm vs attention_baseline",
            "transformer_hebb_proto_prenorm", "attention_baseline"),
           ("LN(x) instead of x, memory: transformer_hebb_prenorm vs transformer_hebb", "transformer_hebb_prenorm",
            "transformer_hebb"),
           ("LN(x) instead of x, prototypes: transformer_proto_prenorm vs transformer_proto",
            "transformer_proto_prenorm", "transformer_proto"),
           ("1-layer bio model: hybrid_b12 vs attention_baseline", "hybrid_b12", "attention_baseline"),
           ("3-layer bio model: stack3_b12 vs attention_baseline", "stack3_b12", "attention_baseline"))),
    Study("memnet", "the memory network (DRLMemNet design): the faithful mean write against the slot write, no "
          "write (gradient only) and no memory (the GRU alone)",
          ("memnet", "memnet_slot_write", "memnet_no_write", "memnet_no_memory"), "memnet",
          (("slot write: memnet_slot_write vs memnet", "memnet_slot_write", "memnet"),
           ("the local write (mean): memnet vs memnet_no_write", "memnet", "memnet_no_write"),
           ("the local write (slot): memnet_slot_write vs memnet_no_write", "memnet_slot_write", "memnet_no_write"),
           ("the memory: memnet_no_write vs memnet_no_memory", "memnet_no_write", "memnet_no_memory"))),
    Study("lattice", "the 3D cellular lattice (student of all-MiniLM-L6-v2's sentence embeddings) against the face "
          "maps alone (K = 0) and the linear autoencoder through the same 64 values; the experts' mixture against "
          "the local stencil alone",
          ("lattice", "lattice_moe", "lattice_no_steps", "linear_ae"), "linear_ae",
          (("the cell updates: lattice vs lattice_no_steps", "lattice", "lattice_no_steps"),
           ("the lattice against the linear autoencoder: lattice vs linear_ae", "lattice", "linear_ae"),
           ("three experts and the gate: lattice_moe vs lattice", "lattice_moe", "lattice"),
           ("the lattice's loss on the face maps: lattice_no_steps vs linear_ae", "lattice_no_steps", "linear_ae"))),
]}


@dataclass
class Job:
    experiment: str
    seed: int
    overrides: list        # the study's --set, then seed=S
    cfg: Config
    key: str = ""          # resolved config + data + code version: which runs are this job

    @property
    def label(self) -> str:
        return f"{self.experiment} s{self.seed}"


# -- what the command asks for, checked before anything is created ---------------------------------
def resolve_study(name: str, experiments: list[str], baseline: str | None) -> Study:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", name):
        raise StudyError(f"study name {name!r}: letters, digits, '_', '.' and '-' only (at most 100)")
    for e in experiments + ([baseline] if baseline else []):
        presets.get(e)
    named = STUDIES.get(name)
    if named is None and not experiments:
        raise StudyError(f"unknown study {name!r}{presets.did_you_mean(name, STUDIES)}: name the experiments "
                         f"to train (e.g. `{name} hybrid ablation_no_proto`) or see --list")
    exps = list(experiments) if experiments else list(named.experiments)
    base = baseline or (named.baseline if named else ("hybrid" if "hybrid" in exps else exps[0]))
    if base not in exps:
        exps.insert(0, base)
    exps = list(dict.fromkeys(exps))
    return Study(name, named.description if named else "experiments named on the command line",
                 tuple(exps), base, named.comparisons if named and base == named.baseline else ())


def study_key(name: str, overrides: list[str]) -> str:
    """What makes two commands the same study: the name and the --set overrides (the first
    seed and the number of seeds aside, which only say which runs it holds)."""
    sets = sorted(o.strip() for o in overrides if o.split("=", 1)[0].strip() != "seed")
    return hashlib.sha256(json.dumps([name, sets]).encode()).hexdigest()[:16]


def plan(study: Study, seeds: int, overrides: list[str]) -> list[Job]:
    """Every experiment × seed, seed-major (all experiments of the first seed first: an
    interrupted study has complete pairs early). Config errors name the experiment."""
    first = [o for o in overrides if o.split("=", 1)[0].strip() == "seed"]
    base_sets = [o for o in overrides if o.split("=", 1)[0].strip() != "seed"]
    cfgs = {}
    for e in study.experiments:
        try:
            cfgs[e] = apply_overrides(presets.get(e).config(), base_sets + first)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (experiment {e})") from None
    tasks: dict[str, list] = {}
    for e, c in cfgs.items():
        tasks.setdefault(task_of(c).name, []).append(e)
    if len(tasks) > 1:   # one report compares runs on one task's measures
        raise StudyError(f"study {study.name!r} mixes tasks: " + "; ".join(
            f"{t} ({', '.join(es)})" for t, es in tasks.items()) + "; a study's experiments must share one task")
    start = cfgs[study.baseline].seed
    jobs = []
    for s in range(start, start + seeds):
        for e in study.experiments:
            jobs.append(Job(e, s, base_sets + [f"seed={s}"], with_overrides(cfgs[e], {"seed": s})))
    return jobs


def job_key(cfg: Config, data_sha: str) -> str:
    return hashlib.sha256(f"{cfg.to_json()}\n{data_sha}\n{code_version()}".encode()).hexdigest()[:16]


def check_jobs(jobs: list[Job], out_root: str, workers: int) -> None:
    """Data, device and memory for every distinct model shape (one Trainer each, freed after),
    K workers' buffers together, and the checkpoint folder; then each job's key."""
    seen = {}
    for job in jobs:
        c = job.cfg
        shape = (c.data.path, c.data.val_fraction, c.model.embedding_dim, c.model.hidden_dim,
                 c.model.num_prototypes, c.train.batch_size, c.train.seq_len, c.proto.mode, c.hebb.mode, c.device)
        if shape not in seen:
            trainer = Trainer(c, None)
            runner.check_out_root(out_root, trainer)
            if workers > 1:
                bufs = trainer.device_buffers(trainer.dev.variant)
                try:
                    trainer.dev.check_memory({f"{k} (worker {i + 1})": v for i in range(workers)
                                              for k, v in bufs.items()})
                except DeviceError as exc:
                    raise DeviceError(f"--workers {workers}: {exc}") from None
            seen[shape] = trainer.data_sha256
            del trainer
        job.key = job_key(c, seen[shape])


# -- the parent run --------------------------------------------------------------------------------
def claim_parent(cl, exp_id: str, study: Study, key: str, overrides: list[str], seeds: list[int],
                 workers: int) -> tuple[str, bool]:
    """(parent run id, created): the study's parent run, found by its key, or created; RUNNING
    and owned by this process from here on. A parent another live process is running is refused."""
    found = _parents(cl, exp_id, key)
    created = False
    if not found:
        tags = {"mlflow.runName": f"study-{study.name}", "study": study.name, "study_key": key,
                "study_role": PARENT_ROLE, "overrides": json.dumps(sorted(overrides)), **owner_tags()}
        run = cl.create_run(exp_id, tags=tags)
        created = True
        found = _parents(cl, exp_id, key)
        if found and found[0].info.run_id != run.info.run_id:   # another process created one at once
            cl.delete_run(run.info.run_id)
            created = False
        else:
            found = [run]
    parent = found[0]
    pid = parent.info.run_id
    if not created:
        if parent.info.status == "RUNNING" and not run_is_stale(parent) and \
                parent.data.tags.get(liveness.OWNER_TAG) != liveness.owner():
            who = liveness.describe(parent.data.tags.get(liveness.OWNER_TAG, "?"))
            raise StudyError(f"study {study.name!r} (run {pid}) is being run by {who}; wait for it or stop it "
                             "(Ctrl+C or kill -TERM), then run this command again")
        for k, v in owner_tags().items():
            cl.set_tag(pid, k, v)
        cl.update_run(pid, status="RUNNING")
    for k, v in {"baseline": study.baseline, "experiments": json.dumps(list(study.experiments)),
                 "seeds": json.dumps(seeds), "code_version": code_version(), "workers": str(workers),
                 "description": study.description, "mlflow.note.content": _note(study, overrides, seeds)}.items():
        cl.set_tag(pid, k, v)
    return pid, created


def _parents(cl, exp_id, key):
    runs = cl.search_runs([exp_id], f"tags.study_key = '{key}' and tags.study_role = '{PARENT_ROLE}'",
                          max_results=100)
    return sorted(runs, key=lambda r: (r.info.start_time or 0, r.info.run_id))


def _note(study: Study, overrides, seeds) -> str:
    sets = " ".join(f"--set {o}" for o in overrides) or "(no overrides)"
    return (f"Study {study.name}: {', '.join(study.experiments)} × seeds {seeds[0]}..{seeds[-1]}, baseline "
            f"{study.baseline}; {sets}. Report under Artifacts → report/.")


def study_runs(cl, exp_id: str, parent_id: str) -> dict[str, list]:
    """The parent's child runs by job key, newest first."""
    runs = cl.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000)
    out: dict[str, list] = {}
    for r in sorted(runs, key=lambda r: -(r.info.start_time or 0)):
        out.setdefault(r.data.tags.get("study_config", ""), []).append(r)
    return out


def decide(runs: list) -> tuple[str, object]:
    """What a job's runs (newest first) ask for: reuse, wait (another live process trains it),
    diverged (an outcome: the same config would diverge again), resume, or new."""
    for r in runs:
        if r.info.status == "FINISHED":
            return "reuse", r
    for r in runs:
        if r.info.status == "RUNNING" and not run_is_stale(r):
            return "wait", r
    for r in runs:
        if r.data.tags.get("superseded_by"):
            continue
        if r.info.status == "FAILED" and "non-finite" in r.data.tags.get("error", ""):
            return "diverged", r
        return "resume", r
    return "new", None


# -- running the jobs -------------------------------------------------------------------------------
class Coordinator:
    def __init__(self, cl, uri, exp_name, exp_id, parent_id, study, jobs, out_root, workers):
        self.cl, self.uri, self.exp_name, self.exp_id = cl, uri, exp_name, exp_id
        self.parent_id, self.study, self.jobs, self.out_root, self.workers = parent_id, study, jobs, out_root, workers
        self.stop = False
        self.counts = {"reused": 0, "trained": 0, "resumed": 0}
        self._print_lock = threading.Lock()

    def say(self, line: str):
        with self._print_lock:
            print(line, file=sys.stderr, flush=True)

    def tags(self, job: Job) -> dict:
        return {"study": self.study.name, "study_config": job.key, "study_job": job.label}

    def request_stop(self, signum=None, frame=None):
        """--workers K: the signal handler; the loop stops its workers and starts no more."""
        self.stop = True

    def interrupt(self, signum=None, frame=None):
        """One worker (in-process): the handler outside training. Inside it, the runner's own
        handler stops the run after the step, and passes on a signal that comes once the run's
        loop has ended (its final writes) to this one: the study stops after that run."""
        self.stop = True
        raise KeyboardInterrupt

    def run(self) -> None:
        todo = []
        existing = study_runs(self.cl, self.exp_id, self.parent_id)
        for job in self.jobs:
            action, _ = decide(existing.get(job.key, []))
            if action == "reuse":
                self.counts["reused"] += 1
            elif action != "diverged":
                todo.append(job)
        n = len(self.jobs)
        diverged = n - len(todo) - self.counts["reused"]
        self.say(f"study {self.study.name}: {len(self.study.experiments)} experiments × "
                 f"{n // max(len(self.study.experiments), 1)} seeds = {n} runs; {self.counts['reused']} finished "
                 f"already (reused), " + (f"{diverged} diverged before (not retried), " if diverged else "")
                 + f"{len(todo)} to train" + (f", {self.workers} at a time" if self.workers > 1 else ""))
        if self.workers <= 1:
            self._serial(todo)
        else:
            self._parallel(todo)

    def _next_action(self, job: Job):
        return decide(study_runs(self.cl, self.exp_id, self.parent_id).get(job.key, []))

    def _wait_for(self, job: Job, run) -> None:
        who = liveness.describe(run.data.tags.get(liveness.OWNER_TAG, "?"))
        self.say(f"{job.label}: run {run.info.run_id} is being trained by {who}; waiting for it")
        while not self.stop:
            time.sleep(WAIT_POLL_S)
            cur = self.cl.get_run(run.info.run_id)
            if cur.info.status != "RUNNING" or run_is_stale(cur):
                return

    def _serial(self, todo: list[Job]) -> None:
        for i, job in enumerate(todo, 1):
            while not self.stop:
                action, run = self._next_action(job)
                if action != "wait":
                    break
                self._wait_for(job, run)
            if self.stop:
                return
            if action == "reuse":
                self.counts["reused"] += 1
            if action in ("reuse", "diverged"):
                continue
            self.say(f"[{i}/{len(todo)}] {job.label}: " + ("resuming run " + run.info.run_id if action == "resume"
                                                          else "training"))
            t0 = time.monotonic()
            summary = None
            if action == "resume":
                try:
                    summary = runner.resume(run.info.run_id, self.uri, self.out_root)
                    self.counts["resumed"] += 1
                except (TrackingError, CheckpointError, ConfigError) as exc:
                    self.say(f"{job.label}: cannot resume {run.info.run_id} ({exc}); training it again")
                    summary = None
                    old = run.info.run_id
            if summary is None:
                rid, summary = runner.launch(job.cfg, job.experiment, job.overrides, self.uri, self.exp_name,
                                             self.out_root, tags=self.tags(job), parent_run_id=self.parent_id)
                if action == "resume":
                    self.cl.set_tag(old, "superseded_by", rid)
                self.counts["trained"] += 1
            self._report_job(job, summary, time.monotonic() - t0)
            if summary["status"] == "killed":
                self.stop = True

    def _report_job(self, job, summary, seconds):
        final = summary.get("final") or {}
        status = summary.get("status", "?")
        loss = f", val_loss {final['val_loss']:.4f}" if final.get("val_loss") is not None else ""
        err = f" ({summary['error']})" if summary.get("error") else ""
        self.say(f"{job.label}: {status}{loss} in {format_duration(seconds)}{err}")

    def _parallel(self, todo: list[Job]) -> None:
        pending = list(todo)
        live: dict[subprocess.Popen, tuple[Job, float, list]] = {}
        waiting: dict[str, float] = {}   # job key -> when to look at its run again
        stopping = None
        while pending or live:
            if self.stop and stopping is None:
                stopping = time.monotonic()
                pending.clear()
                for p in live:   # a terminal's Ctrl+C reached them already; `kill PARENT` did not
                    _signal(p, signal.SIGTERM)
            if stopping is not None and time.monotonic() - stopping > TERM_WAIT_S:
                for p in live:
                    _signal(p, signal.SIGKILL)
            now = time.monotonic()
            while not self.stop and len(live) < self.workers:
                job = next((j for j in pending if waiting.get(j.key, 0.0) <= now), None)
                if job is None:
                    break
                pending.remove(job)
                action, run = self._next_action(job)
                if action == "reuse":
                    self.counts["reused"] += 1
                if action in ("reuse", "diverged"):
                    continue
                if action == "wait":   # trained by a process this one did not start: look again later
                    if job.key not in waiting:
                        who = liveness.describe(run.data.tags.get(liveness.OWNER_TAG, "?"))
                        self.say(f"{job.label}: run {run.info.run_id} is being trained by {who}; waiting for it")
                    waiting[job.key] = now + WAIT_POLL_S
                    pending.append(job)
                    continue
                waiting.pop(job.key, None)
                proc, out = self._spawn(job, run.info.run_id if action == "resume" else None)
                live[proc] = (job, time.monotonic(), out)
                self.counts["resumed" if action == "resume" else "trained"] += 1
                self.say(f"{job.label}: " + (f"resuming run {run.info.run_id}" if action == "resume" else "training")
                         + f" (worker pid {proc.pid})")
            for p in [p for p in live if p.poll() is not None]:
                job, t0, out = live.pop(p)
                rc = p.returncode
                status = "finished" if rc == 0 else "killed" if rc == 130 else "failed" if rc > 0 else \
                    f"killed by {_signal_name(-rc)}"
                tail = out[-1] if out and rc not in (0, 130) else ""
                self.say(f"{job.label}: {status} in {format_duration(time.monotonic() - t0)}"
                         + (f" ({tail})" if tail else ""))
                if rc == 130 and stopping is None:
                    self.stop = True
            time.sleep(0.2)

    def _spawn(self, job: Job, resume_id: str | None):
        spec = {"experiment": job.experiment, "overrides": job.overrides, "uri": self.uri,
                "experiment_name": self.exp_name, "out": self.out_root, "parent": self.parent_id,
                "tags": self.tags(job), "resume": resume_id, "key": job.key}
        env = dict(os.environ, MLFLOW_TRACKING_URI=self.uri, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen([sys.executable, "-m", "experiments.study", "--worker-job", json.dumps(spec)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        out: list[str] = []

        def pump():
            for line in proc.stderr:
                line = line.rstrip("\n")
                if line:
                    out.append(line)
                    self.say(f"[{job.label}] {line}")
        threading.Thread(target=pump, daemon=True).start()
        return proc, out


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _signal(proc, sig):
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def worker_main(spec_json: str) -> int:
    """One job in its own process (--workers K): train it (or resume it) under the parent run."""
    spec = json.loads(spec_json)
    signal.signal(signal.SIGTERM, runner._interrupt)  # until training starts (then: stop after the step)
    try:
        summary, run_id = None, spec.get("resume")
        if run_id:
            try:
                summary = runner.resume(run_id, spec["uri"], spec["out"])
            except (TrackingError, CheckpointError, ConfigError) as exc:
                print(f"cannot resume {run_id} ({exc}); training it again", file=sys.stderr, flush=True)
        if summary is None:
            cfg = apply_overrides(presets.get(spec["experiment"]).config(), spec["overrides"])
            new_id, summary = runner.launch(cfg, spec["experiment"], spec["overrides"], spec["uri"],
                                            spec["experiment_name"], spec["out"], tags=spec["tags"],
                                            parent_run_id=spec["parent"])
            if run_id:
                client(spec["uri"]).set_tag(run_id, "superseded_by", new_id)
            run_id = new_id
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started", file=sys.stderr)
        return 130
    final = summary.get("final") or {}
    if final.get("val_loss") is not None:
        print(f"{summary['status']}: val_loss {final['val_loss']:.4f} at step {final['step']}", file=sys.stderr)
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
    print(run_id, flush=True)
    return {"finished": 0, "killed": 130}.get(summary["status"], 1)


# -- the report ------------------------------------------------------------------------------------
def report(cl, exp_id: str, parent_id: str, study: Study, jobs: list[Job], uri: str) -> tuple[str, dict]:
    """The report over the jobs' finished runs: printed text, and artifacts on the parent."""
    existing = study_runs(cl, exp_id, parent_id)
    chosen, missing, diverged = [], [], []
    for job in jobs:
        action, run = decide(existing.get(job.key, []))
        if action == "reuse":
            chosen.append(run)
        elif action == "diverged":
            diverged.append(run)
        else:
            missing.append(job.label)
    records = analysis.fetch_records(cl, chosen + diverged)
    summary = analysis.summary_frame(records, study.experiments, study.baseline)
    comps = analysis.comparison_frame(records, study.pairs())
    seeds = sorted({j.seed for j in jobs})
    title = (f"study {study.name}: {len(chosen)} of {len(jobs)} runs finished "
             f"(seeds {seeds[0]}..{seeds[-1]}, baseline {study.baseline})")
    text = analysis.render(summary, comps, title)
    notes = []
    if diverged:
        notes.append("diverged (non-finite loss; left out): " + ", ".join(
            f"{r.data.params.get('experiment', '?')} s{r.data.params.get('seed', '?')}" for r in diverged))
    if missing:
        notes.append("not finished yet: " + ", ".join(missing))
    text += "".join(f"\nnote: {n}" for n in notes) + ("\n" if notes else "")
    with tempfile.TemporaryDirectory(prefix="study-report-") as tmp:
        os.makedirs(os.path.join(tmp, "figures"))
        summary.to_csv(os.path.join(tmp, "summary.csv"), index=False)
        comps.to_csv(os.path.join(tmp, "comparisons.csv"), index=False)
        analysis.records_frame(records).to_csv(os.path.join(tmp, "runs.csv"), index=False)
        md = analysis.render(summary, comps, title, markdown=True) + "".join(f"\n- {n}" for n in notes) + \
            "\n\n![validation curves](figures/validation_curves.png)\n\n![differences](figures/differences.png)\n"
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(md)
        analysis.figures(records, comps, os.path.join(tmp, "figures"), study.experiments)
        cl.log_artifacts(parent_id, tmp, "report")
    _log_comparisons(cl, parent_id, comps)
    verdicts = {(r["comparison"], r["metric"]): r["verdict"] for _, r in comps.iterrows()}
    return text, {"finished": len(chosen), "missing": missing, "diverged": len(diverged), "verdicts": verdicts}


def _log_comparisons(cl, parent_id: str, comps) -> None:
    """On the parent, for the MLflow UI: metrics `<a>_vs_<b>/<measure>/{diff,ci_lo,ci_hi,p}` at
    step = the number of pairs (a study grown by seeds shows how its intervals narrowed), and a
    tag `verdict.<a>_vs_<b>` with the final validation loss's verdict."""
    import math
    from mlflow.entities import Metric
    now = liveness.now_ms()
    metrics = []
    for _, r in comps.iterrows():
        base = f"{r['experiment']}_vs_{r['reference']}/{r['metric']}"
        for field in ("diff", "ci_lo", "ci_hi", "p"):
            if isinstance(r[field], float) and math.isfinite(r[field]):
                metrics.append(Metric(f"{base}/{field}", float(r[field]), now, int(r["n"])))
        if r["metric"] == "val_loss":
            cl.set_tag(parent_id, f"verdict.{r['experiment']}_vs_{r['reference']}", r["verdict_text"])
    for i in range(0, len(metrics), 900):
        cl.log_batch(parent_id, metrics=metrics[i:i + 900])


# -- command line ----------------------------------------------------------------------------------
def list_studies() -> str:
    width = max(map(len, STUDIES))
    lines = []
    for s in STUDIES.values():
        lines.append(f"{s.name:<{width}}  {s.description}")
        lines.append(f"{'':<{width}}    experiments: {', '.join(s.experiments)}; baseline {s.baseline}")
        for label, _, _ in s.pairs():
            lines.append(f"{'':<{width}}    - {label}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.splitlines()[0])
    ap.add_argument("name", nargs="?", help="study name: a named study (--list) or a new one")
    ap.add_argument("experiments", nargs="*", help="experiments to train (default: the named study's)")
    ap.add_argument("--list", action="store_true", help="list the named studies")
    ap.add_argument("--seeds", type=int, default=DEFAULT_SEEDS, help=f"seeds per experiment (default {DEFAULT_SEEDS})")
    ap.add_argument("--baseline", help="the experiment the others are compared with")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a config key in every run (seed=S: the first seed)")
    ap.add_argument("--workers", type=int, default=1, help="runs trained at once, one process each")
    ap.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    ap.add_argument("--experiment-name", default=runner.DEFAULT_EXPERIMENT, help="MLflow experiment to log into")
    ap.add_argument("--out", default="runs", help="directory for checkpoints (OUT/<run id>/)")
    ap.add_argument("--worker-job", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker_job:
        return worker_main(args.worker_job)
    if args.list:
        print(list_studies())
        return 0
    if not args.name:
        ap.error("give a study NAME (see --list)")
    if args.seeds < 1:
        print(f"error: --seeds {args.seeds}: at least 1 (an interval needs 2)", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"error: --workers {args.workers}: at least 1", file=sys.stderr)
        return 2
    uri = resolve_tracking_uri(args.tracking_uri)
    t0 = time.monotonic()
    signal.signal(signal.SIGTERM, runner._interrupt)
    parent_id, coord, cl = None, None, None
    try:
        study = resolve_study(args.name, args.experiments, args.baseline)
        jobs = plan(study, args.seeds, args.set)
        runner.check_out_root(args.out)
        check_jobs(jobs, args.out, args.workers)
        check_store(uri)
        cl = client(uri)
        exp_id = experiment_id(cl, args.experiment_name)
        key = study_key(study.name, args.set)
        parent_id, created = claim_parent(cl, exp_id, study, key, args.set, sorted({j.seed for j in jobs}),
                                          args.workers)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before the study started; nothing was created", file=sys.stderr)
        return 130
    print(f"{'new study' if created else 'resuming study'} {study.name} (parent run {parent_id}"
          f"{', ' + ' '.join('--set ' + o for o in args.set) if args.set else ''})", file=sys.stderr, flush=True)
    coord = Coordinator(cl, uri, args.experiment_name, exp_id, parent_id, study, jobs, args.out, args.workers)
    beat = lambda: cl.set_tag(parent_id, liveness.HEARTBEAT_TAG, str(liveness.now_ms()))
    status, error, text, outcome = "FINISHED", None, "", {"finished": 0, "missing": [j.label for j in jobs]}
    try:
        with liveness.Heartbeat(beat):
            handler = coord.request_stop if args.workers > 1 else coord.interrupt
            handlers = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                coord.run()
            except KeyboardInterrupt:
                coord.stop = True
            except USER_ERRORS as exc:
                error = str(exc)
            finally:
                for s, h in handlers.items():
                    signal.signal(s, h)
            text, outcome = report(cl, exp_id, parent_id, study, jobs, uri)
    except KeyboardInterrupt:
        coord.stop = True
    except Exception as exc:   # the parent must not stay RUNNING: end it FAILED with the reason
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]
    finally:
        if coord.stop:
            status = "KILLED"
        elif error or outcome["missing"]:
            status = "FAILED"
            error = error or f"{len(outcome['missing'])} runs did not finish: {', '.join(outcome['missing'])}"
        if error:
            cl.set_tag(parent_id, "error", error[:5000])
        cl.set_tag(parent_id, "study_wall_s", f"{time.monotonic() - t0:.1f}")
        cl.set_terminated(parent_id, status)
    if text:
        print(text, flush=True)
    c = coord.counts
    line = (f"study {study.name}: {outcome['finished']}/{len(jobs)} runs finished ({c['reused']} reused, "
            f"{c['trained']} trained, {c['resumed']} resumed"
            + (f", {outcome.get('diverged', 0)} diverged" if outcome.get("diverged") else "")
            + (f", {len(outcome['missing'])} not finished" if outcome["missing"] else "")
            + f") in {format_duration(time.monotonic() - t0)}; report: {runner.ui_hint(uri, parent_id)}")
    if status == "KILLED":
        line = "interrupted: " + line + "; run the same command again to resume"
    print(line, file=sys.stderr, flush=True)
    if error:
        print(f"error: {error}", file=sys.stderr)
    print(parent_id, flush=True)
    return {"FINISHED": 0, "KILLED": 130}.get(status, 1)


if __name__ == "__main__":
    sys.exit(main())
