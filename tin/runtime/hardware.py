"""What the machine can do, and the defaults that follow from it.

A default measured on one machine can be 10x wrong on another: bf16 autocast is 1.3-2x faster
than fp32 on a CPU with native bf16 (AVX512-BF16 or AMX) and 10x slower on one that emulates it
(AVX2 only); a GPU before Ampere emulates bf16 too, where fp16 with a gradient scaler is native.
So `--amp auto` and `--channels_last auto` (the defaults) are decided here from torch's own
capability queries, with a one-line reason that main.py logs and records in the run folder.

    decide_runtime(device, amp="auto", amp_dtype="auto", channels_last="auto") -> Runtime
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass

import torch

from utils import UserError

log = logging.getLogger("tin")

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """How this run computes: autocast dtype (None = fp32), memory format, and why."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    reason: str
    device_name: str = ""

    @property
    def precision(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]

    def to_dict(self) -> dict[str, str | bool]:
        """Plain values for config.yaml (`resolved:`), checkpoints and best_results.json."""
        return {
            "device": str(self.device),
            "device_name": self.device_name,
            "precision": self.precision,
            "channels_last": self.channels_last,
            "reason": self.reason,
        }


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The one autocast context of the toolkit: `dtype` (bf16/fp16) on `device`, or nothing at all
    for fp32 (a disabled autocast would still reject devices it does not know)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def synchronize(device: torch.device | str) -> None:
    """Wait for the device's queued work (timings only; a CPU has none)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- devices
def nvidia_devices_visible() -> bool:
    """NVIDIA device nodes exist (a GPU is attached to this machine or container), whether or not
    CUDA can use them. CUDA_VISIBLE_DEVICES='' or '-1' hides them on purpose."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*"))


def resolve_device(name: str) -> torch.device:
    """--device auto|cpu|cuda -> a torch.device. A GPU that is attached but unusable (a driver
    older than this torch's CUDA, say) is an error, never a silent fall-back to the CPU."""
    if name == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if name == "cuda" or nvidia_devices_visible():
        why = _cuda_unusable_reason()
        raise UserError(
            f"{'--device cuda was asked for' if name == 'cuda' else 'NVIDIA devices are visible'} but CUDA cannot "
            f"use them ({why}); this torch is {torch.__version__} built for CUDA {torch.version.cuda or 'none'}. "
            "Update the NVIDIA driver or install a torch built for your driver's CUDA, or pass --device cpu"
        )
    return torch.device("cpu")


