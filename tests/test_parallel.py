"""DDP, FSDP2 and tensor parallelism on CPU ranks (gloo).

Lightning's FSDPStrategy (FSDP1) refuses CPUs, so FSDP is tested as FSDP2 (`fully_shard`, the plan in
project/training/parallel.py) with torch.distributed directly. Multi-process Lightning runs go through the real CLI in
a subprocess: strategy=ddp launched inside pytest would re-run the whole pytest command in its children.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule

from project.training.nan_guard import NonFiniteLossError, NonFiniteLossGuard
from project.training.strategy import ShardedStrategy
from project.formats.checkpoint import load_checkpoint
from project.model import GPT, GPTConfig
from tests.conftest import REPO, free_port, run_cli

pytestmark = pytest.mark.distributed

TINY = dict(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16)


def batch(seed: int = 0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, TINY["vocab_size"], (size, TINY["block_size"] + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def recipes() -> dict[str, GPTConfig]:
    """GPT-2's recipe, and Llama's (RoPE, SwiGLU, grouped-query: 4 query heads share 2 key/value heads) tied and
    untied; a vocabulary of 41 and a context of 15, which 2 ranks cannot split evenly."""
    llama = dict(n_head=4, n_kv_head=2, positions="rope", norm="rmsnorm", bias=False, mlp="swiglu")
    uneven = dict(vocab_size=41, block_size=15)
    return {"gpt2": GPTConfig(**TINY), "gpt2-uneven": GPTConfig(**{**TINY, **uneven}),
            "llama": GPTConfig(**{**TINY, **llama}),
            "llama-untied": GPTConfig(**{**TINY, **llama, **uneven}, tie_embeddings=False)}


def reference(config: GPTConfig) -> tuple[GPT, torch.Tensor, dict[str, torch.Tensor]]:
    """The one-device model for seed 0, its logits on the full batch and its gradients of the mean loss."""
    torch.manual_seed(0)
    model = GPT(config)
    x, y = batch()
    x, y = x[:, : config.block_size] % config.vocab_size, y[:, : config.block_size] % config.vocab_size
    logits = model(x)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
    return model, logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def save_like_lightning(model, path: Path, config: GPTConfig, rank: int) -> None:
    """What ModelParallelStrategy writes: a DCP folder of {"state_dict": {"model.<name>": ...}} + meta.pt."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = {"state_dict": {f"model.{k}": v for k, v in get_model_state_dict(model).items()}}
    dcp.save(state, checkpoint_id=path)
    if rank == 0:
        meta = {"hyper_parameters": {"config": config.to_dict()}, "global_step": 1,
                "tokenizer": {"kind": "char", "chars": "".join(chr(65 + i) for i in range(config.vocab_size))}}
        torch.save(meta, path / "meta.pt")


def full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def build_peak_growth_mib(mesh) -> dict[str, float]:
    """Peak RSS growth of this rank while GPTModule's path builds a sharded 200 MiB GPT (meta, shard, fill), against
    the full model's size and this rank's shards."""
    import gc
    import resource

    from project.training.parallel import materialize, parallelize

    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=16, n_head=8, n_embd=512))
    parallelize(model, mesh)
    materialize(model, "cpu")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    local = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
    whole = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    return {"growth": growth, "local": local, "full": whole}


