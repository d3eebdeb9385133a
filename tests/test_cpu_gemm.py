"""The GEMM backends of the CPU loops and how one is chosen (targets/c/gemm.py).

- each backend's product (native kernel, torch.mm, oneDNN plain and packed) equals a @ w.T or
  d @ w computed by torch, for every kind of product, =, += and = bias +, at shapes with partial
  tiles and panels, float32 and float64;
- the choice is measured once per site and written to cpu_gemm.json in the cache folder; a corrupt,
  truncated, foreign or ill-typed file is measured again and rewritten (never trusted, never fatal);
- a backend that computes a wrong product is not chosen;
- without mkldnn (torch.backends.mkldnn.is_available() False, monkeypatched) or with an unexpected
  op schema (a torch version this code was not written for), oneDNN is no candidate, a forced
  oneDNN falls back to the measured torch backend, and a layer still computes the torch result;
- CELLDSL_CPU_GEMM forces a backend and rejects unknown names.
"""

import json
import math

import pytest
import torch
from test_cpu_fused import make_layer, rel_err, run_loop
from test_cpu_native import args_for, fused_loop

from celldsl.targets.c import fused as cpu_fused
from celldsl.targets.c import gemm as cpu_gemm

HAVE_CC = cpu_fused.compiler() is not None
needs_cc = pytest.mark.skipif(not HAVE_CC, reason="needs a C compiler ($CC, cc or gcc) for the native GEMM")


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh folder for the choices' file (cpu_gemm.json) and a fresh in-process view of them. The
    compiled libraries stay in the session's cache: building them again per test cost ~3 s each."""
    folder = tmp_path / "cache"
    folder.mkdir(mode=0o700)
    monkeypatch.setattr(cpu_gemm, "_path", lambda: folder / cpu_gemm.CACHE_FILE)
    monkeypatch.delenv("CELLDSL_CPU_GEMM", raising=False)
    cpu_gemm.reset()
    yield folder
    cpu_gemm.reset()


def gemm_lib():
    lib, why = cpu_fused.build_gemm_library()
    assert lib is not None, why
    return lib


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_products_equal_torch(dtype):
    native = cpu_gemm.native_gemm(gemm_lib(), dtype)
    gen = torch.Generator().manual_seed(0)
    for m, k, n in ((1, 5, 3), (2, 37, 40), (7, 64, 33), (13, 8, 2 * native.width)):
        a = torch.randn(m, k, generator=gen, dtype=dtype)
        w = torch.randn(n, k, generator=gen, dtype=dtype)
        bias = torch.randn(n, generator=gen, dtype=dtype)
        c0 = torch.randn(m, n, generator=gen, dtype=dtype)
        tol = 1e-5 if dtype == torch.float32 else 1e-13
        for init, want in ((0, a @ w.t()), (1, c0 + a @ w.t()), (2, bias + a @ w.t())):
            out = c0.clone()
            native.gemm(a, native.pack_transposed(w), out, init, bias)
            assert rel_err([want], [out]) < tol, (m, k, n, init)
        d = torch.randn(m, n, generator=gen, dtype=dtype)  # d @ w, the backward products
        out = torch.empty(m, k, dtype=dtype)
        native.gemm(d, native.pack_plain(w), out)
        assert rel_err([d @ w], [out]) < tol, (m, k, n)
        wide = torch.zeros(m, n + 3, dtype=dtype)  # an output with a row stride of its own
        native.gemm(a, native.pack_transposed(w), wide[:, 1 : n + 1])
        assert rel_err([a @ w.t()], [wide[:, 1 : n + 1]]) < tol
        assert not wide[:, 0].any() and not wide[:, -2:].any()


