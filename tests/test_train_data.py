"""Data loading: the CiteULike split, Gowalla / Yelp2018 statistics, the synthetic generator,
malformed files, checksums."""
import csv
import math
import os

import numpy as np
import pytest
from test_train_helpers import shared_data_dir

from rcekd_train.data import (
    DataFormatError,
    load_dataset,
    make_synthetic,
    read_user_lines,
    read_users_dat,
    split_in_order,
    write_split,
)
from rcekd_train.data.citeulike import load_citeulike
from rcekd_train.data.lightgcn_format import load_lightgcn_format


def read_tsv_pairs(path):
    with open(path) as f:
        rows = list(csv.reader(f, delimiter="\t"))
    assert rows[0] == ["USER", "ITEM"]
    return [(int(u), int(i)) for u, i in rows[1:]]


# --- split rule ------------------------------------------------------------------------------
@pytest.mark.parametrize("n,expected", [
    (1, (1, 0, 0)), (2, (1, 0, 1)), (5, (4, 0, 1)), (9, (7, 1, 1)), (10, (8, 1, 1)), (11, (8, 1, 2)),
    (19, (15, 2, 2)), (20, (16, 2, 2)),
])
def test_split_in_order_sizes(n, expected):
    # train = max(floor(8n/10), 1), valid = floor(9n/10) - train, test = rest (hand computed)
    a, b, c = split_in_order(list(range(n)))
    assert (len(a), len(b), len(c)) == expected
    assert a + b + c == list(range(n))  # order kept, nothing lost


# --- CiteULike ----------------------------------------------------------------------------------
def test_citeulike_reproduces_split_811():
    root = shared_data_dir("citeulike", "split_811")
    data = load_dataset("citeulike", root)
    assert (data.num_users, data.num_items) == (5219, 25181)
    assert (data.train.nnz, data.valid.nnz, data.test.nnz) == (98405, 12451, 14724)
    for part in ("train", "valid", "test"):
        expected = read_tsv_pairs(os.path.join(root, "citeulike", "split_811", f"{part}.txt"))
        got = [tuple(p) for p in getattr(data, part).pairs().tolist()]
        assert got == expected, part  # same pairs in the same order