def worker(rank: int, world: int, port: int, out: str) -> None:
    """Every plan on 2 ranks: sharded initialisation, DDP gradients, FSDP2 and whole-model tensor parallelism
    (weights, logits, gradients, one-reduction clipping, checkpoints)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.debug import CommDebugMode
    from torch.nn.parallel import DistributedDataParallel

    from project.training.parallel import materialize, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    out = Path(out)
    meshes = {name: init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "tensor_parallel"))
              for name, shape in (("fsdp", (2, 1)), ("tp", (1, 2)))}
    results = {"memory": build_peak_growth_mib(meshes["fsdp"])}  # first: the process's peak is still low
    errors = {}
    try:
        for recipe, config in recipes().items():
            ref_model, ref_logits, ref_grads = reference(config)
            ref_weights = dict(ref_model.named_parameters())
            x, y = batch()
            x, y = x[:, : config.block_size] % config.vocab_size, y[:, : config.block_size] % config.vocab_size
            half = slice(rank * 2, rank * 2 + 2)  # data parallel: each rank takes half of the global batch
            ref_norm = torch.nn.utils.get_total_norm(list(ref_grads.values()))

            # DDP: gradients averaged over two half-batches == gradients of the full batch
            torch.manual_seed(0)
            ddp = DistributedDataParallel(GPT(config))
            torch.nn.functional.cross_entropy(ddp(x[half]).flatten(0, 1), y[half].flatten()).backward()
            errors[f"ddp_grad_{recipe}"] = max((p.grad - ref_grads[n]).abs().max().item()
                                               for n, p in ddp.module.named_parameters())

            for plan, mesh in meshes.items():
                rows = half if plan == "fsdp" else slice(None)  # tensor parallel: every rank sees the whole batch
                torch.manual_seed(0)  # the same seed draw as the reference: GPTModule's path, meta then shards
                with torch.device("meta"):
                    model = GPT(config)
                parallelize(model, mesh)
                materialize(model, "cpu")
                results[f"{plan}_{recipe}_all_dtensors"] = all(isinstance(p, DTensor) for p in model.parameters())
                results[f"{plan}_{recipe}_tied"] = (model.lm_head.weight is model.wte.weight) == config.tie_embeddings
                results[f"{plan}_{recipe}_weights_equal"] = all(
                    torch.equal(full(p), ref_weights[n]) for n, p in model.named_parameters())
                logits = model(x[rows])
                torch.nn.functional.cross_entropy(logits.flatten(0, 1), y[rows].flatten()).backward()
                errors[f"{plan}_logits_{recipe}"] = (full(logits).detach() - ref_logits[rows]).abs().max().item()
                errors[f"{plan}_grad_{recipe}"] = max((full(p.grad) - ref_grads[n]).abs().max().item()
                                                      for n, p in model.named_parameters())
                # clipping at half the reference norm: torch's clip_grad_norm_ on the DTensor gradients takes the
                # global norm in one all-reduce, so every rank scales by the same factor as one device would
                with CommDebugMode() as comm:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), ref_norm.item() / 2)
                results[f"{plan}_{recipe}_clip_collectives"] = comm.get_total_counts()
                errors[f"{plan}_gradnorm_{recipe}"] = abs(full(norm).item() - ref_norm.item())
                errors[f"{plan}_clipped_{recipe}"] = max((full(p.grad) - ref_grads[n] / 2).abs().max().item()
                                                         for n, p in model.named_parameters())
                if recipe in ("gpt2", "llama-untied"):
                    save_like_lightning(model, out / f"{plan}_{recipe}", config, rank)
                # AdamW's fused kernel takes the all-DTensor parameters (fused on CPU as on GPUs)
                before = {n: full(p).detach().clone() for n, p in model.named_parameters()}
                torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True).step()
                results[f"{plan}_{recipe}_fused_adamw_stepped"] = all(
                    not torch.equal(full(p), before[n]) for n, p in model.named_parameters())
        if rank == 0:
            torch.save({"errors": errors, "results": results}, out / "results.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_models_equal_one_device_from_their_first_weights(tmp_path, monkeypatch):
    """2 gloo ranks. Built on the meta device, FSDP2 (2 x 1) and whole-model tensor parallelism (1 x 2) fill each
    rank's shards with exactly the one-device weights; every parameter is a DTensor (embeddings, norms and head
    included) and a tied head stays tied; logits, gradients, the global gradient norm (one all-reduce) and the
    clipped gradients match one device, as do DDP's; a rank never holds the whole model while building; the
    sharded checkpoints load on one device with the same logits."""
    import torch.multiprocessing as mp

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # freed blocks go back to the OS: RSS follows live memory
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    saved = torch.load(tmp_path / "results.pt")
    for key, err in saved["errors"].items():
        assert err < 1e-5, f"{key}: max difference {err}"
    memory = saved["results"].pop("memory")
    # building the whole model first would take at least `full`; meta + shards stays near this rank's half
    assert memory["local"] <= memory["full"] / 2 + 1
    assert memory["growth"] < memory["local"] + 0.5 * (memory["full"] - memory["local"]), memory
    for key, value in saved["results"].items():
        if key.endswith("_clip_collectives"):
            assert value == 1, f"{key}: {value} collectives"
        else:
            assert value is True, key
    for plan in ("fsdp", "tp"):
        for recipe in ("gpt2", "llama-untied"):
            loaded = load_checkpoint(tmp_path / f"{plan}_{recipe}")
            ref_model, ref_logits, _ = reference(loaded.model.config)
            x = batch()[0][:, : ref_model.config.block_size] % ref_model.config.vocab_size
            with torch.no_grad():
                torch.testing.assert_close(loaded.model(x), ref_logits, atol=1e-5, rtol=0)


def test_a_sharded_checkpoint_is_checked_from_its_index_without_reading_a_shard(tmp_path):
    """What every rank checks before a sharded resume: names, shapes and dtypes from the folder's .metadata; with
    the shards gone that check passes (none is read), while reading the weights fails."""
    import torch.distributed.checkpoint as dcp

    from project.formats.checkpoint import read_checkpoint

    config = GPTConfig(**TINY)
    torch.manual_seed(0)
    state = {"state_dict": {f"model.{k}": v for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}}
    folder = tmp_path / "step-000000001"
    dcp.save(state, checkpoint_id=folder, no_dist=True)
    torch.save({"hyper_parameters": {"config": config.to_dict()}, "global_step": 1}, folder / "meta.pt")
    for shard in folder.glob("__*.distcp"):
        shard.unlink()
    checked = read_checkpoint(folder, weights=False)
    assert {k: (tuple(v.shape), v.is_meta) for k, v in checked["state_dict"].items()} == {
        k: (tuple(v.shape), True) for k, v in state["state_dict"].items()}
    with pytest.raises(ValueError, match="cannot be read"):
        read_checkpoint(folder)
    torch.save({"hyper_parameters": {"config": {**config.to_dict(), "n_embd": 32}}, "global_step": 1},
               folder / "meta.pt")
    with pytest.raises(ValueError, match="does not match its stored config"):
        read_checkpoint(folder, weights=False)  # a wrong shape is caught from the index too


def test_ddp_fit_two_cpu_processes_with_fewer_val_windows_than_ranks(tmp_path, shakespeare_path):
    """Real CLI, 2 gloo processes. The val split holds 1 window for 2 ranks: the sampler pads, nobody hangs."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(shakespeare_path.read_text(encoding="utf-8")[:600], encoding="utf-8")
    result = run_cli(
        "fit", "--config", str(REPO / "configs" / "debug.yaml"), "--config", str(REPO / "configs" / "strategy" / "ddp.yaml"),
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--data.path", str(corpus),
        "--data.split.val_fraction", "0.1",  # 60 characters: one window of 33
        "--data.data_dir", str(tmp_path / "data"), "--trainer.max_steps", "4", "--trainer.val_check_interval", "2",
        "--samples.max_new_tokens", "8", cwd=tmp_path, timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    assert loaded.global_step == 4 and "val/loss" in loaded.metrics


@pytest.mark.parametrize("data_parallel, tensor_parallel", [(1, 2), (2, 1)], ids=["tensor-parallel", "fsdp2"])
def test_model_parallel_fit_then_consolidate(tmp_path, data_dir, data_parallel, tensor_parallel):
    """ModelParallelStrategy through the CLI, as tensor parallel (tp=2) and as pure FSDP2 (dp=2): a DCP folder
    -> consolidate -> a single-device checkpoint with identical logits."""
    common = ["--config", str(REPO / "configs" / "debug.yaml"), "--data.data_dir", str(data_dir)]
    sharded = [*common, "--config", str(REPO / "configs" / "strategy" / "tp.yaml"), "--trainer.accelerator", "cpu",
               "--trainer.devices", "2", "--trainer.strategy.data_parallel_size", str(data_parallel),
               "--trainer.strategy.tensor_parallel_size", str(tensor_parallel), "--trainer.val_check_interval", "2",
               "--trainer.limit_val_batches", "2"]
    result = run_cli("fit", *sharded, "--trainer.max_steps", "4", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no text samples are logged: ShardedStrategy shards the weights" in result.stderr
    folder = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    assert folder.is_dir() and (folder / "meta.pt").is_file()

    single = tmp_path / "single.ckpt"
    result = run_cli("consolidate", "--ckpt_path", str(folder), "--out", str(single), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    x = torch.randint(0, 60, (2, 8))
    a, b = load_checkpoint(folder), load_checkpoint(single)
    assert a.global_step == b.global_step == 4
    with torch.no_grad():
        torch.testing.assert_close(a.model(x), b.model(x), atol=0, rtol=0)

    # the consolidated file is a Lightning checkpoint too (`predict --ckpt_path single.ckpt` on one device)
    from project.training.module import GPTModule

    module = GPTModule.load_from_checkpoint(single, map_location="cpu", weights_only=True)
    assert module.tokenizer is not None
    with torch.no_grad():
        torch.testing.assert_close(module.model(x), b.model(x), atol=0, rtol=0)

    # ... and it carries the optimizer state, so training resumes on one device from step 4
    state = torch.load(single, map_location="cpu", weights_only=True)["optimizer_states"][0]
    params = dict(module.named_parameters())
    names = [name for name in params if name != "model.lm_head.weight"]  # tied to wte: one parameter
    assert sorted(state["state"]) == list(range(len(names)))
    assert all(int(s["step"]) == 4 for s in state["state"].values())
    shapes = sorted(tuple(s["exp_avg"].shape) for s in state["state"].values())
    assert shapes == sorted(tuple(params[n].shape) for n in names)
    # resuming from the folder itself reads it through project.formats.dcp (ShardedStrategy.load_checkpoint)
    result = run_cli("fit", *sharded, "--ckpt_path", str(folder), "--trainer.max_steps", "6", cwd=tmp_path, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = load_checkpoint(tmp_path / "runs" / "gpt" / "version_1" / "checkpoints" / "last.ckpt")
    assert resumed.global_step == 6


def test_tensor_parallel_ranks_read_the_same_training_batches(data_dir):
    """Training streams are keyed by the data-parallel rank: a tensor-parallel group shares one stream."""
    from types import SimpleNamespace

    from project.data.datamodule import TextDataModule

    def first_batch(global_rank: int, sampler_kwargs: dict | None) -> torch.Tensor:
        dm = TextDataModule(data_dir=str(data_dir), tokenizer="char", block_size=8, batch_size=2)
        strategy = SimpleNamespace(distributed_sampler_kwargs=sampler_kwargs) if sampler_kwargs else SimpleNamespace()
        dm.trainer = SimpleNamespace(global_rank=global_rank, strategy=strategy, state=SimpleNamespace(fn="fit"),
                                     global_step=0, accumulate_grad_batches=1)
        return next(iter(dm.train_dataloader()))[0]

    tp_group = {"num_replicas": 1, "rank": 0}  # ModelParallelStrategy, dp=1 x tp=2: both ranks are dp rank 0
    assert torch.equal(first_batch(0, tp_group), first_batch(1, tp_group))
    ddp = [{"num_replicas": 2, "rank": r} for r in (0, 1)]  # DDP: dp rank == global rank, distinct streams
    assert not torch.equal(first_batch(0, ddp[0]), first_batch(1, ddp[1]))
    assert torch.equal(first_batch(0, None), first_batch(0, ddp[0]))  # single device: rank 0



class NonFiniteOnOneRank(LightningModule):
    """A linear model whose loss is NaN on rank 1 only, at `nan_steps`."""

    def __init__(self, nan_steps: tuple[int, ...]) -> None:
        super().__init__()
        self.nan_steps = nan_steps
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.global_rank == 1 and self.global_step in self.nan_steps:
            loss = loss * float("nan")
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class RecordingGuard(NonFiniteLossGuard):
    """NonFiniteLossGuard that, when it raises on a rank, first saves the error and that rank's weights to
    <out>/rank<r>.pt (Lightning runs no on_exception hook inside spawned ranks)."""

    def __init__(self, out: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.out = out

    def on_interval(self, trainer, pl_module, values, seconds):
        try:
            return super().on_interval(trainer, pl_module, values, seconds)
        except NonFiniteLossError as error:
            weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
            torch.save({"error": str(error), "weights": weights}, Path(self.out) / f"rank{trainer.global_rank}.pt")
            raise


@pytest.mark.slow  # spawns 2 ranks, each importing Lightning
def test_nan_guard_decides_on_every_rank_alike(tmp_path):
    """2 gloo ranks, a NaN loss on rank 1 alone at steps 1 and 3, "skip" with one skip allowed: step 1 is
    skipped on both ranks (the replicas stay equal), step 3 stops both (none is left waiting for the other)."""
    from datetime import timedelta

    from lightning.pytorch import Trainer
    from lightning.pytorch.strategies import DDPStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from project.training.step_stats import StepStats

    module = NonFiniteOnOneRank(nan_steps=(1, 3))
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))  # a rank left waiting times out
    trainer = Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False, log_every_n_steps=1,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[StepStats(), RecordingGuard(str(tmp_path), action="skip", max_skips=1)])
    with pytest.raises(Exception, match="non-finite training loss at step 3"):
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=2))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for rank in ranks:
        assert rank["error"].startswith("non-finite training loss at step 3")
        assert "1 steps were skipped" in rank["error"]
    for name, value in ranks[0]["weights"].items():
        assert torch.isfinite(value).all(), name
        torch.testing.assert_close(ranks[1]["weights"][name], value, atol=0, rtol=0)


