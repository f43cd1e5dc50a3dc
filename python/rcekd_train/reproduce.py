"""A resumable queue of every run of the paper's Table 1 (one data set) and of the Figure 3 ablations.

``rcekd reproduce --dataset citeulike --seeds 0 1 2 --runs-dir DIR`` runs, for each seed s, every run of
:func:`plan` in order (teachers before the students that distil from them), each in ``DIR/<name>/seed_<s>``
with the packaged config of its data set, pair and method (``config.resolve``) and ``--resume``
semantics: a finished run is skipped, an interrupted one continues from its last complete epoch, so the
command can be killed at any moment and started again. A student of seed s distils from the teacher of
the same seed (``DIR/teacher-<backbone>/seed_<s>``) and trains with seed s itself.

Every action is appended to ``DIR/reproduce.log``; each run's epoch lines go to its ``train.log``.
``--list`` prints the plan with the state of each run: ``done`` (result.json of a finished run),
``partial`` (a checkpoint, or a run ended by its time limit), ``todo`` (nothing yet). Several queues may
work on one runs directory at once (e.g. one per free core): a run being trained holds ``.run.lock`` in its
directory (:mod:`rcekd_train.lock`, the trainer's own lock), and the other queues leave it alone. The queue is a
thin layer over :func:`rcekd_train.runs.run_one`.
"""
from __future__ import annotations

import fnmatch
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from . import config as C
from .files import append_line, copy_file
from .lock import held_by_other, try_lock

FINISHED = ("early_stop", "max_epochs", "finished")


@dataclass(frozen=True)
class PlannedRun:
    """One run of the queue. ``sets`` are ``--set`` overrides on top of the packaged config (variants)."""

    name: str                 # directory name, e.g. "rcekd-mf-mf", "teacher-hstu"
    seed: int
    role: str                 # "teacher" or "student"
    model: str                # the backbone trained
    kd: str = "none"          # KD method ("none": a teacher or a scratch student)
    teacher: Optional[str] = None   # the teacher's backbone (distilled students)
    sets: Tuple[str, ...] = ()
    group: str = "table"      # "table" (Table 1) or "ablation" (Figure 3 and the package's variants)
    label: str = ""           # the row of the report

    @property
    def id(self) -> str:
        return f"{self.name}/seed_{self.seed}"

    def out(self, runs_dir: str) -> str:
        return os.path.join(runs_dir, self.name, f"seed_{self.seed}")

    @property
    def teacher_id(self) -> Optional[str]:
        return f"teacher-{self.teacher}/seed_{self.seed}" if self.teacher else None


#: (teacher backbone, student backbone, KD methods) of the paper's Table 1 rows run by the queue (issue 14,
#: item 2): every pair has its teacher and its scratch student too
TABLE_PAIRS = (
    ("mf", "mf", ("cd", "rrd", "dcd", "hetcomp", "rcekd")),
    ("lightgcn", "lightgcn", ("rcekd",)),
    ("hstu", "hstu", ("dcd", "rcekd")),
    ("lightgcn", "mf", ("rcekd",)),
    ("hstu", "mf", ("rcekd",)),
)
#: the ablations on MF->MF (item 3): (name suffix, --set overrides, label)
ABLATIONS = (
    ("no_split", ("kd.variant=no_split",), "RCE-KD w/o sep"),
    ("l1_only", ("kd.variant=l1_only",), "RCE-KD w/o S"),
    ("const_gamma", ("kd.variant=const_gamma",), "RCE-KD w/ const"),
    ("paper", ("kd.mode=paper",), "RCE-KD mode=paper"),
    ("batch", ("kd.refresh=batch",), "RCE-KD refresh=batch"),
)
METHOD_LABEL = {"cd": "CD", "rrd": "RRD", "dcd": "DCD", "hetcomp": "HetComp", "rcekd": "RCE-KD", "ce": "CE"}


def plan(seeds: Sequence[int], methods_available: Optional[Sequence[str]] = None) -> List[PlannedRun]:
    """Every run, seed by seed (the whole table of one seed before the next seed), and within a seed by
    teacher backbone, cheapest first: the MF teacher, the MF scratch student, the MF->MF rows and
    ablations; the LightGCN teacher, its scratch student, LightGCN->LightGCN and LightGCN->MF; the same
    for HSTU. A teacher always comes before the students that distil from it."""
    if methods_available is None:
        from .kd import METHODS
        methods_available = list(METHODS)
    runs = []
    for s in seeds:
        for tb in ("mf", "lightgcn", "hstu"):
            runs.append(PlannedRun(f"teacher-{tb}", s, "teacher", tb, label="Teacher"))
            runs.append(PlannedRun(f"student-{tb}", s, "student", tb, label="Student"))
            for t, st, methods in TABLE_PAIRS:
                if t != tb:
                    continue
                for k in methods:
                    if k in methods_available:
                        runs.append(PlannedRun(f"{k}-{t}-{st}", s, "student", st, k, t, label=METHOD_LABEL[k]))
            if tb == "mf":
                for suffix, sets, label in ABLATIONS:
                    runs.append(PlannedRun(f"rcekd_{suffix}-mf-mf", s, "student", "mf", "rcekd", "mf", tuple(sets),
                                           group="ablation", label=label))
    return runs


