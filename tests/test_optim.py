"""Optimizer choice (AdamW or Muon + AdamW) and the throughput/MFU monitor."""

import copy
import math
from datetime import timedelta

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import Timer
from torch.utils.data import DataLoader, TensorDataset

from conftest import scalars
from project.formats.checkpoint import read_checkpoint
from project.model import GPTConfig
from project.training.monitoring import measure_matmul_flops
from project.training.module import GPTModule
from project.training.optim import (MUON_SHARDED_ERROR, CombinedOptimizer, OptimizerSettings, build_optimizer,
                                    param_groups, warmup_cosine)

LLAMA = dict(positions="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=1, tie_embeddings=False)


def settings(name: str) -> OptimizerSettings:
    return OptimizerSettings(name=name, learning_rate=3e-3, warmup_steps=2, muon_lr=0.02)


def tiny_module(optimizer: str, **config) -> GPTModule:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, **config)
    module = GPTModule(cfg, optimizer=settings(optimizer))
    module.configure_model()
    return module


def batches(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (n, 1), generator=g)
    seq = (start + torch.arange(17)) % 32  # counting mod 32: learnable in a few steps
    return TensorDataset(seq[:, :-1], seq[:, 1:])


@pytest.mark.parametrize("config", [{}, LLAMA], ids=["gpt2", "llama"])
def test_muon_takes_block_matrices_and_adamw_the_rest(config):
    module = tiny_module("muon", **config)
    groups = param_groups(module.model, muon=True)
    names = {id(p): n for n, p in module.model.named_parameters()}
    muon = {names[id(p)] for p in groups["muon"]}
    expected = {n for n, p in module.model.named_parameters() if n.startswith("blocks.") and p.dim() == 2}
    assert muon == expected and all(p.dim() == 2 for p in groups["muon"])
    assert any(n.endswith("attn.q_proj.weight") for n in muon) and any(n.endswith("mlp.proj.weight") for n in muon)
    adamw = {names[id(p)] for g in ("decay", "no_decay") for p in groups[g]}
    assert "wte.weight" in adamw and not any(n.startswith("blocks.") and n in muon for n in adamw)
    if not config.get("tie_embeddings", True):
        assert "lm_head.weight" in adamw
    everything = [id(p) for g in groups.values() for p in g]
    assert len(everything) == len(set(everything)) == len(list(module.model.parameters()))  # none missing or twice
    optimizer, _ = build_optimizer(module.model, settings("muon"), total_steps=20)
    assert isinstance(optimizer, CombinedOptimizer)
    assert [g["name"] for g in optimizer.param_groups] == ["muon", "decay", "no_decay"]
    assert isinstance(optimizer.optimizers[0], torch.optim.Muon)


def test_muon_refuses_sharded_weights_with_the_fix():
    with pytest.raises(ValueError) as refused:
        build_optimizer(tiny_module("muon").model, settings("muon"), total_steps=20, sharded=True)
    assert str(refused.value) == MUON_SHARDED_ERROR and "\n" not in MUON_SHARDED_ERROR
    assert "cannot be saved as a sharded checkpoint" in MUON_SHARDED_ERROR  # the true reason, not "whole matrices"
    assert "--model.optimizer.name adamw" in MUON_SHARDED_ERROR and "configs/strategy/ddp.yaml" in MUON_SHARDED_ERROR


def test_adamw_is_the_default_and_has_no_muon_group():
    module = tiny_module("adamw")
    assert "muon" not in param_groups(module.model)
    assert isinstance(build_optimizer(module.model, OptimizerSettings(), total_steps=20)[0], torch.optim.AdamW)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
@pytest.mark.parametrize("config", [{}, LLAMA], ids=["gpt2", "llama"])
def test_a_few_steps_lower_the_loss(optimizer, config):
    module = tiny_module(optimizer, **config)
    opt, scheduler = build_optimizer(module.model, settings(optimizer), total_steps=20)
    x, y = batches(16).tensors
    losses = []
    for _ in range(15):
        loss = module.loss(module(x), y)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        scheduler.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


class Record(Callback):
    def __init__(self):
        self.lrs, self.restored = [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_train_start(self, trainer, pl_module):
        self.restored = copy.deepcopy(trainer.optimizers[0].state_dict())  # the live tensors change in place


def fit(module, tmp_path, max_steps, ckpt_path=None, callbacks=(), **trainer_kwargs):
    record = Record()
    trainer = Trainer(max_steps=max_steps, gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record, *callbacks],
                      default_root_dir=tmp_path, **trainer_kwargs)
    trainer.fit(module, DataLoader(batches(), batch_size=8), ckpt_path=ckpt_path)
    return trainer, record


