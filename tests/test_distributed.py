"""Item-sharded RCE-KD (rcekd_kernels.distributed) against the single-process API.

Two processes on loopback (gloo), spawned once for the module by the fixture ``runs``: each runs
every case of tests/dist_cases.py on its shard and saves what it got; the tests compare that with
``select`` / ``rce_kd_loss`` / ``rce_kd_loss_gathered`` / ``gathered_dot`` on the whole catalogue
(themselves tested against the brute-force oracle). Scores are small integers: ties across shards
are common and products exact. The run has a timeout, so a hang fails instead of blocking.
"""
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

import rcekd_kernels as R
import rcekd_kernels.distributed as D

import dist_cases as C

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORLD = 2
TIMEOUT_S = 150

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(tmp_dir, world=WORLD, timeout=TIMEOUT_S):
    """Runs the worker in ``world`` processes; returns each rank's results (fails on a hang)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo",
               PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "python"), os.environ.get("PYTHONPATH", "")]))
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_cases.py"), str(r), str(world), str(port),
                               str(tmp_dir)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"the distributed workers did not finish within {timeout} s (a hang)")
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{logs[r][-4000:]}"
    out = [torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, o in enumerate(out):
        assert "crash" not in o, f"rank {r} crashed:\n{o['crash']}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return spawn(tmp_path_factory.mktemp("dist"))


def _same_selection(got, sel):
    for name in ("indices", "q2_mask", "gamma", "n_q1", "n_qt_sampled"):
        assert torch.equal(got[name], getattr(sel, name)), name


def _dense_oracle(name):
    d = C.dense_data(name)
    kw = dict(K=C.K, M=C.M, L=C.L, mode=d["mode"], seed=11, row_ids=d["row_ids"])
    t_for_select = None if d["teacher_topk"] is not None else d["t"]
    sel = R.select(d["s"], t_for_select, d["teacher_topk"], exclude=d["exclude"], **kw)
    s = d["s"].clone().requires_grad_()
    loss = R.rce_kd_loss(s, d["t"], d["teacher_topk"], exclude=d["exclude"], reduction="sum", **kw)
    loss.backward()
    sg = d["s"].clone().requires_grad_()
    loss_gathered = R.rce_kd_loss_gathered(sg.gather(1, sel.indices), d["t"].gather(1, sel.indices), sel,
                                           reduction="sum")
    loss_gathered.backward()
    return d, sel, loss.detach(), s.grad, loss_gathered.detach(), sg.grad


def _tol(dtype):
    if dtype == torch.float16:  # the gradient is rounded to float16 (after or before adding QS and U's parts)
        return dict(rtol=2e-3, atol=1e-3)
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)


def _concat(parts, key, dim):
    """The shards' tensors in item order."""
    parts = sorted(parts, key=lambda o: o["offset"])
    return torch.cat([o[key] for o in parts], dim=dim)


@pytest.mark.parametrize("name", list(C.DENSE))
def test_dense_sharded_equals_single_process(runs, name):
    d, sel, loss, grad, loss_gathered, grad_gathered = _dense_oracle(name)
    got = [r[name] for r in runs]
    for o in got:
        _same_selection(o["select"], sel)  # sharded_select
        _same_selection(o["select2"], sel)  # the selection inside sharded_rce_kd_loss
        # the loss: bit for bit the gathered loss of the single process (the assembled scores are
        # the owners' values), and the dense loss to float rounding
        assert torch.equal(o["loss"], loss_gathered)
        torch.testing.assert_close(o["loss"], loss, **_tol(d["s"].dtype))
    assert torch.equal(got[0]["loss"], got[1]["loss"])
    g = _concat(got, "grad", 1)
    assert torch.equal(g, grad_gathered)  # each shard got its columns of the gradient, only those
    torch.testing.assert_close(g.float(), grad.float(), **_tol(d["s"].dtype))


@pytest.mark.parametrize("name", list(C.DENSE))
def test_dense_gathered_protocol_with_callables(runs, name):
    """sharded_loss_gathered (offsets found by the call, reduction mean) on sharded_select's sets."""
    d, sel, *_ = _dense_oracle(name)
    sg = d["s"].clone().requires_grad_()
    ref = R.rce_kd_loss_gathered(sg.gather(1, sel.indices), d["t"].gather(1, sel.indices), sel, reduction="mean")
    ref.backward()
    for o in (r[name] for r in runs):
        assert torch.equal(o["loss_g"], ref.detach())
    assert torch.equal(_concat([r[name] for r in runs], "grad_g", 1), sg.grad)


