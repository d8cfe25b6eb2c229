"""The Docker scripts print the exact docker command with --dry-run (no Docker engine runs here)."""

from __future__ import annotations

import subprocess

from conftest import ROOT


def _dry(script, *args, env=None):
    proc = subprocess.run(["bash", str(ROOT / "docker" / script), "--dry-run", *args], capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_build_command():
    cmd = _dry("build_docker.sh", "--tag", "me/tin:1")
    assert cmd.startswith("docker build -f ") and "docker/Dockerfile" in cmd and "-t me/tin:1" in cmd
    assert "--build-arg UID=" in cmd and cmd.endswith(str(ROOT))
    assert "UID=0 " not in cmd  # the image never runs as root, even when built by root


def test_run_command_mounts_gpus_shm_wandb_and_the_command(monkeypatch):
    import os

    env = {**os.environ, "WANDB_API_KEY": "secret", "WANDB_MODE": "offline"}
    cmd = _dry("run_docker.sh", "--gpus", "2", "--", "torchrun", "--nproc_per_node=2", "main.py", "--arch", "resnet18",
               env=env)  # fmt: skip
    assert cmd.startswith("docker run --rm --name tiny-imagenet --gpus 2 --shm-size 16g")
    assert f"-v {ROOT}/data:/workspace/data" in cmd and f"-v {ROOT}/checkpoints:/workspace/checkpoints" in cmd
    assert "-e WANDB_API_KEY" in cmd and "secret" not in cmd  # passed through by name, not printed
    assert cmd.endswith("tiny-imagenet-toolkit:latest torchrun --nproc_per_node=2 main.py --arch resnet18")


def test_run_without_a_command_attaches_a_shell():
    cmd = _dry("run_docker.sh", "--name", "exp1")
    assert "--name exp1" in cmd and cmd.endswith("-it tiny-imagenet-toolkit:latest bash")


def test_unknown_option_is_a_clear_error():
    proc = subprocess.run(["bash", str(ROOT / "docker" / "run_docker.sh"), "--gpu", "1"], capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2 and "unknown option --gpu" in proc.stderr
