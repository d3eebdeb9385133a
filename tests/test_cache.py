"""The on-disk cache of compiled cells: cold compiles are fast enough, warm loads are fast, a corrupt
entry is rebuilt, and concurrent writers never leave a broken entry.

Timings run in fresh interpreters (nothing compiled or cached in memory, the Lark parser not yet
built) with a fresh cache directory; the thresholds are the project's targets: < 2 s cold per zoo
cell, < 100 ms warm.
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
HEAVIEST_FIRST = ["slstm", "greff_fgr"]  # the most SymPy work: these pay for the cold parser build too

TIMING_SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from celldsl.compiler import compile_cell
cold, warm = {}, {}
for name in sys.argv[1:]:
    t0 = time.perf_counter(); compile_cell(name); cold[name] = time.perf_counter() - t0
    t0 = time.perf_counter(); compile_cell(name); warm[name] = time.perf_counter() - t0
print(json.dumps({"cold": cold, "warm": warm}))
"""

WARM_SCRIPT = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
from celldsl.compiler import compile_cell
warm = {}
for name in sys.argv[1:]:
    t0 = time.perf_counter(); compile_cell(name); warm[name] = time.perf_counter() - t0
print(json.dumps(warm))
"""


def _run(script: str, cache: Path, names: list[str]) -> dict:
    env = dict(os.environ, CELLDSL_CACHE=str(cache))
    command = [sys.executable, "-c", script, *names]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def timings(tmp_path_factory):
    """Cold and warm compile times of every zoo cell in a fresh process and cache, and warm load
    times in a second fresh process that finds the cache filled."""
    cache = tmp_path_factory.mktemp("cold-cache")
    order = HEAVIEST_FIRST + [n for n in ZOO if n not in HEAVIEST_FIRST]
    first = _run(TIMING_SCRIPT, cache, order)
    later = _run(WARM_SCRIPT, cache, order)
    return first["cold"], first["warm"], later, cache


@pytest.mark.parametrize("cell", ZOO)
def test_cold_compile_under_two_seconds(timings, cell):
    cold, _, _, _ = timings
    assert cold[cell] < 2.0, f"{cell}: {cold[cell]:.2f} s cold"


@pytest.mark.parametrize("cell", ZOO)
def test_warm_load_under_100_ms(timings, cell):
    _, warm_same, warm_fresh, _ = timings
    assert warm_same[cell] < 0.1, f"{cell}: {1000 * warm_same[cell]:.0f} ms warm"
    assert warm_fresh[cell] < 0.1, f"{cell}: {1000 * warm_fresh[cell]:.0f} ms warm in a new process"


def test_the_timed_compiles_left_one_entry_per_cell(timings):
    *_, cache = timings
    entries = sorted(cache.glob("*/plan.pkl"))
    assert len(entries) == len(ZOO)
    assert not list(cache.glob("**/*.tmp"))


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
    command = [sys.executable, "-c", TIMING_SCRIPT, *names]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        p.communicate(timeout=300)
        assert p.returncode == 0
    entries = list(cache.glob("*/plan.pkl"))
    assert len(entries) == len(names)
    for entry in entries:
        assert isinstance(pickle.loads(entry.read_bytes()), CompiledCell)
    assert not list(cache.glob("**/*.tmp"))
