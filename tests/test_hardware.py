"""Defaults decided from the machine: every branch of --amp auto / --channels_last auto, with the
capability queries replaced (no GPU and no particular CPU needed), the device refusal, and what a
run records about its decision."""

from __future__ import annotations

import os

import pytest
import torch
import yaml

import main
from conftest import FAST_RUN
from tin.runtime import hardware
from utils import UserError

ZEN4 = {"architecture": "x86_64", "avx2": True, "avx512_f": True, "avx512_bf16": True, "amx_tile": False}
SAPPHIRE_RAPIDS = {**ZEN4, "amx_tile": True, "amx_bf16": True}
EPYC_AVX2 = {"architecture": "x86_64", "avx2": True, "avx512_f": False, "avx512_bf16": False}
GRAVITON3 = {"architecture": "aarch64", "neon": True, "bf16": True}
CPU, GPU = torch.device("cpu"), torch.device("cuda", 0)


@pytest.fixture
def cpu_with(monkeypatch):
    def use(caps: dict) -> None:
        monkeypatch.setattr(hardware, "cpu_capabilities", lambda: dict(caps))

    return use


@pytest.fixture
def gpu_with(monkeypatch):
    def use(native_bf16: bool) -> None:
        monkeypatch.setattr(hardware, "cuda_bf16", lambda device: native_bf16)
        monkeypatch.setattr(hardware, "device_name", lambda device: "a test GPU")

    return use


@pytest.mark.parametrize(
    "caps, isa", [(ZEN4, "AVX512-BF16"), (SAPPHIRE_RAPIDS, "AVX512-BF16 + AMX"), (GRAVITON3, "BF16")]
)
def test_cpu_with_native_bf16_gets_bf16_and_channels_last(cpu_with, caps, isa):
    cpu_with(caps)
    rt = hardware.decide_runtime(CPU)
    assert (rt.amp_dtype, rt.channels_last) == (torch.bfloat16, True)
    assert rt.reason.startswith(f"bf16: this CPU has native bf16 ({isa})")


def test_cpu_without_native_bf16_gets_fp32_and_the_plain_layout(cpu_with):
    cpu_with(EPYC_AVX2)
    rt = hardware.decide_runtime(CPU)
    assert (rt.amp_dtype, rt.channels_last, rt.precision) == (None, False, "fp32")
    assert rt.reason.startswith("fp32: this CPU has no native bf16 (AVX2 only)")


def test_forcing_bf16_on_such_a_cpu_is_obeyed_with_a_warning(cpu_with, tin_log):
    cpu_with(EPYC_AVX2)
    rt = hardware.decide_runtime(CPU, amp="on")
    assert rt.amp_dtype is torch.bfloat16 and rt.channels_last  # auto layout follows the precision
    assert "no native bf16" in tin_log.text and "10x slower" in tin_log.text
    assert hardware.decide_runtime(CPU, amp="auto", amp_dtype="bf16").amp_dtype is torch.bfloat16


def test_gpu_with_native_bf16_gets_bf16(gpu_with):
    gpu_with(True)
    rt = hardware.decide_runtime(GPU)
    assert (rt.amp_dtype, rt.channels_last, rt.device_name) == (torch.bfloat16, True, "a test GPU")
    assert rt.reason.startswith("bf16: this GPU has native bf16")


def test_gpu_without_native_bf16_gets_fp16_with_the_scaler(gpu_with):
    gpu_with(False)  # a T4 or V100: torch.cuda.is_bf16_supported() would say True, counting emulation
    rt = hardware.decide_runtime(GPU)
    assert rt.amp_dtype is torch.float16 and rt.reason.startswith("fp16 with a gradient scaler")
    assert hardware.decide_runtime(GPU, amp="on", amp_dtype="bf16").amp_dtype is torch.bfloat16  # forced: obeyed


def test_flags_override_the_automatic_choice(cpu_with, gpu_with):
    cpu_with(SAPPHIRE_RAPIDS)
    assert hardware.decide_runtime(CPU, amp="off").amp_dtype is None
    assert not hardware.decide_runtime(CPU, channels_last="off").channels_last
    cpu_with(EPYC_AVX2)
    assert hardware.decide_runtime(CPU, channels_last="on").channels_last
    gpu_with(True)
    assert hardware.decide_runtime(GPU, amp="on", amp_dtype="fp16").amp_dtype is torch.float16
    assert hardware.decide_runtime(GPU, amp="off").channels_last  # the layout still helps fp32 (TF32) on a GPU


def test_the_real_queries_answer_on_this_machine():
    native, isa = hardware.cpu_bf16()
    assert isinstance(native, bool) and isa
    assert hardware.decide_runtime(CPU).precision in ("bf16", "fp32")


