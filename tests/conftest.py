"""pytest configuration shared by the tests: the `cuda` marker.

Tests marked `cuda` need a CUDA GPU with Triton in compiled mode. They are skipped where there is no CUDA device, and
where TRITON_INTERPRET=1 is set (as `make test` sets it: Triton would run them through its interpreter). On a GPU
machine: `pytest -m cuda tests` (or `bash tools/gpu_check.sh OUT`, which also runs the kernel benchmark).
"""
import os

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and compiled Triton (skipped otherwise; run with -m cuda)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1": return
    why = "no CUDA device" if not torch.cuda.is_available() else "TRITON_INTERPRET=1 (unset it to run the CUDA tests)"
    skip = pytest.mark.skip(reason=why)
    for item in items:
        if item.get_closest_marker("cuda"): item.add_marker(skip)
