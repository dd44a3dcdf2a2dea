"""pytest setup for tests/python: the package under test (build/python through PYTHONPATH, or an
installed one), torch when present. The GPU tests run from gpu_suite.py (suite gpu) only."""

import importlib.util
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import eplb  # noqa: E402,F401
from ranks import pattern, run_processes, run_threads  # noqa: E402,F401

# Without importing it: spawned rank processes import the test modules, and torch takes seconds.
HAVE_TORCH = importlib.util.find_spec("torch") is not None

needs_torch = pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed")

# Collected only when gpu_suite.py asks for it (it passes the file explicitly).
collect_ignore = [] if os.environ.get("EPLB_GPU_SUITE") else ["test_gpu.py"]
