"""A small inference call of a layer (T > 1, no autograd, CPU) replays each layer's prepared sequence
(targets/c/fused.PreparedSequence, nn/stack.RecurrentStack._sequenced): kernel arguments bound once,
the parameters read live at every call. The references: torch.nn's layers given the same writes, and
the layer's own full path (bit for bit: the same kernels on the same numbers)."""

from __future__ import annotations

import threading
import unittest.mock

import pytest
import torch
from test_streaming_step_writes import MODES, Guard, flat, nonzero_state, written
from torch import nn
from zoo import GENERIC

import celldsl
from celldsl.nn import stack
from celldsl.ops.function import loop_for
from celldsl.targets.c import fused

I, H, T = 24, 21, 6


@pytest.fixture(autouse=True)
def native_loops(monkeypatch):
    """The native loop at every size (otherwise cpu_gemm's measurements choose, per machine)."""
    monkeypatch.setenv("CELLDSL_CPU_GEMM", "native")
    if fused.compiler() is None:
        pytest.skip("no C compiler: the cpu backend's kernels cannot be built")


def full_path(monkeypatch, module, *args):
    """The layer's result without the prepared sequences (the op's infer, as before they existed)."""
    with monkeypatch.context() as m:
        m.setattr(stack.RecurrentStack, "_sequenced", lambda self, input, given: None)
        return module(*args)


def fused_off():
    """No prepared sequence applies inside (every call is over SEQUENCE_ELEMENTS)."""
    return unittest.mock.patch.object(fused, "SEQUENCE_ELEMENTS", 0)


def replayed(module) -> bool:
    """Whether the module's last inference call had prepared sequences (its most recent signature)."""
    entry = stack._SEQUENCES.get(module)
    return entry is not None and bool(entry[1]) and list(entry[1].values())[-1] is not None


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize(("layers", "bidirectional"), [(1, False), (2, False), (1, True), (2, True)])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_a_layer_sequence_sees_every_write_without_autograd(name, layers, bidirectional, n, dtype, mode,
                                                            monkeypatch):
    """p.data.mul_(), .data.copy_(), numpy writes and `p.data = new` between replayed calls: each
    call after a write gives torch.nn's numbers for the written weights (the guard fails the test if
    any call of ours runs the op instead of the prepared sequences). Bidirectional layers replay a
    sequence per direction, the reverse one on the input reversed in time."""
    torch.manual_seed(0)
    kw = {"num_layers": layers, "dtype": dtype, "bidirectional": bidirectional}
    ref, ours = getattr(nn, name)(I, H, **kw), getattr(celldsl, name)(I, H, **kw)
    ours.load_state_dict(ref.state_dict())
    x, hx = torch.randn(T, n, I, dtype=dtype), nonzero_state(name, n, dtype, layers * (1 + bidirectional))
    with MODES[mode]():
        ours(x, hx)  # the first call checks the arguments and prepares the sequences
    assert replayed(ours)
    written(ours, ref, lambda m: m(x, hx), lambda: ref(x, hx), mode, dtype, Guard(monkeypatch, ours))


@pytest.mark.parametrize(("steps", "bidirectional"), [(T, False), (T, True), (1, True)])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("given", [False, True])
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_replayed_calls_are_the_full_paths_numbers_bit_for_bit(name, given, batch_first, steps, bidirectional,
                                                               monkeypatch):
    """T = 1 replays a sequence where the layer is bidirectional (a one-step call of a unidirectional
    layer takes the prepared step: tests/test_streaming_step.py)."""
    torch.manual_seed(0)
    ours = getattr(celldsl, name)(I, H, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    with torch.no_grad():
        for call in range(3):  # new inputs and states at every call, into the same bound buffers
            x = torch.randn(3, steps, I) if batch_first else torch.randn(steps, 3, I)
            hx = nonzero_state(name, 3, torch.float32, 2 * (1 + bidirectional)) if given else None
            got, want = flat(ours(x, hx)), flat(full_path(monkeypatch, ours, x, hx))
            assert replayed(ours)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert g.shape == w.shape and torch.equal(g, w), f"call {call}"


@pytest.mark.parametrize("cell", GENERIC)
def test_zoo_layers_replay_their_full_paths_numbers(cell, monkeypatch):
    """Every generic zoo cell: the prepared sequences where the cell has them (every op parameter a
    view of a stored one: not antisymmetric_rnn's W - Wᵀ), bit for bit the full path's numbers."""
    torch.manual_seed(0)
    width = H if celldsl.compile_cell(cell).ir.needs_hidden_size else I
    layer = celldsl.Recurrent(cell, width, H, num_layers=2)
    x = torch.randn(T, 4, width)
    with torch.no_grad():
        for _ in range(2):
            got, want = flat(layer(x)), flat(full_path(monkeypatch, layer, x))
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w)
            x = torch.randn(T, 4, width)


