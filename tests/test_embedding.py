"""RCE-KD from embeddings (rcekd_kernels.embedding) against the dense API on U @ V.T.

* exact inputs (small integers: every product is exact in float32, so the embedding path and the
  dense path see the same numbers): identical sets, the same losses bit for bit (to float rounding
  for Triton, whose fused dense kernel sums in another order), gradients of the vectors equal to
  the dense loss's gradients pushed through U @ V.T (to float rounding), for both modes, both
  refresh protocols, sparse vs dense exclusion, teacher top-K given or from the teacher's vectors,
  every backend of topm_dot available here;
* random float64 inputs against the dense path in float64 (the oracle here; the dense path is
  itself tested against the brute-force oracle of the spec);
* the teacher as a callable; the module; bad input.
"""
import pytest
import torch

import rcekd_kernels as R
from rcekd_kernels import backends

import conformance as C

TOPM = [n for n in C.available_backends() if backends.unsupported_reason(
    n, backends.Call("topm_dot", C.DEVICE, (torch.float32,), None, 100, 10)) is None]


def exact_case(seed, B=6, N=90, D=5, Dt=7):
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(-3, 4, (B, D), generator=g).float()
    v = torch.randint(-3, 4, (N, D), generator=g).float()
    tu = torch.randint(-3, 4, (B, Dt), generator=g).float()
    tv = torch.randint(-3, 4, (N, Dt), generator=g).float()
    mask = torch.rand(B, N, generator=g) < 0.2
    return u, v, tu, tv, mask


def dense_reference(u, v, tu, tv, mask, teacher_topk=None, **kw):
    """The dense API on the products: loss rows and the gradients of u and v through U @ V.T."""
    uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    rows = R.rce_kd_loss(uu @ vv.T, tu @ tv.T, teacher_topk, exclude=mask, reduction="none", **kw)  # same backend
    w = torch.linspace(0.5, 2.0, u.shape[0])
    (rows * w).sum().backward()
    sel = R.select((u @ v.T), tu @ tv.T, teacher_topk, exclude=mask, **{k: x for k, x in kw.items()
                                                                       if k not in ("tau", "backend")},
                   backend=kw.get("backend"))
    return rows.detach(), uu.grad, vv.grad, sel


