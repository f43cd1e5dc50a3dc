"""The ``rcekd`` command: train teachers and students, distill, evaluate, fetch data, run the demo."""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

from . import parallel
from .memory import keep_freed_memory

EPILOG = """examples:
  rcekd demo                                   # synthetic data: teacher, scratch student, RCE-KD student
  rcekd download citeulike --data-dir DATA     # fetch + verify the public files (needs internet)
  rcekd train-teacher --dataset citeulike --model mf --data-dir DATA --out runs/cul/teacher-mf
  rcekd distill --dataset citeulike --student mf --kd none --data-dir DATA --out runs/cul/student-mf
  rcekd distill --dataset citeulike --student mf --kd rcekd --teacher runs/cul/teacher-mf \\
                --data-dir DATA --out runs/cul/rcekd-mf
  rcekd evaluate --run runs/cul/rcekd-mf --data-dir DATA
  rcekd collect runs/cul/teacher-mf runs/cul/student-mf runs/cul/rcekd-mf --out results/citeulike
  rcekd distill --nproc 2 ...                  # 2 processes on this machine (data parallel over users)
  torchrun --nproc-per-node 2 -m rcekd_train distill ...   # the same, launched by torchrun (docs/DISTRIBUTED.md)

Settings come from the packaged YAML files (rcekd_train/configs/: defaults.yaml and one file per data
set, with the authors' hyperparameters per backbone and teacher->student pair); any key can be
overridden with --set key.sub=value (e.g. --set model.dim=64 --set kd.K=100 --set train.lr=1e-3).
The data directory is --data-dir or $RCEKD_DATA (not needed for the synthetic data)."""


class Parser(argparse.ArgumentParser):
    """argparse with the errors of the command: one line ``rcekd: error: ...`` (and the command's --help)."""

    def error(self, message):
        sub = self.prog.partition(" ")[2]
        self.exit(2, f"rcekd: error: {sub + ': ' if sub else ''}{message} (see {self.prog} --help)\n")


