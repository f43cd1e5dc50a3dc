"""Fetching the public data files, with sha256 checks.

The sources are the upstream repositories named in the data README (raw files
at pinned commits; a second mirror where one exists). Every file is checked
against the sha256 below before it is moved into place; a mismatch is an
error and leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from typing import Dict, List

_LGCN_PT = "https://raw.githubusercontent.com/gusye1234/LightGCN-PyTorch/947ca2b3b1d2d3545b114145710cb06c4e57b3d2/data"
_LGCN_TF = "https://raw.githubusercontent.com/kuandeng/LightGCN/b067ec05f16a24e0e1efe63cd82385f0c469af20/Data"

# name -> file -> (sha256, size in bytes, [urls])
SOURCES: Dict[str, Dict[str, tuple]] = {
    "citeulike": {
        "users.dat": ("02d5d429b2c0362e0ed79f6ef204666b4092563d21493abf4dfb521e8a7078bf", 770649, [
            "https://raw.githubusercontent.com/changun/CollMetric/d9026cfce7c6e8dd2640b842ad524b61031b29ac/"
            "citeulike-t/users.dat",
            "https://raw.githubusercontent.com/SeongKu-Kang/HetComp_WWW23/59568a9dfc0132c94e6d85a4520655308c27adae/"
            "Data/users.dat",
        ]),
    },
    "gowalla": {
        "train.txt": ("7244696fdeb23911319cf7b689f2e15a3c4c92549c873a5677b44e3f13cc3e62", 4633414, []),
        "test.txt": ("099a2a73924e4b754dc6efd730d764f492321b53c38eb93298850c83acf57be3", 1372559, []),
        "user_list.txt": ("5344c4d0deef610e1f148f23ad216a0db03b36f88834cd39a06786a672c5f5a1", 351203, []),
        "item_list.txt": ("6b186f92890cc3f0c15a6dae5d6285f125a302bb8c5ea0cd9a16cf9c16347139", 506926, []),
    },
    "yelp2018": {
        "train.txt": ("1e9568725a9e833d0ac3bae01c94cd95367f73b3bb6104fd26b5f65ea5054093", 6904880, []),
        "test.txt": ("9cd9b37926cd1447a06625ffa7914527573fb097c10cb0bbdb1d1b8ded3742fe", 1986152, []),
        "user_list.txt": ("4931519d8b3c40d71a34cc386c3287b6d63c1be9a82edd7ee6bfad765e640778", 907278, []),
        "item_list.txt": ("1091bc824b60561906df552f2f7cb3ec61767b1e46fd4386b44400ae49712007", 1092298, []),
    },
}
for _name in ("gowalla", "yelp2018"):
    for _file, (_sha, _size, _urls) in SOURCES[_name].items():
        _urls.extend([f"{_LGCN_PT}/{_name}/{_file}", f"{_LGCN_TF}/{_name}/{_file}"])


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(name: str, data_dir: str) -> Dict[str, str]:
    """``{file: 'ok' | 'missing' | 'bad checksum'}`` for the files of one data set in data_dir/name/."""
    out = {}
    for file, (sha, _size, _urls) in SOURCES[name].items():
        path = os.path.join(data_dir, name, file)
        if not os.path.exists(path):
            out[file] = "missing"
        else:
            out[file] = "ok" if sha256_file(path) == sha else "bad checksum"
    return out


def _fetch(url: str, dest: str, timeout: float) -> None:
    req = urllib.request.Request(url, headers={"User-Agent": "rcekd-train"})
    with urllib.request.urlopen(req, timeout=timeout) as r, open(dest, "wb") as f:
        shutil.copyfileobj(r, f)


def download(name: str, data_dir: str, force: bool = False, timeout: float = 60.0,
             log=print) -> List[str]:
    """Downloads the files of ``name`` into data_dir/name/ (skipping verified ones unless ``force``).
    Returns the paths written or kept. Raises RuntimeError when a file cannot be fetched from
    any source with the right checksum."""
    if name not in SOURCES:
        raise ValueError(f"unknown data set {name!r}; choose from {sorted(SOURCES)}")
    target = os.path.join(data_dir, name)
    os.makedirs(target, exist_ok=True)
    done = []
    for file, (sha, size, urls) in SOURCES[name].items():
        path = os.path.join(target, file)
        if not force and os.path.exists(path) and sha256_file(path) == sha:
            log(f"{path}: present, checksum ok")
            done.append(path)
            continue
        errors = []
        for url in urls:
            fd, tmp = tempfile.mkstemp(dir=target, prefix=f".{file}.")
            os.close(fd)
            try:
                log(f"fetching {url} ({size / 1e6:.1f} MB)")
                _fetch(url, tmp, timeout)
                got = sha256_file(tmp)
                if got != sha:
                    raise RuntimeError(f"sha256 mismatch: expected {sha}, got {got}")
                os.replace(tmp, path)
                done.append(path)
                break
            except Exception as e:  # try the next mirror
                errors.append(f"{url}: {e}")
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        else:
            raise RuntimeError(f"could not fetch {name}/{file}:\n  " + "\n  ".join(errors))
    if name == "citeulike":
        from .citeulike import load_citeulike, write_split
        data = load_citeulike(target)
        write_split(data, os.path.join(target, "split_811"))
        log(f"wrote {os.path.join(target, 'split_811')} ({data.train.nnz} / {data.valid.nnz} / {data.test.nnz})")
    return done