@pytest.mark.parametrize("backend", TOPM)
@pytest.mark.parametrize("mode", ["paper", "official"])
@pytest.mark.parametrize("given", [False, True])
def test_exact_inputs_equal_the_dense_loss(backend, mode, given):
    for seed in range(3):
        u, v, tu, tv, mask = exact_case(seed)
        kw = dict(K=6, M=20, L=8, tau=0.7, T=3.0, beta=2.5, mode=mode, seed=11 + seed, backend=backend)
        qt = R.spec.ranked_topk(tu @ tv.T, 6, mask) if given else None
        want_rows, want_gu, want_gv, want_sel = dense_reference(u, v, tu, tv, mask, qt, **kw)
        ex = R.csr_exclusion(mask)
        sel = R.select_embeddings(u, v, qt, teacher_user_vecs=tu, teacher_item_vecs=tv, exclude=ex,
                                  **{k: x for k, x in kw.items() if k != "tau"})
        for f in ("indices", "q2_mask", "gamma", "n_q1", "n_qt_sampled"):
            assert torch.equal(getattr(sel, f), getattr(want_sel, f)), f
        uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
        rows = R.rce_kd_loss_embeddings(uu, vv, qt, teacher_user_vecs=tu, teacher_item_vecs=tv, exclude=ex,
                                        reduction="none", **kw)
        if backend == "triton":  # the fused dense kernel sums in another block order: to float rounding
            torch.testing.assert_close(rows.detach(), want_rows, rtol=1e-6, atol=0)
        else:  # the same subset cross-entropy code on the same numbers: bit for bit
            assert torch.equal(rows.detach(), want_rows)
        (rows * torch.linspace(0.5, 2.0, u.shape[0])).sum().backward()
        torch.testing.assert_close(uu.grad, want_gu, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(vv.grad, want_gv, rtol=1e-5, atol=1e-6)


def test_random_float64_equals_the_dense_loss():
    g = torch.Generator().manual_seed(5)
    u, v = torch.randn(7, 12, generator=g, dtype=torch.float64), torch.randn(300, 12, generator=g, dtype=torch.float64)
    tu, tv = torch.randn(7, 16, generator=g, dtype=torch.float64), torch.randn(300, 16, generator=g,
                                                                                dtype=torch.float64)
    mask = torch.rand(7, 300, generator=g) < 0.1
    for mode in ("paper", "official"):
        kw = dict(K=10, M=40, L=12, tau=1.3, T=5.0, beta=4.0, mode=mode, seed=3)
        want_rows, want_gu, want_gv, want_sel = dense_reference(u, v, tu, tv, mask, **kw)
        uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
        rows, diag = R.rce_kd_loss_embeddings(uu, vv, teacher_user_vecs=tu, teacher_item_vecs=tv,
                                              exclude=R.csr_exclusion(mask), reduction="none", return_diagnostics=True,
                                              **kw)
        (rows * torch.linspace(0.5, 2.0, 7, dtype=torch.float64)).sum().backward()
        torch.testing.assert_close(rows.detach(), want_rows, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(uu.grad, want_gu, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(vv.grad, want_gv, rtol=1e-9, atol=1e-12)
        assert set(diag) == {"L1", "L2", "gamma", "q1_frac", "qt_in_sampled_frac"}


def test_per_epoch_protocol_and_teacher_callable():
    """Sets once per epoch in chunks of users (Selection.cat), then per batch the loss on the batch's
    rows of the sets: the dense per-epoch path's values and gradients; a teacher given as a callable
    of the selected ids gives the same as its vectors."""
    u, v, tu, tv, mask = exact_case(9, B=10, N=70)
    kw = dict(K=5, M=15, L=6, beta=3.0, mode="official", seed=4)
    ex = R.csr_exclusion(mask)
    chunks = [R.select_embeddings(u[i:i + 4], v, teacher_user_vecs=tu[i:i + 4], teacher_item_vecs=tv,
                                  exclude=R.csr_exclusion(mask[i:i + 4]), row_ids=torch.arange(i, min(i + 4, 10)),
                                  **kw) for i in (0, 4, 8)]
    sel = R.Selection.cat(chunks)
    dense = R.select(u @ v.T, tu @ tv.T, exclude=mask, row_ids=torch.arange(10), **kw)
    assert torch.equal(sel.indices, dense.indices)
    batch = torch.tensor([7, 2, 2, 9])
    uu, vv = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    got = R.rce_kd_loss_embeddings(uu[batch], vv, selection=sel[batch], teacher_user_vecs=tu[batch],
                                   teacher_item_vecs=tv, reduction="sum")
    got.backward()
    u2, v2 = u.clone().requires_grad_(True), v.clone().requires_grad_(True)
    s_b = (u2 @ v2.T)[batch]
    idx = dense[batch].indices
    want = R.rce_kd_loss_gathered(s_b.gather(1, idx), (tu @ tv.T)[batch].gather(1, idx), dense[batch], reduction="sum")
    want.backward()
    assert torch.equal(got.detach(), want.detach())
    torch.testing.assert_close(uu.grad, u2.grad)
    torch.testing.assert_close(vv.grad, v2.grad)
    t_all = tu @ tv.T
    via_fn = R.rce_kd_loss_embeddings(u[batch], v, selection=sel[batch],
                                      teacher_scores=lambda ids: t_all[batch].gather(1, ids), reduction="sum")
    assert torch.equal(via_fn, got.detach())
    del ex


def test_module_advances_its_seed():
    u, v, tu, tv, _ = exact_case(2)
    mod = R.RCEKDEmbeddingLoss(K=4, M=10, L=4, seed=7)
    a = mod(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv)
    b = mod(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv)
    assert mod.step == 2
    assert torch.equal(a, R.rce_kd_loss_embeddings(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv, K=4, M=10, L=4,
                                                   seed=7))
    assert torch.equal(b, R.rce_kd_loss_embeddings(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv, K=4, M=10, L=4,
                                                   seed=8))
    mod2 = R.RCEKDEmbeddingLoss(K=4, M=10, L=4, seed=7)
    mod2.load_state_dict(mod.state_dict())
    assert mod2.step == 2 and "step" in str(mod.get_extra_state())


def test_bad_input():
    u, v, tu, tv, mask = exact_case(1)
    with pytest.raises(ValueError, match="teacher_topk, or teacher_user_vecs"):
        R.select_embeddings(u, v, K=3, M=8, L=3)
    with pytest.raises(ValueError, match="teacher_scores, or teacher_user_vecs"):
        R.rce_kd_loss_embeddings(u, v, R.spec.ranked_topk(tu @ tv.T, 3), K=3, M=8, L=3)
    many = torch.ones_like(mask)
    many[:, :5] = False  # 5 items left < M = 8
    with pytest.raises(ValueError, match="fewer than M = 8 items in row 0"):
        R.select_embeddings(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv, exclude=R.csr_exclusion(many), K=3,
                            M=8, L=3)
    qt = R.spec.ranked_topk(tu @ tv.T, 3)
    hit = torch.zeros_like(mask)
    hit[2, qt[2, 0]] = True
    with pytest.raises(ValueError, match="exclude marks in row 2"):
        R.select_embeddings(u, v, qt, exclude=R.csr_exclusion(hit), K=3, M=8, L=3)
    with pytest.raises(ValueError, match=r"\[0, N\)"):
        R.select_embeddings(u, v, qt + 1000, K=3, M=8, L=3)
    with pytest.raises(TypeError, match="user_vecs"):
        R.rce_kd_loss_embeddings(u.tolist(), v, qt, teacher_user_vecs=tu, teacher_item_vecs=tv, K=3, M=8, L=3)
    with pytest.raises(TypeError, match="exclude must be a pair"):
        R.select_embeddings(u, v, qt, exclude=mask, K=3, M=8, L=3)
    with pytest.raises(TypeError, match="selection"):
        R.rce_kd_loss_embeddings(u, v, teacher_user_vecs=tu, teacher_item_vecs=tv, selection=qt, K=3, M=8, L=3)
    assert R.csr_exclusion([[3, 1], [], [7]])[0].tolist() == [0, 2, 2, 3]