def _emb_oracle(name):
    d = C.emb_data(name)
    kw = dict(K=C.K, M=C.M, L=C.L, mode=d["mode"], seed=5, row_ids=d["row_ids"])
    s_rows, t_rows = d["U"] @ d["V"].T, d["Ut"] @ d["Vt"].T
    sel = R.select(s_rows, t_rows if d["teacher_topk"] is None else None, d["teacher_topk"], exclude=d["mask"], **kw)
    U, V = d["U"].clone().requires_grad_(), d["V"].clone().requires_grad_()
    loss = R.rce_kd_loss_gathered(R.gathered_dot(U, V, sel.indices), R.gathered_dot(d["Ut"], d["Vt"], sel.indices),
                                  sel, reduction="sum")
    loss.backward()
    return d, sel, loss.detach(), U.grad, V.grad


@pytest.mark.parametrize("name", list(C.EMB))
def test_embeddings_sharded_equals_single_process(runs, name):
    d, sel, loss, gU, gV = _emb_oracle(name)
    got = [r[name] for r in runs]
    for o in got:
        _same_selection(o["select"], sel)
        torch.testing.assert_close(o["loss"], loss, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[0]["loss"], got[1]["loss"])
    torch.testing.assert_close(_concat(got, "grad_V", 0), gV, rtol=1e-5, atol=1e-6)  # item grads on their owner
    if C.EMB[name]["sum_user"]:  # shard_input: the full user gradient on every rank
        for o in got:
            torch.testing.assert_close(o["grad_U"], gU, rtol=1e-5, atol=1e-6)
    else:  # each rank its own items' part; the parts sum to the gradient
        torch.testing.assert_close(got[0]["grad_U"] + got[1]["grad_U"], gU, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got[0]["grad_U"], gU)
    if C.EMB[name].get("custom"):
        assert all(o["topm_calls"] == 2 for o in got)  # the given local_topm did the ranking (student, teacher)


def test_shard_layout(runs):
    o = runs[0]["emb_paper_topk_computed_exclusion"]
    assert o["layout"] == ((0, 23), (23, 17), 40)


def test_group_of_one_process_equals_the_plain_api(runs):
    d, sel, loss, grad, loss_gathered, _ = _dense_oracle("dense_paper_topk_computed")
    for o in (r["single"] for r in runs):
        _same_selection(o["select"], sel)
        assert torch.equal(o["loss"], loss_gathered)
        torch.testing.assert_close(o["grad"], grad)


def test_the_group_is_in_step_after_the_errors(runs):
    d, sel, loss, *_ = _dense_oracle("dense_paper_topk_computed")
    for r in runs:
        _same_selection(r["after_errors"]["select"], sel)


ERROR_TEXT = {
    "B": ["B (the rows) must agree", "rank 0: 6, rank 1: 5"],
    "K": ["K must agree"],
    "overlap": ["overlap", "[10, 30)"],
    "gap": ["leave a gap", "[25, 45)"],
    "mixed_offsets": ["item_offset must be given on every rank or on none"],
    "local_type": ["exclude_shard must have dtype torch.bool"],
    "nan": ["student_shard contains NaN", "rank 0"],
    "seed": ["seed", "must agree"],
    "row_ids": ["row_ids", "must agree"],
    "dtype": ["dtype of the student", "torch.float64"],
    "topk_excluded": ["teacher_topk holds an id that exclude_shard marks in row 4", "rank 1"],
    "too_few_eligible": ["fewer than 10 eligible items in row 1"],
    "callable_fails": ["the student's table is not loaded", "rank 1"],
    "kind": ["called different functions"],
}


@pytest.mark.parametrize("kind", C.ERRORS)
def test_a_mismatch_raises_on_every_rank(runs, kind):
    for r, out in enumerate(runs):
        msg = out["errors"][kind]
        assert msg is not None, f"rank {r} raised nothing for {kind}"
        for text in ERROR_TEXT[kind]:
            assert text in msg, (r, msg)


