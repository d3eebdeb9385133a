"""The `celldsl` command: `check` and `explain`, exit codes, and error output without tracebacks."""

import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from celldsl.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
ZOO_FILES = sorted(str(p) for p in (ROOT / "cells").glob("*.cell"))
BAD = "cell t\ninput x\nstate h\nparam W\nh' = tanh(W @ x h)\n"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CELLDSL_CACHE", str(tmp_path / "cache"))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_console_script_is_declared():
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("celldsl") == "celldsl.cli.main:main"


def test_check_passes_every_zoo_cell(capsys):
    code, out, err = run(capsys, "check", *ZOO_FILES)
    assert code == 0
    assert err == ""  # no errors and no warnings in the zoo
    assert out.splitlines() == [f"{f}: ok" for f in ZOO_FILES]
    # the matrix-memory and shaped cells (cells/mlstm.cell, cells/flstm.cell) check as any other
    assert len(ZOO_FILES) == 42


def test_check_bad_file_prints_position_line_and_caret(tmp_path, capsys):
    bad = tmp_path / "bad.cell"
    bad.write_text(BAD)
    code, out, err = run(capsys, "check", str(bad))
    assert code == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"{bad}:5:17: error: unexpected name 'h'; expected an operator")
    assert lines[1:3] == ["    h' = tanh(W @ x h)", "    " + " " * 16 + "^"]
    assert "Traceback" not in err


def test_check_reports_every_file_and_fails_if_one_is_bad(tmp_path, capsys):
    bad = tmp_path / "bad.cell"
    bad.write_text("cell t\ninput x\nstate h\nh' = y\n")
    good = ZOO_FILES[0]
    code, out, err = run(capsys, "check", str(bad), good)
    assert code == 1
    assert out.splitlines() == [f"{good}: ok"]
    assert f"{bad}:4:6: error: unknown name 'y'" in err
    assert err.splitlines()[-1] == "1 of 2 files have errors"


def test_check_prints_warnings_and_still_passes(tmp_path, capsys):
    path = tmp_path / "w.cell"
    path.write_text("cell t\ninput x\nstate h\nparam W, b\nh' = tanh(W @ x + h)\n")
    code, out, err = run(capsys, "check", str(path))
    assert code == 0
    assert out == f"{path}: ok\n"
    warning = f"{path}:4:10: warning: parameter 'b' is never used\n    param W, b\n             ^"
    assert err.startswith(warning)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "error: the file is not valid UTF-8 text"),
        (b"cell t\x00\n", "error: the file contains a NUL byte"),
        (b"", "error: the file holds no cell"),
    ],
)
def test_check_binary_and_empty_files(tmp_path, capsys, content, fragment):
    path = tmp_path / "odd.cell"
    path.write_bytes(content)
    code, _, err = run(capsys, "check", str(path))
    assert code == 1
    assert fragment in err and "Traceback" not in err


def test_check_missing_file(tmp_path, capsys):
    code, _, err = run(capsys, "check", str(tmp_path / "nope.cell"))
    assert code == 1
    assert err.startswith(f"{tmp_path / 'nope.cell'}: error: cannot read")


def test_check_accepts_zoo_names(capsys):
    code, out, _ = run(capsys, "check", "lstm", "-q")
    assert code == 0 and out == ""