def test_schedule_scales_both_optimizers_and_checkpoints_restore_both_states(tmp_path):
    module = tiny_module("muon", **LLAMA)
    trainer, record = fit(module, tmp_path, max_steps=6)
    lrs = torch.tensor(record.lrs)  # (steps, groups): muon, decay, no_decay
    peaks = torch.tensor([0.02, 3e-3, 3e-3])
    ratios = lrs / peaks
    assert torch.allclose(ratios, ratios[:, :1].expand_as(ratios))  # one multiplier for every group
    assert ratios[0, 0] < ratios[2, 0] and ratios[2, 0] > ratios[-1, 0]  # warmup then decay
    ckpt = tmp_path / "muon.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = torch.load(ckpt, weights_only=True)["optimizer_states"][0]["optimizers"]
    assert len(saved) == 2
    muon_state, adamw_state = (next(iter(s["state"].values())) for s in saved)
    assert "momentum_buffer" in muon_state and "exp_avg" in adamw_state
    read_checkpoint(ckpt)  # the project's checked reader (every command's) accepts the pair's state as written

    resumed = tiny_module("muon", **LLAMA)
    _, record = fit(resumed, tmp_path, max_steps=8, ckpt_path=ckpt)
    for before, after in zip(saved, record.restored["optimizers"], strict=True):
        assert before["state"].keys() == after["state"].keys()
        for key, state in before["state"].items():
            for name, value in state.items():
                torch.testing.assert_close(after["state"][key][name], value)
        assert [g["lr"] for g in before["param_groups"]] == [g["lr"] for g in after["param_groups"]]
    assert record.lrs[0] != [0.02, 3e-3, 3e-3] and math.isclose(record.lrs[0][0] / 0.02, record.lrs[0][1] / 3e-3)


def test_schedule_follows_whichever_runs_out_first_steps_or_time():
    """With a time budget, progress is the larger of the step count and the budget's used share x total steps."""
    shares = [0.0, 0.05, 0.5, 0.9, 1.0, 1.0]  # of the budget, when the schedule is built and after each step
    used = [shares[0]]
    opt, scheduler = build_optimizer(tiny_module("adamw").model, OptimizerSettings(warmup_steps=10, min_lr_ratio=0.1),
                                     total_steps=100, time_fraction=lambda: used[0])
    lrs = [opt.param_groups[0]["lr"]]
    for share in shares[1:]:
        opt.step()
        used[0] = share
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    expected = [warmup_cosine(max(step, share * 100), 10, 100, 0.1) * 1e-3 for step, share in enumerate(shares)]
    assert lrs == pytest.approx(expected)
    assert lrs[1] == pytest.approx(6 / 11 * 1e-3)  # step 1, but 5% of the time: warmup as at step 5 of 100...
    assert lrs[4] == pytest.approx(1e-4)  # ...and the budget's end is the floor, at step 4 of 100


class SlowClock(Timer):
    """Lightning's Timer on a clock where every optimizer step takes `seconds_per_step`: a slow machine."""

    def __init__(self, budget_s: float, seconds_per_step: float) -> None:
        super().__init__(duration=timedelta(seconds=budget_s))
        self.seconds_per_step, self.trainer = seconds_per_step, None

    def on_train_start(self, trainer, pl_module):
        super().on_train_start(trainer, pl_module)
        self.trainer = trainer

    def time_elapsed(self, stage="train"):
        return 0.0 if self.trainer is None else self.trainer.global_step * self.seconds_per_step


def test_a_run_stopped_by_its_time_budget_ends_at_the_floor_learning_rate(tmp_path):
    """max_steps 1,000 at 10 s a step in a 200 s budget: the Timer stops at step 20, and the schedule has warmed
    up and decayed over those 20 steps, as it would over 1,000 on a fast machine."""
    module = tiny_module("muon")  # peaks: muon 0.02, adamw 3e-3; warmup 2 of 1,000 steps
    trainer, record = fit(module, tmp_path, max_steps=1000, callbacks=[SlowClock(200, 10.0)])
    assert trainer.global_step == 20
    lrs = torch.tensor(record.lrs)[:, 0] / 0.02  # the multiplier before each step
    last = trainer.optimizers[0].param_groups[0]["lr"] / 0.02  # after the last step
    expected = [warmup_cosine(max(step, step / 20 * 1000), 2, 1000, 0.1) for step in range(20)]
    assert lrs.tolist() == pytest.approx(expected)
    assert last == pytest.approx(0.1)  # the floor (min_lr_ratio), where a step-bound schedule is still at its peak
    assert warmup_cosine(20, 2, 1000, 0.1) > 0.99


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_fp16_loss_scaling_trains_with_clipping(optimizer, tmp_path):
    """16-mixed on a GPU means a GradScaler: Lightning refuses to clip the gradients of a fused AdamW then, since
    it unscales inside its step. CPUs turn "16-mixed" into bf16, so the fp16 plugin and its scaler are explicit."""
    from lightning.pytorch.plugins import MixedPrecision

    module = tiny_module(optimizer)
    plugin = MixedPrecision("16-mixed", device="cpu", scaler=torch.amp.GradScaler("cpu"))
    trainer, _ = fit(module, tmp_path, max_steps=3, accelerator="cpu", plugins=[plugin])
    assert trainer.global_step == 3
    adamw = [opt for opt in getattr(trainer.optimizers[0], "optimizers", trainer.optimizers)
             if isinstance(opt, torch.optim.AdamW)]
    assert len(adamw) == 1 and not adamw[0].defaults["fused"]
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_matmul_peak_is_the_median_of_timed_repeats(monkeypatch):
    import time

    clock = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])  # three matmuls timed at 1 s, 3 s and 2 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    assert measure_matmul_flops(torch.float32, size=64, repeats=3) == 2 * 64**3 / 2.0


def test_fit_logs_tokens_per_second_and_mfu(trained_run):
    logged = scalars(trained_run["run_dir"])
    assert "train/tokens_per_sec" in logged
    assert "train/mfu" in logged, sorted(logged)
    assert all(0 < v < 1.5 for v in logged["train/mfu"])
