"""The torch target: each pointwise function of the plan as plain torch code (emit.py), run by the
shared time loop (targets/loop.py). Runs every cell on every device, and is the code autograd
differentiates again for higher-order gradients."""

from __future__ import annotations

from ... import cache
from ..base import Target


class TorchTarget(Target):
    name = "torch"

    def source(self, plan) -> str:
        from .emit import torch_module_source

        return torch_module_source(plan)

    def load(self, compiled):
        """The generated module, written under the cell's cache key and imported from that file."""
        path = cache.root() / compiled.key / "torch_cell.py"
        cache.write_if_changed(path, self.source(compiled.plan))
        return cache.import_file(path, f"celldsl_generated_{compiled.key[:16]}")

    def loop(self, compiled, schedule: str | None = None):
        from ..loop import TorchLoop

        if schedule is not None:
            self.check_schedule(compiled.plan, schedule)
        return TorchLoop(compiled.plan, compiled.torch_module)

    def matrix_loop(self, compiled):
        """A matrix-memory cell's loop (matrix.py) on its generated module (emit_matrix.py), written
        under the cell's cache key and imported from that file."""
        from .emit_matrix import matrix_module_source
        from .matrix import MatrixLoop

        path = cache.root() / compiled.key / "torch_matrix.py"
        cache.write_if_changed(path, matrix_module_source(compiled.ir))
        module = cache.import_file(path, f"celldsl_generated_matrix_{compiled.key[:16]}")
        return MatrixLoop(compiled.ir, module)


TARGET = TorchTarget()
