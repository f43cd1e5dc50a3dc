"""The cases of tests/test_distributed.py and the worker that runs them in each process.

The test spawns ``python tests/dist_cases.py RANK WORLD PORT OUTDIR`` once per rank (gloo,
loopback); each worker joins the group, runs every case on its shard of data that both the
worker and the test build from the case's seed, and saves what it got (selections, losses,
gradients, error messages) to OUTDIR/rank<R>.pt. The test process then compares these with the
single-process API on the whole catalogue (the oracle).

Scores and vectors are small integers, so that ties (within and across shards) are common and
every product and sum is exact.
"""
from __future__ import annotations

import gc
import os
import sys
import traceback
from typing import Any, Dict, List, Optional, Tuple

import torch

B, K, M, L = 6, 4, 10, 5

# ------------------------------------------------------------------ the cases
# sizes: the shard of each rank (in rank order unless offsets is given)
DENSE = {
    "dense_paper_topk_computed": dict(sizes=[20, 20], mode="paper", topk=False, excl=False, dtype="float32"),
    "dense_official_topk_given_small_shard": dict(sizes=[31, 9], mode="official", topk=True, excl=False,
                                                  dtype="float32"),
    "dense_float64_exclusion": dict(sizes=[13, 27], mode="paper", topk=False, excl=True, dtype="float64"),
    "dense_official_exclusion_empty_shard": dict(sizes=[40, 0], mode="official", topk=False, excl=True,
                                                 dtype="float32"),
    "dense_offsets_reversed": dict(sizes=[15, 25], offsets=[25, 0], mode="paper", topk=True, excl=True,
                                   dtype="float32"),
    "dense_float16_official": dict(sizes=[7, 33], mode="official", topk=False, excl=False, dtype="float16"),
}
EMB = {
    "emb_paper_topk_computed_exclusion": dict(sizes=[23, 17], mode="paper", topk=False, excl=True, sum_user=True),
    "emb_official_topk_given_small_shard": dict(sizes=[35, 5], mode="official", topk=True, excl=False,
                                                sum_user=True),
    "emb_empty_shard": dict(sizes=[0, 40], mode="paper", topk=False, excl=True, sum_user=True),
    "emb_custom_topm_partial_user_grad": dict(sizes=[18, 22], mode="official", topk=False, excl=True,
                                              sum_user=False, custom=True),
}
ERRORS = ["B", "K", "overlap", "gap", "mixed_offsets", "local_type", "nan", "seed", "row_ids", "dtype",
          "topk_excluded", "too_few_eligible", "callable_fails", "kind"]


