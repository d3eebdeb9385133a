"""The language: cell text -> AST (syntax.py, ast.py) -> SymPy IR (ir.py), with the function table
(functions.py), the width inference (widths.py) and located errors (errors.py). Imports nothing else
of celldsl but resources.py (the grammar's file)."""
