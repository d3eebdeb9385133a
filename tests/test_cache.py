"""The on-disk cache (celldsl/cache.py) holds generated code only, and is trusted only when private.

- nothing is unpickled: a fresh process compiles cells from their text, finds a cell it only knows
  by key from the text recorded under the key (verified against the key), and ignores a planted
  pickle or a record whose text does not give the key;
- keys follow the text, the file name and the compiler's own source (a cache written by another
  version of celldsl is never read back);
- a cache folder another user owns, or that others can write to (or a non-sticky parent they can
  write to), is refused with UnsafeCacheError, checked where it resolves (a symlink changes nothing);
  so is an entry folder inside it; a file of another user or one others can write is replaced, never
  loaded; folders are 0700 whatever the umask; one that cannot be written costs only speed; a full
  disk is an error that says so;
- the C kernels' .so is loaded only when it matches its recorded checksum: truncated, empty, garbage
  or another cell's library is rebuilt (each case in a fresh process, where a bad load would crash);
- concurrent writers never leave a broken file.

How fast compiles are is measured by bench/compile.py, not here.
"""

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from zoo import ELEMENTWISE

from celldsl import cache, compile_cell
from celldsl.targets.c import fused as cpu_fused

ROOT = Path(__file__).resolve().parents[1]
ZOO = ELEMENTWISE  # found by key with their plans' GEMMs counted: a matrix cell (tests/zoo.py) has no plan
needs_cc = pytest.mark.skipif(cpu_fused.compiler() is None, reason="needs a C compiler to build the kernels")

COMPILE_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from celldsl.compiler import compile_cell
print(json.dumps({name: compile_cell(name).key for name in sys.argv[1:]}))
"""

FIND_BY_KEY_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("ignore")
from celldsl.compiler import compile_key
found = {key: compile_key(key) for key in sys.argv[1:]}
print(json.dumps({key: [c.name, len(c.plan.gemms)] if c else None for key, c in found.items()}))
"""