def panels_reference(w, groups, n, k, s_n, s_k, s_group, width):
    """The packed layout, element by element: panel p of group g holds B(k, c) = w[g * s_group +
    c * s_n + k * s_k] for its columns c = p * width + j, zero beyond n."""
    flat, panels = w.reshape(-1), -(-n // width)
    out = torch.zeros(groups, panels, k, width, dtype=w.dtype)
    for g in range(groups):
        for c in range(n):
            out[g, c // width, :, c % width] = flat[g * s_group + c * s_n + torch.arange(k) * s_k]
    return out.reshape(-1)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_panels_hold_every_element_where_the_tiles_read_it(dtype):
    # transposed (s_k = 1: the blocks the register transpose takes, and the columns and rows left
    # over) and plain; rows with a stride of their own; several groups
    native = cpu_gemm.native_gemm(gemm_lib(), dtype)
    W = native.width
    gen = torch.Generator().manual_seed(2)
    for groups, n, k in ((1, 2 * W, 16), (4, 2 * W, 19), (2, W + 3, 8), (3, 5, 3), (1, 3 * W + 1, 40)):
        big = torch.randn(groups * n, k + 5, generator=gen, dtype=dtype)
        cases = [(big, k + 5, 1, n * (k + 5)),  # B = W.T of the [n, k] blocks of a wider matrix
                 (big.t().contiguous(), 1, groups * n, n)]  # B = W: a [k, n] row-major view
        for w, s_n, s_k, s_group in cases:
            got = native.pack(w, groups, n, k, s_n, s_k, s_group)
            want = panels_reference(w, groups, n, k, s_n, s_k, s_group, W)
            assert torch.equal(got, want), (groups, n, k, s_n, s_k)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_products_are_the_same_on_any_number_of_threads(dtype):
    # rows in several L2-sized chunks (K = 512, 600), and fewer panels than threads (n <= 16: the
    # threads split the chunks instead): every element is computed by the same tile in the same order
    native = cpu_gemm.native_gemm(gemm_lib(), dtype)
    gen = torch.Generator().manual_seed(1)
    for m, k, n in ((128, 512, 40), (300, 600, 16), (2, 600, 3 * native.width + 1)):
        a = torch.randn(m, k, generator=gen, dtype=dtype)
        w = torch.randn(n, k, generator=gen, dtype=dtype)
        panels = native.pack_transposed(w)
        outs = []
        for threads in (1, 2, 3, 5):
            outs.append(torch.full((m, n), float("nan"), dtype=dtype))
            native.gemm(a, panels, outs[-1], threads=threads)
        tol = 1e-5 if dtype == torch.float32 else 1e-13
        assert rel_err([a @ w.t()], [outs[0]]) < tol, (m, k, n)
        for threads, out in zip((2, 3, 5), outs[1:], strict=True):
            assert torch.equal(out, outs[0]), (m, k, n, threads)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_products_with_streaming_stores_equal_the_cached_ones(dtype):
    # an output of at least CD_STREAM_BYTES (4 MB) is written with streaming stores unless it is
    # added to (init 1): the same tiles in the same order, so bitwise what the product gives in
    # row halves small enough to be written through the caches; rows whose start is not aligned
    # for a vector store (ldc odd) and the narrow last panel go through the plain stores
    native = cpu_gemm.native_gemm(gemm_lib(), dtype)
    gen = torch.Generator().manual_seed(2)
    n = 4 * native.width + 3
    m = (4 << 20) // (n * torch.empty(0, dtype=dtype).element_size()) + 5
    a = torch.randn(m, 7, generator=gen, dtype=dtype)
    w = torch.randn(n, 7, generator=gen, dtype=dtype)
    bias = torch.randn(n, generator=gen, dtype=dtype)
    panels = native.pack_transposed(w)
    for ld in (n, n + 1):  # aligned rows (mostly) and rows at odd offsets
        for init in (0, 1, 2):
            start = torch.randn(m, ld, generator=gen, dtype=dtype)
            whole, halves = start.clone(), start.clone()
            native.gemm(a, panels, whole[:, :n], init, bias, threads=2)
            half = m // 2 // 12 * 12  # a multiple of the tile height (MR: 12 or 6), as the chunks are
            for rows in (slice(0, half), slice(half, m)):
                native.gemm(a[rows], panels, halves[rows, :n], init, bias, threads=2)
            assert torch.equal(whole, halves), (ld, init)  # columns past n untouched in both
            want = {0: a @ w.t(), 1: start[:, :n] + a @ w.t(), 2: bias + a @ w.t()}[init]
            assert rel_err([want], [whole[:, :n]]) < (1e-5 if dtype == torch.float32 else 1e-13), (ld, init)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_transpose_moves_every_element(dtype):
    # whole register blocks, 64 x 64 tiles and the rows and columns left over; a source with a row
    # stride of its own
    native = cpu_gemm.native_gemm(gemm_lib(), dtype)
    gen = torch.Generator().manual_seed(3)
    for rows, cols in ((1, 1), (8, 8), (3, 17), (64, 64), (70, 129), (200, 9)):
        big = torch.randn(rows, cols + 4, generator=gen, dtype=dtype)
        src = big[:, 2 : cols + 2]
        for threads in (1, 3):
            got = native.transpose(src, threads)
            assert got.is_contiguous() and torch.equal(got, src.t()), (rows, cols, threads)


@needs_cc
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_weight_gradients_equal_torch(dtype):
    # rows over several chunks (and a chunk's remainder), row ranges of one d (a state operand's
    # initial state, then its new states) summed into one result, any number of threads
    lib = gemm_lib()
    chunk = cpu_gemm.WEIGHT_GRAD_CHUNK_BYTES // torch.empty(0, dtype=dtype).element_size()
    gen = torch.Generator().manual_seed(4)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    for rows, n, k in ((1, 5, 3), (37, 40, 33), (2 * chunk + 5, 70, 20)):
        d = torch.randn(rows, n, generator=gen, dtype=dtype)
        a = torch.randn(rows, k, generator=gen, dtype=dtype)
        want = d.t() @ a
        first = min(3, rows)
        results, before = [], torch.get_num_threads()
        for threads in (1, 2):
            torch.set_num_threads(threads)
            try:
                grads = cpu_gemm.WeightGrads(d, lib, force="native")
                whole = grads(a)
                split = grads(a[:first])
                grads(a[first:], start=first, out=split)
            finally:
                torch.set_num_threads(before)
            assert rel_err([want], [whole]) < tol and rel_err([want], [split]) < tol, (rows, n, k, threads)
            results.append(whole)
        assert torch.equal(results[0], results[1]), (rows, n, k)  # the same tiles in the same order
        by_mm = cpu_gemm.WeightGrads(d, lib, force="mm")
        assert rel_err([want], [by_mm(a)]) < tol


@pytest.mark.parametrize("backend", ["mm", "onednn", "onednn_packed"])
@pytest.mark.parametrize("kind", ["step", "step_backward"])
def test_torch_products_equal_torch(backend, kind):
    if backend != "mm" and not cpu_gemm.onednn_available():
        pytest.skip("torch has no usable mkldnn here (test_without_mkldnn covers this case)")
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(12, 5, generator=gen)
    a = torch.randn(3, 5 if kind == "step" else 12, generator=gen)
    product = cpu_gemm.TorchProduct(backend, kind, w, 3)
    want = a @ w.t() if kind == "step" else a @ w
    bias = torch.randn(want.shape[1], generator=gen)
    base = torch.randn(6, want.shape[1], generator=gen)
    for init, expected in ((0, want), (1, base[1:4] + want), (2, bias + want)):
        buffer = base.clone()
        product(a, buffer[1:4], init, bias)
        assert torch.allclose(buffer[1:4], expected, atol=1e-5), (init, backend, kind)
        assert torch.equal(buffer[0], base[0]) and torch.equal(buffer[4:], base[4:])  # nothing else written


def lstm_against_torch(dtype, N, gemm):
    """A small LSTM's fused loop with `gemm` forced (None: measured), and the results of the torch
    loop and of it on the same arguments: (loop, torch's (forward, backward), the fused loop's)."""
    layer = make_layer("lstm", hidden=6, dtype=dtype, tag="native")
    loop = fused_loop(layer)
    loop.gemm = gemm
    args = args_for(layer, N=N)
    return loop, run_loop(layer.compiled.torch_loop, *args), run_loop(loop, *args)


def read_choices(folder):
    return json.loads((folder / cpu_gemm.CACHE_FILE).read_text())["sites"]


@needs_cc
def test_choice_is_measured_once_and_cached_as_json(private_cache, monkeypatch):
    site = cpu_gemm.site("step", torch.float32, 3, 8, 32)
    lib = gemm_lib()
    calls = []
    measure = cpu_gemm.measure
    monkeypatch.setattr(cpu_gemm, "measure", lambda *a: calls.append(a) or measure(*a))
    first = cpu_gemm.choose(site, lib)
    assert first in cpu_gemm.candidates("step", torch.float32, True) and len(calls) == 1
    entry = read_choices(private_cache)[site.key]
    assert entry["choice"] == first
    assert set(entry["seconds"]) == set(cpu_gemm.candidates("step", torch.float32, True))
    cpu_gemm.reset()  # a new process: reads the file, measures nothing
    assert cpu_gemm.choose(site, lib) == first and len(calls) == 1


@needs_cc
@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe", b"[1, 2]", b'{"format": 1}',
                                     b'{"format": 1, "machine": "elsewhere", "sites": {}}', "ill-typed"])
