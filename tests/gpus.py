"""How many GPUs `eplb info` reports (0 without CUDA or a driver); shared by the GPU test scripts."""
import subprocess


def gpu_count(eplb):
    info = subprocess.run([eplb, "info"], capture_output=True, text=True).stdout
    for line in info.splitlines():
        if line.strip().startswith("cuda") and "GPU(s)" in line:
            return int(line.split("(")[1].split()[0])
    return 0