def _cuda_unusable_reason() -> str:
    if torch.version.cuda is None:
        return "this torch is a CPU-only build"
    try:
        torch.cuda.init()
    except Exception as exc:  # noqa: BLE001 - the driver's own words are the useful part
        return str(exc).splitlines()[0][:200]
    return "no CUDA device found"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def cpu_name() -> str:
    """The CPU's model name (lscpu's "Model name"), falling back to what platform knows."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if shutil.which("sysctl"):  # macOS
        out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    return platform.processor() or platform.machine() or "cpu"


def configure(device: torch.device, deterministic: str = "auto") -> str:
    """Process-wide numerics; returns the one-line reason that is logged.

    --deterministic auto (the default): deterministic where it costs nothing — a CPU's kernels
    already are — and on a GPU cuDNN benchmarks its algorithms and keeps the fastest, as timm's
    and torchvision's training references do. on: bitwise-repeatable GPU runs too — cuDNN's
    deterministic algorithms without autotuning, and torch's deterministic kernels (cuBLAS with a
    fixed workspace; ops without a deterministic kernel warn). off: autotuning. fp32 matmuls and
    convolutions may use TF32 on Ampere and newer (`high`): --no-amp runs stay on the tensor cores."""
    if device.type != "cuda":
        return "deterministic (a CPU)"
    exact = deterministic == "on"
    if exact:  # must be set before cuBLAS starts; torchrun's processes each get it
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(exact, warn_only=True)
    torch.backends.cudnn.deterministic = exact
    torch.backends.cudnn.benchmark = not exact
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    if exact:
        return "deterministic GPU kernels, no cuDNN autotuning (--deterministic on; slower)"
    return f"cuDNN autotuning, not bitwise repeatable (--deterministic {deterministic}; on for exact repeats)"


# --------------------------------------------------------------------------- CPUs
CGROUP = "/sys/fs/cgroup"  # tests point it at a fake tree


def cpu_quota(root: str | None = None) -> float | None:
    """The CPUs' worth of time a cgroup CPU quota allows this process (`docker run --cpus`,
    Kubernetes CPU limits): cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us / cpu.cfs_period_us`.
    None when there is no quota or it cannot be read."""
    root = root or CGROUP
    try:
        quota, period = open(os.path.join(root, "cpu.max")).read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            quota = int(open(os.path.join(root, sub, "cpu.cfs_quota_us")).read())
            period = int(open(os.path.join(root, sub, "cpu.cfs_period_us")).read())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask (taskset, cpusets, SLURM, `docker
    --cpuset-cpus`), capped by a cgroup CPU quota (whole CPUs, at least one)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cpu_quota()
    return max(1, min(cpus, int(quota))) if quota else cpus


def fit_threads() -> str | None:
    """torch sizes its thread pool from the cores it sees and the affinity mask, not from a cgroup
    quota: `docker run --cpus 4` on a 64-core host would run 64 threads on 4 CPUs' worth of time
    and crawl. Cap torch's threads at usable_cpus(), unless OMP_NUM_THREADS says otherwise (as
    torchrun does). Returns the log line when it changed anything."""
    if "OMP_NUM_THREADS" in os.environ:
        return None
    before, cpus = torch.get_num_threads(), usable_cpus()
    if cpus >= before:
        return None
    torch.set_num_threads(cpus)
    return (
        f"torch threads: {cpus}, not {before}: the cgroup CPU quota allows {cpu_quota():g} CPUs "
        "(OMP_NUM_THREADS=N to choose)"
    )


# --------------------------------------------------------------------------- capabilities
def cpu_capabilities() -> dict:
    """torch's view of the CPU's instruction sets (torch.cpu.get_capabilities, torch >= 2.10;
    older torch: its private per-feature queries)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is not None:
        try:
            return dict(get())
        except Exception:  # noqa: BLE001 - cpuinfo failed: fall through to the older queries
            pass
    caps = {"architecture": platform.machine()}
    for key, query in (
        ("avx512_bf16", "_is_avx512_bf16_supported"),
        ("amx_tile", "_is_amx_tile_supported"),
        ("avx2", "_is_avx2_supported"),
        ("avx512_f", "_is_avx512_supported"),
    ):
        fn = getattr(torch.cpu, query, None)
        caps[key] = bool(fn()) if fn is not None else False
    return caps


def cpu_bf16(caps: dict | None = None) -> tuple[bool, str]:
    """(native bf16 arithmetic?, which instructions say so) for this CPU."""
    caps = cpu_capabilities() if caps is None else caps
    native = [
        name
        for key, name in (
            ("avx512_bf16", "AVX512-BF16"),
            ("amx_bf16", "AMX"),
            ("amx_tile", "AMX"),
            ("bf16", "BF16"),
            ("sve_bf16", "SVE-BF16"),
        )
        if caps.get(key)
    ]
    if native:
        return True, " + ".join(dict.fromkeys(native))
    best = next(
        (name for key, name in (("avx512_f", "AVX-512"), ("avx2", "AVX2"), ("neon", "NEON")) if caps.get(key)),
        caps.get("architecture", "unknown"),
    )
    return False, f"{best} only"


def cuda_bf16(device: torch.device) -> bool:
    """Native bf16 on this GPU (Ampere and newer); emulation does not count."""
    try:
        with torch.cuda.device(device):
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except TypeError:  # torch without the argument: compute capability 8.0+ is native
        return torch.cuda.get_device_capability(device)[0] >= 8


# --------------------------------------------------------------------------- decisions
def decide_runtime(
    device: torch.device, amp: str = "auto", amp_dtype: str = "auto", channels_last: str = "auto"
) -> Runtime:
    """--amp auto|on|off, --amp_dtype auto|bf16|fp16 and --channels_last auto|on|off for `device`.

    auto: CUDA with native bf16 -> bf16; CUDA without -> fp16 with the gradient scaler; a CPU with
    native bf16 -> bf16; any other CPU -> fp32. channels_last: on with CUDA, and on a CPU with
    bf16 autocast; off for fp32 on a CPU (it made resnet18 0.82-0.85x on the two CPUs measured)."""
    dtype, why = _precision(device, amp, amp_dtype)
    if channels_last == "auto":
        layout = device.type == "cuda" or dtype is not None
        how = "channels_last" if layout else "contiguous (NCHW)"
    else:
        layout, how = channels_last == "on", f"--channels_last {channels_last}"
    return Runtime(device, dtype, layout, f"{why}; {how}", device_name(device))


def _precision(device: torch.device, amp: str, amp_dtype: str) -> tuple[torch.dtype | None, str]:
    if amp == "off":
        return None, "fp32: --no-amp"
    asked = DTYPES.get(amp_dtype)
    if device.type == "cuda":
        native = cuda_bf16(device)
        if asked is torch.float16 or (asked is None and not native):
            why = "--amp_dtype fp16" if asked is torch.float16 else "this GPU has no native bf16"
            return torch.float16, f"fp16 with a gradient scaler: {why}"
        if not native:
            log.warning(
                "--amp_dtype bf16: this GPU has no native bf16 and emulates it; fp16 (--amp_dtype auto) is faster"
            )
        return torch.bfloat16, "bf16: " + ("this GPU has native bf16" if native else "--amp_dtype bf16 (emulated)")
    native, isa = cpu_bf16()
    if asked is torch.float16:
        log.warning("--amp_dtype fp16 needs a CUDA GPU; using bf16 on the CPU")
    if amp == "auto" and asked is None:
        if native:
            return torch.bfloat16, f"bf16: this CPU has native bf16 ({isa})"
        return None, f"fp32: this CPU has no native bf16 ({isa}); bf16 would be emulated, ~10x slower"
    if not native:
        log.warning(
            "--amp: this CPU has no native bf16 (%s): bf16 is emulated and can be 10x slower than fp32 "
            "(--amp auto picks fp32 here)",
            isa,
        )
    return torch.bfloat16, f"bf16: --amp{' --amp_dtype ' + amp_dtype if asked is not None else ''}"


def warn_if_changed(before: dict | None, now: Runtime) -> None:
    """A resumed run whose precision or memory format resolves differently here than where it was
    started (another machine): it goes on, but not bit-identically; say so."""
    after = now.to_dict()
    if not before or (before["precision"], before["channels_last"]) == (after["precision"], after["channels_last"]):
        return
    log.warning(
        "this run was trained with %s%s on %s and resumes with %s%s here: it continues, but it will not be "
        "bit-identical to an uninterrupted run (pass --amp/--amp_dtype/--channels_last to keep the old)",
        before["precision"],
        ", channels_last" if before["channels_last"] else "",
        before["device_name"],
        after["precision"],
        ", channels_last" if after["channels_last"] else "",
    )


def decide_data_on_device(
    request: str, device: torch.device, nbytes: int | None, aug_backend: str, fraction: float = 0.5
) -> tuple[bool, str]:
    """--data_on_device auto|on|off: keep the decoded uint8 dataset (`nbytes`; None when not cached
    as arrays) on `device`. auto: on for a GPU when it takes at most `fraction` of the free memory;
    off on a CPU (the loader there reads the same memory-mapped cache without a copy)."""
    if request == "off":
        return False, "data on the device: off (--data_on_device off)"
    blockers = []
    if aug_backend != "torch":
        blockers.append("--aug_backend albumentations augments on the host")
    if nbytes is None:
        blockers.append("the splits are not cached as arrays (--no_cache)")
    if blockers:
        if request == "on":
            raise UserError(f"--data_on_device on cannot be honoured: {'; '.join(blockers)}")
        return False, f"data on the device: off ({'; '.join(blockers)})"
    size = f"{nbytes / 2**30:.2f} GiB"
    if request == "on":
        return True, f"data on the device: on ({size}, --data_on_device on)"
    if device.type != "cuda":
        return False, f"data on the device: off (auto on a CPU: the loader reads the cache in place; {size})"
    free, _ = torch.cuda.mem_get_info(device)
    if nbytes > fraction * free:
        return (
            False,
            f"data on the device: off ({size} is over {fraction:.0%} of the GPU's {free / 2**30:.1f} GiB free)",
        )
    return True, f"data on the device: on ({size} of {free / 2**30:.1f} GiB free; no DataLoader)"
