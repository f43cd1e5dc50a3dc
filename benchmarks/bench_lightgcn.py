"""LightGCN's propagation: the training step of a LightGCN teacher with the former layer-by-layer
sparse products (one autograd node per layer, int64 CSR indices) against the blocked layer mean of
``rcekd_kernels.graph`` (64 columns at a time through every layer, int32 indices) by its two
backends: ``reference`` (torch.sparse.mm per block) and ``cpp`` (csrc/cpu/graph_cpu.cpp, one pass
per layer and block). All give the same numbers to rounding (``tests/test_graph.py``); this
measures the time.

    python benchmarks/bench_lightgcn.py --dataset citeulike --data-dir DIR --dim 2000 --repeats 5

A step: propagation, BPR loss of a random batch, backward, Adam. The two variants run interleaved on
the same model, one thread unless ``--threads``; min and median per variant, written to ``--csv``.
Importing the drivers sets ``THP_MEM_ALLOC_ENABLE=1`` (huge pages for large tensors) unless it is set:
``THP_MEM_ALLOC_ENABLE=0 python benchmarks/bench_lightgcn.py ...`` times 4 KB pages.
"""
from __future__ import annotations

import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _interleaved import parser, report, time_interleaved  # noqa: E402

from rcekd_kernels import graph  # noqa: E402
from rcekd_kernels.backends import Call, unsupported_reason  # noqa: E402
from rcekd_train.data import load_dataset  # noqa: E402
from rcekd_train.models import lightgcn as L  # noqa: E402


def train_step(data, opt, batch_size: int, generator: torch.Generator, prop) -> None:
    """One teacher step: ``prop()`` gives the (users, items) vectors, then BPR on a random batch, backward
    and the optimiser's step."""
    users = torch.randint(0, data.num_users, (batch_size,), generator=generator)
    pos, neg = (torch.randint(0, data.num_items, (batch_size,), generator=generator) for _ in range(2))
    u, i = prop()
    loss = L.bpr_loss(u[users], i, pos, neg)
    opt.zero_grad()
    loss.backward()
    opt.step()


def main(argv=None) -> int:
    ap = parser(__doc__, "steps per variant (after one warm-up each)")
    ap.add_argument("--dim", type=int, default=2000, help="embedding size (the authors' teacher: 2000)")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2048)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    data = load_dataset(a.dataset, a.data_dir)
    model = L.LightGCN(data, dim=a.dim, layers=a.layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-7)
    adj = model.adj
    adj64 = torch.sparse_csr_tensor(adj.crow_indices().long(), adj.col_indices().long(), adj.values(), adj.shape)

    class PerLayer(torch.autograd.Function):  # the former implementation
        @staticmethod
        def forward(ctx, x):
            return torch.sparse.mm(adj64, x)

        @staticmethod
        def backward(ctx, g):
            return torch.sparse.mm(adj64, g)

    def per_layer():
        x = torch.cat([model.user_emb.weight, model.item_emb.weight])
        total = x
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(a.layers):
                x = PerLayer.apply(x)
                total = total + x
        out = total / (a.layers + 1)
        return out[: model.num_users], out[model.num_users:]

    g = torch.Generator().manual_seed(0)

    def step(prop):
        train_step(data, opt, a.batch_size, g, prop)

    def blocked(backend):
        return lambda: step(lambda: graph.propagate(adj, [model.user_emb.weight, model.item_emb.weight], a.layers,
                                                    backend=backend))

    variants = [("per_layer_int64", lambda: step(per_layer)), ("blocked_reference", blocked("reference"))]
    if unsupported_reason("cpp", Call("layer_mean", "cpu", (torch.float32,))) is None:
        variants.append(("blocked_cpp", blocked("cpp")))
    times = time_interleaved(variants, a.repeats)
    report(times, dict(threads=a.threads, dataset=a.dataset, nodes=adj.shape[0], nnz=adj._nnz(), dim=a.dim,
                       layers=a.layers), a.csv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
