"""Deployment: one layer of a cell as a standalone C library (c_library.py) or an ONNX model
(onnx_graph.py), from `celldsl export` (cli.py). docs/deploy.md says what each supports."""