def test_two_threads_on_one_layer_each_get_their_own_numbers():
    """The buffers are the layer's: a call that finds them in use takes the full path."""
    torch.manual_seed(0)
    layer = celldsl.LSTM(I, H, num_layers=2, dtype=torch.float64)
    inputs = [torch.randn(T, 2, I, dtype=torch.float64) for _ in range(8)]
    with torch.no_grad():
        want = [flat(layer(x)) for x in inputs]
    assert replayed(layer)
    failures = []

    def work(order):
        with torch.no_grad():
            for _ in range(25):
                for i in order:
                    got = flat(layer(inputs[i]))
                    if not all(torch.equal(g, w) for g, w in zip(got, want[i], strict=True)):
                        failures.append(i)
    threads = [threading.Thread(target=work, args=(order,)) for order in (range(8), reversed(range(8)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures


def test_what_is_not_replayed_still_gives_torch_nn_numbers():
    """A large call and a parametrized weight (a tensor made anew at every call) take the full path
    (a call under autograd replays training sequences: tests/test_prepared_training.py)."""
    torch.manual_seed(0)
    ref, ours = nn.LSTM(I, H, dtype=torch.float64), celldsl.LSTM(I, H, dtype=torch.float64)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(T, 3, I, dtype=torch.float64)
    big = torch.randn(fused.SEQUENCE_ELEMENTS // (I + 2 * H) + 1, 1, I, dtype=torch.float64)  # T large
    with torch.no_grad():
        torch.testing.assert_close(ours(big)[0], ref(big)[0])
    assert not replayed(ours)
    nn.utils.parametrizations.weight_norm(ours, "weight_hh_l0")
    nn.utils.parametrizations.weight_norm(ref, "weight_hh_l0")
    with torch.no_grad():
        for m in (ours, ref):
            m.parametrizations.weight_hh_l0.original0.mul_(0.5)
        torch.testing.assert_close(ours(x)[0], ref(x)[0])
        assert not replayed(ours)
        for m in (ours, ref):
            m.parametrizations.weight_hh_l0.original0.mul_(3.0)
        torch.testing.assert_close(ours(x)[0], ref(x)[0])


@pytest.mark.parametrize("cell", ["mut1", "gru_cho", "greff_vanilla", "antisymmetric_rnn", "sru"])
def test_weights_made_of_several_parameters_are_made_again_at_every_call(cell, monkeypatch):
    """A GEMM weight that is a concatenation of parameters, or W - Wᵀ - γI, is a copy: the call after
    a write the copy cannot see (`p.data.mul_`) must still give the full path's numbers."""
    torch.manual_seed(0)
    width = H if celldsl.compile_cell(cell).ir.needs_hidden_size else I
    layer = celldsl.Recurrent(cell, width, H, dtype=torch.float64)
    x = torch.randn(T, 3, width, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
        assert replayed(layer)
        for name, p in layer.named_parameters():
            p.data.mul_(0.5)
            got, want = flat(layer(x)), flat(full_path(monkeypatch, layer, x))
            for g, w in zip(got, want, strict=True):
                assert torch.equal(g, w), name


def test_a_changed_gemm_choice_or_library_makes_the_sequences_again(monkeypatch):
    """The sequences are bound to the loop's libraries and GEMM choices (FusedCPULoop.revision): a
    background -O3 build swapped in, or CELLDSL_CPU_GEMM set, makes them again, so replayed calls keep
    the full path's numbers (bound to the quick -Og kernels, they differed in the last bits once the
    -O3 ones were in) and its errors."""
    torch.manual_seed(0)
    layer = celldsl.LSTM(I, H)
    x = torch.randn(T, 4, I)
    loop = loop_for(layer.compiled.key, "cpu")
    with torch.no_grad():
        layer(x)
        first = stack._SEQUENCES[layer][1]
        assert replayed(layer) and len(first) == 1
        monkeypatch.setattr(fused, "cell_library_ready", lambda key: (True, loop.cell_lib))
        monkeypatch.setattr(loop, "cell_waiting", "a background build")
        got, want = flat(layer(x)), flat(full_path(monkeypatch, layer, x))
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        assert len(stack._SEQUENCES[layer][1]) == 2  # a second signature: the swap's revision
        monkeypatch.setenv("CELLDSL_CPU_GEMM", "mm")
        got, want = flat(layer(x)), flat(full_path(monkeypatch, layer, x))
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        monkeypatch.setenv("CELLDSL_CPU_GEMM", "bogus")
        with pytest.raises(ValueError, match="CELLDSL_CPU_GEMM"):
            layer(x)


def test_alternating_batch_sizes_keep_both_signatures(monkeypatch):
    torch.manual_seed(0)
    layer = celldsl.GRU(I, H)
    made = []
    prepare = stack.RecurrentStack._prepare_sequences
    monkeypatch.setattr(stack.RecurrentStack, "_prepare_sequences",
                        lambda self, *a: made.append(1) or prepare(self, *a))
    with torch.no_grad():
        for _ in range(3):
            for n in (8, 5):
                x = torch.randn(T, n, I)
                got, want = flat(layer(x)), flat(full_path(monkeypatch, layer, x))
                assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert len(made) == 2


def test_converted_parameters_are_let_go():
    """After .double() (the same Parameter objects, new storage) the float32 sequences, which hold views
    of the old weights, are dropped at the next call, even one that takes the full path (here: too
    large for a sequence)."""
    layer = celldsl.LSTM(I, H)
    with torch.no_grad():
        layer(torch.randn(T, 2, I))
    assert replayed(layer)
    layer.double()
    x = torch.randn(T, 2, I, dtype=torch.float64, requires_grad=True)
    with fused_off():
        layer(x)[0].sum().backward()
    assert all(key[1] == torch.float64 for key in stack._SEQUENCES[layer][1])


def test_a_subclass_with_its_own_float64_head_runs_as_torch_nn():
    """The checks look at the tensors the layer reads, as torch.nn's do (its _flat_weights), not at a
    child module's parameters: a float64 head beside a float32 layer is no error on either path."""
    class Tagger(celldsl.GRU):
        def __init__(self):
            super().__init__(8, 8)
            self.head = nn.Linear(8, 3, dtype=torch.float64)

    class TorchTagger(nn.GRU):
        def __init__(self):
            super().__init__(8, 8)
            self.head = nn.Linear(8, 3, dtype=torch.float64)

    ours, ref = Tagger(), TorchTagger()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x)[0], ref(x)[0])
    torch.testing.assert_close(ours(x)[0], ref(x)[0])  # with autograd: the full path


def test_the_one_step_path_is_made_again_after_a_library_swap(monkeypatch):
    """The T = 1 prepared step (nn/cells.py) follows the loop's revision too: bound to the quick -Og
    kernels it gave other last bits than the full path once the -O3 library was swapped in."""
    from celldsl.nn import cells

    torch.manual_seed(0)
    cell = celldsl.LSTMCell(I, H)
    x, hx = torch.randn(3, I), (torch.randn(3, H), torch.randn(3, H))
    loop = loop_for(cell.compiled.key, "cpu")
    with torch.no_grad():
        cell(x, hx)
        first = cells._PREPARED[cell][False]
        cell(x, hx)
        assert cells._PREPARED[cell][False] is first  # replayed
        monkeypatch.setattr(fused, "cell_library_ready", lambda key: (True, loop.cell_lib))
        monkeypatch.setattr(loop, "cell_waiting", "a background build")
        got = cell(x, hx)
        assert cells._PREPARED[cell][False] is not first  # made again on the swapped-in library
        assert all(torch.equal(g, w) for g, w in zip(got, cell(x, hx), strict=True))


class _Untouchable:
    """A cache that fails the test on any read: under tracing no prepared call may be looked up."""

    def __getattr__(self, name):
        raise AssertionError(f"a cache was read while compiling ({name})")


@pytest.mark.parametrize(("t", "bidirectional"), [(1, False), (4, False), (4, True)])
def test_compiling_never_reads_the_prepared_caches(t, bidirectional, monkeypatch):
    """Under torch.compile/torch.export the layer takes the full path before it reads _STEPS or
    _SEQUENCES: a strict torch.export that traced the cache lookup guarded on the weak
    dictionary's keys, and a key collected before the guards were built failed the export (CI,
    IndexError in a guard). Here the compiling flag is set and the caches refuse every read."""
    layer = celldsl.LSTM(I, H, bidirectional=bidirectional)
    x = torch.randn(t, 2, I)
    with torch.no_grad():
        expected = layer(x)[0]
    with monkeypatch.context() as m:
        m.setattr(stack, "_STEPS", _Untouchable())
        m.setattr(stack, "_SEQUENCES", _Untouchable())
        m.setattr(torch.compiler, "is_compiling", lambda: True)
        assert layer._streamed(x, None) is None
    with torch.no_grad():  # and the caches still serve the eager call
        torch.testing.assert_close(layer(x)[0], expected, rtol=0, atol=0)
