"""glibc's thresholds raised once when the CPU kernels are first built (targets/c/memory.py).

Each case runs in a fresh interpreter: the setting is per process and once.
- building a cell's CPU loop sets them ("kept"), and after that a forward+backward of indrnn
  (whose buffers ended on top of glibc's heap and were handed back at every call: ~500-1600 page
  faults a call at T=100 N=32 on this project's machine) faults almost never;
- CELLDSL_KEEP_FREED=0 and the user's own MALLOC_* / GLIBC_TUNABLES settings leave glibc alone,
  and say so;
- any C library but glibc is left alone.
"""

import json
import os
import platform
import subprocess
import sys

import pytest
from test_cpu_fused import needs_cc

from celldsl.targets.c import memory

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's thresholds are glibc's")

FAULTS = """
import json, resource, torch, celldsl
from celldsl.targets.c import memory
torch.set_num_threads(1)
layer = celldsl.Recurrent("indrnn", 128, 256)
x, g = torch.randn(100, 32, 128), torch.randn(100, 32, 256)
def run():
    layer.zero_grad(set_to_none=True)
    layer(x)[0].backward(g)
for _ in range(3):
    run()
per_call = []
for _ in range(10):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run()
    per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
# the median: what every call pays (the bug faulted ~500-1600 pages on every call), not a one-time
# event such as the -O3 library swapped in by a background build finishing under load
faults = sorted(per_call)[len(per_call) // 2]
print(json.dumps({"state": memory._state, "faults": faults, "per_call": per_call}))
"""


def run_python(code: str, **env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k not in (*memory.USER_SETTINGS, "CELLDSL_KEEP_FREED")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env=environ | env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@needs_cc
@glibc
def test_a_cpu_layer_keeps_freed_memory_and_stops_faulting():
    result = run_python(FAULTS)
    assert result["state"] == ["kept"]
    # the buffers of a call are 100 x 32 x 256 floats (800 pages) each; a handful of faults is noise
    # (CI once measured a mean of 58 a call under load: a one-time event, which the median ignores)
    assert result["faults"] < 50, result


@glibc
@pytest.mark.parametrize("env, why", [({"CELLDSL_KEEP_FREED": "0"}, "off: CELLDSL_KEEP_FREED=0"),
                                       ({"MALLOC_TRIM_THRESHOLD_": "1000000"},
                                        "off: the environment sets MALLOC_TRIM_THRESHOLD_"),
                                       ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"},
                                        "off: the environment sets GLIBC_TUNABLES")])
def test_the_user_can_keep_glibcs_own_settings(env, why):
    code = ("import json; from celldsl.targets.c import memory; "
            "print(json.dumps({'first': memory.keep_freed_memory(), 'again': memory.keep_freed_memory()}))")
    assert run_python(code, **env) == {"first": why, "again": why}


def test_another_c_library_is_left_alone(monkeypatch):
    monkeypatch.setattr(memory, "_state", [])
    monkeypatch.delenv("CELLDSL_KEEP_FREED", raising=False)
    for name in memory.USER_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(memory.platform, "libc_ver", lambda: ("musl", "1.2"))
    assert memory.keep_freed_memory() == "off: not glibc"
