"""A brute-force, per-row, float64 implementation of the RCE-KD spec.

Written plainly (Python loops, sets, exact integer hashing) and independently
of the package, so that the package's reference and kernels can be tested
against it. Only numpy is used, for the float32 rounding of the sampling keys.
"""
import math

import numpy as np

M32 = 0xFFFFFFFF


def lowbias32(x):
    x &= M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    x ^= x >> 16
    return x


def hash3(seed, row, item):
    k1 = lowbias32((seed & M32) ^ 0x9E3779B9)
    k2 = lowbias32(k1 ^ (row & M32))
    return lowbias32(k2 ^ (item & M32))


def u_of(seed, row, item):
    return ((hash3(seed, row, item) >> 8) + 0.5) / 2.0**24


def gumbel(seed, row, item):
    return -math.log(-math.log(u_of(seed, row, item)))


def ranked(scores, excl, k):
    items = [j for j in range(len(scores)) if not excl[j]]
    return sorted(items, key=lambda j: (-scores[j], j))[:k]


def counts_of(P, QT, K, mode):
    pos = {j: i for i, j in enumerate(P)}
    QS = set(P[:K])
    Q2 = [i for i in QT if i not in QS]
    c = {}
    for j in P:
        if mode == "paper":
            c[j] = sum(1 for i in Q2 if pos.get(i, math.inf) > pos[j])
        else:
            c[j] = min(50, sum(1 for i in QT if i in pos and pos[i] >= pos[j]))
    return c


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    z = sum(e)
    return [x / z for x in e]


def ce_and_grad(items, s, t, tau):
    ps = softmax([s[j] / tau for j in items])
    pt = softmax([t[j] / tau for j in items])
    loss = -sum(pt[a] * math.log(ps[a]) for a in range(len(items)))
    grad = {j: (ps[a] - pt[a]) / tau for a, j in enumerate(items)}
    return loss, grad


def row(s, t, excl, qt_given, *, K, M, L, tau, T, beta, mode, seed, row_id):
    """Everything the spec defines for one row. s, t: lists of floats (values of
    the float32 scores), excl: list of bools, qt_given: list of ids or None."""
    N = len(s)
    excl = excl if excl is not None else [False] * N
    P = ranked(s, excl, M)
    QT = list(qt_given) if qt_given is not None else ranked(t, excl, K)
    QS = P[:K]
    Q1 = set(QT) & set(QS)
    Q2 = [i for i in QT if i not in set(QS)]
    c = counts_of(P, QT, K, mode)
    key = {j: np.float32(c[j] / T + gumbel(seed, row_id, j)) for j in P}
    A = sorted(P, key=lambda j: (-float(key[j]), j))[:L]
    U = list(A) + [i for i in Q2 if i not in set(A)]
    n = len(Q1) if mode == "paper" else len(set(QT) & set(A))
    gamma = math.exp(-beta * n / K)
    l1, g1 = ce_and_grad(QS, s, t, tau)
    l2, g2 = ce_and_grad(U, s, t, tau)
    grad = [0.0] * N
    for j, v in g1.items():
        grad[j] += (1 - gamma) * v
    for j, v in g2.items():
        grad[j] += gamma * v
    return dict(P=P, QS=QS, QT=QT, A=A, U=U, Q1=Q1, Q2=Q2, counts=c, gamma=gamma, L1=l1, L2=l2,
                loss=(1 - gamma) * l1 + gamma * l2, grad=grad,
                q2_mask=[(i in set(Q2)) and (i not in set(A)) for i in QT],
                n_q1=len(Q1), n_qt_a=len(set(QT) & set(A)))
