"""The on-disk cache of compiled cells: a fresh process compiles every zoo cell into an empty cache and
a second fresh process loads them all without compiling, a corrupt entry is rebuilt, and concurrent
writers never leave a broken entry.

How fast cold compiles and warm loads are (targets: < 2 s cold, < 100 ms warm) is measured by
bench/compile.py, not here: timings in tests fail on a loaded machine and prove nothing on a quiet one.
"""

import json
import os
import pickle
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from celldsl import compile_cell
from celldsl.compiler import CompiledCell, _atomic_write, cache_dir

ROOT = Path(__file__).resolve().parents[1]
ZOO = sorted(p.stem for p in (ROOT / "cells").glob("*.cell"))

COMPILE_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from celldsl.compiler import compile_cell
print(json.dumps({name: compile_cell(name).key for name in sys.argv[1:]}))
"""

# The second process must find every cell on disk: compiling is made to fail.
LOAD_ONLY_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from celldsl import compiler
def no_compiling(source, key):
    raise AssertionError(f"compiled {source.filename} again instead of loading it from the cache")
compiler._compile = no_compiling
loaded = {name: compiler.compile_cell(name) for name in sys.argv[1:]}
print(json.dumps({name: [c.key, c.name, len(c.plan.gemms)] for name, c in loaded.items()}))
"""


def _run(script: str, cache: Path, names: list[str]) -> dict:
    env = dict(os.environ, CELLDSL_CACHE=str(cache))
    command = [sys.executable, "-c", script, *names]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    """A fresh cache that a fresh process filled with every zoo cell: (cache dir, name -> key)."""
    cache = tmp_path_factory.mktemp("cold-cache")
    return cache, _run(COMPILE_SCRIPT, cache, ZOO)


def test_a_new_process_loads_every_zoo_cell_without_compiling(filled_cache):
    cache, keys = filled_cache
    loaded = _run(LOAD_ONLY_SCRIPT, cache, ZOO)
    for name in ZOO:
        key, cell_name, n_gemms = loaded[name]
        assert key == keys[name]
        assert cell_name == compile_cell(name).name and n_gemms == len(compile_cell(name).plan.gemms)


def test_the_compiles_left_one_whole_entry_per_cell(filled_cache):
    cache, keys = filled_cache
    entries = sorted(cache.glob("*/plan.pkl"))
    assert sorted(e.parent.name for e in entries) == sorted(keys.values())
    assert not list(cache.glob("**/*.tmp"))


def test_bench_compile_prints_a_row_per_cell():
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "compile.py"), "--cells", "gru,lstm"],
                           capture_output=True, text=True, timeout=300)
    assert bench.returncode == 0, bench.stderr
    rows = [line for line in bench.stdout.splitlines() if line.startswith("| ") and "cold" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["gru", "lstm"]
    for row in rows:
        assert all(float(v) > 0 for v in row.split("|")[2:5])


# ---- corrupt entries -------------------------------------------------------------------------------


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _entry(compiled: CompiledCell) -> Path:
    return cache_dir() / compiled.key / "plan.pkl"


CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "empty": lambda data: b"",
    "garbage": lambda data: bytes(range(256)) * 4,
    "flipped-bytes": lambda data: data[:40] + bytes(b ^ 0xFF for b in data[40:80]) + data[80:],
    "foreign-object": lambda data: pickle.dumps({"not": "a compiled cell"}),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_entry_is_rebuilt(cache, how):
    first = compile_cell("gru")
    entry = _entry(first)
    entry.write_bytes(CORRUPTIONS[how](entry.read_bytes()))
    again = compile_cell("gru")
    assert isinstance(again, CompiledCell) and again.key == first.key
    assert again.plan.num_stages == 1 and [g.params for g in again.plan.gemms] == [("W_hr", "W_hz", "W_hn")]
    restored = pickle.loads(entry.read_bytes())  # the rebuilt entry replaced the bad one
    assert isinstance(restored, CompiledCell) and restored.key == first.key


def test_entry_of_another_key_is_not_trusted(cache):
    lstm, gru = compile_cell("lstm"), compile_cell("gru")
    _entry(gru).write_bytes(_entry(lstm).read_bytes())  # a well-formed entry in the wrong place
    again = compile_cell("gru")
    assert again.name == "gru"


def test_unwritable_cache_only_costs_speed(cache):
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the cache directory should be")
    compiled = compile_cell("rnn_tanh")
    assert compiled.plan.num_stages == 1
    assert hasattr(compiled.torch_module, "stage1_forward")  # the generated code lands elsewhere


def test_key_depends_on_text_name_and_compiler_version(cache, tmp_path, monkeypatch):
    from celldsl import compiler

    text = (ROOT / "cells" / "lstm.cell").read_text()
    a, b = tmp_path / "a.cell", tmp_path / "b.cell"
    a.write_text(text)
    b.write_text(text)
    ka = compile_cell(a).key
    assert compile_cell(a).key == ka
    assert compile_cell(b).key != ka  # the file name is part of every message, so of the entry
    monkeypatch.setattr(compiler, "COMPILER_VERSION", compiler.COMPILER_VERSION + "-next")
    assert compile_cell(a).key != ka
    monkeypatch.undo()
    a.write_text(text + "\n# a comment\n")
    assert compile_cell(a).key != ka


# ---- concurrent writers --------------------------------------------------------------------------------


def test_concurrent_atomic_writes_leave_one_whole_payload(tmp_path):
    path = tmp_path / "entry" / "plan.pkl"
    payloads = [bytes([i]) * (200_000 + i) for i in range(8)]
    threads = [threading.Thread(target=_atomic_write, args=(path, p)) for p in payloads for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert not list(path.parent.glob("*.tmp"))


def test_two_processes_compiling_into_one_cache(tmp_path):
    cache = tmp_path / "shared"
    names = ["lstm", "gru", "mut1", "greff_fgr", "slstm", "sru"]
    env = dict(os.environ, CELLDSL_CACHE=str(cache))
    command = [sys.executable, "-c", COMPILE_SCRIPT, *names]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    entries = list(cache.glob("*/plan.pkl"))
    assert len(entries) == len(names)
    for entry in entries:
        assert isinstance(pickle.loads(entry.read_bytes()), CompiledCell)
    assert not list(cache.glob("**/*.tmp"))
