"""Print the CUDA toolkit folder that an nvcc command belongs to (meson.build links cudart from it).

nvcc on PATH is not always the toolkit's own binary: a symlink (/usr/bin/nvcc) or a wrapper script
(/usr/local/bin/nvcc that execs /usr/local/cuda-13.0/bin/nvcc) sits two levels above no lib64.
nvcc's dry run prints `#$ TOP=<toolkit>/bin/..`, which holds for all of them.
"""
import os
import subprocess
import sys


def toolkit_root(nvcc: str) -> str:
    try:
        run = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        for line in (run.stdout + run.stderr).splitlines():
            if line.startswith("#$ TOP="):
                return os.path.realpath(line.split("=", 1)[1].strip())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


if __name__ == "__main__":
    print(toolkit_root(sys.argv[1]))
