"""Replication labs: train compiled cells on the classic recurrent-network benchmarks.

The labs answer "does a cell written in a .cell file learn what the paper says it learns?".
Each benchmark is a task module under `tasks/` (copy, adding, chorales, arithmetic); `train.py`
runs one cell on one task, `compare.py` runs several cells and writes a table and a plot, and
`cli.py` adds the `celldsl train` and `celldsl compare` commands.

Nothing here downloads anything: the synthetic tasks are generated from a seed and the chorales
ship inside the music21 package.
"""
