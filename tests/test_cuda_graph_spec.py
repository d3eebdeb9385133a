"""targets/triton/cuda_graph.py's argument flattening (the part that runs without a GPU), and that the loop it
wraps runs unchanged on CPU tensors (the Triton interpreter tests drive the same wrapper)."""

import torch

from celldsl.targets.triton.cuda_graph import GraphedLoop, _flatten, _signature, _unflatten


def test_flatten_round_trips_nested_arguments_with_none():
    a, b, c = torch.ones(2), torch.zeros(3, 1), torch.arange(4.0)
    tree = (a, [b, None], [], None, [c], [None, a])
    leaves: list = []
    spec = _flatten(tree, leaves)
    assert len(leaves) == 4 and leaves[0] is a and leaves[3] is a
    back = _unflatten(spec, leaves)
    assert back[0] is a and back[1][0] is b and back[1][1] is None and back[2] == [] and back[3] is None
    assert back[4][0] is c and back[5] == [None, a]


def test_signature_tells_apart_what_a_graph_bakes_in():
    def sig(tree, extra=("forward", None)):
        leaves: list = []
        return _signature(_flatten(tree, leaves), leaves, extra)

    x = torch.ones(2, 3)
    assert sig((x, [None])) == sig((torch.zeros(2, 3), [None]))  # values are copied in, not baked
    assert sig((x, [None])) != sig((x, [x]))  # a None gradient is a different graph
    assert sig((x,)) != sig((torch.ones(3, 2),))
    assert sig((x,)) != sig((x.double(),))
    assert sig((x,)) != sig((x.t().contiguous().t(),))  # strides
    assert sig((x,)) != sig((x,), ("forward", (2, 1)))  # packed batch sizes


def test_cpu_tensors_run_the_wrapped_loop():
    calls = []

    class Loop:
        hoisted = ["w"]

        def forward(self, *args):
            calls.append(args)
            return "ran"

    loop = GraphedLoop(Loop())
    x = torch.ones(1, 1, 1)
    assert loop.forward(x, [x], [x], [x], [], []) == "ran" and len(calls) == 1
    assert loop.hoisted == ["w"] and not loop._graphs