def select_runs(runs: List[PlannedRun], only: Optional[Sequence[str]]) -> List[PlannedRun]:
    """The runs whose id (``name/seed_<s>``) or name matches one of the glob patterns."""
    if not only:
        return list(runs)
    return [r for r in runs if any(fnmatch.fnmatch(r.id, p) or fnmatch.fnmatch(r.name, p) for p in only)]


def _finished_result(out: str) -> Optional[Dict]:
    """The result.json of a finished run in ``out``, else None."""
    try:
        with open(os.path.join(out, "result.json")) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    return res if isinstance(res, dict) and res.get("status") in FINISHED else None


def run_state(out: str, needs_weights: bool = False) -> Tuple[str, str]:
    """(state, detail) of a run directory: done / partial / todo. With ``needs_weights`` (a teacher, whose
    students load its ``best_model.pt``), a finished run's record without its weights (one imported from a
    results folder, :meth:`Queue.import_records`) is not done: it is trained again."""
    res = _finished_result(out)
    if res is not None:
        if needs_weights and not os.path.exists(os.path.join(out, "best_model.pt")):
            return "todo", "a recorded result without its weights (best_model.pt): trained again"
        return "done", f"best epoch {res.get('best_epoch')} of {res.get('epochs_run')}"
    if os.path.exists(os.path.join(out, "checkpoint.pt")):
        n = 0
        try:
            with open(os.path.join(out, "history.json")) as f:
                n = len(json.load(f))
        except (OSError, ValueError):
            pass
        return "partial", f"{n} epochs"
    return "todo", ""


def run_config(r: PlannedRun, dataset: str, runs_dir: str, data_dir: Optional[str], threads: Optional[int],
               device: Optional[str], max_minutes: Optional[float], extra_sets: Sequence[str] = ()) -> Dict:
    """The resolved config of a planned run (the packaged settings of its pair and method, then
    ``extra_sets`` of the command line, then the run's own variant settings)."""
    flags = {"seed": r.seed, "threads": threads, "device": device, "data_dir": data_dir,
             "train.max_minutes": max_minutes, "train.progress": False}
    cfg = C.resolve(dataset, r.role, r.model, kd_method=r.kd, teacher_model=r.teacher,
                    sets=list(extra_sets) + list(r.sets), flags=flags)
    if r.role == "teacher" and r.model == "mf" and not cfg["train"].get("keep_every"):
        cfg["train"]["keep_every"] = 10  # HetComp distils from the MF teacher's trajectory
    if r.teacher:
        cfg["teacher_dir"] = os.path.join(runs_dir, r.teacher_id)
    return cfg


#: where a teacher trained again keeps its imported record (result.json, history.csv, config.yaml, curves.png) until
#: the new result is there: ``rcekd collect`` reports the record meanwhile
RECORD_DIR = "record"
RECORD_FILES = ("result.json", "history.csv", "config.yaml", "curves.png")


#: relative difference of a metric below which a result trained again counts as its record up to rounding
#: (float sums in another order move a metric by a few units in the last place, about 1e-16 relative)
RECORD_RTOL = 1e-9


def _result_differences(record_path: str, res: Dict, rtol: float = RECORD_RTOL) -> Tuple[List[str], List[str]]:
    """What differs between a recorded result and a new one: (differences that matter: the best epoch, or a
    valid or test metric by more than ``rtol`` relative; the metrics that differ by at most ``rtol``)."""
    with open(record_path) as f:
        rec = json.load(f)
    real = [f"best epoch {rec.get('best_epoch')} -> {res.get('best_epoch')}"] \
        if rec.get("best_epoch") != res.get("best_epoch") else []
    rounding = []
    for split in ("valid", "test"):
        a, b = rec.get(split) or {}, res.get(split) or {}
        for m in sorted(set(a) | set(b)):
            x, y = a.get(m), b.get(m)
            if x == y:
                continue
            close = isinstance(x, (int, float)) and isinstance(y, (int, float)) and \
                abs(x - y) <= rtol * max(abs(x), abs(y))
            (rounding if close else real).append(f"{split} {m} {x} -> {y}")
    return real, rounding


