"""Tests of ssl_nb.kernels on the CPU, through Triton's interpreter.

Every Triton launch happens in a child process (`python -m ssl_nb.kernels.checks`): an out-of-bounds access under the
interpreter kills the process, and a child dying costs one case, not the test session (the runner restarts it on the
remaining cases). The child also keeps TRITON_INTERPRET=1 and the triton import out of this process. The cases
themselves (values and gradients against `ssl_nb.losses` / the MAE references) live in `kernels/checks.py`, shared
with the GPU check `kernels/gpu_check.sh`.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from ssl_nb.kernels.checks import cases

NAMES = list(cases("cpu"))
ENV = {**os.environ, "TRITON_INTERPRET": "1", "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore"}
TIMEOUT = 600


def _run_checks(names):
    "Run the cases in children; a child that dies marks its current case as crashed and a new child goes on."
    results, todo = {}, list(names)
    while todo:
        p = subprocess.run([sys.executable, "-m", "ssl_nb.kernels.checks", "--device", "cpu", "--cases", *todo],
                           capture_output=True, text=True, env=ENV, timeout=TIMEOUT)
        current = None
        for line in p.stdout.splitlines():
            word, _, rest = line.partition(" ")
            if word == "START": current = rest.strip()
            elif word in ("PASS", "FAIL"):
                name, _, detail = rest.partition(" ")
                results[name] = (word == "PASS", detail)
                current = None
        if current is not None:        # died inside a case
            results[current] = (False, f"child process died (exit {p.returncode}) in this case: {p.stderr[-2000:]}")
        elif p.returncode not in (0, 1):
            for n in todo:
                results.setdefault(n, (False, f"child exited {p.returncode}: {p.stderr[-2000:]}"))
        todo = [n for n in todo if n not in results]
    return results


@pytest.fixture(scope="module")
def interpreter_results():
    return _run_checks(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_interpreter(name, interpreter_results):
    ok, detail = interpreter_results[name]
    assert ok, detail


def _py(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def test_compiled_mode_error():
    """A CPU tensor forced onto Triton when the kernels were loaded in compiled mode (here: TRITON_INTERPRET=0 set
    explicitly) raises ConfigError saying what to do, instead of triton's '0 active drivers'."""
    p = _py("import os, torch\n"
            "os.environ.pop('TRITON_INTERPRET', None); os.environ['TRITON_INTERPRET'] = '0'\n"
            "import ssl_nb.kernels as K\nfrom ssl_nb.core import ConfigError\n"
            "z = torch.randn(4, 10)\n"
            "try:\n    K.fixmatch_loss(z, z)\nexcept ConfigError as e:\n    print('CONFIGERROR', e)\n",
            SSL_NB_KERNELS="triton")
    assert "CONFIGERROR" in p.stdout and "TRITON_INTERPRET=1" in p.stdout, p.stdout + p.stderr


def test_triton_imported_first_error():
    """triton imported in compiled mode before the Triton path is taken (its own tl.max/tl.sum are then compiled-mode
    functions, which the interpreter cannot call): a clear ConfigError, not an InterpreterError from inside a kernel.
    With TRITON_INTERPRET=1 set first, importing triton early is fine."""
    code = ("import os, torch, triton\nimport ssl_nb.kernels as K\nfrom ssl_nb.core import ConfigError\n"
            "z = torch.randn(16, 10)\n"
            "try:\n    K.fixmatch_loss(z, z)\nexcept ConfigError as e:\n    print('CONFIGERROR', e)\n"
            "else:\n    print('OK')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**env, "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore"})
    assert "CONFIGERROR" in p.stdout and "before anything imports triton" in p.stdout, p.stdout + p.stderr
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**env, "SSL_NB_KERNELS": "triton", "PYTHONWARNINGS": "ignore", "TRITON_INTERPRET": "1"})
    assert p.stdout.strip() == "OK", p.stdout + p.stderr


def test_bad_backend_name():
    from ssl_nb.core import ConfigError
    import ssl_nb.kernels as K
    old = os.environ.get("SSL_NB_KERNELS")
    os.environ["SSL_NB_KERNELS"] = "cuda-please"
    try:
        with pytest.raises(ConfigError, match="SSL_NB_KERNELS"):
            K.fixmatch_loss(torch.randn(2, 3), torch.randn(2, 3))
    finally:
        if old is None: os.environ.pop("SSL_NB_KERNELS")
        else: os.environ["SSL_NB_KERNELS"] = old


def test_compiles_for_sm90():
    """The interpreter is more lenient than the compiler: build every GPU configuration for sm_90a with triton's
    bundled ptxas (no GPU needed) and check for register spills and unvectorised loads."""
    p = subprocess.run([sys.executable, "-m", "ssl_nb.kernels._aot"], capture_output=True, text=True, timeout=TIMEOUT,
                       env={**os.environ, "TRITON_INTERPRET": "0"})
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert p.returncode == 0 and lines, p.stdout[-3000:] + p.stderr[-3000:]
