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
from timm.layers import convert_sync_batchnorm

import arch
import main
import transforms
from conftest import (
    FAST_RUN,
    HostTraffic,
    TinyNet,
    device_tensors,
    loaders_for,
    parts_on_meta,
    tiny_parts,
    train_epoch,
)
from tin import checkpoint
from tin.config.cli import parse_config
from tin.engine.state import TrainState
from tin.plan import budget, stop
from tin.run.build import build_parts, build_scheduler
from tin.runtime import distributed
from tin.sweep import experiments
from utils import UserError


@pytest.mark.parametrize(
    "resident, taught",
    [(True, None), (False, "0"), (True, "2")],
    ids=[
        "data on the device",
        "data from the loader, a teacher at another resolution",
        "data on the device, cached soft labels",
    ],
)
def test_the_training_step_copies_without_blocking_and_reads_only_every_few_updates(
    tiny_data, tmp_path, resident, taught, trained_run
):
    """The real step (batch to device, RandAugment and the rest of BatchAugment at full strength,
    CutMix/MixUp, forward, backward, AdamW, schedule, EMA, meters; a teacher's forward pass on the
    batch resized to its 32 px, or its cached soft labels), its host traffic recorded as a GPU would
    see it: at most one non-blocking copy of each batch's augmentation parameters (one per chunk of
    batches; one per batch with cached soft labels' views), of the batch itself from the loader and
    of its cached soft labels, one of the epoch's order, and host reads only at the sync points."""
    args = [*FAST_RUN, "--data_dir", str(tiny_data), "--cache_dir", str(tmp_path / "cache"), "--device", "cpu"]
    args += ["--data_on_device", "on" if resident else "off", "--randaugment", "--ema", "--wandb", "disabled"]
    args += ["--teacher", str(trained_run), "--kd_views", taught] if taught else []
    cfg, parts, *_ = build_parts(parse_config(args), distributed.Context())
    parts = parts_on_meta(parts)
    parts.sync_every = 4
    scheduler = build_scheduler(cfg, parts.optimizer, budget.epochs_plan(1, 8, 1))
    seen = []  # the sizes the teacher was called at
    for teacher in parts.teacher.models if taught else []:
        teacher.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[-1]))
    with HostTraffic(known=device_tensors(parts)) as traffic:  # full strength: every augmentation op and the mixer
        _, state = train_epoch(parts, 8, scheduler, strength=1.0, size=24 if taught else None)
    assert state.step == 8 and seen == ([32] * 8 if taught == "0" else [])  # cached: no forward pass
    blocking = [c for c in traffic.copies if not c[1]]
    assert not blocking, blocking  # each would make the host wait for the GPU
    per_batch = (1 if resident else 3) + (taught == "2")  # augmentation parameters (+ images and labels, soft labels)
    assert len(traffic.copies) <= 8 * per_batch + 1, traffic.copies  # + the epoch's order, once
    assert len(traffic.reads) <= 8 // 4 + 3, traffic.reads  # sync points and the epoch's end


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
    parts = tiny_parts(model, loaders_for(tiny_data, batch_size=4, seed=3), accum_steps=4)
    parts.net = ddp
    _, state = train_epoch(parts, 16)
    assert state.step == 4 and len(reductions) == 4  # one all-reduce per update, not per micro-batch


def test_under_torchrun_the_stop_is_agreed_every_sync_every_updates_with_its_reason(monkeypatch):
    asked, others = [], {"signal": 0.0, "deadline": 0.0}  # what the other process reports

    def agree(values, device):
        asked.append(list(values))
        mine = [float(v) for v in values]
        theirs = [others["signal"], others["deadline"]][: len(mine)]
        return [max(a, b) for a, b in zip(mine, theirs, strict=True)]

    monkeypatch.setattr(distributed, "agree", agree)
    cfg = parse_config(["--time_budget", "0"])
    ctx = distributed.Context(rank=0, world=2)
    clock = stop.Timekeeper(budget.Plan(100, 10, 10), cfg, TrainState(), 0.0, ctx, "cpu", 25)
    try:
        results = [clock.should_stop(step) for step in range(1, 101)]
        assert len(asked) == 4 and not any(results)  # updates 25, 50, 75, 100: the only collectives
        others["signal"] = 2.0  # Ctrl-C reached the other process only
        assert not clock.should_stop(101) and clock.should_stop(125)  # both stop at the same update...
        assert clock.signal == 2 and not clock.deadline_hit  # ...for the same reason: save and exit 130
        others.update(signal=0.0, deadline=1.0)  # the other process's deadline passed
        clock.signal = 0
        assert clock.should_stop(150) and clock.deadline_hit and clock.signal == 0  # evaluate, then finish
    finally:
        clock.close()