def _record_verdict(rid: str, record_path: str, res: Dict) -> str:
    """The log line that compares a result trained again with its record."""
    real, rounding = _result_differences(record_path, res)
    head = f"{rid}: the result trained again against its recorded one ({RECORD_DIR}/result.json)"
    if real:
        return f"DIFFERENT {head}: " + ", ".join(real)
    if rounding:
        return (f"same to rounding {head}: the best epoch equal, {len(rounding)} metric(s) within "
                f"{RECORD_RTOL:g} relative (" + ", ".join(rounding) + "), the others equal")
    return f"same {head}: every metric and the best epoch equal"


class Queue:
    def __init__(self, dataset: str, seeds: Sequence[int], runs_dir: str, data_dir: Optional[str] = None,
                 only: Optional[Sequence[str]] = None, threads: Optional[int] = 1, device: Optional[str] = None,
                 max_minutes_per_run: Optional[float] = None, sets: Sequence[str] = (), out=sys.stdout,
                 wait_s: Optional[float] = 60.0):
        self.dataset, self.runs_dir, self.data_dir = dataset, runs_dir, data_dir
        self.wait_s = wait_s
        self.sets = list(sets)
        self.threads, self.device, self.max_minutes = threads, device, max_minutes_per_run
        from .runs import check_seeds
        check_seeds(seeds)
        self.all = plan(seeds)
        self.runs = select_runs(self.all, only)
        if only and not self.runs:
            raise ValueError(f"--only {list(only)} matches no run; run ids look like "
                             f"{self.all[0].id!r}, {self.all[-1].id!r}")
        for r in self.runs:  # a bad --set (an unknown key, a bad value) is refused now, not by every run later
            run_config(r, dataset, runs_dir, data_dir, threads, device, max_minutes_per_run, self.sets)
        self.print = lambda msg: print(msg, file=out, flush=True)

    # --- state --------------------------------------------------------------------------------
    def state(self, r: PlannedRun) -> Tuple[str, str]:
        return run_state(r.out(self.runs_dir), needs_weights=r.role == "teacher")

    def import_records(self, src: str) -> int:
        """Copies into the runs directory the records of finished runs kept in ``src`` (a folder laid out as
        ``<name>/seed_<s>/`` with result.json, history.csv, config.yaml, curves.png: the ``runs/`` folder that
        ``rcekd collect --runs-dir`` writes, e.g. ``results/citeulike/runs``), so that a queue started on a new
        machine continues the table instead of training again what is committed. Only selected runs that
        have nothing in the runs directory yet are imported, and only when the recorded config is the
        run's config now (the packaged settings may have changed since: then the run is trained again).
        A teacher's record has no weights, so the queue trains the teacher again when it comes to it (the
        record moves to ``record/``, which ``rcekd collect`` reports until the new result is there) and says
        whether the new result equals the recorded one. Returns the number of runs imported."""
        if not os.path.isdir(src):
            raise ValueError(f"--import-from {src}: no such folder (expected e.g. results/<dataset>/runs)")
        from .report import sanitize_config
        n = 0
        for r in self.runs:
            rec = os.path.join(src, r.name, f"seed_{r.seed}")
            if _finished_result(rec) is None:
                continue
            out = r.out(self.runs_dir)
            if any(os.path.exists(os.path.join(out, f)) for f in ("result.json", "checkpoint.pt")):
                continue  # never over what is here
            if not os.path.exists(os.path.join(rec, "config.yaml")):
                self.log(f"not imported {r.id}: {rec} has no config.yaml")
                continue
            planned = sanitize_config(run_config(r, self.dataset, self.runs_dir, self.data_dir, self.threads,
                                           self.device, self.max_minutes, self.sets))
            diffs = C.config_differences(C.load_yaml(os.path.join(rec, "config.yaml")), planned, C.NOT_RESULT_KEYS)
            if diffs:
                self.log(f"not imported {r.id}: its recorded config differs from the run's config now ("
                         + ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diffs[:5])
                         + (", ..." if len(diffs) > 5 else "") + "): it is trained again")
                continue
            os.makedirs(out, exist_ok=True)
            for f in ("config.yaml", "history.csv", "curves.png", "result.json"):  # result.json last
                if os.path.exists(os.path.join(rec, f)):
                    copy_file(os.path.join(rec, f), os.path.join(out, f))
            n += 1
            self.log(f"import {r.id} from {rec}" + (" (its weights are not recorded: trained again)"
                                                     if r.role == "teacher" else ""))
        return n

    def listing(self) -> str:
        lines = [f"plan for {self.dataset} in {self.runs_dir} ({len(self.runs)} runs)"]
        counts: Dict[str, int] = {}
        for i, r in enumerate(self.runs, 1):
            st, detail = self.state(r)
            counts[st] = counts.get(st, 0) + 1
            dep = f"  <- {r.teacher_id}" if r.teacher_id else ""
            lines.append(f"{i:3d}  {st:7s}  {r.id:34s} {r.group:8s} {detail}{dep}")
        lines.append("  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        return "\n".join(lines)

    def log(self, msg: str) -> None:
        os.makedirs(self.runs_dir, exist_ok=True)
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')}  {msg}"
        append_line(os.path.join(self.runs_dir, "reproduce.log"), line)
        self.print(line)

    # --- running ------------------------------------------------------------------------------
    def run_one(self, r: PlannedRun) -> str:
        from .runs import run_one
        out = r.out(self.runs_dir)
        cfg = run_config(r, self.dataset, self.runs_dir, self.data_dir, self.threads, self.device,
                         self.max_minutes, self.sets)
        os.makedirs(out, exist_ok=True)

        def log(msg):
            append_line(os.path.join(out, "train.log"), msg)
            self.print(f"  [{r.id}] {msg}")

        t0 = time.time()
        before = self.state(r)[0]
        record = os.path.join(out, RECORD_DIR, "result.json")
        if _finished_result(out) is not None:  # a teacher's imported record: kept aside, compared at the end
            os.makedirs(os.path.join(out, RECORD_DIR), exist_ok=True)
            for f in RECORD_FILES[1:] + RECORD_FILES[:1]:  # result.json last
                if os.path.exists(os.path.join(out, f)):
                    os.replace(os.path.join(out, f), os.path.join(out, RECORD_DIR, f))
        self.log(f"start  {r.id} ({before})")
        res = run_one(cfg, out, resume=True, log=log)
        status = res.get("status")
        self.log(f"end    {r.id}: {status}, {res.get('epochs_run', res.get('epoch'))} epochs, "
                 f"{time.time() - t0:.0f} s this time")
        if status in FINISHED and os.path.exists(record):
            self.log(_record_verdict(r.id, record, res))
        return status

    def blocked(self, r: PlannedRun) -> bool:
        return bool(r.teacher) and run_state(os.path.join(self.runs_dir, r.teacher_id), needs_weights=True)[0] != "done"

    def run(self) -> int:
        """Runs the selected runs in plan order until every one is done; with a per-run time limit it
        makes passes over the plan. A student waits for its teacher; a run that another live queue holds
        (its ``.run.lock``) is left to it, so several queues can share one runs directory (one per core).
        When nothing can progress but another queue holds runs, it waits ``wait_s`` seconds and looks
        again (``wait_s=None``: it returns). Returns the number of selected runs not done."""
        failed: Dict[str, str] = {}
        said = set()

        def say_once(key, msg):
            if key not in said:
                said.add(key)
                self.log(msg)

        while True:
            progressed = busy = False
            pending = [r for r in self.runs if self.state(r)[0] != "done" and r.id not in failed]
            if not pending:
                break
            for r in pending:
                if self.state(r)[0] == "done":
                    continue
                if self.blocked(r):
                    t_out = os.path.join(self.runs_dir, r.teacher_id)
                    why = ("failed" if r.teacher_id in failed else
                           "is being trained by another queue" if held_by_other(t_out) else "is not done")
                    busy |= held_by_other(t_out)
                    say_once(("wait", r.id, why), f"wait   {r.id}: its teacher {r.teacher_id} {why}"
                             + ("" if any(t.id == r.teacher_id for t in self.runs) else
                                " and is not selected (--only)"))
                    continue
                release = try_lock(r.out(self.runs_dir), log=self.log)
                if release is None:
                    busy = True
                    say_once(("busy", r.id), f"skip   {r.id}: another queue is running it")
                    continue
                try:
                    self.run_one(r)
                except Exception as e:  # one broken run must not stop the others
                    failed[r.id] = f"{type(e).__name__}: {e}"
                    self.log(f"FAILED {r.id}: {failed[r.id]}")
                finally:
                    release()
                progressed = True
            if not progressed:
                if busy and self.wait_s is not None:
                    time.sleep(self.wait_s)
                    continue
                break
        left = [r.id for r in self.runs if self.state(r)[0] != "done"]
        if not left:
            self.log(f"all {len(self.runs)} runs done")
        else:
            self.log(f"stopped with {len(left)} run(s) not done ({len(failed)} failed: "
                     f"{', '.join(failed) or '-'}); rerun the same command to continue")
        return len(left)