def test_visible_but_unusable_gpu_is_refused_not_ignored(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(hardware, "nvidia_devices_visible", lambda: True)
    monkeypatch.setattr(hardware, "_cuda_unusable_reason", lambda: "the NVIDIA driver is too old")
    with pytest.raises(UserError, match="NVIDIA devices are visible but CUDA cannot use them .*driver is too old"):
        hardware.resolve_device("auto")
    assert hardware.resolve_device("cpu") == CPU  # asking for the CPU is always fine
    monkeypatch.setattr(hardware, "nvidia_devices_visible", lambda: False)
    assert hardware.resolve_device("auto") == CPU
    with pytest.raises(UserError, match="--device cuda was asked for"):
        hardware.resolve_device("cuda")


def test_a_run_logs_and_records_what_was_decided(tiny_data, tmp_path, cpu_with):
    cpu_with(EPYC_AVX2)
    args = [a for a in FAST_RUN if a not in ("--no-amp", "--no-channels_last")]  # the automatic choice
    run = main.main(
        [
            *args,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 1 --steps_per_epoch 2 --wandb disabled".split(),
        ]
    )
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["amp"] == "auto" and saved["resolved"]["runtime"]["precision"] == "fp32"
    assert saved["resolved"]["runtime"]["channels_last"] is False
    log_text = (run / "log.txt").read_text()
    assert "fp32: this CPU has no native bf16 (AVX2 only)" in log_text
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    assert ckpt["runtime"]["precision"] == "fp32"
    # the saved config.yaml is a usable preset: its `resolved:` block is ignored on reading
    assert main.parse_config(["--config", str(run / "config.yaml")]).amp == "auto"


def test_resuming_where_the_choice_differs_warns_and_continues(tiny_data, tmp_path, cpu_with):
    cpu_with(SAPPHIRE_RAPIDS)
    args = [a for a in FAST_RUN if a not in ("--no-amp", "--no-channels_last")]
    run = main.main(
        [
            *args,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 2 --steps_per_epoch 2 --wandb disabled".split(),
        ]
    )
    ckpt = torch.load(run / "last.pth.tar", weights_only=True)
    ckpt.update(epoch=1, finished=False, history=ckpt["history"][:1])  # as if stopped after epoch 1
    torch.save(ckpt, run / "last.pth.tar")
    cpu_with(EPYC_AVX2)  # resumed on another machine
    main.main(["--resume", str(run)])
    log_text = (run / "log.txt").read_text()
    assert "resumes with fp32" in log_text and "not be bit-identical" in log_text
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 2


def test_data_on_the_device_is_decided_from_free_memory(monkeypatch):
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * gib, 80 * gib))
    assert hardware.decide_data_on_device("auto", GPU, int(1.5 * gib), "torch")[0]
    on, why = hardware.decide_data_on_device("auto", GPU, 6 * gib, "torch")
    assert not on and "over 50% of the GPU's 10.0 GiB free" in why
    assert not hardware.decide_data_on_device("auto", CPU, gib, "torch")[0]  # a CPU reads the cache in place
    assert hardware.decide_data_on_device("on", CPU, gib, "torch")[0]
    assert not hardware.decide_data_on_device("off", GPU, gib, "torch")[0]
    off, why = hardware.decide_data_on_device("auto", GPU, None, "torch")
    assert not off and "--no_cache" in why
    with pytest.raises(UserError, match="--data_on_device on cannot be honoured: --aug_backend albumentations"):
        hardware.decide_data_on_device("on", GPU, gib, "albumentations")


# ---------------------------------------------------------------------------- a cgroup CPU quota
def _cgroup(root, v2=None, v1=None):
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return str(root)


@pytest.mark.parametrize(
    "v2, v1, expected",
    [
        ("max 100000", None, None),  # cgroup v2, no limit
        ("150000 100000", None, 1.5),  # docker run --cpus 1.5
        (None, (-1, 100000), None),  # cgroup v1, no limit
        (None, (200000, 100000), 2.0),
        (None, None, None),  # nothing mounted
    ],
)
def test_the_cpu_quota_is_read_from_either_cgroup_version(tmp_path, v2, v1, expected):
    assert hardware.cpu_quota(_cgroup(tmp_path, v2, v1)) == expected


def test_torch_threads_are_capped_at_the_quota_unless_omp_num_threads_says(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(hardware, "CGROUP", _cgroup(tmp_path, v2="100000 100000"))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    try:
        torch.set_num_threads(2)
        assert hardware.usable_cpus() == 1
        line = hardware.fit_threads()
        assert torch.get_num_threads() == 1 and "torch threads: 1, not 2" in line and "allows 1 CPUs" in line
        assert hardware.fit_threads() is None  # already within the quota
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert hardware.fit_threads() is None and torch.get_num_threads() == 2  # the user's choice stands
    finally:
        torch.set_num_threads(before)


def test_deterministic_auto_autotunes_gpus_and_on_makes_them_repeatable(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cuda = torch.device("cuda")  # the settings are process-wide flags: no GPU is needed to set them
    try:
        assert "autotuning" in hardware.configure(cuda, "auto")
        assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
        assert not torch.are_deterministic_algorithms_enabled()
        assert "deterministic GPU kernels" in hardware.configure(cuda, "on")
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before
    assert hardware.configure(torch.device("cpu"), "off") == "deterministic (a CPU)"  # CPUs: exact at no cost


def test_runs_saved_with_a_boolean_deterministic_resume_with_its_meaning():
    from tin.config.schema import upgrade_saved

    assert upgrade_saved({"deterministic": True})["deterministic"] == "on"
    assert upgrade_saved({"deterministic": False})["deterministic"] == "off"
    assert upgrade_saved({})["deterministic"] == "on"  # before the flag existed: the original's deterministic cuDNN
