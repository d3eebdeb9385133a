"""The `celldsl` command (main.py), its `compile` command for Triton sources (compile.py) and
`celldsl explain` (explain.py). Empty on purpose: the driver imports explain.py, and an import of
main.py here would make the package import the driver back."""