def test_a_bad_cache_file_is_measured_again_and_rewritten(private_cache, content):
    site = cpu_gemm.site("step_backward", torch.float64, 2, 5, 20)
    path = private_cache / cpu_gemm.CACHE_FILE
    if content == "ill-typed":  # this machine's header, entries of the wrong types
        sites = {site.key: {"choice": "os.system", "seconds": {"mm": "fast"}}, "x": [1]}
        header = {"format": cpu_gemm.FORMAT, "machine": cpu_gemm._machine()}
        content = json.dumps({**header, "sites": sites}).encode()
    path.write_bytes(content)
    choice = cpu_gemm.choose(site, gemm_lib())
    assert choice in ("native", "mm")
    entry = read_choices(private_cache)[site.key]  # valid JSON again, with this site measured
    assert entry["choice"] == choice and all(s > 0 for s in entry["seconds"].values())


@needs_cc
def test_a_wrong_backend_is_never_chosen(private_cache, monkeypatch):
    """measure() checks every backend's product against torch before timing it."""
    def wrong(self, a, out, init=0, bias=None):
        out.fill_(0.5)

    monkeypatch.setattr(cpu_gemm.TorchProduct, "__call__", wrong)
    seconds = cpu_gemm.timings(cpu_gemm.site("step", torch.float32, 4, 16, 48), gemm_lib())
    assert set(seconds) == {"native"}


