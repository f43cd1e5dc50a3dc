"""Backbones: LightGCN's adjacency and propagation count, MF negatives, HSTU causality, scoring APIs."""
import math

import numpy as np
import pytest
import torch
from test_train_helpers import tiny_synthetic

from rcekd_train.models import build_model, normalized_adjacency
from rcekd_train.models.base import PairBatches


@pytest.fixture(scope="module")
def data():
    return tiny_synthetic()


def test_adjacency_against_dense_formula(data):
    adj = normalized_adjacency(data, "coo")
    assert adj.layout == torch.sparse_coo  # never a dense (U + I)^2 matrix in the model
    U, I = data.num_users, data.num_items
    R = np.zeros((U, I))
    for u in range(U):
        R[u, data.train.items_of(u)] = 1
    A = np.block([[np.zeros((U, U)), R], [R.T, np.zeros((I, I))]])
    deg = A.sum(1)
    with np.errstate(divide="ignore"):
        d = np.where(deg > 0, 1 / np.sqrt(deg), 0)
    want = d[:, None] * A * d[None, :]
    assert np.allclose(adj.to_dense().numpy(), want, atol=1e-6)
    assert normalized_adjacency(data, "csr").layout == torch.sparse_csr


@pytest.mark.parametrize("dim", [8, 64])  # 64: the C++ propagation where the extension is built
def test_lightgcn_layer_mean_and_one_propagation_per_step(data, dim):
    m = build_model("lightgcn", data, dim=dim, layers=2)
    A = normalized_adjacency(data, "coo").to_dense()
    E = torch.cat([m.user_emb.weight, m.item_emb.weight])
    want = (E + A @ E + A @ A @ E) / 3
    u, i = m.propagate()
    assert torch.allclose(torch.cat([u, i]), want, atol=1e-5)
    # one training step: base loss + scores for KD reuse the same propagation
    batch = next(m.batches(data, 64, torch.Generator().manual_seed(0)))
    m.propagations = 0
    base, users, uv, iv = m.base_loss(batch)
    zeros = torch.zeros(len(users), 3, dtype=torch.long)
    kd_scores = (uv @ iv.T)[:, :5].sum() + (uv.unsqueeze(1) * iv[zeros]).sum()
    (base + kd_scores).backward()
    assert m.propagations == 1
    # gradient through the custom symmetric sparse product equals the dense one
    g = m.user_emb.weight.grad.clone()
    m.zero_grad()
    E = torch.cat([m.user_emb.weight, m.item_emb.weight])
    out = (E + A @ E + A @ A @ E) / 3
    uvd, ivd = out[: data.num_users][users], out[data.num_users:]
    pos, neg = batch[1], batch[2]
    ref = -torch.nn.functional.logsigmoid((uvd * ivd[pos]).sum(-1) - (uvd * ivd[neg]).sum(-1)).sum()
    ref = ref + (uvd @ ivd.T)[:, :5].sum() + (uvd.unsqueeze(1) * ivd[zeros]).sum()
    ref.backward()
    assert torch.allclose(g, m.user_emb.weight.grad, atol=1e-4)


def test_bpr_negatives_exclude_positives(data):
    pb = PairBatches(data, 50)
    g = torch.Generator().manual_seed(1)
    users = torch.from_numpy(data.train.users_of_pairs()).repeat(20)
    neg = pb.sample_negatives(users, g)
    for u, j in zip(users.tolist(), neg.tolist()):
        assert j not in set(data.train.items_of(u).tolist())
    # every pair appears once per epoch
    seen = []
    for u, p, _n in pb(g):
        seen += list(zip(u.tolist(), p.tolist()))
    assert sorted(seen) == sorted(map(tuple, data.train.pairs().tolist()))


def test_bpr_loss_hand_value(data):
    m = build_model("mf", data, dim=2)
    with torch.no_grad():
        m.user_emb.weight[0] = torch.tensor([1.0, 2.0])
        m.item_emb.weight[1] = torch.tensor([0.5, 0.5])
        m.item_emb.weight[2] = torch.tensor([1.0, -1.0])
    loss, *_ = m.base_loss((torch.tensor([0]), torch.tensor([1]), torch.tensor([2])))
    # s(0,1) = 1.5, s(0,2) = -1 -> -log sigmoid(2.5)
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-2.5)), rel=1e-6)


