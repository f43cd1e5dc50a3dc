"""Full-ranking Recall / NDCG against hand computations and a brute-force loop."""
import math

import numpy as np
import pytest
import torch

from rcekd_train.data import InteractionData, Split
from rcekd_train.evaluate import evaluate_scores, evaluate_vectors


def toy(train, valid, test, n_items):
    return InteractionData("toy", len(train), n_items, Split.from_lists(train), Split.from_lists(valid),
                           Split.from_lists(test))


def test_hand_computed_case():
    # one user, 6 items; item 0 is a training item with the highest score (must be skipped)
    data = toy([[0]], [[]], [[2, 5]], 6)
    scores = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]])  # ranking after masking 0: 1, 2, 3, 4, 5
    res = evaluate_scores(lambda u: scores[u], data, ks=(1, 2, 5), splits=("test",))["test"]
    # relevant {2, 5} at ranks 2 and 5 (1-based)
    assert res["recall@1"] == 0.0
    assert res["recall@2"] == pytest.approx(0.5)
    assert res["recall@5"] == pytest.approx(1.0)
    assert res["ndcg@1"] == 0.0
    assert res["ndcg@2"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert res["ndcg@5"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(6)) / (1 + 1 / math.log2(3)))


def test_idcg_truncated_at_k_and_user_average():
    # user 0: 3 relevant items, all in the top 2 -> NDCG@2 = 1 (IDCG over min(3, 2) positions), recall 2/3
    # user 1: no test item -> not averaged; user 2: relevant item ranked 1st -> 1, 1
    data = toy([[5], [5], [5]], [[], [], []], [[0, 1, 2], [], [3]], 6)
    scores = torch.tensor([[5.0, 4.0, 1.0, 0.0, 0.5, 9.0],
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                           [0.0, 0.0, 0.0, 5.0, 1.0, 9.0]])
    res = evaluate_scores(lambda u: scores[u], data, ks=(2,), splits=("test",))["test"]
    assert res["ndcg@2"] == pytest.approx((1.0 + 1.0) / 2)
    assert res["recall@2"] == pytest.approx((2 / 3 + 1.0) / 2)


def test_against_brute_force_loop():
    rng = np.random.default_rng(0)
    U, N = 40, 30
    lists = [rng.permutation(N)[: rng.integers(3, 12)].tolist() for _ in range(U)]
    train = [x[: len(x) // 2] for x in lists]
    valid = [x[len(x) // 2: len(x) // 2 + 1] for x in lists]
    test = [x[len(x) // 2 + 1:] for x in lists]
    data = toy(train, valid, test, N)
    uv, iv = torch.randn(U, 4), torch.randn(N, 4)
    res = evaluate_vectors(uv, iv, data, ks=(5, 10), batch_size=7)
    scores = (uv @ iv.T).numpy()
    for split, gt in (("valid", valid), ("test", test)):
        for k in (5, 10):
            rec, nd = [], []
            for u in range(U):
                if not gt[u]:
                    continue
                order = [i for i in np.argsort(-scores[u], kind="stable") if i not in train[u]][:k]
                hits = [1.0 if i in gt[u] else 0.0 for i in order]
                dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
                idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(gt[u]))))
                rec.append(sum(hits) / len(gt[u]))
                nd.append(dcg / idcg)
            assert res[split][f"recall@{k}"] == pytest.approx(np.mean(rec))
            assert res[split][f"ndcg@{k}"] == pytest.approx(np.mean(nd))


def test_authors_convention_counts_users_without_items_as_zeros():
    # 3 users; valid items only for users 0 and 2 (user 1 has none), test items for all
    data = toy([[5], [5], [5]], [[0], [], [1]], [[1], [2], [0]], 6)
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.0, 0.5, 9.5],    # ranking 0, 1, 2, ...
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],    # ranking 4, 3, 2, ...
                           [0.0, 7.0, 0.0, 5.0, 1.0, 9.0]])   # ranking 1, 3, 4, ...
    ours = evaluate_scores(lambda u: scores[u], data, ks=(1, 3))
    auth = evaluate_scores(lambda u: scores[u], data, ks=(1, 3), convention="authors")
    # valid by hand: user 0 hits at rank 1 (recall 1, ndcg 1), user 2 hits at rank 1 (1, 1)
    assert ours["valid"]["recall@1"] == pytest.approx(1.0)
    assert auth["valid"]["recall@1"] == pytest.approx(2.0 / 3)        # (1 + 0 + 1) / 3 users
    assert auth["valid"]["ndcg@3"] == pytest.approx(2.0 / 3)
    # test by hand: user 0: item 1 at rank 2; user 1: item 2 at rank 3; user 2: item 0 at rank 5
    n3 = (1 / math.log2(3) + 1 / math.log2(4) + 0.0) / 3
    assert ours["test"]["ndcg@3"] == pytest.approx(n3)
    assert auth["test"]["ndcg@3"] == pytest.approx(n3)                # every user has test items
    assert auth["test"]["recall@3"] == pytest.approx(2.0 / 3)
    with pytest.raises(ValueError, match="convention"):
        evaluate_scores(lambda u: scores[u], data, ks=(1,), convention="paper")


