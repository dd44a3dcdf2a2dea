#!/usr/bin/env python3
"""The Python part of the gpu suite: CUDA tensors and torch streams through eplb on one GPU (ranks
are processes sharing it). Exit 77 (skipped) without torch.cuda or a CUDA build of eplb; runs under
pytest when it is installed, else calls the tests itself."""

import os
import sys

SKIP = 77

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, here)
    try:
        import numpy  # noqa: F401
        import torch
    except ImportError as e:
        print(f"skipped: {e}")
        sys.exit(SKIP)
    import eplb

    if not torch.cuda.is_available():
        print("skipped: torch.cuda has no GPU")
        sys.exit(SKIP)
    if not any(b["name"] == "cuda_ipc" and b["built"] for b in eplb.backends()):
        print("skipped: eplb was built without CUDA")
        sys.exit(SKIP)
    try:
        import pytest
    except ImportError:
        pytest = None
    if pytest is not None:
        os.environ["EPLB_GPU_SUITE"] = "1"
        sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", os.path.join(here, "test_gpu.py")]))
    import inspect
    import tempfile

    import test_gpu

    failures = 0
    for name, fn in sorted(vars(test_gpu).items()):
        if not name.startswith("test_") or not callable(fn):
            continue
        params = getattr(fn, "cases", [()])
        for args in params:
            try:
                if "tmp_path" in inspect.signature(fn).parameters:
                    import pathlib

                    with tempfile.TemporaryDirectory() as d:
                        fn(*args, tmp_path=pathlib.Path(d))
                else:
                    fn(*args)
                print(f"PASS {name}{args}")
            except Exception as e:  # noqa: BLE001 - reported
                failures += 1
                print(f"FAIL {name}{args}: {e!r}")
    sys.exit(1 if failures else 0)