def _gen(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(sum(ord(c) * (i + 1) for i, c in enumerate(name)) % (1 << 31))


def dense_data(name: str) -> Dict[str, Any]:
    """The whole catalogue of a dense case: s, t (B, N), teacher_topk or None, exclude or None, row_ids."""
    c = DENSE[name]
    g = _gen(name)
    N = sum(c["sizes"])
    dt = getattr(torch, c["dtype"])
    s = torch.randint(-3, 4, (B, N), generator=g).to(dt)
    t = torch.randint(-3, 4, (B, N), generator=g).to(dt)
    exclude = (torch.rand(B, N, generator=g) < 0.15) if c["excl"] else None
    from rcekd_kernels.spec import ranked_topk
    qt = ranked_topk(t, K, exclude) if c["topk"] else None
    rows = torch.randperm(1000, generator=g)[:B]
    return dict(s=s, t=t, teacher_topk=qt, exclude=exclude, row_ids=rows, mode=c["mode"])


def emb_data(name: str) -> Dict[str, Any]:
    """The whole catalogue of an embedding case: U (B, D), V (N, D), Ut, Vt, teacher_topk or None,
    the CSR exclusion (offsets, ids) or None, its dense mask, row_ids."""
    c = EMB[name]
    g = _gen(name)
    N, D, Dt = sum(c["sizes"]), 4, 3
    U = torch.randint(-2, 3, (B, D), generator=g).float()
    V = torch.randint(-2, 3, (N, D), generator=g).float()
    Ut = torch.randint(-2, 3, (B, Dt), generator=g).float()
    Vt = torch.randint(-2, 3, (N, Dt), generator=g).float()
    mask = (torch.rand(B, N, generator=g) < 0.15) if c["excl"] else None
    offsets = ids = None
    if mask is not None:
        counts = mask.sum(1)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        ids = mask.nonzero()[:, 1].contiguous()
    from rcekd_kernels.spec import ranked_topk
    qt = ranked_topk(Ut @ Vt.T, K, mask) if c["topk"] else None
    rows = torch.randperm(1000, generator=g)[:B]
    return dict(U=U, V=V, Ut=Ut, Vt=Vt, teacher_topk=qt, mask=mask, exclude_offsets=offsets, exclude_ids=ids,
                row_ids=rows, mode=c["mode"])


def shard_of(sizes: List[int], offsets: Optional[List[int]], rank: int) -> Tuple[int, int]:
    off = offsets[rank] if offsets is not None else sum(sizes[:rank])
    return off, sizes[rank]


def sort_topm(user_vecs, item_vecs, k, exclude_offsets, exclude_ids, item_offset):
    """A second local top-M (full stable sort), to show that local_topm plugs in."""
    s = user_vecs @ item_vecs.T
    n = s.shape[1]
    if exclude_offsets is not None:
        from rcekd_kernels.distributed import _csr_mask
        s = s.masked_fill(_csr_mask(exclude_offsets, exclude_ids, 0, s.shape[0], item_offset, n), float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    vals = s.gather(1, order)
    ids = torch.where(vals > float("-inf"), order + item_offset, -1)
    pad = k - order.shape[1]
    if pad:
        vals = torch.cat([vals, vals.new_full((s.shape[0], pad), float("-inf"))], 1)
        ids = torch.cat([ids, ids.new_full((s.shape[0], pad), -1)], 1)
    sort_topm.calls += 1
    return vals, ids


sort_topm.calls = 0


def _sel(sel) -> Dict[str, torch.Tensor]:
    return dict(indices=sel.indices, q2_mask=sel.q2_mask, gamma=sel.gamma, n_q1=sel.n_q1,
                n_qt_sampled=sel.n_qt_sampled)


# ------------------------------------------------------------------ the worker
def run_dense(name: str, rank: int, group=None, whole: bool = False) -> Dict[str, Any]:
    import rcekd_kernels.distributed as D
    c = DENSE[name]
    d = dense_data(name)
    off, n = (0, sum(c["sizes"])) if whole else shard_of(c["sizes"], c.get("offsets"), rank)
    item_offset = None if whole or "offsets" not in c else off
    s = d["s"][:, off:off + n].clone().requires_grad_()
    t = d["t"][:, off:off + n]
    excl = d["exclude"][:, off:off + n] if d["exclude"] is not None else None
    kw = dict(K=K, M=M, L=L, mode=d["mode"], seed=11, row_ids=d["row_ids"], group=group)
    log = D.CommLog()
    sel = D.sharded_select(s, None if d["teacher_topk"] is not None else t, d["teacher_topk"], item_offset=item_offset,
                           exclude_shard=excl, comm_log=log, **kw)
    select_log = log.summary()
    log.reset()
    loss, diag, sel2 = D.sharded_rce_kd_loss(s, t, d["teacher_topk"], item_offset=item_offset, exclude_shard=excl,
                                             reduction="sum", return_diagnostics=True, return_selection=True,
                                             comm_log=log, **kw)
    loss.backward()
    loss_log = log.summary()
    # the per-epoch protocol: the gathered loss from callables, offsets found by the call
    s2 = d["s"][:, off:off + n].clone().requires_grad_()
    loss_g = D.sharded_loss_gathered(lambda ids: s2.gather(1, ids), lambda ids: t.gather(1, ids), sel, n_local=n,
                                     item_offset=item_offset, group=group, reduction="mean")
    loss_g.backward()
    return dict(select=_sel(sel), select2=_sel(sel2), loss=loss.detach(), diag={k: v for k, v in diag.items()},
                grad=s.grad, loss_g=loss_g.detach(), grad_g=s2.grad, offset=off, n=n, select_log=select_log,
                loss_log=loss_log)


def run_emb(name: str, rank: int, group=None) -> Dict[str, Any]:
    import rcekd_kernels.distributed as D
    c = EMB[name]
    d = emb_data(name)
    off, n = shard_of(c["sizes"], None, rank)
    U = d["U"].clone().requires_grad_()
    V = d["V"][off:off + n].clone().requires_grad_()
    Vt = d["Vt"][off:off + n]
    kw = dict(K=K, M=M, L=L, mode=d["mode"], seed=5, row_ids=d["row_ids"], group=group)
    topm = sort_topm if c.get("custom") else None
    calls = sort_topm.calls
    log = D.CommLog()
    sel = D.sharded_select_embeddings(U, V, None if c["topk"] else d["Ut"], None if c["topk"] else Vt,
                                      d["teacher_topk"], exclude_offsets=d["exclude_offsets"],
                                      exclude_ids=d["exclude_ids"], local_topm=topm, comm_log=log, **kw)
    select_log = log.summary()
    log.reset()
    layout = D.shard_layout(n, group=group)
    loss = D.sharded_loss_embeddings(U, V, d["Ut"], Vt, sel, item_offset=layout.offset, group=group,
                                     sum_user_grad=c["sum_user"], reduction="sum", comm_log=log)
    loss.backward()
    return dict(select=_sel(sel), loss=loss.detach(), grad_U=U.grad, grad_V=V.grad, offset=off, n=n,
                topm_calls=sort_topm.calls - calls, select_log=select_log, loss_log=log.summary(),
                layout=(layout.offsets, layout.sizes, layout.N))


def run_error(kind: str, rank: int) -> Optional[str]:
    """Runs one bad call; returns '<ExceptionType>: message' (None if nothing was raised)."""
    import rcekd_kernels.distributed as D
    d = dense_data("dense_paper_topk_computed")
    s, t = d["s"], d["t"]
    sizes = [20, 20]
    off = sum(sizes[:rank])
    sh, th = s[:, off:off + 20], t[:, off:off + 20]
    kw: Dict[str, Any] = dict(K=K, M=M, L=L, seed=3, row_ids=d["row_ids"])
    try:
        if kind == "B":
            D.sharded_select(sh[:B - rank], th[:B - rank], **{**kw, "row_ids": None})
        elif kind == "K":
            D.sharded_select(sh, th, **{**kw, "K": K + rank})
        elif kind == "overlap":
            D.sharded_select(sh, th, item_offset=[0, 10][rank], **kw)
        elif kind == "gap":
            D.sharded_select(sh, th, item_offset=[0, 25][rank], **kw)
        elif kind == "mixed_offsets":
            D.sharded_select(sh, th, item_offset=[0, None][rank], **kw)
        elif kind == "local_type":
            excl = torch.zeros(sh.shape, dtype=torch.bool if rank == 0 else torch.int64)
            D.sharded_select(sh, th, exclude_shard=excl, **kw)
        elif kind == "nan":
            bad = sh.clone()
            if rank == 0:
                bad[2, 3] = float("nan")
            D.sharded_select(bad, th, **kw)
        elif kind == "seed":
            D.sharded_select(sh, th, **{**kw, "seed": 3 + rank})
        elif kind == "row_ids":
            rows = d["row_ids"].clone()
            if rank == 1:
                rows[0] += 1
            D.sharded_select(sh, th, **{**kw, "row_ids": rows})
        elif kind == "dtype":
            D.sharded_select(sh.double() if rank else sh, th.double() if rank else th, **kw)
        elif kind == "topk_excluded":
            qt = torch.arange(K).repeat(B, 1) + 20  # items 20.. live on rank 1
            excl = torch.zeros(sh.shape, dtype=torch.bool)
            if rank == 1:
                excl[4, 2] = True  # item 22 of row 4
            D.sharded_select(sh, None, qt, exclude_shard=excl, **kw)
        elif kind == "too_few_eligible":
            excl = torch.zeros(sh.shape, dtype=torch.bool)
            excl[1, :] = True
            if rank == 1:
                excl[1, :10] = False  # 10 items of row 1 on rank 1, none on rank 0
                excl[1, 1] = True  # 9 left < M
            D.sharded_select(sh, th, exclude_shard=excl, **kw)
        elif kind == "callable_fails":
            sel = D.sharded_select(sh, th, **kw)

            def student_at(ids):
                if rank == 1:
                    raise RuntimeError("the student's table is not loaded")
                return sh.gather(1, ids)

            D.sharded_loss_gathered(student_at, lambda ids: th.gather(1, ids), sel, n_local=20)
        elif kind == "kind":
            if rank == 0:
                D.sharded_select(sh, th, **kw)
            else:
                D.shard_layout(20)
    except Exception as e:  # noqa: BLE001 -- the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def worker(rank: int, world: int, port: int, outdir: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out: Dict[str, Any] = {}
    try:
        for name in DENSE:
            out[name] = run_dense(name, rank)
        for name in EMB:
            out[name] = run_emb(name, rank)
        out["errors"] = {kind: run_error(kind, rank) for kind in ERRORS}
        # after the errors the group is still in step: a good call works
        out["after_errors"] = run_dense("dense_paper_topk_computed", rank)
        # groups of one process: each rank alone with the whole catalogue
        singles = [dist.new_group([r]) for r in range(world)]
        out["single"] = run_dense("dense_paper_topk_computed", rank, group=singles[rank], whole=True)
    except Exception:  # noqa: BLE001
        out["crash"] = traceback.format_exc()
    torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    dist.barrier()
    gc.collect()  # what a reference cycle still holds of the group frees now, not at the interpreter's
    dist.destroy_process_group()  # exit, where freeing gloo's threads can abort (parallel.Session.close)


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
