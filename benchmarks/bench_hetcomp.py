"""HetComp's loss on a training batch: the (B, N) formulas (``hetcomp_overall_rows`` / ``hetcomp_rank_rows``
on the student's full score rows and a (B, N) training mask, as the drivers computed it before) against
the block-by-block loss from the vectors (``hetcomp_*_from_vectors``, what ``HetComp.rows`` uses now).
Both give the same values (``tests/test_train_hetcomp.py``); this measures forward + backward.

    python benchmarks/bench_hetcomp.py --dataset citeulike --data-dir DIR --dim 20 --repeats 5

Random student vectors (dim ``--dim``), a random batch of ``--batch-size`` users with their training
items, random targets of K = 50 non-training items and 2 positives per user; one thread unless
``--threads``; both variants interleaved; min and median, appended to ``--csv``.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _interleaved import parser, report, time_interleaved  # noqa: E402

from rcekd_train.data import load_dataset  # noqa: E402
from rcekd_train.kd import hetcomp as H  # noqa: E402


def main(argv=None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--dim", type=int, default=20, help="the student's embedding size (the authors' MF: 20)")
    ap.add_argument("--batch-size", type=int, default=2048)
    ap.add_argument("--K", type=int, default=50)
    ap.add_argument("--stage", choices=("overall", "rank"), default="overall")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_dataset(a.dataset, a.data_dir)
    N = data.num_items
    g = torch.Generator().manual_seed(0)
    users = torch.randint(0, data.num_users, (a.batch_size,), generator=g)
    mask = data.train_mask_rows(users)
    scores = torch.rand(a.batch_size, N, generator=g).masked_fill_(mask, 2.0)
    targets = scores.topk(a.K, dim=1, largest=False).indices  # K items outside the training ones
    pos = torch.stack([torch.from_numpy(data.train.items_of(int(x))[:2]) for x in users])
    u = (torch.randn(a.batch_size, a.dim, generator=g) * 0.3).requires_grad_(True)
    v = (torch.randn(N, a.dim, generator=g) * 0.3).requires_grad_(True)
    full = H.hetcomp_overall_rows if a.stage == "overall" else H.hetcomp_rank_rows
    fused = H.hetcomp_overall_from_vectors if a.stage == "overall" else H.hetcomp_rank_from_vectors

    def rows_full():
        m = data.train_mask_rows(users)
        return full((u @ v.T).clamp(-40.0, 40.0), m, targets, pos)

    def rows_fused():
        return fused(u, v, 40.0, data.train_exclusion(users), targets, pos)

    def clear():
        u.grad = v.grad = None

    variants = (("full_rows", lambda: rows_full().sum().backward()),
                ("from_vectors", lambda: rows_fused().sum().backward()))
    times = time_interleaved(variants, a.repeats, before=clear)
    report(times, dict(threads=a.threads, dataset=a.dataset, N=N, B=a.batch_size, dim=a.dim, K=a.K,
                       stage=a.stage), a.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