def test_without_mkldnn(private_cache, monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert not cpu_gemm.onednn_available()
    for kind in cpu_gemm.KINDS:
        assert not {"onednn", "onednn_packed"} & set(cpu_gemm.candidates(kind, torch.float32, True))
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "onednn_packed")
    site = cpu_gemm.site("step", torch.float32, 2, 6, 24)
    lib = gemm_lib() if HAVE_CC else None
    assert cpu_gemm.choose(site, lib, native=False) == "mm"
    if HAVE_CC:  # the whole loop: the Python loop on torch.mm, the torch backend's result
        loop, want, got = lstm_against_torch(torch.float32, N=2, gemm=None)
        assert loop.ran == {"forward": ("mm",), "backward": ("mm",)}
        assert rel_err(want[0][:3], got[0][:3]) < 1e-5 and rel_err(want[1], got[1]) < 1e-5


def test_onednn_with_another_schema_is_not_used(private_cache, monkeypatch):
    """The oneDNN ops are torch internals: a schema other than the expected one disables them."""
    schemas = dict(cpu_gemm.ONEDNN_SCHEMAS)
    schemas["_linear_pointwise"] = schemas["_linear_pointwise"].replace("str attr", "str attribute")
    monkeypatch.setattr(cpu_gemm, "ONEDNN_SCHEMAS", schemas)
    assert not cpu_gemm.onednn_available()
    assert cpu_gemm.candidates("step", torch.float32, False) == ["mm"]


def test_forcing_a_backend(monkeypatch, private_cache):
    site = cpu_gemm.site("step", torch.float64, 1, 4, 8)
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "mm")
    assert cpu_gemm.choose(site, None) == "mm"
    assert not (private_cache / cpu_gemm.CACHE_FILE).exists()  # forced: nothing measured
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="CELLDSL_CPU_GEMM must be one of native, mm, onednn"):
        cpu_gemm.choose(site, None)


