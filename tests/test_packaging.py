"""The installed package: pyproject ships every package and the data folders, resources.py finds the
data, and the zoo is reachable by name (`celldsl list`, `celldsl check mut1`, Recurrent("mut1")).

.ci/run builds the wheel and runs it in a fresh venv outside the checkout (.ci/wheel_smoke.py); these
tests check the parts a checkout can see.
"""

from pathlib import Path

import pytest

from celldsl import resources
from celldsl.cli.main import main

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_lists_every_package_and_maps_the_data_folders():
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    code = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "celldsl").rglob("*.py")
            if "__pycache__" not in p.parts}  # every folder of modules, __init__.py or not (a namespace
    # package such as labs/seq2seq once was is left out of the wheel by setuptools' explicit list)
    data = {"celldsl.zoo": "cells", "celldsl.grammars": "grammars", "celldsl.kernels": "kernels"}
    assert set(config["packages"]) == code | set(data), "pyproject's packages must list every package"
    assert config["package-dir"] == data
    assert config["package-data"] == {"celldsl.zoo": ["*.cell"], "celldsl.grammars": ["*.lark"],
                                      "celldsl.labs.seq2seq": ["cells/*.cell"]}
    modules = {p.stem for p in (ROOT / "celldsl").glob("*.py")}
    assert not modules & {name.split(".")[1] for name in data}, "a data folder would shadow a module"


def test_resources_in_a_checkout_are_the_top_level_folders():
    assert resources.ZOO == ROOT / "cells" and resources.KERNELS == ROOT / "kernels"
    assert resources.GRAMMAR == ROOT / "grammars" / "cell.lark" and resources.GRAMMAR.is_file()
    assert resources.zoo_names() == sorted(p.stem for p in (ROOT / "cells").glob("*.cell"))


def test_an_installed_copy_wins_over_the_checkout(tmp_path, monkeypatch):
    """resources.folder prefers the copy inside the package (where the wheel puts it)."""
    shipped = tmp_path / "celldsl"
    (shipped / "zoo").mkdir(parents=True)
    monkeypatch.setattr(resources, "files", lambda package: shipped)
    assert resources.folder("cells", "zoo") == shipped / "zoo"
    assert resources.folder("kernels", "kernels") == resources.CHECKOUT / "kernels"  # not shipped


def test_celldsl_list_names_every_zoo_cell_with_its_doc(capsys):
    assert main(["list", "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert names == resources.zoo_names() and len(names) == 42  # the matrix-memory cells among them
    assert not (resources.ZOO / "matrix").exists(), "every zoo cell is cells/<name>.cell (issue 26's command)"
    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 42
    assert lines[names.index("mlstm")].split(None, 1)[1].startswith("[matrix state] mLSTM")
    assert "[matrix" not in lines[names.index("lru")]  # an elementwise cell: every backend
    assert "[matrix" not in lines[names.index("flstm")]  # shaped parameters, no matrix state
    lstm = lines[names.index("lstm")].split(None, 1)
    assert lstm == ["lstm", "torch.nn.LSTM cell: gates i, f, g, o; no peepholes"]


def test_celldsl_check_takes_zoo_names(capsys):
    assert main(["check", "mut1", "gru"]) == 0
    assert capsys.readouterr().out.splitlines() == ["mut1: ok", "gru: ok"]


def test_celldsl_check_takes_every_name_celldsl_list_prints(capsys):
    """CI checks the installed zoo with `celldsl check $(celldsl list --names)`: every listed name,
    the matrix-memory cells included, resolves to its shipped file cells/<name>.cell."""
    assert main(["list", "--names"]) == 0
    names = capsys.readouterr().out.split()
    assert "mlstm" in names and "lstm" in names
    assert main(["check", "-q", *names]) == 0, capsys.readouterr().err
    assert all(resources.zoo_file(name) == resources.ZOO / f"{name}.cell" for name in names)
    assert resources.zoo_file("matrix/mlstm") is None and resources.zoo_file("no_such_cell") is None