def test_sync_bn_keeps_timm_activations_which_torch_conversion_drops():
    import copy

    torch.manual_seed(0)
    model = arch.build_model("efficientnet_b0", 10, img_size=64).eval()  # BatchNormAct2d throughout
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # in eval mode SyncBatchNorm needs no process group: outputs can be compared
        expected = model(x)
        ours = convert_sync_batchnorm(copy.deepcopy(model)).eval()  # timm's, which tin.run.build uses
        theirs = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model)).eval()
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in ours.modules())
        assert torch.allclose(ours(x), expected, atol=1e-5)
        assert not torch.allclose(theirs(x), expected, atol=1e-2)  # its SyncBatchNorm never calls the activation


def _broadcast_worker(rank: int, store: str, out: dict) -> None:
    from types import SimpleNamespace

    from timm.utils import ModelEmaV3

    from tin.run import loop

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    model = torch.nn.BatchNorm2d(3)
    ema = ModelEmaV3(model, decay=0.9)
    model.running_mean.fill_(float(rank + 1))  # each process saw its own shard
    ema.module.running_mean.fill_(float(10 * (rank + 1)))
    loop.same_statistics(SimpleNamespace(model=model, ema=ema))
    out[rank] = (model.running_mean.tolist(), ema.module.running_mean.tolist())
    dist.destroy_process_group()


def test_batchnorm_statistics_of_the_model_and_the_ema_come_from_rank_0_before_evaluation(tmp_path):
    out = mp.Manager().dict()
    mp.spawn(_broadcast_worker, args=(str(tmp_path / "store"), out), nprocs=2)
    assert out[0] == out[1] == ([1.0, 1.0, 1.0], [10.0, 10.0, 10.0])  # as rank 0 saves them


def test_checkpoints_keep_only_this_process_cuda_rng_and_resume_on_fewer_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    assert checkpoint.rng_state()["cuda"].tolist() == [7]  # one state, not one per visible GPU
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s: restored.append(s.tolist()))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    state = checkpoint.rng_state()
    state["cuda"] = [torch.tensor([k], dtype=torch.uint8) for k in range(4)]  # an older checkpoint of a 4-GPU run
    checkpoint.set_rng_state(state)
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
    assert experiments.gpu_slots(4) == ["0", "1", "0", "1"]
    assert experiments.gpu_slots(3, "2,5") == ["2", "5", "2"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    assert experiments.gpu_slots(2) == ["3", "3"]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert experiments.gpu_slots(2) == []


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


def test_batch_augment_draws_and_copies_once_per_chunk_of_batches_not_per_batch(monkeypatch):
    """The host's setup per op is paid once per chunk of batches, not per batch: over two chunks,
    each active op builds one generator per chunk (one per batch, before), and the parameters reach
    the device in one non-blocking copy per chunk; the device is never read."""
    made = []

    class CountedGenerator(torch.Generator):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(1)

    monkeypatch.setattr(torch, "Generator", CountedGenerator)
    aug = transforms.BatchAugment(seed=0, recipe=transforms.build_recipe(randaugment=True))
    aug.set_epoch(1, 1.0, 32)
    active = [k for k, p in transforms.at_strength(aug.recipe, 1.0).items() if transforms.OPS[k].active(p)]
    x = torch.empty(16, 3, 32, 32, dtype=torch.uint8, device="meta")
    batches = 2 * transforms.CHUNK_BATCHES
    with HostTraffic(known=[x]) as traffic:
        for b in range(batches):
            assert aug(x, b).shape == (16, 3, 32, 32)
    assert len(active) == 7 and len(made) == 2 * len(active)  # per batch: 64 x 7
    assert [c[1] for c in traffic.copies] == [True, True] and not traffic.reads