@pytest.mark.parametrize("name,kw", [("mf", dict(dim=4)), ("lightgcn", dict(dim=4, layers=2)),
                                     ("hstu", dict(dim=8, blocks=2, heads=2, attn_dim=4, linear_dim=4, max_len=12,
                                                   num_negatives=16))])
def test_scores_consistent(data, name, kw):
    torch.manual_seed(0)
    m = build_model(name, data, **kw).eval()
    users = torch.tensor([0, 3, 3, 100])
    items = torch.randint(0, data.num_items, (4, 7))
    full = m.score_all(users)
    assert full.shape == (4, data.num_items)
    assert torch.allclose(m.score_items(users, items), full.gather(1, items), atol=1e-5)
    uv, iv = m.represent_all()
    assert torch.allclose(uv[users] @ iv.T, full, atol=1e-5)


def test_hstu_causal_and_last_position(data):
    torch.manual_seed(0)
    m = build_model("hstu", data, dim=8, blocks=2, heads=2, attn_dim=4, linear_dim=4, max_len=12,
                    num_negatives=16).eval()
    u = int(np.argmax(data.train.lengths() >= 6))
    users = torch.tensor([u])
    out1, ids, lengths = m.encode(users)
    n = int(lengths[0])
    # changing the last item changes only the last position's output (causal mask)
    m.seq[u, n - 1] = (m.seq[u, n - 1] % data.num_items) + 1
    out2, _, _ = m.encode(users)
    assert torch.allclose(out1[0, : n - 1], out2[0, : n - 1], atol=1e-6)
    assert not torch.allclose(out1[0, n - 1], out2[0, n - 1])
    # outputs are unit vectors; the user vector is the output at the last training position
    assert torch.allclose(out2[0, :n].norm(dim=-1), torch.ones(n), atol=1e-5)
    uv, _ = m.represent(users)
    assert torch.allclose(uv[0], out2[0, n - 1])
    # the training loss is finite and differentiable
    m.train()
    loss, *_ = m.base_loss(torch.arange(10))
    loss.backward()
    assert math.isfinite(float(loss)) and m.item_emb.weight.grad is not None


@pytest.mark.parametrize("negatives", ["position", "batch"])
def test_hstu_sampled_softmax_negatives(data, negatives):
    """negatives="position": each position draws its own num_negatives items (the authors'
    LocalNegativesSampler, ids of shape (positions, R)); "batch": one draw of R shared by the batch."""
    torch.manual_seed(0)
    R, T = 6, 0.05
    m = build_model("hstu", data, dim=8, blocks=1, heads=2, attn_dim=4, linear_dim=4, max_len=12,
                    num_negatives=R, temperature=T, rel_bias=False, negatives=negatives).eval()
    assert all(layer.rel_bias is None for layer in m.layers)
    users = torch.arange(20)
    torch.manual_seed(123)
    loss, *_ = m.base_loss(users)  # eval mode: no dropout, the draw is the only use of the RNG
    # by hand
    out, ids, lengths = m.encode(users)
    items = m.item_vectors()
    q = out[:, :-1][ids[:, 1:] != 0]
    pos = ids[:, 1:][ids[:, 1:] != 0] - 1
    P = len(pos)
    torch.manual_seed(123)
    if negatives == "position":
        neg = torch.randint(0, data.num_items, (P, R))
    else:
        neg = torch.randint(0, data.num_items, (R,)).expand(P, R)
    s_pos = (q * items[pos]).sum(-1) / T
    s_neg = torch.einsum("pd,prd->pr", q, items[neg]) / T
    s_neg = s_neg.masked_fill(neg == pos.view(-1, 1), float("-inf"))
    want = -torch.log_softmax(torch.cat([s_pos.view(-1, 1), s_neg], 1), 1)[:, 0].mean()
    assert torch.allclose(loss, want, atol=1e-5)
    # differentiable through the item vectors of the negatives
    m.train()
    loss, *_ = m.base_loss(users)
    loss.backward()
    assert math.isfinite(float(loss)) and m.item_emb.weight.grad.abs().sum() > 0


def test_hstu_negatives_choice_is_checked(data):
    with pytest.raises(ValueError, match="negatives must be one of"):
        build_model("hstu", data, dim=8, negatives="shared")