def test_communication_volume(runs):
    """Bytes per call as docs/DISTRIBUTED.md states them (float32: one int64 key per candidate)."""
    o = runs[0]["dense_paper_topk_computed"]
    assert o["select_log"]["select.candidates"] == dict(calls=1, payload_bytes=C.B * (C.M + C.K) * 8,
                                                        wire_bytes=(WORLD - 1) * C.B * (C.M + C.K) * 8)
    assert o["select_log"]["select.meta"]["payload_bytes"] == len(D._META) * 8
    W = 2 * C.K + C.L
    assert o["loss_log"]["loss.scores"] == dict(calls=1, payload_bytes=2 * C.B * W * 4, wire_bytes=2 * C.B * W * 4)
    o = runs[0]["dense_official_topk_given_small_shard"]  # teacher top-K given: the pools only
    assert o["select_log"]["select.candidates"]["payload_bytes"] == C.B * C.M * 8
    o = runs[0]["dense_float64_exclusion"]  # float64: value and id
    assert o["select_log"]["select.candidates"]["payload_bytes"] == C.B * (C.M + C.K) * 16
    o = runs[0]["emb_official_topk_given_small_shard"]  # the user-vector gradient's all-reduce
    assert o["loss_log"]["loss.user_grad"]["payload_bytes"] == C.B * 4 * 4


# --------------------------------------------------------------- single-process pieces
def test_packed_keys_order_as_the_spec():
    """The int64 keys order (value desc, id asc) with -0.0 == 0.0 and padding last, on values of
    every sign and magnitude."""
    vals = torch.tensor([[3.0, -0.0, 0.0, -1e-40, 1e-40, float("-inf"), -2.5, 3.0, 7e37, -7e37, float("-inf")]])
    ids = torch.tensor([[9, 4, 2, 6, 7, 1, 3, 0, 5, 8, -1]])
    keys = D._encode(vals, ids, packed=True)
    got_ids, got_vals = D._merge(keys.unsqueeze(0), vals.shape[1], packed=True)
    want = sorted(range(vals.shape[1]), key=lambda j: (ids[0, j] < 0, -float(vals[0, j]) if vals[0, j] > float(
        "-inf") else float("inf"), int(ids[0, j])))
    assert got_ids[0].tolist() == [int(ids[0, j]) for j in want]
    assert torch.equal(got_vals[0, :-1], (vals[0, want] + 0.0)[:-1])
    assert torch.isnan(got_vals[0, -1])


def test_topm_matmul_matches_ranked_topk():
    g = torch.Generator().manual_seed(0)
    U, V = torch.randint(-2, 3, (7, 3), generator=g).float(), torch.randint(-2, 3, (30, 3), generator=g).float()
    vals, ids = D.topm_matmul(U, V, 8, item_offset=100, chunk_elems=50)  # several chunks of rows
    ref = R.spec.ranked_topk(U @ V.T, 8)
    assert torch.equal(ids, ref + 100)
    assert torch.equal(vals, (U @ V.T).gather(1, ref))
    vals, ids = D.topm_matmul(U, V[:5], 8)  # fewer items than k: padded
    assert (ids[:, 5:] == -1).all() and torch.isinf(vals[:, 5:]).all()


def test_not_initialized_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group exists in this process")
    with pytest.raises(RuntimeError, match="not initialized"):
        D.sharded_select(torch.zeros(2, 5), torch.zeros(2, 5), K=1, M=2, L=1)


def test_benchmark_bytes_equal_the_model(tmp_path):
    """benchmarks/bench_distributed.py on tiny shapes, 1 and 2 processes: a row per (kind, provider,
    op), and the measured wire bytes equal the model of docs/DISTRIBUTED.md."""
    import csv
    out = tmp_path / "d.csv"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_distributed.py"), "--N", "600",
                        "--B", "16", "--users", "40", "--M", "20", "--K", "5", "--L", "6", "--D", "4", "--repeats", "1",
                        "--epoch-repeats", "1", "--warmup", "0", "--timeout", "120", "--csv", str(out)],
                       env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 2 * 3 * 2 + 2 * 3  # P = 1: sharded and plain; P = 2: sharded
    for row in rows:
        if row["provider"] == "sharded":
            assert row["wire_bytes"] == row["model_wire_bytes"], row
        assert float(row["p50_ms"]) > 0
    p2 = {(r["kind"], r["op"]): int(r["wire_bytes"]) for r in rows if r["procs"] == "2"}
    assert p2[("dense", "select")] == 16 * (20 + 5) * 8 + 25 * 8  # the candidates and the metadata word
    assert p2[("emb", "step")] == 2 * 16 * (2 * 5 + 6) * 4 + 16 * 4 * 4  # scores (ring: 2 (P-1)/P = 1) + user grad
