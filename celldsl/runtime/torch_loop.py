"""The time loop of any cell on torch: hoisted GEMMs, then per step GEMMs + generated pointwise code.

The backward runs the same loop in reverse with the SymPy-derived pointwise backward (not autograd
through the forward). Weight gradients are one GEMM over all time steps per GEMM group.

Shapes: x [T, N, I], states [N, H] each, hoisted weights [rows, I], step weights [rows, K],
vectors [H], scalars [] (0-dim).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..plan import Plan


@dataclass(frozen=True)
class Slot:
    """Where a pointwise argument comes from: (kind, index, block)."""

    kind: str  # input | state | vector | scalar | hoisted | product | operand
    index: int | str
    block: int = 0


class TorchLoop:
    """Runs one compiled cell forward and backward over a whole sequence with a torch module of
    pointwise functions (see emit/torch_source.py)."""

    def __init__(self, plan: Plan, module):
        self.plan = plan
        ir = plan.ir
        self.states = list(ir.states)
        self.vectors = [n for n, p in ir.params.items() if p.kind == "vector"]
        self.scalars = [n for n, p in ir.params.items() if p.kind == "scalar"]
        self.hoisted = plan.hoisted
        self.gemms = plan.gemms
        where: dict[str, Slot] = {}
        for i, s in enumerate(self.states):
            where[s] = Slot("state", i)
        for name in ir.inputs:
            where[name] = Slot("input", name)
        for i, v in enumerate(self.vectors):
            where[v] = Slot("vector", i)
        for i, v in enumerate(self.scalars):
            where[v] = Slot("scalar", i)
        for gi, g in enumerate(self.hoisted):
            for j, p in enumerate(g.products):
                where[p.name] = Slot("hoisted", gi, j)
        for gi, g in enumerate(self.gemms):
            for j, p in enumerate(g.products):
                where[p.name] = Slot("product", gi, j)
            if plan.role(g.operand) == "operand":
                where[g.operand.name] = Slot("operand", g.operand.name)
        self.where = where
        self.output_state = self.states.index(ir.output) if ir.output in self.states else None
        # per stage: (gemm indices, pointwise or None, forward fn, backward fn, argument slots)
        self.stages = []
        by_stage = {pw.stage: pw for pw in plan.pointwise}
        for k in range(plan.num_stages + 1):
            gemm_ids = [i for i, g in enumerate(self.gemms) if g.stage == k]
            pw = by_stage.get(k)
            if pw is None:
                self.stages.append((gemm_ids, None, None, None, None))
                continue
            slots = [where[s.name] for s in pw.inputs]
            self.stages.append(
                (
                    gemm_ids,
                    pw,
                    getattr(module, f"stage{k}_forward"),
                    getattr(module, f"stage{k}_backward"),
                    slots,
                )
            )
        hp = plan.hoist_pointwise
        self.hoist = None
        if hp is not None:
            self.hoist = (hp, module.hoist_forward, module.hoist_backward, [where[s.name] for s in hp.inputs])
        self.operand_of_hoisted = [g.operand.name for g in self.hoisted]

    # ---- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _blocks(t: torch.Tensor, n: int) -> list[torch.Tensor]:
        return list(t.chunk(n, dim=-1)) if n > 1 else [t]

    def _hoisted_operands(self, x, vectors, scalars):
        """Operand values of the hoisted GEMMs over the whole sequence: [T, N, K] each."""
        values = {}
        if self.hoist is not None:
            hp, fwd, _bwd, slots = self.hoist
            args = [self._static(s, x, vectors, scalars) for s in slots]
            for (name, _), r in zip(hp.outputs, fwd(*args), strict=True):
                values[name] = r
        return [values[n] if n in values else self._static(self.where[n], x, vectors, scalars)
                for n in self.operand_of_hoisted]

    @staticmethod
    def _static(slot: Slot, x, vectors, scalars):
        if slot.kind == "input":
            return x
        if slot.kind == "vector":
            return vectors[slot.index]
        if slot.kind == "scalar":
            return scalars[slot.index]
        raise AssertionError(slot)

    # ---- forward -----------------------------------------------------------------------------

    def forward(self, x, states, hoisted_w, step_w, vectors, scalars):
        T, N = x.shape[0], x.shape[1]
        hoisted_ops = self._hoisted_operands(x, vectors, scalars)
        hoisted_out = [
            torch.matmul(op, w.t()) for op, w in zip(hoisted_ops, hoisted_w, strict=True)
        ]
        hoisted_blocks = [
            self._blocks(h, len(g.products)) for h, g in zip(hoisted_out, self.hoisted, strict=True)
        ]
        cur = list(states)
        state_seq = [[s] for s in states]
        step_out = [[] for _ in self.gemms]
        operand_seq = {name: [] for name, slot in self.where.items() if slot.kind == "operand"}
        outputs = []
        w_t = [w.t() for w in step_w]
        for t in range(T):
            env_ops: dict[str, torch.Tensor] = {}
            products: dict[int, list[torch.Tensor]] = {}
            results = None
            for gemm_ids, pw, fwd, _bwd, slots in self.stages:
                for gi in gemm_ids:
                    g = self.gemms[gi]
                    slot = self.where[g.operand.name]
                    opnd = cur[slot.index] if slot.kind == "state" else env_ops[g.operand.name]
                    out = torch.mm(opnd, w_t[gi])
                    step_out[gi].append(out)
                    products[gi] = self._blocks(out, len(g.products))
                if pw is None:
                    continue
                args = [
                    self._arg(s, t, x, cur, vectors, scalars, hoisted_blocks, products, env_ops) for s in slots
                ]
                results = fwd(*args)
                for (name, _), r in zip(pw.outputs, results, strict=True):
                    env_ops[name] = r
            for name in operand_seq:
                operand_seq[name].append(env_ops[name])
            cur = [env_ops[s + "'"] for s in self.states]
            for seq, value in zip(state_seq, cur, strict=True):
                seq.append(value)
            if self.output_state is None:
                outputs.append(env_ops[self.plan.ir.output])
        states_all = [torch.stack(seq) for seq in state_seq]  # [T+1, N, H] each
        if self.output_state is None:
            out = torch.stack(outputs)
        else:
            out = states_all[self.output_state][1:]
        saved = {
            "states": states_all,
            "step_out": [torch.stack(s) if s else None for s in step_out],
            "operands": {k: torch.stack(v) for k, v in operand_seq.items()},
            "hoisted_out": hoisted_out,
            "hoisted_ops": hoisted_ops,
        }
        return out, [s[-1] for s in states_all], saved

    def _arg(self, slot, t, x, cur, vectors, scalars, hoisted_blocks, products, env_ops):
        kind = slot.kind
        if kind == "state":
            return cur[slot.index]
        if kind == "product":
            return products[slot.index][slot.block]
        if kind == "hoisted":
            return hoisted_blocks[slot.index][slot.block][t]
        if kind == "vector":
            return vectors[slot.index]
        if kind == "scalar":
            return scalars[slot.index]
        if kind == "input":
            return x[t]
        return env_ops[slot.index]

    # ---- backward ----------------------------------------------------------------------------

    def backward(self, x, hoisted_w, step_w, vectors, scalars, saved, grad_out, grad_states):
        T = x.shape[0]
        states_all = saved["states"]
        step_all = saved["step_out"]
        hoisted_blocks = [
            self._blocks(h, len(g.products)) for h, g in zip(saved["hoisted_out"], self.hoisted, strict=True)
        ]
        H = states_all[0].shape[-1]
        zeros = x.new_zeros(x.shape[1], H)
        dcur = [g if g is not None else zeros for g in grad_states]
        d_step = [[None] * T for _ in self.gemms]
        d_hoisted = [[None] * T for _ in self.hoisted]
        d_vec = [[] for _ in self.vectors]
        d_scal = [x.new_zeros(()) for _ in self.scalars]
        dx_elem = []
        for t in reversed(range(T)):
            cur = [s[t] for s in states_all]
            products = {
                gi: self._blocks(step_all[gi][t], len(g.products)) for gi, g in enumerate(self.gemms)
            }
            env_ops = {k: v[t] for k, v in saved["operands"].items()}
            dprev: list = [None] * len(self.states)
            dprod: dict[tuple[int, int], torch.Tensor] = {}
            dhoist: dict[tuple[int, int], torch.Tensor] = {}
            dops: dict[str, torch.Tensor] = {}
            dx_t = None
            final_grads = {s + "'": dcur[i] for i, s in enumerate(self.states)}
            if self.output_state is not None:
                s = self.states[self.output_state] + "'"
                final_grads[s] = final_grads[s] + grad_out[t]
            else:
                final_grads[self.plan.ir.output] = grad_out[t]
            for k in reversed(range(len(self.stages))):
                gemm_ids, pw, _fwd, bwd, slots = self.stages[k]
                if pw is not None:
                    args = [
                        self._arg(s, t, x, cur, vectors, scalars, hoisted_blocks, products, env_ops)
                        for s in slots
                    ]
                    grads = [final_grads[n] if n in final_grads else dops.pop(n, None) for n, _ in pw.outputs]
                    grads = [g if g is not None else zeros for g in grads]
                    res = bwd(*args, *grads)
                    for sym, r in zip(pw.grad_inputs, res, strict=True):
                        if r is None:
                            continue
                        slot = self.where[sym.name]
                        if slot.kind == "state":
                            dprev[slot.index] = r if dprev[slot.index] is None else dprev[slot.index] + r
                        elif slot.kind == "product":
                            key = (slot.index, slot.block)
                            dprod[key] = r if key not in dprod else dprod[key] + r
                        elif slot.kind == "hoisted":
                            key = (slot.index, slot.block)
                            dhoist[key] = r if key not in dhoist else dhoist[key] + r
                        elif slot.kind == "vector":
                            d_vec[slot.index].append(r)
                        elif slot.kind == "scalar":
                            d_scal[slot.index] = d_scal[slot.index] + r.sum()
                        elif slot.kind == "input":
                            dx_t = r if dx_t is None else dx_t + r
                for gi in gemm_ids:
                    g = self.gemms[gi]
                    blocks = [dprod.get((gi, j), zeros) for j in range(len(g.products))]
                    dP = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
                    d_step[gi][t] = dP
                    d_op = torch.mm(dP, step_w[gi])
                    slot = self.where[g.operand.name]
                    if slot.kind == "state":
                        i = slot.index
                        dprev[i] = d_op if dprev[i] is None else dprev[i] + d_op
                    else:
                        name = g.operand.name
                        dops[name] = d_op if name not in dops else dops[name] + d_op
            for gi, g in enumerate(self.hoisted):
                blocks = [dhoist.get((gi, j), zeros) for j in range(len(g.products))]
                d_hoisted[gi][t] = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
            dx_elem.append(dx_t)
            dcur = [d if d is not None else zeros for d in dprev]

        # weight gradients: one GEMM over all time steps per group
        d_step_w = []
        for gi, g in enumerate(self.gemms):
            dP = torch.stack(d_step[gi])  # [T, N, rows]
            slot = self.where[g.operand.name]
            opnd = states_all[slot.index][:-1] if slot.kind == "state" else saved["operands"][g.operand.name]
            d_step_w.append(dP.flatten(0, 1).t().mm(opnd.flatten(0, 1)))
        dx = None
        if any(d is not None for d in dx_elem):
            dx = torch.stack([d if d is not None else x.new_zeros(x.shape[1:]) for d in reversed(dx_elem)])
        d_hoisted_w = []
        d_hoist_ops: dict[str, torch.Tensor] = {}
        for gi, g in enumerate(self.hoisted):
            dP = torch.stack(d_hoisted[gi])
            opnd = saved["hoisted_ops"][gi]
            d_hoisted_w.append(dP.flatten(0, 1).t().mm(opnd.flatten(0, 1)))
            d_op = torch.matmul(dP, hoisted_w[gi])
            name = g.operand.name
            d_hoist_ops[name] = d_op if name not in d_hoist_ops else d_hoist_ops[name] + d_op
        d_vectors = [torch.stack(v).sum(dim=(0, 1)) if v else torch.zeros_like(vectors[i])
                     for i, v in enumerate(d_vec)]
        if self.hoist is not None:
            hp, _fwd, bwd, slots = self.hoist
            args = [self._static(s, x, vectors, scalars) for s in slots]
            grads = [d_hoist_ops.pop(n, None) for n, _ in hp.outputs]
            grads = [g if g is not None else torch.zeros_like(x[..., :1]).expand(*x.shape[:2], H) for g in grads]
            for sym, r in zip(hp.grad_inputs, bwd(*args, *grads), strict=True):
                if r is None:
                    continue
                slot = self.where[sym.name]
                if slot.kind == "input":
                    dx = r if dx is None else dx + r
                elif slot.kind == "vector":
                    d_vectors[slot.index] = d_vectors[slot.index] + r.sum(dim=(0, 1))
                elif slot.kind == "scalar":
                    d_scal[slot.index] = d_scal[slot.index] + r.sum()
        for name, d_op in d_hoist_ops.items():
            if self.where[name].kind == "input":
                dx = d_op if dx is None else dx + d_op
        if dx is None:
            dx = torch.zeros_like(x)
        return dx, dcur, d_hoisted_w, d_step_w, d_vectors, d_scal