def _run(script: str, cache_root: Path, args: list[str]) -> dict:
    env = dict(os.environ, CELLDSL_CACHE=str(cache_root))
    done = subprocess.run(
        [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def private(tmp_path, monkeypatch):
    """A fresh, private cache folder for the test."""
    root = tmp_path / "cache"
    monkeypatch.setenv("CELLDSL_CACHE", str(root))
    return root


def test_a_fresh_process_finds_every_zoo_cell_by_key(tmp_path):
    keys = _run(COMPILE_SCRIPT, tmp_path, ZOO)
    found = _run(FIND_BY_KEY_SCRIPT, tmp_path, list(keys.values()))
    for name, key in keys.items():
        assert found[key] == [compile_cell(name).name, len(compile_cell(name).plan.gemms)]
    assert not list(tmp_path.glob("**/*.tmp"))


def test_the_cache_holds_no_pickles(private):
    layer_cell = compile_cell("gru")
    layer_cell.torch_module  # noqa: B018 - writes the generated module
    if cpu_fused.compiler() is not None:
        cpu_fused.build_library(layer_cell)
    suffixes = {p.suffix for p in private.rglob("*") if p.is_file()}
    assert suffixes <= {".json", ".py", ".c", ".so", ".sha256"}, suffixes


def test_a_planted_pickle_is_never_loaded(private, tmp_path):
    """An attacker's plan.pkl next to a cell's entry runs nothing: the compiler does not read it."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    key = compile_cell("lstm").key
    (private / key / "plan.pkl").write_bytes(pickle.dumps(Payload()))
    found = _run(FIND_BY_KEY_SCRIPT, private, [key])
    assert found[key][0] == "lstm"
    compile_cell("lstm", use_cache=False)
    assert not marker.exists()


def test_a_record_whose_text_does_not_give_its_key_is_ignored(private):
    lstm, gru = compile_cell("lstm"), compile_cell("gru")
    record = private / gru.key / "cell.json"
    record.write_text((private / lstm.key / "cell.json").read_text())  # lstm's text under gru's key
    assert _run(FIND_BY_KEY_SCRIPT, private, [gru.key])[gru.key] is None
    record.write_text("{ not json")
    assert _run(FIND_BY_KEY_SCRIPT, private, [gru.key])[gru.key] is None
    record.write_text(json.dumps({"filename": 3, "text": ["not text"]}))
    assert _run(FIND_BY_KEY_SCRIPT, private, [gru.key])[gru.key] is None


def test_key_depends_on_text_name_and_compiler_source(private, tmp_path, monkeypatch):
    text = (ROOT / "cells" / "lstm.cell").read_text()
    a, b = tmp_path / "a.cell", tmp_path / "b.cell"
    a.write_text(text)
    b.write_text(text)
    ka = compile_cell(a).key
    assert compile_cell(a).key == ka
    assert compile_cell(b).key != ka  # the file name is part of every message, so of the entry
    monkeypatch.setattr(cache, "compiler_digest", lambda: "another version of the compiler")
    assert compile_cell(a).key != ka
    monkeypatch.undo()
    a.write_text(text + "\n# a comment\n")
    assert compile_cell(a).key != ka


def test_the_compiler_digest_covers_its_own_source():
    digest = cache.compiler_digest()
    assert len(digest) == 64 and int(digest, 16) >= 0
    sources = {p.name for p in cache.PACKAGE.rglob("*.py") if "labs" not in p.parts}
    assert {"plan.py", "ir.py", "emit.py", "loop.py"} <= sources


def test_a_pickled_layer_cell_is_its_source():
    """Pickling a compiled cell stores its file name and text, never a plan: unpickled, it is compiled
    again by the current compiler."""
    cell = compile_cell("mut1")
    data = pickle.dumps(cell)
    assert b"plan" not in data and b"sympy" not in data
    again = pickle.loads(data)
    assert again.key == cell.key and again.plan.num_stages == 2


# ---- which folders are trusted ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o722])
def test_a_cache_others_can_write_to_is_refused(private, mode):
    private.mkdir(parents=True)
    private.chmod(mode)
    with pytest.raises(cache.UnsafeCacheError, match="other users can write to it"):
        cache.root()
    with pytest.raises(cache.UnsafeCacheError):  # nothing is imported from such a folder (use_cache=False:
        # a cell this process compiled before would hold its module already, and so pass in any order)
        compile_cell("rnn_tanh", use_cache=False).torch_module  # noqa: B018


def test_a_cache_below_a_folder_others_can_write_to_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("CELLDSL_CACHE", str(shared / "mine"))
    with pytest.raises(cache.UnsafeCacheError, match="above it"):
        cache.root()
    shared.chmod(0o777 | stat.S_ISVTX)  # like /tmp: others cannot rename or remove what is mine
    assert cache.root() == shared / "mine"
    assert stat.S_IMODE((shared / "mine").stat().st_mode) == 0o700


@pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0, reason="changing a folder's owner needs root"
)
def test_a_cache_another_user_owns_is_refused(private):
    private.mkdir(parents=True, mode=0o700)
    os.chown(private, 12345, -1)
    with pytest.raises(cache.UnsafeCacheError, match="belongs to another user"):
        cache.root()


def test_a_cache_owned_by_another_user_is_refused_as_any_user(private, monkeypatch):
    """The same check without root: this process pretends to be another user."""
    private.mkdir(parents=True, mode=0o700)
    monkeypatch.setattr(os, "getuid", lambda: private.stat().st_uid + 4242)
    if private.stat().st_uid == 0:
        pytest.skip("the folder belongs to root, which every user may trust")
    with pytest.raises(cache.UnsafeCacheError, match="belongs to another user"):
        cache.root()


def test_an_unwritable_cache_costs_only_speed(private):
    private.parent.mkdir(parents=True, exist_ok=True)
    private.write_text("a file where the cache folder should be")
    cache._private_root = None
    with pytest.warns(RuntimeWarning, match="cannot use the cache folder"):
        module = compile_cell("rnn_tanh", use_cache=False).torch_module
    assert hasattr(module, "stage1_forward")  # the generated code lands in a private temporary folder
    cache._private_root = None


# ---- verified libraries ------------------------------------------------------------------------------------

RUN_CPU_SCRIPT = r"""
import sys, warnings, torch
from celldsl import Recurrent
from celldsl.targets.c.fused import FusedCPULoop
torch.manual_seed(0)
with warnings.catch_warnings():
    warnings.simplefilter("error", RuntimeWarning)  # falling back to the torch loop would warn
    fused = Recurrent(sys.argv[1], 5, 5, backend="cpu").double()
    plain = Recurrent(sys.argv[1], 5, 5, backend="torch").double()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    assert isinstance(fused.compiled.cpu_loop, FusedCPULoop)
    print(fused.compiled.key, float((fused(x)[0] - plain(x)[0]).abs().max()))
"""

CORRUPTIONS = {
    "truncated": lambda data, other: data[: len(data) // 3],
    "empty": lambda data, other: b"",
    "garbage": lambda data, other: bytes(range(256)) * 64,
    "another cell's library": lambda data, other: other,
}


def _library(cell_name: str, root: Path) -> Path:
    (lib,) = [p for p in root.glob(f"{compile_cell(cell_name).key}/cpu_kernels_*.so")]
    return lib


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A cache holding the verified C kernels of two small cells, built once for the module."""
    root = tmp_path_factory.mktemp("built-cache")
    for name in ("rnn_tanh", "vanilla_rnn"):
        lib, reason = cpu_fused.build_library(compile_cell(name), cache_root=root)
        assert lib is not None, reason
    return root


@needs_cc
@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_a_corrupt_library_is_rebuilt(built, private, how):
    """Each corruption once crashed or slowed every later process (SIGBUS, SIGSEGV, a silent fallback to
    the torch loop); now the next process verifies the bytes and rebuilds."""
    shutil.copytree(built, private)
    victim, other = _library("rnn_tanh", private), _library("vanilla_rnn", private)
    victim.write_bytes(CORRUPTIONS[how](victim.read_bytes(), other.read_bytes()))
    out = subprocess.run(
        [sys.executable, "-c", RUN_CPU_SCRIPT, "rnn_tanh"],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr  # a signal would give a negative return code
    key, diff = out.stdout.strip().splitlines()[-1].split()
    assert key == compile_cell("rnn_tanh").key, "celldsl's source changed while the test ran: run it again"
    assert float(diff) < 1e-12
    assert cache.verified(_library("rnn_tanh", private))


def test_verified_removes_what_does_not_match(tmp_path):
    artifact = tmp_path / "lib.so"
    artifact.write_bytes(b"built")
    assert not cache.verified(artifact) and not artifact.exists()  # no checksum: not trusted
    artifact.write_bytes(b"built")
    cache.seal(artifact)
    assert cache.verified(artifact)
    artifact.write_bytes(b"built, then changed")
    assert not cache.verified(artifact) and not artifact.exists()


# ---- concurrent writers ------------------------------------------------------------------------------------


def test_concurrent_atomic_writes_leave_one_whole_payload(tmp_path):
    path = tmp_path / "entry" / "torch_cell.py"
    payloads = [bytes([i]) * (200_000 + i) for i in range(8)]
    threads = [
        threading.Thread(target=cache.atomic_write, args=(path, p)) for p in payloads for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert path.read_bytes() in payloads
    assert not list(path.parent.glob("*.tmp"))


def test_atomic_write_replaces_a_symlink_instead_of_following_it(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me")
    link = tmp_path / "out" / "lstm.py"
    link.parent.mkdir()
    link.symlink_to(target)
    cache.atomic_write(link, b"generated")
    assert target.read_text() == "keep me"
    assert not link.is_symlink() and link.read_bytes() == b"generated"


@needs_cc
def test_two_processes_building_into_one_cache(tmp_path):
    env = dict(os.environ, CELLDSL_CACHE=str(tmp_path / "shared"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RUN_CPU_SCRIPT, "rnn_tanh"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        assert float(out.strip().splitlines()[-1].split()[-1]) < 1e-12
    assert not list((tmp_path / "shared").glob("**/*.tmp"))


# ---- issue 24: the resolved folder, entry folders and files, the umask, a full disk ---------------------

as_root = pytest.mark.skipif(
    not hasattr(os, "getuid") or os.getuid() != 0, reason="giving a folder to another user needs root"
)
OTHER_UID = 12345  # "another user": any uid that is neither this process's nor root's

CONSTRUCTOR_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("ran", f); fclose(f); }
}
"""


@as_root
@needs_cc
def test_a_library_in_an_entry_folder_another_user_owns_is_never_loaded(private, tmp_path):
    """Issue 24, finding 4: the cache root is ours (0755), the entry folder is another user's, and the
    library there has a matching checksum: its constructor once ran. Now the folder is refused."""
    cell = compile_cell("rnn_tanh")
    lib, why = cpu_fused.build_library(cell)
    assert lib is not None, why
    private.chmod(0o755)
    (victim,) = private.glob(f"{cell.key}/cpu_kernels_*.so")
    marker = tmp_path / "constructor-ran"
    src = tmp_path / "planted.c"
    src.write_text(CONSTRUCTOR_C)
    build = ["cc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(victim), str(src)]
    subprocess.run(build, check=True)
    cache.seal(victim)  # the checksum matches the planted bytes
    entry = victim.parent
    entry.chmod(0o755)
    for path in [entry, *entry.iterdir()]:
        os.chown(path, OTHER_UID, -1)
    cpu_fused._gemm_libraries.clear()
    with pytest.raises(cache.UnsafeCacheError, match=f"belongs to another user \\(uid {OTHER_UID}\\)"):
        cpu_fused.build_library(cell)
    assert not marker.exists()


@as_root
def test_a_cache_file_another_user_owns_is_replaced_not_loaded(private):
    """A file of another user in our own entry folder (a hard link, say) could change after it was
    checked: it is replaced by a file of ours before it is imported, even when it holds the right text."""
    cell = compile_cell("rnn_tanh", use_cache=False)
    cell.torch_module  # noqa: B018 - writes torch_cell.py
    planted = private / cell.key / "torch_cell.py"
    os.chown(planted, OTHER_UID, -1)
    assert compile_cell("rnn_tanh", use_cache=False).torch_module.stage1_forward
    assert planted.stat().st_uid == os.getuid()


def test_a_cache_file_others_can_write_to_is_replaced_not_loaded(private):
    cell = compile_cell("rnn_tanh", use_cache=False)
    cell.torch_module  # noqa: B018
    planted = private / cell.key / "torch_cell.py"
    planted.chmod(0o666)
    assert compile_cell("rnn_tanh", use_cache=False).torch_module.stage1_forward
    assert stat.S_IMODE(planted.stat().st_mode) == 0o600


def test_a_symlink_to_a_cache_others_can_write_above_is_refused(tmp_path, monkeypatch):
    """Finding 5: the symlink once passed where the folder it names, given directly, was refused (only
    the path as written and its own parents were checked)."""
    shared = tmp_path / "shared"
    (shared / "cache").mkdir(parents=True, mode=0o700)
    shared.chmod(0o777)
    (tmp_path / "home").mkdir(mode=0o700)
    link = tmp_path / "home" / "cache"
    link.symlink_to(shared / "cache")
    for given in (shared / "cache", link):
        monkeypatch.setenv("CELLDSL_CACHE", str(given))
        with pytest.raises(cache.UnsafeCacheError, match="shared.* above it"):
            cache.root()
    with pytest.raises(cache.UnsafeCacheError):
        compile_cell("rnn_tanh", use_cache=False).torch_module  # noqa: B018


def test_a_symlink_to_a_cache_others_can_write_to_is_refused(tmp_path, monkeypatch):
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "open")
    monkeypatch.setenv("CELLDSL_CACHE", str(link))
    with pytest.raises(cache.UnsafeCacheError, match="open it resolves to \\(mode 777\\)"):
        cache.root()


def test_a_symlink_to_a_private_cache_is_used_by_the_folder_it_names(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    monkeypatch.setenv("CELLDSL_CACHE", str(link))
    assert cache.root() == (tmp_path / "real").resolve()  # a later swap of the link changes nothing


@pytest.mark.parametrize("via", ["root", "entry"])
def test_an_entry_folder_others_can_write_to_is_refused(private, via):
    cell = compile_cell("rnn_tanh", use_cache=False)
    cell.torch_module  # noqa: B018
    (private / cell.key).chmod(0o777 if via == "entry" else 0o700)
    if via == "root":
        private.chmod(0o777)
    with pytest.raises(cache.UnsafeCacheError, match="other users can write"):
        compile_cell("rnn_tanh", use_cache=False).torch_module  # noqa: B018


def test_folders_are_private_whatever_the_umask(tmp_path, monkeypatch):
    """Finding 6: with umask 002 ~/.cache was made 0775 (then refused as group-writable); so was every
    folder made on the way (triton/, __pycache__/). Each is now 0700, and no .pyc is written."""
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("CELLDSL_CACHE", str(home / ".cache" / "celldsl"))
    before = os.umask(0o002)
    try:
        root = cache.root()
        cache.atomic_write(root / "triton" / "abc" / "cell.py", b"x = 1\n")
        module = compile_cell("rnn_tanh", use_cache=False).torch_module
    finally:
        os.umask(before)
    assert hasattr(module, "stage1_forward")
    folders = [home / ".cache", *[p for p in (home / ".cache").rglob("*") if p.is_dir()]]
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}, folders
    assert not list(home.rglob("__pycache__")) and not list(home.rglob("*.pyc"))


@pytest.fixture
def full_disk(private, monkeypatch):
    """Every write of a file fails with ENOSPC, as on a full disk (reads still work)."""
    import errno

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cache.root()
    monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a: Full(fd, mode) if "w" in mode else
                        real_fdopen(fd, mode, *a))
    return private


def test_a_full_disk_is_a_clear_error(full_disk):
    """Finding 10 (cache side): ENOSPC once ended in a bare traceback from deep in the cache."""
    import errno

    with pytest.raises(cache.CacheWriteError) as info:
        compile_cell("rnn_tanh", use_cache=False).torch_module  # noqa: B018
    message = str(info.value)
    assert message.startswith(f"cannot write {full_disk}") and "No space left on device" in message
    assert "CELLDSL_CACHE" in message and info.value.errno == errno.ENOSPC
    assert not list(full_disk.rglob("*.tmp"))


@needs_cc
def test_a_full_disk_during_a_c_build_is_a_reason_not_a_traceback(full_disk):
    """The C path keeps its design for a failed build: (None, why), which cpu_loop turns into a warning
    and the torch loop; the reason names the disk, not a failing compiler."""
    lib, why = cpu_fused.build_library(compile_cell("rnn_tanh", use_cache=False))
    assert lib is None and why.startswith("cannot build in ") and "No space left on device" in why, why
