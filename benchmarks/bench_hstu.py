"""HSTU: a training step and the full-ranking representation of every user, with the batch run as one
padded block (every user cut to the batch's longest sequence, the former layout) against the layers
run on groups of similar length (``rcekd_train.models.hstu.length_groups``, each group cut to its own
longest sequence). Both give the same numbers (``tests/test_train_models.py``); this measures the time.

    python benchmarks/bench_hstu.py --dataset citeulike --data-dir DIR --role teacher --repeats 5

A step: the sampled-softmax loss of a random batch of users, backward, Adam, with the packaged config
of the data set and role (the authors' HSTU settings). ``represent``: the user vectors of all users (the
evaluation's part that depends on the layout; its scoring and ranking do not). The variants run
interleaved on the same model, one thread unless ``--threads``; min and median per variant, written
to ``--csv``.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _interleaved import parser, report, time_interleaved  # noqa: E402

from rcekd_train import config as C  # noqa: E402
from rcekd_train.data import load_dataset  # noqa: E402
from rcekd_train.models import build_model  # noqa: E402
from rcekd_train.models import hstu as H  # noqa: E402


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--role", choices=("teacher", "student"), default="teacher",
                    help="whose packaged HSTU config (the teacher: 8 blocks; the student: 1)")
    ap.add_argument("--part", choices=("step", "represent"), default="step")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = C.resolve(a.dataset, a.role, "hstu", flags={"data_dir": a.data_dir})
    data = load_dataset(a.dataset, a.data_dir)
    hp = dict(cfg["model"])
    hp.pop("name", None)
    torch.manual_seed(0)
    model = build_model("hstu", data, **hp)
    opt = torch.optim.Adam(model.parameters(), lr=cfg["train"]["lr"])
    batch = int(cfg["train"]["batch_size"])
    g = torch.Generator().manual_seed(0)
    grouped = H.length_groups

    def padded(lengths):  # one group: the whole batch cut to its longest sequence
        return [(torch.arange(len(lengths)), max(int(lengths.max()), 1))] if len(lengths) else []

    def run(groups):
        H.length_groups = groups
        try:
            if a.part == "step":
                users = torch.randint(0, data.num_users, (batch,), generator=g)
                loss = model.base_loss(users)[0]
                opt.zero_grad()
                loss.backward()
                opt.step()
            else:
                model.represent_all()
        finally:
            H.length_groups = grouped

    variants = (("padded", lambda: run(padded)), ("length_groups", lambda: run(grouped)))
    times = time_interleaved(variants, a.repeats)
    report(times, dict(threads=a.threads, dataset=a.dataset, role=a.role, part=a.part, batch=batch,
                       blocks=hp["blocks"], dim=hp["dim"], negatives=hp["num_negatives"]), a.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
