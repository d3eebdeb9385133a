"""The typed forwards of the scriptable copies (celldsl/nn/script_arity.py), shared by the elementwise
layers (nn/script_any.py) and the matrix path (nn/script_matrix.py): the matrix path's bare-Tensor
layer (a cell without heads and one state) scripts with its eager numbers, and its `extra` argument,
there only for one signature with the elementwise layers, is refused when given. The reference is the
eager layer (its own loop)."""

import typing

import pytest
import torch
from shaped_cells import LOWRANK, H, I, shaped_layer

import celldsl
from celldsl.nn.matrix import MatrixCell, MatrixRecurrent
from celldsl.nn.script_arity import MAX_STATES, BareState, States1, arity_forward

T, N = 5, 2  # I, H: tests/shaped_cells.py
TOL = {"rtol": 1e-12, "atol": 1e-12}


def _layer(**kw) -> MatrixRecurrent:
    layer = shaped_layer(LOWRANK, {"R": 2}, **kw)
    assert isinstance(layer, MatrixRecurrent)
    return layer


def test_a_one_state_matrix_layer_without_heads_scripts_with_a_bare_tensor_state():
    layer = _layer(num_layers=2, bidirectional=True)
    scripted = torch.jit.script(layer)
    assert "Tensor? state=None" in str(scripted.forward.schema)
    x = torch.randn(T, N, I, dtype=torch.float64)
    h0 = torch.randn(4, N, H, dtype=torch.float64)
    for state in (None, h0):
        want_out, want_h = layer(x, state)
        got_out, got_h = scripted(x, state)
        assert isinstance(got_h, torch.Tensor) and got_h.shape == (4, N, H)
        torch.testing.assert_close(got_out, want_out, **TOL)
        torch.testing.assert_close(got_h, want_h, **TOL)


def test_a_matrix_layer_and_step_refuse_extra_inputs_scripted_and_eagerly():
    torch.manual_seed(0)
    step = MatrixCell(LOWRANK, I, H, sizes={"R": 2}, backend="torch", dtype=torch.float64)
    extra = {"ctx": torch.zeros(N, I, dtype=torch.float64)}
    for module, x in ((_layer(), torch.randn(T, N, I, dtype=torch.float64)),
                      (step, torch.randn(N, I, dtype=torch.float64))):
        scripted = torch.jit.script(module)
        want = module(x)
        torch.testing.assert_close(scripted(x, None, None)[0], want[0], **TOL)  # extra=None: as without
        with pytest.raises(torch.jit.Error, match="takes no extra inputs"):
            scripted(x, None, extra)
        copy = module.__prepare_scriptable__()  # its eager branch: the layer's own forward
        torch.testing.assert_close(copy(x)[0], want[0], **TOL)
        with pytest.raises(TypeError, match="takes no extra inputs"):
            copy(x, None, extra)


def test_arity_forward_picks_the_typed_mixin_and_refuses_other_counts():
    assert arity_forward(1, bare=True) is BareState and arity_forward(1) is States1
    for n in range(1, MAX_STATES + 1):  # state: tuple[Tensor, ...n] | None
        state = typing.get_args(arity_forward(n).forward.__annotations__["state"])[0]
        assert typing.get_args(state) == (torch.Tensor,) * n
    for bad in (0, MAX_STATES + 1):
        with pytest.raises(ValueError, match="states"):
            arity_forward(bad)
    with pytest.raises(ValueError, match="one state"):
        arity_forward(2, bare=True)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_the_shared_scripted_loop_drops_out_between_layers_as_torch_nn(bidirectional):
    """LSTM's and Recurrent's scripted forwards run one loop (nn/scripting.py ScriptedLayers): in
    training, dropout between layers draws the masks torch.nn.LSTM draws under the same seed; eval
    drops nothing."""
    torch.manual_seed(0)
    ref = torch.nn.LSTM(I, H, num_layers=3, dropout=0.5, bidirectional=bidirectional, dtype=torch.float64)
    x = torch.randn(T, N, I, dtype=torch.float64)
    for eager in (celldsl.LSTM(I, H, num_layers=3, dropout=0.5, bidirectional=bidirectional,
                               dtype=torch.float64),
                  celldsl.Recurrent("lstm", I, H, num_layers=3, dropout=0.5, bidirectional=bidirectional,
                                    dtype=torch.float64)):
        eager.load_state_dict(ref.state_dict())
        scripted = torch.jit.script(eager)
        for training in (True, False):
            ref.train(training)
            scripted.train(training)
            torch.manual_seed(1)
            want, (want_h, want_c) = ref(x)
            torch.manual_seed(1)
            got, (got_h, got_c) = scripted(x)
            for a, b in ((got, want), (got_h, want_h), (got_c, want_c)):
                torch.testing.assert_close(a, b, **TOL)


class Parent(torch.nn.Module):
    """A matrix layer and a matrix step, one after the other."""

    def __init__(self):
        super().__init__()
        self.layer = _layer()
        self.step = MatrixCell(LOWRANK, H, H, sizes={"R": 2}, backend="torch", dtype=torch.float64)

    def forward(self, x):
        out, h = self.layer(x)
        return self.step(out[-1])[0] + h[0]


def test_a_scripted_matrix_parent_pickles_and_loads_as_the_eager_classes(tmp_path):
    """torch.jit.script puts the copies (nn/script_arity.py PicklesAsEager) in their parent's place;
    the parent then saves with torch.save and loads with weights_only=True as MatrixRecurrent and
    MatrixCell, giving the eager numbers."""
    import pickle

    parent = Parent()
    x = torch.randn(T, N, I, dtype=torch.float64)
    want = parent(x)
    torch.jit.script(parent)
    assert [type(m).__name__[:8] for m in (parent.layer, parent.step)] == ["Scripted"] * 2
    torch.testing.assert_close(parent(x), want, **TOL)
    copy = pickle.loads(pickle.dumps(parent))
    assert type(copy.layer) is MatrixRecurrent and type(copy.step) is MatrixCell
    torch.testing.assert_close(copy(x), want, **TOL)
    torch.save(parent, tmp_path / "parent.pt")
    with torch.serialization.safe_globals([*celldsl.safe_globals(), Parent]):
        loaded = torch.load(tmp_path / "parent.pt", weights_only=True)
    assert type(loaded.layer) is MatrixRecurrent and type(loaded.step) is MatrixCell
    torch.testing.assert_close(loaded(x), want, **TOL)