def test_text_samples_are_skipped_with_a_reason_under_sharding_strategies():
    """Rank 0 generating alone through sharded weights would wait forever for the other ranks' all-gathers."""
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

    from project.training.monitoring import sample_skip_reason

    for sharded in (FSDPStrategy(), ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)):
        assert "rank 0 alone cannot run the model" in sample_skip_reason(sharded)
    assert sample_skip_reason(DDPStrategy()) is None  # every rank holds the whole model
    assert sample_skip_reason(SingleDeviceStrategy(torch.device("cpu"))) is None


def test_muon_under_model_parallel_is_refused_before_any_process_starts(tmp_path, capsys, monkeypatch):
    from project.training.optim import MUON_SHARDED_ERROR
    from tests.conftest import run_main

    monkeypatch.chdir(tmp_path)
    code, err = run_main(capsys, "fit", "--config", str(REPO / "configs" / "debug.yaml"), "--config",
                         str(REPO / "configs" / "strategy" / "tp.yaml"), "--model.optimizer.name", "muon",
                         "--trainer.accelerator", "cpu", "--trainer.devices", "2")
    assert code == 1
    assert err.strip().splitlines()[-1] == f"error: {MUON_SHARDED_ERROR}"
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # 2 processes
def test_ctrl_c_stops_both_ranks_at_one_step_with_a_usable_checkpoint(tmp_path, data_dir):
    """Ctrl-C during a 2-process fit, sent to rank 0 alone, which used to leave rank 1 training and rank 0 waiting
    in the save (a terminal's Ctrl-C reaches every process: each sets its flag, the easier case, also passing
    under DDP). Both ranks stop at the same step within one logging interval, save last.ckpt, exit with 130 and
    leave no process behind; the checkpoint loads."""
    import signal
    import subprocess
    import sys
    import time

    command = [sys.executable, "-m", "project", "fit", "--config", str(REPO / "configs" / "debug.yaml"),
               "--config", str(REPO / "configs" / "strategy" / "tp.yaml"), "--trainer.strategy.data_parallel_size",
               "2", "--trainer.strategy.tensor_parallel_size", "1", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
               "--data.data_dir", str(data_dir), "--trainer.max_steps", "100000", "--trainer.log_every_n_steps", "2",
               "--trainer.val_check_interval", "100000", "--last_checkpoint.every_n_train_steps", "2",
               "--samples.max_new_tokens", "0", "--trainer.enable_progress_bar", "false"]
    run = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    last = tmp_path / "runs" / "gpt" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 180
    while not last.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert last.exists(), run.communicate(timeout=60)[1][-3000:] if run.poll() is not None else "no checkpoint"
    time.sleep(1.0)  # a few more steps
    os.kill(run.pid, signal.SIGINT)  # rank 0 only
    try:
        _, stderr = run.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("Ctrl-C to rank 0: the run hung")
    assert run.returncode == 130, stderr[-3000:]
    deadline = time.monotonic() + 30  # rank 1 ends on its own, just after rank 0: no rank is left behind
    while time.monotonic() < deadline:
        try:
            os.killpg(run.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(run.pid, signal.SIGKILL)
        pytest.fail("Ctrl-C to rank 0: a process of the run was still alive 30 s after rank 0 exited")
    step = int(stderr.split("interrupted at step ")[1].split(":")[0])
    loaded = load_checkpoint(last)
    assert loaded.global_step == step and step % 2 == 0  # stopped at a logging interval, where both ranks were


# --- sharded checkpoints: step folders, a kill mid-save, resuming on another number of processes ---------------


class StallInSave(ShardedStrategy):
    """ShardedStrategy that stops forever in the save of step 4, after every rank's shards are written and before
    the commit (marking <version folder>/stalled), so a test can kill the run there."""

    def commit(self, checkpoint: dict, staging: Path, folder: Path) -> None:
        if checkpoint["global_step"] == 4:
            import time

            if self.is_global_zero:
                (staging.parent.parent / "stalled").touch()
            time.sleep(600)
        super().commit(checkpoint, staging, folder)


def sharded_fit(cwd: Path, data: Path, devices: int, *args: str, popen: bool = False):
    """`fit` of configs/debug.yaml under ShardedStrategy (pure FSDP2 on `devices` processes), a global batch of 8
    windows, the loss logged at every step."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "project", "fit", "--config", str(REPO / "configs" / "debug.yaml"), "--config",
               str(REPO / "configs" / "strategy" / "tp.yaml"), "--trainer.accelerator", "cpu", "--trainer.devices",
               str(devices), "--trainer.strategy.data_parallel_size", str(devices),
               "--trainer.strategy.tensor_parallel_size", "1", "--data.batch_size", str(8 // devices),
               "--data.data_dir", str(data), "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "1000",
               "--samples.max_new_tokens", "0", "--trainer.enable_progress_bar", "false", *args]
    if popen:
        return subprocess.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def losses_by_step(run_dir: Path) -> dict[int, float]:
    """train/loss by step from the newest event file of a run folder (a resumed run writes a new one)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    newest = max(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    events = EventAccumulator(str(newest), size_guidance={"scalars": 0})
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, shakespeare_path) -> dict:
    """The reference: 6 steps on one process (batch 8), never interrupted; its data folder, shared."""
    import shutil

    root = tmp_path_factory.mktemp("uninterrupted")
    data = root / "data"
    (data / "tinyshakespeare").mkdir(parents=True)
    shutil.copy(shakespeare_path, data / "tinyshakespeare" / "input.txt")
    done = sharded_fit(root, data, 1, "--trainer.max_steps", "6")
    assert done.returncode == 0, done.stderr[-3000:]
    return {"data": data, "losses": losses_by_step(root / "runs" / "gpt" / "version_0")}


@pytest.mark.slow  # 2 processes, killed, then one
def test_a_kill_mid_save_leaves_last_complete_and_the_run_resumes_on_one_process(tmp_path, uninterrupted):
    """2 processes save sharded checkpoints every 2 steps into step folders; killed inside the save of step 4
    (every shard written, nothing committed), the run leaves step-2 complete, `last` still names it, and the
    half-written save is a hidden temporary. `fit --ckpt_path last` on one process (2 -> 1) resumes from step 2,
    removes the leftover and trains on with the uninterrupted run's losses."""
    import signal
    import time

    run = sharded_fit(tmp_path, uninterrupted["data"], 2, "--trainer.max_steps", "100",
                      "--last_checkpoint.every_n_train_steps", "2",
                      "--trainer.strategy.class_path", "tests.test_parallel.StallInSave", popen=True)
    version = tmp_path / "runs" / "gpt" / "version_0"
    deadline = time.monotonic() + 180
    while not (version / "stalled").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert (version / "stalled").exists(), run.stderr.read()[-3000:] if run.poll() is not None else "never stalled"
    os.killpg(run.pid, signal.SIGKILL)  # every rank, in the middle of the save
    run.wait(timeout=60)
    checkpoints = version / "checkpoints"
    staged = list(checkpoints.glob(".step-000000004.*.tmp"))
    assert len(staged) == 1 and list(staged[0].glob("__*_0.distcp")) and not (staged[0] / "meta.pt").exists()
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000000002"]
    assert os.readlink(checkpoints / "last.ckpt") == "step-000000002"

    resumed = sharded_fit(tmp_path, uninterrupted["data"], 1, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-000000002" in resumed.stderr  # `last`: the newest complete step folder
    assert not list(checkpoints.glob(".step-*.tmp"))  # the killed save's leftover, removed at the start
    assert os.readlink(checkpoints / "last.ckpt") == "step-000000006"
    losses, expected = losses_by_step(version), uninterrupted["losses"]
    assert sorted(losses) == [3, 4, 5, 6]
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), (step, losses, expected)


@pytest.mark.slow  # one process, then 2
def test_a_one_process_run_resumes_on_two_with_the_same_losses(tmp_path, uninterrupted):
    """1 -> 2: a sharded checkpoint written by one process is resharded on load for two (FSDP2); the global batch
    is kept (2 x 4 windows), so the losses continue as the uninterrupted run's. Old step folders are pruned to
    keep_checkpoints, except those a link names."""
    first = sharded_fit(tmp_path, uninterrupted["data"], 1, "--trainer.max_steps", "3")
    assert first.returncode == 0, first.stderr[-3000:]
    resumed = sharded_fit(tmp_path, uninterrupted["data"], 2, "--trainer.max_steps", "6", "--ckpt_path", "last",
                          "--last_checkpoint.every_n_train_steps", "1", "--trainer.strategy.keep_checkpoints", "2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    version = tmp_path / "runs" / "gpt" / "version_0"
    losses, expected = losses_by_step(version), uninterrupted["losses"]
    assert sorted(losses) == [4, 5, 6]
    for step, loss in losses.items():
        assert loss == pytest.approx(expected[step], abs=1e-5), (step, losses, expected)
    checkpoints = version / "checkpoints"
    linked = {os.readlink(p) for p in checkpoints.iterdir() if p.is_symlink()}
    kept = sorted(p.name for p in checkpoints.glob("step-*"))
    assert kept[-2:] == ["step-000000005", "step-000000006"] and set(kept[:-2]) <= linked | {"step-000000003"}
