"""The packaged configs hold the authors' values; per-method training settings; config checks."""
import os

import pytest
import yaml

from rcekd_train.config import CONFIG_DIR, resolve


def test_citeulike_values_named_in_issue_14():
    # HSTU teacher and student: woriazzc/RCEKD configs/citeulike/hstu/{base_config,scratch}.yaml
    t = resolve("citeulike", "teacher", "hstu")
    assert {k: t["model"][k] for k in ("dim", "blocks", "heads", "attn_dim", "num_negatives")} == \
        {"dim": 64, "blocks": 8, "heads": 4, "attn_dim": 8, "num_negatives": 512}
    assert (t["train"]["batch_size"], t["train"]["wd"]) == (128, 1e-5)
    s = resolve("citeulike", "student", "hstu", kd_method="none")
    assert {k: s["model"][k] for k in ("dim", "blocks", "heads")} == {"dim": 64, "blocks": 1, "heads": 2}
    assert s["train"]["batch_size"] == 128
    # HSTU->HSTU RCE-KD: configs/citeulike/hstu/rcekd.yaml [hstu]
    k = resolve("citeulike", "student", "hstu", kd_method="rcekd", teacher_model="hstu")
    assert (k["kd"]["lambda"], k["kd"]["M"], k["kd"]["beta"], k["train"]["batch_size"]) == (5, 200, 3, 512)
    # LightGCN student from scratch: configs/citeulike/lightgcn/scratch.yaml [student]
    assert resolve("citeulike", "student", "lightgcn", kd_method="none")["train"]["wd"] == 1e-3


@pytest.mark.parametrize("dataset", ["citeulike", "gowalla", "yelp2018"])
def test_hstu_is_the_model_the_authors_code_computes(dataset):
    # woriazzc/RCEKD modeling/backbone/sequential_backbone.py: generate_user_embeddings passes
    # all_timestamps=None to HSTUJagged, and hstu_base_module.py adds the relative bias only when
    # all_timestamps is not None: enable_relative_attention_bias: True builds the module, adds nothing.
    # Its LocalNegativesSampler draws num_negatives items for each position (positive_ids.size() + (R,)).
    runs = [resolve(dataset, "teacher", "hstu"), resolve(dataset, "student", "hstu", kd_method="none"),
            resolve(dataset, "student", "hstu", kd_method="rcekd", teacher_model="hstu")]
    for cfg in runs:
        assert (cfg["model"]["rel_bias"], cfg["model"]["negatives"]) == (False, "position")
    # the packaged defaults keep the earlier behaviour (a shared draw, the bias)
    d = resolve("synthetic", "teacher", "hstu")["model"]
    assert (d["rel_bias"], d["negatives"]) == (True, "batch")


def test_per_method_training_settings_of_a_pair():
    # the authors tune weight decay per method: MF->MF RCE-KD 1e-5, CD 1e-8, CE 1e-7, HetComp 1e-3
    wd = {m: resolve("citeulike", "student", "mf", kd_method=m, teacher_model="mf")["train"]["wd"]
          for m in ("rcekd", "cd", "ce", "rrd", "dcd")}
    assert wd == {"rcekd": 1e-5, "cd": 1e-8, "ce": 1e-7, "rrd": 1e-5, "dcd": 1e-5}
    # the "train:" of a method section is not a KD hyperparameter
    cfg = resolve("citeulike", "student", "mf", kd_method="cd", teacher_model="mf")
    assert "train" not in cfg["kd"] and cfg["kd"]["pool"] == 3000 and cfg["kd"]["guide"] == "student"
    # a method the authors did not tune for a pair: the student's own settings and the kd defaults
    other = resolve("citeulike", "student", "lightgcn", kd_method="dcd", teacher_model="lightgcn")
    assert other["train"]["wd"] == 1e-3 and other["kd"]["pool"] == 100
    # explicit flags still win
    cfg = resolve("citeulike", "student", "mf", kd_method="rcekd", teacher_model="mf", flags={"train.wd": 0.5})
    assert cfg["train"]["wd"] == 0.5


