"""Every bad input of spec section 7 raises a clear error before any work."""
import pytest
import torch

import rcekd_kernels as R


def base(B=3, N=20):
    g = torch.Generator().manual_seed(0)
    return dict(student_scores=torch.randn(B, N, generator=g, requires_grad=True),
                teacher_scores=torch.randn(B, N, generator=g), K=3, M=8, L=4)


def topk(B=3, K=3):
    return torch.stack([torch.randperm(20, generator=torch.Generator().manual_seed(b))[:K] for b in range(B)])


def nan_at(x):
    x = x.detach().clone()
    x[1, 2] = float("nan")
    return x


def inf_at(x, v=float("inf")):
    x = x.detach().clone()
    x[0, 5] = v
    return x


def dup_topk():
    q = topk()
    q[1, 2] = q[1, 0]
    return q


def excl_many():
    e = torch.zeros(3, 20, dtype=torch.bool)
    e[2, :13] = True  # 7 items left < M = 8
    return e


def excl_hits_topk():
    q = topk()
    e = torch.zeros(3, 20, dtype=torch.bool)
    e[1, q[1, 1]] = True
    return q, e


_q, _e = excl_hits_topk()

# (id, overrides, exception, words the message must contain)
CASES = [
    ("student_not_2d", dict(student_scores=torch.randn(20), teacher_scores=torch.randn(20)), ValueError,
     ["student_scores", "2-D"]),
    ("student_3d", dict(student_scores=torch.randn(2, 3, 20)), ValueError, ["student_scores", "2-D"]),
    ("shape_mismatch", dict(teacher_scores=torch.randn(3, 21)), ValueError, ["teacher_scores", "shape"]),
    ("int_scores", dict(student_scores=torch.ones(3, 20, dtype=torch.int64)), TypeError,
     ["student_scores", "floating"]),
    ("int_teacher", dict(teacher_scores=torch.ones(3, 20, dtype=torch.int32)), TypeError,
     ["teacher_scores", "floating"]),
    ("complex_scores", dict(student_scores=torch.randn(3, 20, dtype=torch.complex64)), TypeError, ["student_scores"]),
    ("not_tensor", dict(student_scores=[[1.0] * 20] * 3), TypeError, ["student_scores"]),
    ("K_zero", dict(K=0), ValueError, ["K", "1 <= K"]),
    ("K_gt_M", dict(K=9, M=8), ValueError, ["M", "K <= M"]),
    ("M_gt_N", dict(M=21), ValueError, ["M", "N"]),
    ("K_gt_N", dict(K=25, M=30), ValueError, ["K", "N"]),
    ("L_zero", dict(L=0), ValueError, ["L", "1 <= L"]),
    ("L_gt_M", dict(L=9), ValueError, ["L", "M"]),
    ("K_float", dict(K=3.0), TypeError, ["K", "int"]),
    ("K_bool", dict(K=True), TypeError, ["K", "int"]),
    ("tau_zero", dict(tau=0.0), ValueError, ["tau", "> 0"]),
    ("tau_negative", dict(tau=-1.0), ValueError, ["tau", "> 0"]),
    ("tau_nan", dict(tau=float("nan")), ValueError, ["tau"]),
    ("T_zero", dict(T=0.0), ValueError, ["T", "> 0"]),
    ("beta_negative", dict(beta=-0.1), ValueError, ["beta", ">= 0"]),
    ("mode_unknown", dict(mode="paperr"), ValueError, ["mode", "paper", "official"]),
    ("reduction_unknown", dict(reduction="avg"), ValueError, ["reduction", "mean"]),
    ("backend_unknown", dict(backend="cudnn"), ValueError, ["backend"]),
    ("seed_float", dict(seed=1.5), TypeError, ["seed"]),
    ("nan_student", dict(student_scores=nan_at(torch.randn(3, 20))), ValueError, ["student_scores", "NaN"]),
    ("inf_student", dict(student_scores=inf_at(torch.randn(3, 20))), ValueError, ["student_scores", "infinite"]),
    ("ninf_teacher", dict(teacher_scores=inf_at(torch.randn(3, 20), float("-inf"))), ValueError, ["teacher_scores"]),
    ("topk_shape", dict(teacher_topk=topk(K=4)), ValueError, ["teacher_topk", "shape"]),
    ("topk_dtype", dict(teacher_topk=topk().int()), TypeError, ["teacher_topk", "int64"]),
    ("topk_range_hi", dict(teacher_topk=topk().index_fill(1, torch.tensor([0]), 20)), ValueError,
     ["teacher_topk", "[0, 20)"]),
    ("topk_range_lo", dict(teacher_topk=topk().index_fill(1, torch.tensor([0]), -1)), ValueError,
     ["teacher_topk", "[0, 20)"]),
    ("topk_repeated", dict(teacher_topk=dup_topk()), ValueError, ["teacher_topk", "repeated", "row 1"]),
    ("topk_excluded", dict(teacher_topk=_q, exclude=_e), ValueError, ["teacher_topk", "exclude", "row 1"]),
    ("too_few_items", dict(exclude=excl_many()), ValueError, ["exclude", "fewer than M", "row 2"]),
    ("exclude_dtype", dict(exclude=torch.zeros(3, 20)), TypeError, ["exclude", "bool"]),
    ("exclude_shape", dict(exclude=torch.zeros(3, 19, dtype=torch.bool)), ValueError, ["exclude", "shape"]),
    ("row_ids_shape", dict(row_ids=torch.arange(4)), ValueError, ["row_ids", "shape"]),
    ("row_ids_float", dict(row_ids=torch.zeros(3)), TypeError, ["row_ids", "integer"]),
    ("device_mismatch", dict(teacher_scores=torch.randn(3, 20, device="meta")), ValueError,
     ["teacher_scores", "device"]),
]