def test_hstu_init_choices(data):
    """init=normal draws its tables right after creating them (the draws of every run recorded before the
    option existed, replayed here by hand); init=xavier has the scales of the authors' code."""
    kw = dict(dim=8, blocks=2, heads=2, attn_dim=4, linear_dim=4, max_len=12, rel_bias=False)
    n_rows = data.num_items + 1
    torch.manual_seed(3)
    m = build_model("hstu", data, **kw)  # init=normal, the default
    torch.manual_seed(3)
    torch.empty(n_rows, 8).normal_()                   # nn.Embedding's own init of the item table
    items = torch.empty(n_rows, 8).normal_(0, 0.02).clamp_(-0.04, 0.04)
    items[0] = 0
    torch.empty(12, 8).normal_()                       # nn.Embedding's own init of the position table
    pos = torch.empty(12, 8).normal_(0, math.sqrt(1 / 8))
    assert torch.equal(m.item_emb.weight.data, items) and torch.equal(m.pos_emb.weight.data, pos)
    assert all(float(layer.out.bias.abs().max()) == 0 for layer in m.layers)

    torch.manual_seed(3)
    big = build_model("hstu", data, init="xavier", **{**kw, "dim": 64, "max_len": 100})
    w = big.item_emb.weight.data
    assert float(w[0].abs().max()) == 0
    assert float(w[1:].std()) == pytest.approx(math.sqrt(2 / (n_rows + 64)), rel=0.05)
    assert float(big.pos_emb.weight.std()) == pytest.approx(math.sqrt(2 / (110 + 64)), rel=0.05)
    bound = 1 / math.sqrt(2 * 4)  # nn.Linear's default bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 8
    for layer in big.layers:
        b = layer.out.bias.data
        assert float(b.abs().max()) <= bound and float(b.abs().max()) > bound / 4
    with pytest.raises(ValueError, match="init must be one of"):
        build_model("hstu", data, dim=8, init="kaiming")


def test_hstu_attention_is_pointwise_silu_over_padded_length(data):
    from rcekd_train.models.hstu import HSTULayer
    torch.manual_seed(0)
    layer = HSTULayer(dim=4, heads=1, attn_dim=2, linear_dim=2, max_len=5, linear_dropout=0.0, rel_bias=True).eval()
    x = torch.randn(1, 3, 4)
    y = layer(x)
    # by hand
    F = torch.nn.functional
    h = F.silu(F.layer_norm(x, (4,), eps=1e-6) @ layer.uvqk)
    u, v, q, k = h[..., :2], h[..., 2:4], h[..., 4:6], h[..., 6:8]
    A = torch.zeros(3, 3)
    for i in range(3):
        for j in range(i + 1):
            A[i, j] = F.silu(q[0, i] @ k[0, j] + layer.rel_bias[i - j + 4]) / 5  # divided by the padded length
    a = F.layer_norm(A @ v[0], (2,), eps=1e-6)
    want = x[0] + layer.out(u[0] * a)
    assert torch.allclose(y[0], want, atol=1e-5)


def test_unknown_hyperparameter_is_named(data):
    with pytest.raises(ValueError, match="dimm"):
        build_model("mf", data, dimm=3)


@pytest.mark.parametrize("name,batch_size", [("mf", 64), ("lightgcn", 1000), ("hstu", 50)])
def test_batches_say_how_many_an_epoch_has(data, name, batch_size):
    m = build_model(name, data, dim=8)
    batches = m.batches(data, batch_size, torch.Generator().manual_seed(0))
    # one row per training pair (BPR) or per user with training items (HSTU), in batches of batch_size
    rows = data.train.nnz if name != "hstu" else int((data.train.lengths() > 0).sum())
    assert len(batches) == math.ceil(rows / batch_size)
    assert sum(1 for _ in batches) == math.ceil(rows / batch_size)


def test_eval_mode_restores_the_previous_mode(data):
    from rcekd_train.models import eval_mode
    m = build_model("hstu", data, dim=8)
    for training in (True, False):
        m.train(training)
        with eval_mode(m):
            assert not m.training and not torch.is_grad_enabled()
            assert not m.represent(torch.arange(3))[0].requires_grad
        assert m.training == training and torch.is_grad_enabled()
    m.train()
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(m):
            raise RuntimeError("inside")
    assert m.training and torch.is_grad_enabled()