def test_citeulike_independent_recount():
    """Re-derive the statistics from users.dat with a plain loop (no code of the package)."""
    root = shared_data_dir("citeulike", "users.dat")
    lines = open(os.path.join(root, "citeulike", "users.dat")).read().split("\n")
    users = [list(map(int, l.split()))[1:] for l in lines if l.strip()]
    kept = [x for x in users if len(x) >= 5]
    items = sorted({i for x in kept for i in x})
    data = load_dataset("citeulike", root)
    assert data.num_users == len(kept) and data.num_items == len(items)
    assert data.train.nnz + data.valid.nnz + data.test.nnz == sum(len(x) for x in kept) == 125580
    # user 0's first item is its smallest-original-id kept item's new id
    remap = {o: n for n, o in enumerate(items)}
    assert data.train.items_of(0).tolist() == [remap[i] for i in kept[0][:max(8 * len(kept[0]) // 10, 1)]]


def test_citeulike_write_split_roundtrip(tmp_path):
    raw = ["3 10 11 12", "6 5 6 7 8 9 10", "5 1 2 3 4 5"]
    (tmp_path / "users.dat").write_text("\n".join(raw))
    data = load_citeulike(str(tmp_path))
    assert data.num_users == 2  # the 3-item user is dropped
    # kept items 1..10 -> ids 0..9 in ascending original order
    assert data.num_items == 10
    assert data.train.items_of(0).tolist() == [4, 5, 6, 7]  # originals 5,6,7,8 (floor(4.8) = 4)
    assert data.valid.items_of(0).tolist() == [8]  # floor(5.4) = 5
    assert data.test.items_of(0).tolist() == [9]
    assert data.train.items_of(1).tolist() == [0, 1, 2, 3] and data.test.items_of(1).tolist() == [4]
    write_split(data, str(tmp_path / "split"))
    assert read_tsv_pairs(str(tmp_path / "split" / "train.txt"))[:4] == [(0, 4), (0, 5), (0, 6), (0, 7)]


# --- Gowalla / Yelp2018 --------------------------------------------------------------------------
@pytest.mark.parametrize("name,users,items,inter,train,test", [
    ("gowalla", 29858, 40981, 1027370, 810128, 217242),
    ("yelp2018", 31668, 38048, 1561406, 1237259, 324147),
])
def test_lightgcn_statistics_match_readme(name, users, items, inter, train, test):
    root = shared_data_dir(name, "train.txt")
    data = load_dataset(name, root)
    assert (data.num_users, data.num_items) == (users, items)
    assert data.train.nnz + data.valid.nnz == train  # validation is carved out of train
    assert data.test.nnz == test
    assert data.train.nnz + data.valid.nnz + data.test.nnz == inter
    assert (data.train.lengths() >= 1).all() and (data.test.lengths() >= 1).all()
    # valid = the last ceil(10%) of each user's training list, at least one item left in train
    raw = read_user_lines(os.path.join(root, name, "train.txt"))
    for u in (0, 1, 17, users - 1):
        n = len(raw[u])
        k = min(n - 1, math.ceil(0.1 * n))
        assert data.valid.items_of(u).tolist() == raw[u][n - k:]
        assert data.train.items_of(u).tolist() == raw[u][:n - k]


def test_lightgcn_format_small(tmp_path):
    (tmp_path / "train.txt").write_text("0 3 1 4 1000\n1 5 9\n2 6\n")
    (tmp_path / "test.txt").write_text("0 2\n1 7\n2 8\n")
    data = load_lightgcn_format(str(tmp_path), "toy", valid_frac=0.1)
    assert data.num_users == 3 and data.num_items == 1001
    assert data.train.items_of(0).tolist() == [3, 1, 4] and data.valid.items_of(0).tolist() == [1000]
    assert data.train.items_of(1).tolist() == [5] and data.valid.items_of(1).tolist() == [9]
    assert data.train.items_of(2).tolist() == [6] and data.valid.items_of(2).tolist() == []


# --- the data directory ---------------------------------------------------------------------------
def test_missing_data_dir_message(monkeypatch):
    monkeypatch.delenv("RCEKD_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="RCEKD_DATA"):
        load_dataset("citeulike", None)


# --- synthetic -------------------------------------------------------------------------------------
def test_synthetic_deterministic_and_valid():
    a = make_synthetic(num_users=300, num_items=200, min_items=5, max_items=50, seed=7)
    b = make_synthetic(num_users=300, num_items=200, min_items=5, max_items=50, seed=7)
    c = make_synthetic(num_users=300, num_items=200, min_items=5, max_items=50, seed=8)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    for u in range(a.num_users):
        items = np.concatenate([a.train.items_of(u), a.valid.items_of(u), a.test.items_of(u)])
        assert len(set(items.tolist())) == len(items) >= 5  # distinct, at least min_items
    # long tail (default sizes): the most popular tenth of the items holds far more than a tenth of the pairs
    d = make_synthetic()
    counts = np.bincount(d.train.indices, minlength=d.num_items)
    assert np.sort(counts)[::-1][: d.num_items // 10].sum() > 0.25 * counts.sum()


# --- checksums ------------------------------------------------------------------------------------
def test_download_checksums_match_local_files():
    from rcekd_train.data.download import SOURCES, verify
    root = shared_data_dir("citeulike", "users.dat")
    for name in SOURCES:
        if os.path.isdir(os.path.join(root, name)):
            assert set(verify(name, root).values()) == {"ok"}, name


def test_download_rejects_bad_checksum(tmp_path, monkeypatch):
    from rcekd_train.data import download as dl

    def fake_fetch(url, dest, timeout):
        open(dest, "wb").write(b"not the file")

    monkeypatch.setattr(dl, "_fetch", fake_fetch)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        dl.download("citeulike", str(tmp_path), log=lambda m: None)
    assert not os.path.exists(tmp_path / "citeulike" / "users.dat")


# --- malformed files: every one names the file and the line (issue 11, item 6) -------------------------------------
@pytest.mark.parametrize("name,content,line,words", [
    ("users.dat", b"2 1 2\n3 4 5\n", 2, "count says 3"),
    ("users.dat", b"2 1 2\n2 4 x\n", 2, "not an integer"),
    ("users.dat", b"1 1\n\n2 1 2", 2, "empty line"),
    ("users.dat", b"2 1 1\n", 1, "repeated"),
    ("users.dat", b"1 -4\n", 1, "negative"),
    ("train.txt", b"0 1 2\n1 2 y\n", 2, "not an integer"),   # the LightGCN format
    ("train.txt", b"0 1 2 1\n", 1, "repeated"),
    ("users.dat", b"2 1 2\n2 4 \xff\xfe\n", 2, "undecodable bytes (not UTF-8) at column 5"),
    ("users.dat", b"2 1 2\n2 --5 3\n", 2, "not an integer: '--5'"),          # isdigit-based checks let it through
    ("users.dat", b"2 1 2\n2 1_5697 3\n", 2, "not an integer: '1_5697'"),    # int() reads it as 15697
    ("users.dat", b"1 +5\n", 1, "not an integer: '+5'"),                       # int() reads it as 5
    ("users.dat", b"1 1.5\n", 1, "not an integer: '1.5'"),
    ("users.dat", "1 \u0663\n".encode(), 1, "not an integer: '\u0663'"),      # an Arabic-Indic 3: int() says 3
    ("users.dat", b"2 1 99999999999999999999\n", 1, "beyond int64"),
    ("users.dat", b"3 1 2 3\n3 4 5", 2, "the count says 3 items but the line has 2; the last line: is the file "
                                         "truncated?"),
    ("train.txt", b"0 1 2\n1 2 x\xff\n", 2, "undecodable bytes"),
    ("train.txt", b"0 1 2\n1 --5\n", 2, "not an integer: '--5'"),
    ("train.txt", b"0 1 2\n1 1_5697\n", 2, "not an integer: '1_5697'"),
    ("train.txt", b"0 1 2\n1 2 3", 2, "the last line has no newline: the file looks truncated"),
    ("train.txt", b"0 1 2\n0 3\n", 2, "user 0 appears twice (first on line 1)"),
])
def test_malformed_tokens_name_file_and_line(tmp_path, name, content, line, words):
    p = tmp_path / name
    p.write_bytes(content)
    reader = read_users_dat if name == "users.dat" else read_user_lines
    with pytest.raises(DataFormatError) as e:
        reader(str(p))
    assert str(e.value).startswith(f"{p}, line {line}: ") and words in str(e.value), str(e.value)


def test_tabs_and_crlf_are_plain_separators(tmp_path):
    p = tmp_path / "train.txt"
    p.write_bytes(b"0\t3 1\r\n1  5\t9 \r\n\n")
    assert read_user_lines(str(p)) == {0: [3, 1], 1: [5, 9]}


@pytest.mark.parametrize("train,test,file,line,words", [
    ("0 1 2\n1 2 1000000000000\n", "0 3\n1 4\n", "train.txt", 2, "item id 1000000000000 is too large: the files "
                                                                 "hold 5 distinct item ids"),
    ("0 1 2\n1 2 3\n", "0 4\n1000000000000 5\n", "test.txt", 2, "user id 1000000000000 is too large: the files hold "
                                                               "3 distinct user ids"),
    ("0 1 2\n1 2 2147483647\n", "0 3\n", "train.txt", 2, "item id 2147483647 is too large"),
])
def test_huge_ids_are_refused_before_anything_is_allocated(tmp_path, monkeypatch, train, test, file, line, words):
    """An id sizes the embedding tables (max id + 1 rows): one id of 10^12 must not ask for terabytes. The check
    comes before any structure of that size (the per-user lists, the CSR splits) is built."""
    from rcekd_train.data import base
    monkeypatch.setattr(base.Split, "from_lists", lambda *a: pytest.fail("allocated before the id check"))
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "test.txt").write_text(test)
    with pytest.raises(DataFormatError) as e:
        load_lightgcn_format(str(tmp_path), "toy")
    assert str(e.value).startswith(f"{tmp_path / file}, line {line}: ") and words in str(e.value), str(e.value)


def test_a_sparse_but_reasonable_id_range_is_accepted(tmp_path):
    # gaps are fine while the table stays within 2 x the distinct ids + 1024 rows (test_lightgcn_format_small too)
    (tmp_path / "train.txt").write_text("0 1 2\n1 2 1030\n")  # 5 distinct: below 2 x 5 + 1024
    (tmp_path / "test.txt").write_text("0 3\n1 4\n")
    assert load_lightgcn_format(str(tmp_path), "toy").num_items == 1031


def test_test_items_in_train_name_the_test_line(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 2\n1 2 3\n")
    (tmp_path / "test.txt").write_text("0 4\n1 3\n")
    with pytest.raises(DataFormatError, match=rf"{tmp_path / 'test.txt'}, line 2: user 1 has test items also in "
                                              r"train: \[3\]"):
        load_lightgcn_format(str(tmp_path), "toy")