def test_every_packaged_config_resolves_and_builds(tmp_path):
    """Every (pair, method) section of every data set resolves, and its kd section is accepted by the method
    (unknown hyperparameters would raise); every teacher/student model section is accepted by the model."""
    from rcekd_train.kd import METHODS
    from rcekd_train.models import model_args
    for fname in sorted(os.listdir(CONFIG_DIR)):
        ds = yaml.safe_load(open(os.path.join(CONFIG_DIR, fname)))
        if fname == "defaults.yaml":
            continue
        name = ds["dataset"]
        for role in ("teacher", "student"):
            for model in ds.get(role, {}):
                cfg = resolve(name, role, model, kd_method="none")
                assert set(cfg["model"]) - {"name"} <= set(model_args(model)), (fname, role, model)
        for pair, sec in ds.get("distill", {}).items():
            t, s = pair.split("->")
            for method in sec:
                if method in ("train", "model"):
                    continue
                cfg = resolve(name, "student", s, kd_method=method, teacher_model=t)
                hp = {k: v for k, v in cfg["kd"].items() if k not in ("method", "lambda")}
                unknown = set(hp) - set(METHODS[method].defaults)
                assert not unknown, (fname, pair, method, unknown)


@pytest.mark.parametrize("key,value,words", [
    ("train.metric_convention", "paper", "metric_convention"),
    ("train.keep_every", 0, "keep_every"),
    ("train.keep_epochs", "[0, 3]", "keep_epochs"),
])
def test_bad_train_options_are_named(key, value, words):
    with pytest.raises(ValueError, match=words):
        resolve("synthetic", "teacher", "mf", sets=[f"{key}={value}"])


# --- invalid values are refused when the configuration is built (issue 11, item 5) ---------------------------------
@pytest.mark.parametrize("role,model,method,item,words", [
    ("teacher", "mf", "none", "model.dim=0", "model.dim must be a positive integer, got 0"),
    ("teacher", "lightgcn", "none", "model.dim=-3", "model.dim must be a positive integer, got -3"),
    ("teacher", "hstu", "none", "model.heads=0", "model.heads must be a positive integer"),
    ("teacher", "hstu", "none", "model.dropout=1.0", r"model.dropout must be a number in \[0, 1\)"),
    ("teacher", "hstu", "none", "model.negatives=shared",
     r"model.negatives must be one of \['position', 'batch'\]"),
    ("teacher", "mf", "none", "train.lr=-0.001", "train.lr must be a finite number > 0, got -0.001"),
    ("teacher", "mf", "none", "train.lr=nan", "train.lr must be a finite number > 0, got nan"),
    ("teacher", "mf", "none", "train.lr=.inf", "train.lr must be a finite number > 0, got inf"),
    ("teacher", "mf", "none", "train.wd=-1", "train.wd must be a finite number >= 0"),
    ("teacher", "mf", "none", "train.max_minutes=-5", "train.max_minutes must be a finite number >= 0 or null"),
    ("teacher", "mf", "none", "train.max_minutes=nan", "train.max_minutes must be a finite number >= 0 or null"),
    ("teacher", "mf", "none", "train.batch_size=0", "train.batch_size must be a positive integer"),
    ("teacher", "mf", "none", "train.epochs=2.5", "train.epochs must be an integer >= 0"),
    ("teacher", "mf", "none", "train.patience=true", "train.patience must be a positive integer, got True"),
    ("teacher", "mf", "none", "train.nonfinite=ignore", r"train.nonfinite must be one of \['error', 'skip'\]"),
    ("teacher", "mf", "none", "train.early_stop_metric=ndcg@5", "train.early_stop_metric must be one of"),
    ("teacher", "mf", "none", "teacher_topk=0", "teacher_topk must be a positive integer"),
    ("student", "mf", "rcekd", "kd.lambda=-1", "kd.lambda must be a finite number >= 0, got -1"),
    ("student", "mf", "rcekd", "kd.lambda=nan", "kd.lambda must be a finite number >= 0, got nan"),
    ("student", "mf", "rcekd", "kd.K=0", "kd.K must be a positive integer, got 0"),
    ("student", "mf", "rcekd", "kd.tau=0", "kd.tau must be a finite number > 0"),
    ("student", "mf", "rcekd", "kd.T=1e9", r"kd \(rcekd\): T must lie in"),        # the loss package's range
    ("student", "mf", "rcekd", "kd.mode=papers", r"kd.mode must be one of \['paper', 'official'\]"),
    ("student", "mf", "cd", "kd.L=200", r"kd \(cd\): need L <= pool, got L=200, pool=100"),
    ("student", "mf", "rrd", "kd.K=500", r"kd \(rrd\): need K <= pool"),
])
def test_invalid_values_are_refused_when_the_config_is_built(role, model, method, item, words):
    with pytest.raises(ValueError, match=words):
        resolve("synthetic", role, model, kd_method=method, teacher_model="mf", sets=[item])