@pytest.mark.parametrize("name,over,exc,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_dense(name, over, exc, words):
    kw = {**base(), **over}
    s = kw["student_scores"]
    before = s.detach().clone() if isinstance(s, torch.Tensor) else None
    with pytest.raises(exc) as info:
        R.rce_kd_loss(**kw)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    if before is not None and not before.is_complex():
        assert torch.equal(s.detach(), before, ) or torch.isnan(before).any()


_LOSS_ONLY = ("reduction_unknown", "tau_zero", "tau_negative", "tau_nan")


@pytest.mark.parametrize("name,over,exc,words", [c for c in CASES if c[0] not in _LOSS_ONLY],
                         ids=[c[0] for c in CASES if c[0] not in _LOSS_ONLY])
def test_bad_input_select(name, over, exc, words):
    kw = {**base(), **over}
    kw.pop("tau", None)
    kw.pop("reduction", None)
    with pytest.raises(exc) as info:
        R.select(**kw)
    for w in words:
        assert w in str(info.value)


def test_validation_off_skips_data_checks_only():
    kw = base()
    kw["student_scores"] = inf_at(kw["student_scores"])
    R.rce_kd_loss(**kw, validate=False)  # the caller vouches for the data
    with pytest.raises(ValueError, match="L"):
        R.rce_kd_loss(**{**kw, "L": 0}, validate=False)


def test_teacher_required_for_loss_but_not_select_with_topk():
    kw = base()
    with pytest.raises(ValueError, match="teacher_scores"):
        R.rce_kd_loss(kw["student_scores"], None, K=3, M=8, L=4)
    with pytest.raises(ValueError, match="teacher_scores"):
        R.select(kw["student_scores"], K=3, M=8, L=4)
    sel = R.select(kw["student_scores"], teacher_topk=topk(), K=3, M=8, L=4)
    assert torch.equal(sel.teacher_topk, topk())


def test_errors_from_direct_op_calls():
    """The custom ops check their arguments themselves (one place, every entry point)."""
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    # the schemas' hyperparameters: K, M, L, tau, T, beta, mode (rcekd_kernels.ops.HPARAMS), then seed
    with pytest.raises(ValueError, match="L must satisfy"):
        torch.ops.rcekd.fused_fwd(s, t, None, None, torch.arange(2), 2, 4, 5, 1.0, 10.0, 1.0, "paper", 0, "auto", True)
    with pytest.raises(ValueError, match="mode"):
        torch.ops.rcekd.select(s, t, None, None, torch.arange(2), 2, 4, 3, 1.0, 10.0, 1.0, "x", 0, "auto", True)
    with pytest.raises(ValueError, match="idx must be int64 of shape"):
        torch.ops.rcekd.fused_bwd(torch.ones(2), s, t, torch.zeros(2, 5, dtype=torch.int64),
                                  torch.zeros(2, 2, dtype=torch.bool), torch.ones(2), 2, 4, 2, 1.0, 10.0, 1.0,
                                  "paper", "auto")
    with pytest.raises(ValueError, match="grad_rows"):
        torch.ops.rcekd.subset_ce_bwd(torch.ones(3), torch.randn(2, 6), torch.randn(2, 6),
                                      torch.zeros(2, 2, dtype=torch.bool), torch.ones(2), 2, 4, 2, 1.0, 10.0, 1.0,
                                      "paper", "auto")


def test_gathered_bad_inputs():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 20, generator=g), torch.randn(3, 20, generator=g)
    sel = R.select(s, t, K=3, M=8, L=4)
    sg, tg = s.gather(1, sel.indices), t.gather(1, sel.indices)
    with pytest.raises(ValueError, match="2K \\+ L"):
        R.rce_kd_loss_gathered(sg[:, :-1], tg[:, :-1], sel)
    with pytest.raises(ValueError, match="teacher_gathered"):
        R.rce_kd_loss_gathered(sg, tg[:2], sel)
    with pytest.raises(TypeError, match="selection"):
        R.rce_kd_loss_gathered(sg, tg, sel.indices)
    with pytest.raises(ValueError, match="tau"):
        R.rce_kd_loss_gathered(sg, tg, sel, tau=0.0)