def _debug_option():
    """--debug, accepted before and after the command: a failing command shows its traceback."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show its traceback too")
    return p


def _common(p, student=False):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="synthetic, citeulike, gowalla or yelp2018")
    g.add_argument("--data-dir", default=None, help="folder holding citeulike/, gowalla/, yelp2018/ "
                   "(default: $RCEKD_DATA)")
    g = p.add_argument_group("run")
    g.add_argument("--out", default=None, help="output directory (default runs/<dataset>/<job>)")
    g.add_argument("--config", default=None, help="a YAML file merged over the packaged config")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set model.dim=64")
    g.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    g.add_argument("--seeds", type=int, nargs="+", default=None,
                   help="run once per seed (in OUT/seed_<s>) and write summary.json/csv with mean and std")
    g.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1, ...")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default 1: fastest on a busy 2-core machine)")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out from its last "
                   "complete epoch (same result as an uninterrupted run)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (one line per epoch)")
    g.add_argument("--max-minutes", type=float, default=None,
                   help="end after this wall time, reporting the best epoch so far (--resume continues it)")
    g.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    g = p.add_argument_group("several processes (data parallel over users; docs/DISTRIBUTED.md)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train with N processes on this machine: relaunches this command under torchrun "
                   "(torchrun --standalone --nproc-per-node N -m rcekd_train ...); under torchrun, leave it out")
    g.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="how long a process waits for the others in a collective before it stops the run with an "
                   f"error (default ${parallel.TIMEOUT_ENV} or {parallel.DEFAULT_TIMEOUT_S:g})")
    g = p.add_argument_group("training (override the config)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--wd", type=float, default=None, help="Adam weight decay")
    g.add_argument("--patience", type=int, default=None, help="early stopping patience (epochs)")
    g.add_argument("--dim", type=int, default=None, help="embedding dimension of the model")
    if student:
        g = p.add_argument_group("distillation (override the config)")
        g.add_argument("--lambda", dest="lam", type=float, default=None, metavar="LAMBDA", help="weight of the KD loss")
        g.add_argument("--K", type=int, default=None, help="teacher/student top-K size")
        g.add_argument("--M", type=int, default=None, help="RCE-KD: student candidate pool size")
        g.add_argument("--L", type=int, default=None, help="number of sampled items")
        g.add_argument("--tau", type=float, default=None, help="logit temperature")
        g.add_argument("--T", type=float, default=None, help="sampling temperature")
        g.add_argument("--beta", type=float, default=None, help="RCE-KD: strength of the adaptive weight")
        g.add_argument("--mode", choices=["paper", "official"], default=None, help="RCE-KD: paper equations or "
                       "the authors' code")
        g.add_argument("--refresh", choices=["epoch", "batch"], default=None,
                       help="RCE-KD / CE: recompute the sets once per epoch (authors) or every batch")
        g.add_argument("--reduction", choices=["sum", "mean"], default=None, help="KD loss over users")
        g.add_argument("--variant", choices=["full", "no_split", "l1_only", "const_gamma"], default=None,
                       help="RCE-KD or one of its ablations (the paper's Figure 3: w/o sep, w/o S, w/ const; "
                       "the constant is kd.gamma)")


def build_parser():
    p = Parser(prog="rcekd", description="Training drivers for RCE-KD (knowledge distillation for recommender "
               "systems): MF, LightGCN, HSTU; RCE-KD, CE, CD, RRD, DCD, HetComp.", epilog=EPILOG,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="on an error, show its traceback too")
    debug = _debug_option()
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, **kwargs):
        return sub.add_parser(name, parents=[debug], **kwargs)


    d = command("demo", help="synthetic data: teacher, scratch student and RCE-KD student, table",
                       description="Trains on the built-in synthetic data (configs/synthetic.yaml) a teacher, a "
                       "student from scratch and an RCE-KD student, and prints their test metrics.")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--seeds", type=int, nargs="+", default=None, help="several seeds: mean and std")
    d.add_argument("--device", default=None)
    d.add_argument("--threads", type=int, default=None)
    d.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of all three runs, e.g. --set train.epochs=5")
    d.add_argument("--no-progress", action="store_true")

    t = command("train-teacher", help="train a teacher; caches its top-K lists",
                       description="Trains a teacher backbone with early stopping, saves its best weights and its "
                       "top-K items per user (teacher_topk.pt) for distillation.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    t.add_argument("--model", required=True, choices=["mf", "lightgcn", "hstu"])
    t.add_argument("--keep-every", type=int, default=None, metavar="E",
                   help="also keep the weights every E epochs in OUT/trajectory/ (train.keep_every; HetComp "
                   "distils from this trajectory)")
    _common(t)

    s = command("distill", help="train a student, from scratch (--kd none) or distilled from a teacher",
                       description="Trains a student with base loss + lambda * KD loss. --kd none trains it from "
                       "scratch (the student's own settings); other methods need --teacher.")
    s.add_argument("--student", required=True, choices=["mf", "lightgcn", "hstu"])
    s.add_argument("--kd", default="rcekd", choices=["none", "rcekd", "ce", "cd", "rrd", "dcd", "hetcomp"])
    s.add_argument("--teacher", default=None, help="teacher run directory (from train-teacher)")
    _common(s, student=True)

    e = command("evaluate", help="evaluate a trained run (its best weights)",
                       description="Full-ranking Recall/NDCG of the best weights of a run directory.")
    e.add_argument("--run", "--run-dir", dest="run", required=True,
                   help="a run directory (with config.yaml and best_model.pt); --run-dir under torchrun, whose "
                   "parser takes --run for its own --run-path")
    e.add_argument("--data-dir", default=None)
    e.add_argument("--splits", nargs="+", default=["valid", "test"])
    e.add_argument("--ks", type=int, nargs="+", default=[10, 20])
    e.add_argument("--device", default=None)
    e.add_argument("--json", action="store_true", help="print JSON")
    e.add_argument("--convention", choices=["ours", "authors"], default=None,
                   help="how metrics are averaged over users (default: the run's train.metric_convention): ours = "
                   "over the users with items in the split; authors = their code (users without items count as 0)")

    w = command("download", help="fetch the public data files and verify their sha256",
                       description="Downloads CiteULike (users.dat, then writes split_811/), Gowalla and "
                       "Yelp2018 (LightGCN files) into DATA_DIR/<name>/ and checks their sha256.")
    w.add_argument("datasets", nargs="+", choices=["citeulike", "gowalla", "yelp2018"])
    w.add_argument("--data-dir", default=None, help="target folder (default: $RCEKD_DATA)")
    w.add_argument("--force", action="store_true", help="download even when a verified copy exists")
    w.add_argument("--verify", action="store_true", help="only check the files already there")
    q = command("reproduce", help="the resumable queue of every run of the paper's Table 1 and ablations",
                       description="Runs every run of the paper's Table 1 on one data set (teachers, scratch "
                       "students, CD, RRD, DCD, HetComp, RCE-KD per pair) and the Figure 3 ablations, for each "
                       "seed, in RUNS_DIR/<run>/seed_<s>. Finished runs are skipped and interrupted ones "
                       "resumed: kill it at any moment and start the same command again. A student of seed s "
                       "distils from the teacher of seed s. Progress: RUNS_DIR/reproduce.log.")
    q.add_argument("--dataset", required=True)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    q.add_argument("--runs-dir", required=True, help="where the runs live (e.g. runs/citeulike/table)")
    q.add_argument("--data-dir", default=None)
    q.add_argument("--list", action="store_true", help="print the plan with each run's state and exit")
    q.add_argument("--only", nargs="+", default=None, metavar="GLOB",
                   help="only the runs whose id (NAME/seed_S) or name matches, e.g. 'teacher-*' '*/seed_0'")
    q.add_argument("--max-minutes-per-run", type=float, default=None, metavar="N",
                   help="give each run at most N minutes per pass (it is resumed in the next pass)")
    q.add_argument("--import-from", default=None, metavar="DIR",
                   help="first copy the records of finished runs kept in DIR (the runs/ folder of a committed "
                        "report, e.g. results/citeulike/runs) into RUNS_DIR, where RUNS_DIR has nothing for them "
                        "and their config is the run's config now; a teacher's record has no weights, so the "
                        "teacher is trained again (and compared with its record) before its students")
    q.add_argument("--threads", type=int, default=1)
    q.add_argument("--device", default=None)
    q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key of every run (changes the results; for tests and trials)")
    c = command("collect", help="gather finished runs into a small results folder (or the paper-layout "
                       "report of a reproduce queue)",
                       description="Copies result.json, history.csv, curves.png and the config of finished runs "
                       "into OUT/<run>/ and writes OUT/summary.{csv,json,md}; no checkpoints, no machine paths. "
                       "With --runs-dir (the folder of `rcekd reproduce`): the paper's Table 1 layout, mean ± std "
                       "over seeds, the paper's values beside ours with the relative difference, a paired t-test "
                       "of RCE-KD against the best baseline per pair, the ablation table and a bar plot "
                       "(OUT/summary.{md,csv,json,png}, the runs' files in OUT/runs/).")
    c.add_argument("runs", nargs="*", help="run directories")
    c.add_argument("--runs-dir", default=None, help="the --runs-dir of `rcekd reproduce`: the paper-layout report")
    c.add_argument("--dataset", default=None, help="with --runs-dir: the data set (the paper's values to compare)")
    c.add_argument("--seeds", type=int, nargs="+", default=None, help="with --runs-dir: only these seeds")
    c.add_argument("--no-copy", action="store_true", help="with --runs-dir: do not copy the runs' files")
    c.add_argument("--out", required=True, help="results folder, e.g. results/citeulike")
    return p


def _flags(a, student=False):
    f = {"seed": a.seed, "device": a.device, "threads": a.threads, "data_dir": a.data_dir,
         "train.epochs": a.epochs, "train.batch_size": a.batch_size, "train.lr": a.lr, "train.wd": a.wd,
         "train.patience": a.patience, "model.dim": a.dim, "train.max_minutes": a.max_minutes,
         "train.stop_after": a.stop_after}
    if a.no_progress:
        f["train.progress"] = False
    if student:
        f.update({"kd.lambda": a.lam, "kd.K": a.K, "kd.M": a.M, "kd.L": a.L, "kd.tau": a.tau, "kd.T": a.T,
                  "kd.beta": a.beta, "kd.mode": a.mode, "kd.refresh": a.refresh, "kd.reduction": a.reduction,
                  "kd.variant": a.variant})
    return f


def _user_config(path):
    return path or None  # config.resolve reads it (and names it in its messages)


def cmd_train_teacher(a):
    from .config import resolve
    from .runs import run_seeds
    flags = _flags(a)
    flags["train.keep_every"] = a.keep_every
    cfg = resolve(a.dataset, "teacher", a.model, user_config=_user_config(a.config), sets=a.sets, flags=flags)
    out = a.out or os.path.join("runs", cfg["dataset"], f"teacher-{a.model}")
    return _train(a, cfg, out, run_seeds)


def _train(a, cfg, out, run_seeds) -> int:
    """Runs the configured training, in this process or, under torchrun, as one rank of the run (rank 0 prints the
    result). ``a.check_only``: the command's arguments and config are checked, nothing runs (``--nproc``, before
    it launches the processes)."""
    if getattr(a, "check_only", False):
        return 0
    with parallel.session(cfg.get("device"), a.dist_timeout) as par:
        res = run_seeds(cfg, out, a.seeds, a.resume)
        if par.is_writer:
            print(json.dumps({k: res.get(k) for k in ("status", "best_epoch", "test") if k in res} if not a.seeds
                             else res, indent=1))
    return 0


def cmd_distill(a):
    from .config import load_yaml, resolve
    from .runs import run_seeds
    teacher_model = None
    if a.kd != "none":
        if not a.teacher:
            raise ValueError(f"--kd {a.kd} needs --teacher RUN_DIR (train one with `rcekd train-teacher`)")
        tcfg = os.path.join(a.teacher, "config.yaml")
        if not os.path.exists(tcfg):
            raise FileNotFoundError(f"{tcfg} not found (is --teacher a train-teacher output?)")
        teacher_model = load_yaml(tcfg)["model"]["name"]
    cfg = resolve(a.dataset, "student", a.student, kd_method=a.kd, teacher_model=teacher_model,
                  user_config=_user_config(a.config), sets=a.sets, flags=_flags(a, student=True))
    if a.kd != "none":
        cfg["teacher_dir"] = a.teacher
    name = f"student-{a.student}" if a.kd == "none" else f"{a.kd}-{teacher_model}-{a.student}"
    out = a.out or os.path.join("runs", cfg["dataset"], name)
    return _train(a, cfg, out, run_seeds)


def cmd_evaluate(a):
    from .config import load_yaml
    from .evaluate import evaluate_model
    from .files import load_torch
    from .models import build_model, model_hparams
    from .runs import get_data
    cfg = load_yaml(os.path.join(a.run, "config.yaml"))
    if a.data_dir:
        cfg["data_dir"] = a.data_dir
    data = get_data(cfg)
    saved = load_torch(os.path.join(a.run, "best_model.pt"), "weights file", ("state",))
    model = build_model(cfg["model"]["name"], data, **model_hparams(cfg))
    model.load_state_dict(saved["state"])
    conv = a.convention or cfg.get("train", {}).get("metric_convention", "ours")
    with parallel.session(a.device or cfg.get("device")) as par:  # under torchrun: the users split, reduced
        model.to(par.device(a.device or cfg.get("device")))
        res = evaluate_model(model, data, tuple(a.ks), tuple(a.splits), convention=conv, par=par)
    if not par.is_writer:
        return 0
    if a.json:
        print(json.dumps({"run": a.run, "epoch": saved.get("epoch"), "metric_convention": conv, **res}, indent=1))
    else:
        print(f"{a.run} (best epoch {saved.get('epoch')}, metrics averaged by the {conv!r} convention)")
        for split, ms in res.items():
            print(f"  {split:5s} " + "  ".join(f"{m} {v:.4f}" for m, v in ms.items()))
    return 0


def cmd_download(a):
    from .data import resolve_data_dir
    from .data.download import download, verify
    root = resolve_data_dir(a.data_dir)
    status = 0
    for name in a.datasets:
        if a.verify:
            res = verify(name, root)
            for f, s in res.items():
                print(f"{name}/{f}: {s}")
            status |= any(s != "ok" for s in res.values())
        else:
            download(name, root, force=a.force)
    return int(status)


def cmd_collect(a):
    from .report import collect, table_report
    if a.runs_dir:
        if a.runs:
            raise ValueError("give either run directories or --runs-dir, not both")
        if not a.dataset:
            raise ValueError("--runs-dir needs --dataset (whose paper values to put beside ours)")
        rep = table_report(a.runs_dir, a.dataset, a.out, seeds=a.seeds, copy_runs=not a.no_copy)
        print(f"report of {sum(r['n'] for e in rep['table1'].values() for r in e['rows'].values())} table "
              f"run(s) (seeds {rep['seeds']}) in {a.out}/summary.md")
        return 0
    if not a.runs:
        raise ValueError("give run directories, or --runs-dir DIR --dataset NAME")
    rows = collect(a.runs, a.out)
    print(f"collected {len(rows)} run(s) into {a.out}")
    return 0 if rows else 1


def cmd_reproduce(a):
    from .reproduce import Queue
    q = Queue(a.dataset, a.seeds, a.runs_dir, data_dir=a.data_dir, only=a.only, threads=a.threads,
              device=a.device, max_minutes_per_run=a.max_minutes_per_run, sets=a.sets)
    if a.import_from:
        n = q.import_records(a.import_from)
        print(f"imported {n} finished run(s) from {a.import_from}")
    if a.list:
        print(q.listing())
        return 0
    return 0 if q.run() == 0 else 1


def cmd_demo(a):
    from .config import resolve
    from .runs import check_seeds, format_table, run_seeds
    t_start = time.time()
    flags = {"device": a.device, "threads": a.threads}
    if a.no_progress:
        flags["train.progress"] = False
    seeds = a.seeds
    check_seeds(seeds)
    base = {"seed": a.seed}
    teacher = resolve("synthetic", "teacher", "mf", sets=a.sets, flags={**flags, **base})
    scratch = resolve("synthetic", "student", "mf", kd_method="none", sets=a.sets, flags={**flags, **base})
    rcekd = resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf", sets=a.sets,
                    flags={**flags, **base})
    rows = []
    if seeds:
        # one teacher per seed, students distilled from the teacher of the same seed
        import copy
        per = {"teacher": [], "student (scratch)": [], "student (RCE-KD)": []}
        for s in seeds:
            out = os.path.join(a.out, f"seed_{s}")
            for name, cfg, sub in (("teacher", teacher, "teacher"), ("student (scratch)", scratch, "scratch"),
                                   ("student (RCE-KD)", rcekd, "rcekd")):
                c = copy.deepcopy(cfg)
                c["seed"] = s
                if sub == "rcekd":
                    c["teacher_dir"] = os.path.join(out, "teacher")
                per[name].append(run_seeds(c, os.path.join(out, sub), None))
        from .runs import summarize
        rows = [{"name": n, "result": summarize(r, seeds)} for n, r in per.items()]
    else:
        res_t = run_seeds(teacher, os.path.join(a.out, "teacher"), None)
        res_s = run_seeds(scratch, os.path.join(a.out, "scratch"), None)
        rcekd["teacher_dir"] = os.path.join(a.out, "teacher")
        res_k = run_seeds(rcekd, os.path.join(a.out, "rcekd"), None)
        rows = [{"name": "teacher (MF dim %d)" % teacher["model"]["dim"], "result": res_t},
                {"name": "student (MF dim %d, scratch)" % scratch["model"]["dim"], "result": res_s},
                {"name": "student (MF dim %d, RCE-KD)" % rcekd["model"]["dim"], "result": res_k}]
    table = format_table(rows)
    print()
    print(f"demo on synthetic data, test split (full ranking, train items masked); total {time.time() - t_start:.0f}s")
    print(table)
    from .files import write_text
    write_text(os.path.join(a.out, "demo_table.txt"), table + "\n")
    return 0


#: the commands that run under torchrun (several processes); the others run in one
PARALLEL_COMMANDS = ("train-teacher", "distill", "evaluate")


def main(argv=None) -> int:
    try:
        return _main(argv)
    finally:
        if parallel.launched():
            # an error's traceback kept the trainer (and its DistributedDataParallel, which holds the process
            # group) alive past the session: freed here, while the interpreter is alive (see Distributed.close)
            gc.collect()


def _main(argv=None) -> int:
    keep_freed_memory()  # the next step reuses the freed pages of the last one (rcekd_train/memory.py)
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parser.parse_args(argv)
    if not a.command:
        parser.print_help()
        return 0
    fn = {"demo": cmd_demo, "train-teacher": cmd_train_teacher, "distill": cmd_distill, "evaluate": cmd_evaluate,
          "download": cmd_download, "collect": cmd_collect, "reproduce": cmd_reproduce}[a.command]
    where = ""
    if parallel.launched():
        where = f"rank {os.environ.get('RANK', '?')}/{os.environ.get('WORLD_SIZE')}: "
    try:
        nproc = getattr(a, "nproc", None)
        if parallel.launched():
            if a.command not in PARALLEL_COMMANDS:
                raise ValueError(f"rcekd {a.command} runs in one process; under torchrun run "
                                 f"{', '.join(PARALLEL_COMMANDS)}")
            if nproc is not None:
                raise ValueError("--nproc launches torchrun itself: leave it out under torchrun")
        elif nproc is not None:
            if nproc < 1:
                raise ValueError(f"--nproc must be >= 1, got {nproc}")
            if nproc > 1:
                a.check_only = True
                fn(a)  # a bad argument or config is one error here, not one per process
                return launch(argv, nproc, bool(getattr(a, "debug", False)))
        return fn(a)
    except KeyboardInterrupt:
        print(f"\nrcekd: {where}interrupted; the last complete epoch is checkpointed: rerun with --resume",
              file=sys.stderr)
        return 130
    except Exception as e:  # every error is one line (the traceback with --debug)
        if getattr(a, "debug", False):
            traceback.print_exc()
        line = error_line(e)
        print(f"rcekd: error: {'' if line.startswith('rank ') else where}{line}", file=sys.stderr)
        return 2


def without_nproc(argv):
    """The command line without its ``--nproc N`` / ``--nproc=N`` (what the launched processes run)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--nproc":
            skip = True
        elif not x.startswith("--nproc="):
            out.append(x)
    if build_parser().parse_args(out).__dict__.get("nproc") is not None:
        raise ValueError("write --nproc N in full (an abbreviation of it cannot be taken out of the command line)")
    return out


