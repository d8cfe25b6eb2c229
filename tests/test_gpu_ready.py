"""What the CUDA and torchrun paths need, shown on a CPU: no host synchronisation per update,
gradients all-reduced once per update under accumulation, the stop flag agreed only every few
updates, timm's SyncBatchNorm conversion (torch's drops activations), BatchNorm statistics
broadcast from rank 0, per-process CUDA RNG states, one GPU per process, sweeps spread over GPUs,
and the resumed run's settings choosing the process-group backend."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_engine import TinyNet, tiny_parts
from torch.overrides import TorchFunctionMode

import arch
import distributed
import engine
import main
import run_state
import sweep
import train
from conftest import FAST_RUN, loaders_for
from utils import UserError

SYNCS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
}


class CountSyncs(TorchFunctionMode):
    """Counts the tensor operations that make the host wait for a GPU (reading a value back)."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.where = 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.count += 1
            self.where.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_the_update_step_reads_the_device_only_every_few_updates(tiny_data):
    torch.manual_seed(0)
    loaders = loaders_for(tiny_data, batch_size=2, seed=3, aug_backend="torch")  # 64 images: 32 updates
    loaders.set_epoch(0, 1.0)  # full strength: the batch augmentation runs too
    parts = tiny_parts(TinyNet(), loaders)
    spec = train.StepSpec(num_classes=4, sync_every=8)
    with CountSyncs() as counter:
        out = train.train_one_epoch(parts, spec, step=0, start_batch=0, end_batch=32, should_stop=lambda step: False)
    assert out["steps"] == 32
    # 4 reads at the sync points, one at the end, plus the sampler's order once per epoch (the old loop
    # read the loss, its finiteness and two accuracy counts on every update: >= 128 here)
    assert counter.count <= 32 // 8 + 6, counter.where


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_accumulation_all_reduces_once_per_update(tiny_data, one_process_group):
    torch.manual_seed(0)
    model = TinyNet()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    reductions = []

    def count(state, bucket):
        reductions.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, count)
    loaders = loaders_for(tiny_data, batch_size=4, seed=3)
    loaders.set_epoch(0, 0.0)
    parts = tiny_parts(model, loaders)
    parts.net = ddp
    out = train.train_one_epoch(
        parts, train.StepSpec(num_classes=4, accum_steps=4), step=0, start_batch=0, end_batch=16
    )
    assert out["steps"] == 4 and len(reductions) == 4  # one all-reduce per update, not per micro-batch


def test_under_torchrun_the_stop_flag_is_agreed_every_sync_every_updates(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "any_flag", lambda flag, device: calls.append(flag) or flag)

    class Parts:
        ctx = distributed.Context(rank=0, world=2)
        device = torch.device("cpu")

    stop = type("Stop", (), {"signum": 0})()
    deadline = type("Deadline", (), {"passed": lambda self: False})()
    should_stop = engine._stopper(Parts(), train.StepSpec(num_classes=2, sync_every=25), stop, deadline)
    results = [should_stop(step) for step in range(1, 101)]
    assert len(calls) == 4 and not any(results)  # updates 25, 50, 75, 100
    stop.signum = 2
    assert not should_stop(101) and should_stop(125)  # every process stops at the same update


def test_sync_bn_keeps_timm_activations_which_torch_conversion_drops():
    import copy

    torch.manual_seed(0)
    model = arch.build_model("efficientnet_b0", 10, img_size=64).eval()  # BatchNormAct2d throughout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # in eval mode SyncBatchNorm needs no process group: outputs can be compared
        expected = model(x)
        ours = engine.to_sync_batchnorm(copy.deepcopy(model)).eval()
        theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in ours.modules())
        assert torch.allclose(ours(x), expected, atol=1e-5)
        assert not torch.allclose(theirs(x), expected, atol=1e-2)  # its SyncBatchNorm never calls the activation


def _broadcast_worker(rank: int, store: str, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    bn = torch.nn.BatchNorm2d(3)
    bn.running_mean.fill_(float(rank + 1))
    distributed.broadcast_buffers(bn)
    out[rank] = bn.running_mean.tolist()
    dist.destroy_process_group()


def test_batchnorm_statistics_come_from_rank_0_before_evaluation(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_broadcast_worker, args=(str(tmp_path / "store"), out), nprocs=2)
    assert out[0] == out[1] == [1.0, 1.0, 1.0]


def test_checkpoints_keep_only_this_process_cuda_rng_and_resume_on_fewer_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    assert run_state.rng_state()["cuda"].tolist() == [7]  # one state, not one per visible GPU
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s.tolist()))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = run_state.rng_state()
    state["cuda"] = [torch.tensor([k], dtype=torch.uint8) for k in range(4)]  # an older checkpoint of a 4-GPU run
    run_state.set_rng_state(state)
    assert restored == [[0]]


def test_each_process_finds_its_gpu_whether_it_sees_one_or_all(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert distributed.cuda_index(3) == 0  # SLURM --gpus-per-task=1: LOCAL_RANK 3 sees one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert distributed.cuda_index(3) == 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="LOCAL_RANK is 3 but this process sees 2 GPUs"):
        distributed.cuda_index(3)


def test_sweeps_spread_parallel_runs_over_the_gpus(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert sweep.gpu_slots(4) == ["0", "1", "0", "1"]
    assert sweep.gpu_slots(3, "2,5") == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert sweep.gpu_slots(2) == ["3", "3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert sweep.gpu_slots(2) == []


def test_the_resumed_runs_device_chooses_the_process_group(tiny_data, tmp_path, monkeypatch):
    run = main.main(
        [
            *FAST_RUN,
            "--data_dir",
            str(tiny_data),
            "--output_dir",
            str(tmp_path),
            *"--epochs 1 --steps_per_epoch 1 --wandb disabled --device cpu".split(),
        ]
    )
    seen = []
    real = distributed.init
    monkeypatch.setattr(distributed, "init", lambda device: seen.append(device) or real(device))
    main.main(["--resume", str(run)])  # no --device: the run's own, cpu (gloo), not the default auto
    assert seen == ["cpu"]


def test_non_main_ranks_draw_no_progress_bars(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("TQDM_DISABLE", "0")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # no real group needed for this
    ctx = distributed.init("cpu")
    assert (ctx.rank, ctx.world, ctx.is_main) == (1, 2, False) and os.environ["TQDM_DISABLE"] == "1"
