"""The Docker scripts: the exact docker commands they print with --dry-run, the image check's verdicts
(a GPU with a driver too old for the image, faked), and `make docker-smoke` end to end (slow; needs a
Docker daemon)."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

DOCKER = ROOT / "docker"


def _dry(script, *args, env=None):
    proc = subprocess.run(
        ["bash", str(DOCKER / script), "--dry-run", *args], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("PIP_CERT", "IMAGE", "DOCKER")}
    return {**env, **extra}


def test_build_command_uses_the_base_and_the_ca_bundle_as_a_secret(tmp_path):
    cmd = _dry("build_docker.sh", "--tag", "me/tin:1", env=_env())
    assert cmd.startswith("docker build -f ") and "docker/Dockerfile" in cmd and "-t me/tin:1" in cmd
    assert cmd.endswith(str(ROOT)) and "--secret" not in cmd and "UID=" not in cmd  # one image for every uid
    cert = tmp_path / "ca.crt"
    cert.write_text("-----BEGIN CERTIFICATE-----\n")
    cmd = _dry("build_docker.sh", "--base", "local/pytorch:x", env=_env(PIP_CERT=str(cert)))
    assert "--build-arg BASE_IMAGE=local/pytorch:x" in cmd and f"--secret id=pip_cert\\,src={cert}" in cmd
    assert "--secret" not in _dry("build_docker.sh", "--pip-cert", "", env=_env(PIP_CERT=str(cert)))


def test_a_missing_ca_bundle_is_a_clear_error():
    proc = subprocess.run(
        ["bash", str(DOCKER / "build_docker.sh"), "--pip-cert", "/nonexistent.crt", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "/nonexistent.crt: no such file" in proc.stderr


def test_run_command_mounts_runs_as_the_caller_and_passes_wandb(monkeypatch):
    env = _env(WANDB_API_KEY="secret", WANDB_MODE="offline")
    cmd = _dry(
        "run_docker.sh", "--gpus", "2", "--", "torchrun", "--nproc_per_node=2", "main.py", "--arch", "resnet18", env=env
    )
    assert re.match(r"docker run --name tiny-imagenet-\d{4}-\d{6}-\d+ --init --stop-timeout 60 ", cmd)
    assert f"--user {os.getuid()}:{os.getgid()} " in cmd and "--shm-size 16g --gpus 2 --rm" in cmd
    assert f"-v {ROOT}/data:/workspace/data" in cmd and f"-v {ROOT}/checkpoints:/workspace/checkpoints" in cmd
    assert f"-v {ROOT}:/workspace " not in cmd  # the code is the image's unless --mount-code
    assert "-e WANDB_API_KEY" in cmd and "secret" not in cmd  # passed through by name, not printed
    assert cmd.endswith("tiny-imagenet-toolkit:latest torchrun --nproc_per_node=2 main.py --arch resnet18")


def test_default_names_differ_so_two_containers_can_run():
    names = {re.search(r"--name (\S+)", _dry("run_docker.sh", "--cpu", "--", "true")).group(1) for _ in range(2)}
    assert len(names) == 2


@pytest.mark.parametrize(
    "args, expected",
    [
        ((), "--gpus all "),
        (("--gpu", "2"), "--gpus device=2 "),
        (("--gpu", "2,3"), '--gpus \\"device=2\\,3\\" '),  # quoted: docker splits --gpus at commas
        (("--gpus", "device=2,3"), '--gpus \\"device=2\\,3\\" '),
        (("--cpu",), None),
        (("--gpus", "none"), None),
    ],
)
def test_gpu_selection(args, expected):
    cmd = _dry("run_docker.sh", *args, "--", "python", "main.py")
    if expected is None:
        assert "--gpus" not in cmd
    else:
        assert expected in cmd


def test_detach_check_and_mount_code():
    cmd = _dry("run_docker.sh", "--detach", "--name", "exp1", "--cpuset", "0-3", "--", "python", "main.py")
    assert "--name exp1 " in cmd and "--detach" in cmd and "--rm" not in cmd and "-it" not in cmd
    assert "--cpuset-cpus 0-3 " in cmd
    cmd = _dry("run_docker.sh", "--cpu", "--check", "--mount-code")
    assert f"-v {ROOT}:/workspace -v {ROOT}/data:/workspace/data" in cmd
    assert cmd.endswith("tiny-imagenet-toolkit:latest python docker/check_image.py")
    proc = subprocess.run(
        ["bash", str(DOCKER / "run_docker.sh"), "--detach"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--detach needs a command" in proc.stderr


def test_run_without_a_command_attaches_a_shell():
    cmd = _dry("run_docker.sh", "--name", "exp1")
    assert "--name exp1" in cmd and cmd.endswith("-it tiny-imagenet-toolkit:latest bash")


def test_unknown_option_is_a_clear_error():
    proc = subprocess.run(
        ["bash", str(DOCKER / "run_docker.sh"), "--gpux", "1"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "unknown option --gpux" in proc.stderr


@pytest.mark.parametrize("script", ["build_docker.sh", "run_docker.sh", "local_base.sh", "smoke.sh"])
def test_help_prints_the_usage_not_code(script):
    proc = subprocess.run(["bash", str(DOCKER / script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and f"docker/{script}" in proc.stdout
    assert "set -euo" not in proc.stdout and not any(line.startswith("#") for line in proc.stdout.splitlines())


def test_local_base_tag_follows_the_torch_pin():
    out = _dry("local_base.sh")
    assert "tag local/pytorch:2.14.1-cuda13.0-cudnn9-runtime" in out and "torchvision==0.29.1" in out


# --- docker/check_image.py: the verdict is a pure function of the facts; no GPU needed ---------------------


def _check_module():
    spec = importlib.util.spec_from_file_location("check_image", DOCKER / "check_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _facts(**over):
    facts = {
        "python": "3.11.2",
        "torch": "2.14.1+cu130",
        "torchvision": "0.29.1+cu130",
        "cuda": "13.0",
        "cudnn": 92400,
        "devices": [],
        "driver_cuda": None,
        "cuda_usable": False,
        "cuda_detail": "",
        "pins": {"torch": "2.14.1", "torchvision": "0.29.1"},
        "cxx": "/usr/bin/g++",
        "cc": "/usr/bin/cc",
        "python_h": "/usr/include/python3.11/Python.h",
    }
    return {**facts, **over}


def test_check_reads_the_pins():
    assert _check_module().pins() == {"torch": "2.14.1", "torchvision": "0.29.1"}


def test_check_cpu_only_is_fine_and_says_so():
    code, lines = _check_module().verdict(_facts())
    assert code == 0 and lines[-1] == "ok (CPU)" and "cuDNN 9.24.0" in lines[1]
    assert sum("matches" in line for line in lines) == 2  # 2.14.1+cu130 matches the pin 2.14.1


def test_check_gpu_usable():
    code, lines = _check_module().verdict(
        _facts(devices=["/dev/nvidia0"], cuda_usable=True, driver_cuda="13.0", cuda_detail="cuda:0 NVIDIA H100")
    )
    assert code == 0 and "ok: cuda:0 NVIDIA H100 (driver supports CUDA 13.0)" in "\n".join(lines)


def test_check_fails_in_one_line_when_the_driver_is_too_old():
    facts = _facts(
        devices=["/dev/nvidia0", "/dev/nvidia1"],
        driver_cuda="12.4",
        cuda_detail="The NVIDIA driver on your system is too old (found version 12040).",
    )
    code, lines = _check_module().verdict(facts)
    assert code == 1 and lines[-1].startswith("error: 2 NVIDIA device(s) visible but CUDA is unusable")
    assert "driver is older than this torch's CUDA 13.0" in lines[-1]
    assert (
        "bash docker/build_docker.sh --build-arg BASE_IMAGE=pytorch/pytorch:2.14.1-cuda12.8-cudnn9-runtime" in lines[-1]
    )


def test_check_warns_on_pin_mismatch_and_missing_compiler():
    code, lines = _check_module().verdict(_facts(torch="2.13.0", cxx=None, python_h=None))
    text = "\n".join(lines)
    assert code == 0 and "WARN: torch 2.13.0 but requirements.txt pins torch==2.14.1" in text
    assert "--compile will fail: no a C++ compiler (g++), no Python.h (python3-dev)" in text


def test_check_script_with_faked_devices_exits_nonzero():
    """The real script on this machine (no GPU, no driver), with devices faked: the failure branch."""
    env = _env(CHECK_IMAGE_FAKE_DEVICES="1", CHECK_IMAGE_FAKE_DRIVER_CUDA="12.2")
    proc = subprocess.run(
        [sys.executable, str(DOCKER / "check_image.py")], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("error: 1 NVIDIA device(s) visible")


# --- the image, built and run (make docker-smoke) ---------------------------------------------------------


def _docker_daemon() -> str | None:
    """None when a daemon answers, else why not."""
    docker = os.environ.get("DOCKER", "docker")
    if shutil.which(docker) is None:
        return f"no docker client ({docker})"
    proc = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=60)
    return None if proc.returncode == 0 else "no Docker daemon reachable (docker info failed)"


@pytest.mark.slow
def test_docker_smoke():
    """Base (cached), image, one CPU demo epoch in the container; outputs on the host, owned by the caller."""
    reason = _docker_daemon()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(["bash", str(DOCKER / "smoke.sh")], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "docker smoke ok" in proc.stdout


def test_an_interrupted_run_tells_the_host_command_only_in_run_dockers_containers(tmp_path, monkeypatch):
    from tin.run import loop

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "checkpoints" / "2026-11-27_10-00-00_resnet18"
    monkeypatch.delenv("TIN_LAUNCHED_BY", raising=False)  # a plain machine, or any container but run_docker.sh's
    assert loop.resume_command(run) == f"python main.py --resume {run}"
    monkeypatch.setenv("TIN_LAUNCHED_BY", "run_docker")  # what docker/run_docker.sh passes
    assert loop.resume_command(run).startswith(
        "bash docker/run_docker.sh -- python main.py --resume checkpoints/2026-11-27_10-00-00_resnet18 "
    )
    assert "-e TIN_LAUNCHED_BY=run_docker" in _dry("run_docker.sh", "--", "python", "main.py", env=_env())