def test_authors_convention_factor_on_citeulike():
    from test_train_helpers import shared_data_dir

    from rcekd_train.data import load_dataset
    root = shared_data_dir("citeulike", "users.dat")
    data = load_dataset("citeulike", root)
    with_valid = int((data.valid.lengths() > 0).sum())
    assert (with_valid, data.num_users) == (4518, 5219)
    assert with_valid / data.num_users == pytest.approx(0.8657, abs=5e-5)
    assert int((data.test.lengths() > 0).sum()) == data.num_users


def test_evaluate_vectors_short_rows_match_brute_force():
    """Users with fewer than max(K) items outside their training items: the streaming top-K ends with -1 (no
    hit), the metrics equal a brute-force loop over the remaining items."""
    rng = np.random.default_rng(5)
    U, N = 30, 12
    lists = [rng.permutation(N)[: rng.integers(4, 12)].tolist() for _ in range(U)]
    train = [x[:-2] for x in lists]  # up to 9 of 12 items in train: fewer than 10 left
    valid = [x[-2:-1] for x in lists]
    test = [x[-1:] for x in lists]
    data = toy(train, valid, test, N)
    uv, iv = torch.randn(U, 3), torch.randn(N, 3)
    res = evaluate_vectors(uv, iv, data, ks=(5, 10), batch_size=4)
    scores = (uv @ iv.T).numpy()
    for split, gt in (("valid", valid), ("test", test)):
        for k in (5, 10):
            order = [[i for i in np.argsort(-scores[u], kind="stable") if i not in train[u]][:k] for u in range(U)]
            rec = np.mean([len(set(order[u]) & set(gt[u])) / len(gt[u]) for u in range(U)])
            assert res[split][f"recall@{k}"] == pytest.approx(rec, abs=1e-12)


@pytest.mark.parametrize("name", ["citeulike", "gowalla"])
def test_evaluation_from_embeddings_equals_dense_scores_on_real_data(name):
    """The drivers' evaluation (top-20 by rcekd_kernels.topm_dot, the training items excluded sparsely) gives
    the metrics of the dense path (every user's full score row, training items masked, torch.topk) on the real
    data sets, for the vectors of an MF model."""
    from test_train_helpers import shared_data_dir

    from rcekd_train.data import load_dataset
    from rcekd_train.models import build_model
    from rcekd_train.models.base import eval_mode

    sub = {"citeulike": "split_811", "gowalla": "train.txt"}[name]
    root = shared_data_dir(name, sub)
    data = load_dataset(name, root)
    torch.manual_seed(0)
    model = build_model("mf", data, dim=64)
    with eval_mode(model):
        uv, iv = model.represent_all()
    streamed = evaluate_vectors(uv, iv, data, ks=(10, 20))
    dense = evaluate_scores(lambda u: uv[u] @ iv.T, data, ks=(10, 20))
    assert streamed == dense
    assert streamed["test"]["recall@20"] > 0  # real lists, not empty ones