def _tiny_hstu_of_mixed_lengths(num_users, seed, rel_bias):
    """(data, a small HSTU in eval mode, all users, their lengths) on a synthetic set of mixed lengths."""
    data = tiny_synthetic(num_users=num_users, mean_items=10, max_items=40)
    torch.manual_seed(seed)
    m = build_model("hstu", data, dim=8, blocks=2, heads=2, attn_dim=4, linear_dim=4, max_len=30,
                    num_negatives=5, rel_bias=rel_bias, negatives="position").eval()
    users = torch.arange(data.num_users)
    return data, m, users, m.lengths[users]


def test_hstu_batch_of_mixed_lengths_equals_each_user_alone():
    """The layers run on groups of similar length (each cut to its longest): every user's outputs, user
    vector and the loss are those of the user encoded alone (its own length, no padding at all)."""
    from rcekd_train.models.hstu import length_groups
    data, m, users, lengths = _tiny_hstu_of_mixed_lengths(60, seed=0, rel_bias=True)
    groups = length_groups(lengths)
    assert len(groups) >= 3  # the case: several groups
    assert sorted(torch.cat([g for g, _ in groups]).tolist()) == users.tolist()
    for g, n in groups:
        assert n == int(lengths[g].max()) and int(lengths[g].min()) > n // 2 - 1
    out, ids, _ = m.encode(users)
    assert out.shape[1] == int(lengths.max())
    vecs, _ = m.represent(users)
    for u in users.tolist():
        n = int(lengths[u])
        alone, _, _ = m.encode(torch.tensor([u]))
        assert alone.shape[1] == n
        assert torch.allclose(out[u, :n], alone[0], atol=1e-5), u
        assert torch.allclose(vecs[u], alone[0, n - 1], atol=1e-5)
    # the loss over the batch: the mean over all positions of the per-user sampled softmax
    torch.manual_seed(5)
    loss, *_ = m.base_loss(users)
    q = torch.cat([m.encode(torch.tensor([u]))[0][0, : int(lengths[u]) - 1] for u in users.tolist()])
    pos = torch.cat([m.seq[u, 1: int(lengths[u])] - 1 for u in users.tolist()])
    torch.manual_seed(5)
    neg = torch.randint(0, data.num_items, (len(pos), 5))
    items = m.item_vectors()
    s_pos = (q * items[pos]).sum(-1) / m.temperature
    s_neg = torch.einsum("pd,prd->pr", q, items[neg]).masked_fill(neg == pos.view(-1, 1), float("-inf")) \
        / m.temperature
    want = -torch.log_softmax(torch.cat([s_pos.view(-1, 1), s_neg], 1), 1)[:, 0].mean()
    assert torch.allclose(loss, want, atol=1e-5)
    # the same groups from a list of lengths (no tensor, no device)
    assert [(g.tolist(), n) for g, n in length_groups(lengths.tolist())] == [(g.tolist(), n) for g, n in groups]


def test_hstu_grouped_encode_gradient_equals_each_user_alone():
    """The gradient through the grouped encoding (each group written into its rows of one output) is the
    sum of the gradients of the users encoded alone."""
    data, m, users, lengths = _tiny_hstu_of_mixed_lengths(40, seed=1, rel_bias=False)
    w = torch.randn(len(users), int(lengths.max()), 8, generator=torch.Generator().manual_seed(2))
    out, _, _ = m.encode(users)
    valid = (torch.arange(out.shape[1]).view(1, -1) < lengths.view(-1, 1)).unsqueeze(-1)
    grads = torch.autograd.grad((out * w * valid).sum(), list(m.parameters()), allow_unused=True)
    total = None
    for u in users.tolist():
        alone, _, _ = m.encode(torch.tensor([u]))
        n = int(lengths[u])
        term = (alone[0] * w[u, :n]).sum()
        total = term if total is None else total + term
    want = torch.autograd.grad(total, list(m.parameters()), allow_unused=True)
    for g, h in zip(grads, want):
        if g is None or h is None:
            assert g is None and h is None or (g if h is None else h).abs().max() == 0
            continue
        assert torch.allclose(g, h, atol=1e-5)
