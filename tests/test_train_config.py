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