def test_internal_error_is_a_message_not_a_traceback(capsys, monkeypatch):
    import celldsl.cli.main as cli

    def broken(path):
        raise RuntimeError("boom")

    monkeypatch.delenv("CELLDSL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "compile_cell", broken)
    code, _, err = run(capsys, "check", "lstm")
    assert code == 1
    assert "lstm: internal error: RuntimeError: boom" in err and "Traceback" not in err


def test_explain_lstm(capsys):
    code, out, err = run(capsys, "explain", "lstm")
    assert code == 0 and err == ""
    assert "hoisted (once over all T steps): [W_ii, W_if, W_ig, W_io] (4H x I) @ x" in out
    assert "stage 1: [W_hi, W_hf, W_hg, W_ho] (4H x H) @ h" in out
    assert out.count("hoisted (once") == 1 and out.count("stage 1: [") == 1 and "stage 2" not in out
    assert "1 GEMM stage(s) per step" in out
    assert "weight_ih = [W_ii, W_if, W_ig, W_io]  4H x I" in out
    assert "weight_hh = [W_hi, W_hf, W_hg, W_ho]  4H x H" in out
    assert "bias_ih = [b_ii, b_if, b_ig, b_io]  4H  (vector)" in out
    assert "total: 4*H^2 + 4*H*I + 8*H numbers" in out
    assert "recurrence: dense" in out
    assert "hoisted GEMMs: 8*H*I" in out and "step GEMMs: 8*H^2" in out
    assert "h' = tanh(%t0)*sigmoid(W_ho@h + W_io@x + b_ho + b_io)" in out
    assert "backward ops" in out and "saved per step for the backward (10H numbers per sequence)" in out


def test_explain_mut1_has_two_stages(capsys):
    code, out, _ = run(capsys, "explain", str(ROOT / "cells" / "mut1.cell"))
    assert code == 0
    assert "2 GEMM stage(s) per step" in out
    assert "hoisted (once over all T steps): [W_xz, W_xr] (2H x I) @ x" in out
    assert "stage 1: [W_hr] (H x H) @ h" in out
    assert "stage 2: [W_hh] (H x H) @ %operand" in out
    assert "needs I == H: input 'x' meets H-wide values elementwise (line 21, column 33)" in out


@pytest.mark.parametrize(
    ("cell", "kind"), [("mingru", "linear"), ("indrnn", "elementwise"), ("gru", "dense")]
)
def test_explain_names_the_recurrence_kind(capsys, cell, kind):
    _, out, _ = run(capsys, "explain", cell)
    assert f"recurrence: {kind}" in out


def test_explain_fgr_lists_the_prev_states(capsys):
    _, out, _ = run(capsys, "explain", "greff_fgr")
    assert "  prev(i)  [H]  (carried for prev(); starts at zero)" in out
    assert "stage 1: [R_ii, R_if, R_io] (3H x H) @ prev(i)" in out


def test_explain_bad_file_fails(tmp_path, capsys):
    bad = tmp_path / "bad.cell"
    bad.write_text(BAD)
    code, out, err = run(capsys, "explain", str(bad))
    assert code == 1 and out == ""
    assert err.startswith(f"{bad}:5:17: error:")


def test_other_commands_are_registered(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("check", "explain", "train", "compare", "compile"):
        assert f"    {command} " in out


def test_as_a_process_no_traceback(tmp_path):
    bad = tmp_path / "bad.cell"
    bad.write_bytes(b"cell t\ninput x\nstate h\nh' = h \xfe\n")
    done = subprocess.run(
        [sys.executable, "-m", "celldsl.cli", "check", str(bad), str(ROOT / "cells" / "lstm.cell")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"CELLDSL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 1
    assert done.stderr.startswith(f"{bad}:4:8: error: the file is not valid UTF-8 text\n")
    assert "Traceback" not in done.stderr
    assert done.stdout == f"{ROOT / 'cells' / 'lstm.cell'}: ok\n"


def test_check_and_explain_do_not_import_torch():
    """The compiler commands start fast: neither they nor the compiler import torch (about 1 s)."""
    script = ("import sys; from celldsl.cli.main import main; "
              "codes = [main(['check', 'cells/lstm.cell']), main(['explain', 'cells/mut1.cell'])]; "
              "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[0, 0] False"


# ---- issue 24: one line per error, no hang on a FIFO -------------------------------------------------


def test_check_on_a_fifo_is_a_located_error_not_a_hang(tmp_path):
    """Finding 12: `celldsl check` on a FIFO without a writer once waited forever."""
    fifo = tmp_path / "pipe.cell"
    os.mkfifo(fifo)
    done = subprocess.run([sys.executable, "-m", "celldsl.cli", "check", str(fifo)], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, CELLDSL_CACHE=str(tmp_path / "c")))
    assert done.returncode == 1
    said = "it is a FIFO (named pipe), not a regular file"
    assert done.stderr == f"{fifo}: error: cannot read {fifo}: {said}\n"


def test_check_on_a_folder_says_so(tmp_path, capsys):
    code, _, err = run(capsys, "check", str(tmp_path))
    said = "it is a folder, not a regular file"
    assert code == 1 and err == f"{tmp_path}: error: cannot read {tmp_path}: {said}\n"


def test_train_with_an_unsafe_cache_is_one_line(tmp_path):
    """Finding 14: UnsafeCacheError once reached the user as a traceback."""
    unsafe = tmp_path / "cache"
    unsafe.mkdir()
    unsafe.chmod(0o777)
    argv = ["train", "adding", "--cell", str(ROOT / "cells" / "lstm.cell"), "--steps", "1", "--hidden", "3",
            "--out", str(tmp_path / "run"), "--quiet", "--no-pictures"]
    done = subprocess.run([sys.executable, "-m", "celldsl.cli", *argv], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, CELLDSL_CACHE=str(unsafe)))
    assert done.returncode == 1, done.stderr
    said = f"celldsl: error: refusing the cache folder {unsafe}: other users can write"
    assert done.stderr.startswith(said)
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.parametrize(("error", "line"), [
    (PermissionError(13, "Permission denied", "/x/y"), "celldsl: error: /x/y: Permission denied"),
    (FileNotFoundError(2, "No such file or directory"), "celldsl: error: No such file or directory"),
    (ValueError("--lr must be positive\nand \x1b[2J"),
     "celldsl: error: --lr must be positive\\nand \\x1b[2J"),
    (RuntimeError("boom"), "celldsl: internal error: RuntimeError: boom (this is a bug in celldsl; "
                           "CELLDSL_DEBUG=1 shows the traceback)"),
])
def test_every_error_that_reaches_main_is_one_line(monkeypatch, capsys, error, line):
    import celldsl.cli.main as cli

    def fail(args):
        raise error

    monkeypatch.delenv("CELLDSL_DEBUG", raising=False)
    monkeypatch.setattr(cli, "run_list", fail)
    code, out, err = run(capsys, "list")
    assert code == 1 and out == "" and err == line + "\n"
    monkeypatch.setenv("CELLDSL_DEBUG", "1")  # the traceback, for a bug report
    with pytest.raises(type(error)):
        main(["list"])


def test_a_usage_error_exits_with_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["check"])
    assert info.value.code == 2
