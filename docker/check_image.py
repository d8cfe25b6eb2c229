"""What this image (or any Python environment) can run: torch/CUDA/cuDNN versions, whether the GPU works,
whether torch matches the pins in requirements.txt, whether --compile has a C/C++ compiler.

    bash docker/run_docker.sh --check        (or: python docker/check_image.py)

Exits 1 with a one-line reason when NVIDIA devices are visible but CUDA cannot use them (most often a
driver older than the image's CUDA: it names a base image to rebuild on). Pins and compiler are warnings.
Without a GPU, CHECK_IMAGE_FAKE_DEVICES=N pretends N devices are visible (and CHECK_IMAGE_FAKE_DRIVER_CUDA
=12.4 a driver version), to see that branch.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import shutil
import sys
import sysconfig
import warnings
from pathlib import Path

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"
FALLBACK_CUDA = "12.8"  # CUDA of the suggested base when the driver is too old for the image's


def pins(requirements: Path = REQUIREMENTS) -> dict[str, str]:
    """{'torch': '2.14.1', 'torchvision': '0.29.1'} from `name==version` lines."""
    if not requirements.is_file():
        return {}
    found = re.findall(r"^(torch|torchvision)==([^\s;#]+)", requirements.read_text(), flags=re.M)
    return dict(found)


def nvidia_devices() -> list[str]:
    fake = os.environ.get("CHECK_IMAGE_FAKE_DEVICES")
    if fake:
        return [f"/dev/nvidia{i} (fake)" for i in range(int(fake))]
    return sorted(glob.glob("/dev/nvidia[0-9]*"))


def driver_cuda() -> str | None:
    """The newest CUDA the host's driver supports, e.g. '12.4' (libcuda comes from the host)."""
    fake = os.environ.get("CHECK_IMAGE_FAKE_DRIVER_CUDA")
    if fake:
        return fake
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


def cuda_state(torch) -> tuple[bool, str]:
    """(usable, the reason it is not, or the devices it found)."""
    if torch.version.cuda is None:
        return False, "this torch is a CPU-only build"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        available = torch.cuda.is_available()
    if not available:
        reason = " ".join(str(w.message) for w in caught) or "torch.cuda.is_available() is False"
        return False, " ".join(reason.split())
    try:
        (torch.ones(2, device="cuda") * 2).sum().item()
    except Exception as exc:  # the driver's own message is the most useful thing to show
        return False, " ".join(f"{type(exc).__name__}: {exc}".split())
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return True, ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))


def compiler() -> dict[str, str | None]:
    """What torch.compile calls: a C++ compiler (inductor, CPU) and a C compiler and Python.h (triton, GPU)."""
    cxx = os.environ.get("CXX") or next(filter(None, map(shutil.which, ("g++", "c++", "clang++"))), None)
    cc = os.environ.get("CC") or next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    return {"cxx": cxx, "cc": cc, "python_h": str(header) if header.is_file() else None}


def facts() -> dict:
    import torch
    import torchvision

    usable, detail = cuda_state(torch)
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "python": f"{sys.version.split()[0]} ({sys.executable})",
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "devices": nvidia_devices(),
        "driver_cuda": driver_cuda(),
        "cuda_usable": usable,
        "cuda_detail": detail,
        "pins": pins(),
        **compiler(),
    }


def _public(version: str) -> str:
    return version.split("+")[0]  # 2.14.1+cu128 -> 2.14.1: the CUDA flavour is the base image's choice


def suggested_base(f: dict) -> str:
    driver = f.get("driver_cuda")
    cuda = FALLBACK_CUDA if not driver or driver.startswith("12.") else f"{driver} or older"
    return f"pytorch/pytorch:{_public(f['torch'])}-cuda{cuda}-cudnn9-runtime"


def verdict(f: dict) -> tuple[int, list[str]]:
    """(exit code, report lines) from facts; pure, so every branch is testable without a GPU."""
    cudnn = f["cudnn"]
    cudnn_s = f"{cudnn // 10000}.{cudnn // 100 % 100}.{cudnn % 100}" if cudnn else "none"
    lines = [f"python       {f['python']}", f"torch        {f['torch']} (CUDA {f['cuda'] or 'none'}, cuDNN {cudnn_s})"]
    lines.append(f"torchvision  {f['torchvision']}")
    for name in ("torch", "torchvision"):
        want = f["pins"].get(name)
        if want is None:
            lines.append(f"pins         WARN: no {name}== pin found in requirements.txt")
        elif _public(f[name]) != want:
            lines.append(
                f"pins         WARN: {name} {f[name]} but requirements.txt pins {name}=={want}: "
                f"the base image's torch is not the tested one; use a base with {name} {want}"
            )
        else:
            lines.append(f"pins         {name}=={want}: matches")
    missing = [
        what
        for key, what in (
            ("cxx", "a C++ compiler (g++)"),
            ("cc", "a C compiler (gcc)"),
            ("python_h", "Python.h (python3-dev)"),
        )
        if not f[key]
    ]
    if missing:
        lines.append(
            f"compile      WARN: --compile will fail: no {', no '.join(missing)}; "
            "install them (apt-get install g++ python3-dev) or train without --compile"
        )
    else:
        lines.append(f"compile      ok: {f['cxx']}, {f['cc']}, {f['python_h']}")
    driver = f"driver supports CUDA {f['driver_cuda']}" if f["driver_cuda"] else "no NVIDIA driver library found"
    if f["cuda_usable"]:
        lines.append(f"gpu          ok: {f['cuda_detail']} ({driver})")
        return 0, [*lines, "ok"]
    if not f["devices"]:
        lines.append(
            "gpu          none visible: CPU only (run_docker.sh --cpu, a host without GPUs, or "
            "docker run without --gpus / the NVIDIA Container Toolkit)"
        )
        return 0, [*lines, "ok (CPU)"]
    lines.append(f"gpu          unusable: {f['cuda_detail']}")
    return 1, [*lines, unusable_reason(f, driver)]


def unusable_reason(f: dict, driver: str) -> str:
    """One line: what is wrong and the rebuild that fixes it."""
    head = f"error: {len(f['devices'])} NVIDIA device(s) visible but CUDA is unusable ({driver})"
    if f["cuda"] is None:
        return f"{head}: this torch is a CPU-only build; rebuild on a CUDA base image (docker/build_docker.sh --base)"
    fix = f"bash docker/build_docker.sh --build-arg BASE_IMAGE={suggested_base(f)}"
    if f["driver_cuda"] and _tuple(f["driver_cuda"]) < _tuple(f["cuda"]):
        return f"{head}: the driver is older than this torch's CUDA {f['cuda']}; rebuild on an older CUDA: {fix}"
    return f"{head}: {f['cuda_detail']}; if the driver predates CUDA {f['cuda']}, rebuild on an older CUDA: {fix}"


def _tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:2])


def main() -> int:
    code, lines = verdict(facts())
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