def test_flags_are_checked_too():
    with pytest.raises(ValueError, match="train.lr must be a finite number > 0, got -1.0"):
        resolve("synthetic", "teacher", "mf", flags={"train.lr": -1.0})
    with pytest.raises(ValueError, match="model.dim must be a positive integer, got 0"):
        resolve("synthetic", "teacher", "mf", flags={"model.dim": 0})


def test_a_config_changed_after_resolve_is_checked_by_the_trainer(tmp_path):
    from rcekd_train.runs import get_data
    from rcekd_train.trainer import Trainer
    cfg = resolve("synthetic", "teacher", "mf", sets=["data.num_users=50", "data.num_items=40",
                                                      "data.max_items=20", "data.mean_items=8", "data.min_items=5"])
    bad = dict(cfg, train=dict(cfg["train"], lr=float("nan")))
    with pytest.raises(ValueError, match="train.lr must be a finite number > 0, got nan"):
        Trainer(bad, get_data(cfg), str(tmp_path))


# --- unknown keys: refused with the valid keys and a "did you mean" ------------------------------------------------
@pytest.mark.parametrize("item,guess,section", [
    ("train.lrr=1", "train.lr", "train"),
    ("train.patiense=3", "train.patience", "train"),
    ("model.dimm=8", "model.dim", "model"),
    ("kd.bta=2", "kd.beta", "kd"),
    ("lr=0.1", "train.lr", "a config"),        # a key of another section
    ("dat.num_users=5", "data", "a config"),
])
def test_unknown_set_keys_are_refused_with_a_suggestion(item, guess, section):
    with pytest.raises(ValueError) as e:
        resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf", sets=[item])
    msg = str(e.value)
    key = item.split("=")[0] if not item.startswith("dat.") else "dat"  # the first unknown part is named
    assert f"unknown config key {key!r} (--set {item})" in msg
    assert f"did you mean {guess!r}?" in msg and f"the valid keys of {section} are: " in msg
    if section == "train":
        assert "batch_size, early_stop_metric, epochs" in msg  # the valid keys, listed


def test_keys_of_another_model_or_method_are_refused():
    with pytest.raises(ValueError, match=r"unknown config key 'model.max_len' \(--set model.max_len=10\)"):
        resolve("synthetic", "teacher", "mf", sets=["model.max_len=10"])    # an HSTU key on MF
    with pytest.raises(ValueError, match=r"unknown config key 'kd.pool' \(--set kd.pool=20\)"):
        resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf", sets=["kd.pool=20"])
    # a run without distillation takes any method's keys (the demo and the queue share --set over their runs)
    assert resolve("synthetic", "teacher", "mf", sets=["kd.K=5"])["kd"]["K"] == 5
    with pytest.raises(ValueError, match=r"train \(--set train=3\) is a section: it must hold keys \(batch_size"):
        resolve("synthetic", "teacher", "mf", sets=["train=3"])
    with pytest.raises(ValueError, match=r"train.lr \(--set train.lr.x=3\) is a value, not a section: it has no"):
        resolve("synthetic", "teacher", "mf", sets=["train.lr.x=3"])


@pytest.mark.parametrize("text,key,guess", [
    ("trian:\n  lr: 0.1\n", "trian", "train"),
    ("train:\n  lr: 0.1\n  pateince: 3\n", "train.pateince", "train.patience"),
    ("teacher:\n  mf:\n    modle:\n      dim: 3\n", "teacher.mf.modle", "teacher.mf.model"),   # ignored before
    ("models:\n  mf:\n    dimm: 3\n", "models.mf.dimm", "models.mf.dim"),
    ("distill:\n  mf->mf:\n    rcekd:\n      lamda: 3\n", "distill.mf->mf.rcekd.lamda", "distill.mf->mf.rcekd.lambda"),
    ("distill:\n  mf->mf:\n    rcekdd:\n      K: 3\n", "distill.mf->mf.rcekdd", "distill.mf->mf.rcekd"),
    ("kd:\n  rcekd:\n    KK: 3\n", "kd.rcekd.KK", "kd.rcekd.K"),
    ("zzz: 1\n", "zzz", None),
])
def test_unknown_yaml_keys_are_refused_naming_the_file(tmp_path, text, key, guess):
    path = tmp_path / "my.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as e:
        resolve("synthetic", "student", "mf", kd_method="rcekd", teacher_model="mf", user_config=str(path))
    msg = str(e.value)
    assert f"unknown config key {key!r} (in {path})" in msg
    assert (f"did you mean {guess!r}?" in msg) if guess else "did you mean" not in msg