@needs_cc
@pytest.mark.parametrize("force", [None, "native", "mm"])
def test_a_layers_weight_gradients_run_on_the_chosen_backend(private_cache, force):
    # measured (None) or forced: the weight gradients of the backward equal the torch backend's,
    # and a measured run records its weight_grad sites in the cache file
    _loop, want, got = lstm_against_torch(torch.float64, N=3, gemm=force)
    assert rel_err(want[0][:3], got[0][:3]) < 1e-12 and rel_err(want[1], got[1]) < 1e-12
    if force is None:
        assert any(key.startswith("weight_grad/f64/") for key in read_choices(private_cache))


@needs_cc
@pytest.mark.parametrize("planted", ["fifo", "symlink", "group-writable"])
def test_a_cache_file_that_is_not_a_private_regular_file_is_measured_again(private_cache, tmp_path, planted):
    """Issue 24, finding 12: a FIFO in place of cpu_gemm.json once blocked the first GEMM forever (no
    writer). Now it is opened without blocking, refused, measured again and replaced by a regular file;
    so is a symlink or a file others could write to."""
    import os
    import stat
    import threading

    path = private_cache / cpu_gemm.CACHE_FILE
    site = cpu_gemm.site("step", torch.float32, 2, 5, 20)
    lib = gemm_lib()
    names = cpu_gemm.candidates("step", torch.float32, True)
    header = {"format": cpu_gemm.FORMAT, "machine": cpu_gemm._machine()}
    planted_entry = {"choice": "mm", "seconds": dict.fromkeys(names, 123.0)}
    valid = json.dumps({**header, "sites": {site.key: planted_entry}})
    if planted == "fifo":
        os.mkfifo(path, 0o600)
    elif planted == "symlink":
        (tmp_path / "elsewhere.json").write_text(valid)
        path.symlink_to(tmp_path / "elsewhere.json")
    else:
        path.write_text(valid)
        path.chmod(0o666)
    done = []
    worker = threading.Thread(target=lambda: done.append(cpu_gemm.choose(site, lib)), daemon=True)
    worker.start()
    worker.join(timeout=120)
    assert done, "cpu_gemm.choose blocked on the planted cache file"
    info = path.lstat()
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    entry = read_choices(private_cache)[site.key]  # measured here, not read from the planted file
    assert entry["choice"] == done[0] and 123.0 not in entry["seconds"].values()


def test_native_is_kept_unless_another_gemm_is_clearly_faster():
    """gemm.preferred: a tie by the micro-benchmark's noise must not send a layer off the native loop
    (its chunks, fused steps and no Python per step are worth more than a few percent of one product)."""
    margin = cpu_gemm.NATIVE_MARGIN
    assert cpu_gemm.preferred({"native": 1.0 * margin, "onednn": 1.0, "mm": 2.0}) == "native"
    assert cpu_gemm.preferred({"native": 1.01 * margin, "onednn": 1.0, "mm": 2.0}) == "onednn"
    assert cpu_gemm.preferred({"native": 0.5, "onednn": 1.0}) == "native"
    assert cpu_gemm.preferred({"mm": 1.2, "onednn": 1.0}) == "onednn"
    assert cpu_gemm.preferred({"native": math.inf, "mm": 3.0}) == "mm"


@needs_cc
@pytest.mark.parametrize(("m", "k", "n", "threads"), [(3, 16, 16, 1), (1, 64, 256, 1), (64, 256, 1024, 2)])
def test_a_product_is_timed_on_the_threads_it_runs_on(private_cache, monkeypatch, m, k, n, threads):
    """A small product runs the native kernel on one thread (native_threads: the native loop's rule
    too) and is measured so; timed on a team of two, a tiny product on a busy 2-core machine took
    milliseconds a call (the team waits for its second core), and the remembered timing sent small
    cells to the Python loop."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    lib = gemm_lib()
    seen = []
    gemm = cpu_gemm.NativeGemm.gemm
    monkeypatch.setattr(cpu_gemm.NativeGemm, "gemm",
                        lambda self, *a, **kw: seen.append(a[5] if len(a) > 5 else kw["threads"]) or
                        gemm(self, *a, **kw))
    site = cpu_gemm.site("step", torch.float32, m, k, n)
    assert site.threads == 2
    cpu_gemm.measure(site, lib, ["native"])
    w = torch.randn(n, k)
    cpu_gemm.product("native", "step", w, m, lib)(torch.randn(m, k), torch.empty(m, n))
    assert seen and set(seen) == {threads}