def launch(argv, nproc: int, debug: bool = False) -> int:
    """``--nproc N``: this command in N processes on this machine, launched by torchrun's launcher
    (``torch.distributed.run``: ``--standalone --nproc-per-node N -m rcekd_train ARGS``, no restarts); its status is
    that of the first process that failed (its error line is printed by that process), 0 when all succeed."""
    import logging

    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    child = without_nproc(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # (torchrun's default too, without its warning)
    if "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
        os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # one machine: the processes talk over the loopback interface
    if not debug:  # the launcher's own log lines repeat the processes' errors
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = torchrun.parse_args(["--standalone", "--nproc-per-node", str(nproc), "--max-restarts", "0",
                                "--monitor-interval", "0.2", "-m", "rcekd_train"])
    # given to the processes as they are: torchrun's own parser would take an option of ours that abbreviates
    # one of its own (evaluate's --run for its --run-path) as its own
    args.training_script_args = child
    try:
        torchrun.run(args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        code = failure.exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        raise RuntimeError(f"process {rank} of {nproc} {how} (its error, if any, is above) and the others were "
                           f"stopped") from None
    return 0


#: the errors whose message says it all (the drivers' own, the system's, torch's); others are named by their type
MESSAGE_ERRORS = (ValueError, OSError, RuntimeError)


def error_line(e: BaseException) -> str:
    """An exception as one line: its message (lines joined by '; '); an unexpected one with its type, and
    that --debug shows where it came from."""
    msg = "; ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    if not isinstance(e, MESSAGE_ERRORS):
        msg = f"{type(e).__name__}: {msg} (unexpected: --debug shows where)"
    return msg


if __name__ == "__main__":
    raise SystemExit(main())