def test_a_resolved_config_file_is_checked_against_its_run(tmp_path):
    cfg = resolve("synthetic", "teacher", "mf")
    import yaml as _yaml
    cfg["train"]["pateince"] = 3
    path = tmp_path / "config.yaml"
    path.write_text(_yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match=rf"unknown config key 'train.pateince' \(in {path}\); did you mean "
                                         r"'train.patience'\?"):
        resolve("synthetic", "teacher", "mf", user_config=str(path))
    del cfg["train"]["pateince"]
    path.write_text(_yaml.safe_dump(cfg))
    assert resolve("synthetic", "teacher", "mf", user_config=str(path))["train"] == cfg["train"]


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: [1, 2\n")
    with pytest.raises(ValueError, match=rf"{path}, line \d+, column \d+: not valid YAML"):
        resolve("synthetic", "teacher", "mf", user_config=str(path))
    path.write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(ValueError, match=rf"{path}: not a UTF-8 text file"):
        resolve("synthetic", "teacher", "mf", user_config=str(path))


def test_a_key_added_later_reads_as_what_older_records_did():
    """A record made before model.init existed (HSTU) is the same config as init=normal, not as xavier."""
    from rcekd_train.config import config_differences
    new = {"model": {"name": "hstu", "dim": 8, "init": "normal"}, "seed": 0}
    old = {"model": {"name": "hstu", "dim": 8}, "seed": 0}
    assert config_differences(old, new) == [] and config_differences(new, old) == []
    xav = {"model": {"name": "hstu", "dim": 8, "init": "xavier"}, "seed": 0}
    assert config_differences(old, xav) == [("model.init", None, "xavier")]
    # another model never has the key: no difference either way; a real difference is still one
    assert config_differences({"model": {"name": "mf"}}, {"model": {"name": "mf"}}) == []
    assert config_differences(old, {**new, "seed": 1}) == [("seed", 0, 1)]


def _walk(cfg, dotted):
    for k in dotted.split("."):
        cfg = cfg[k]
    return cfg


def test_marked_ours_finds_keys_values_and_reasons(tmp_path):
    """The ``# ours`` settings of a YAML file: dotted key path through nested block mappings, the value as
    written, the comment with its continuation lines; other comments and shallower lines are not joined."""
    from rcekd_train.config import marked_ours
    f = tmp_path / "x.yaml"
    f.write_text(
        "# header, ours in a comment line is not a key\n"
        "a: 1                  # the authors'\n"
        "b:\n"
        "  c:\n"
        "    d: 2              # ours: first line\n"
        "                      # second line\n"
        "    e: x              # theirs\n"
        "  f: {g: 3}           # ours because\n"
        "h:                    # ours: a whole section\n"
        "  i: 4\n"
        "# a comment at the top level is not a continuation\n"
        "j->k: 5               # ours\n")
    got = marked_ours(str(f))
    assert got == [
        {"key": "b.c.d", "value": "2", "why": "first line second line"},
        {"key": "b.f", "value": "{g: 3}", "why": "because"},
        {"key": "h", "value": "", "why": "a whole section"},
        {"key": "j->k", "value": "5", "why": ""},
    ]
    loaded = yaml.safe_load(f.read_text())
    for r in got:
        if r["value"]:
            assert _walk(loaded, r["key"]) == yaml.safe_load(r["value"])


@pytest.mark.parametrize("name", ["citeulike", "gowalla", "yelp2018", "defaults"])
def test_packaged_marked_ours_are_real_settings(name):
    """Every ``# ours`` mark of a packaged config names a key that the loaded config holds, with that value."""
    from rcekd_train.config import marked_ours, packaged
    cfg = packaged(name)
    for r in marked_ours(name):
        assert _walk(cfg, r["key"]) == yaml.safe_load(r["value"]), r
        assert r["why"], r
