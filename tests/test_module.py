"""The LightningModule's loss, metrics, optimizer groups and schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from project.model import GPTConfig
from project.module import GPTModule
from project.optim import build_optimizer, warmup_cosine


def tiny_module(**kwargs) -> GPTModule:
    torch.manual_seed(0)
    return GPTModule(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16), **kwargs)


def test_loss_is_next_token_cross_entropy():
    module = tiny_module()
    logits = torch.randn(2, 5, 50)
    targets = torch.randint(0, 50, (2, 5))
    log_probs = logits.log_softmax(-1)
    by_hand = -log_probs.gather(-1, targets[..., None]).mean()
    torch.testing.assert_close(module.loss(logits, targets), by_hand)


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_lr_ratio=0.1) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_weight_decay_only_on_matrices():
    model = tiny_module().model
    optimizer, _ = build_optimizer(model, total_steps=100, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == model.num_params()


def test_validation_metrics_are_loss_perplexity_and_bits_per_byte():
    module = tiny_module()
    module.val_bytes_per_token = 4.0
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    module.validation_step((x, y), 0)
    module.on_validation_epoch_end()
    expected = F.cross_entropy(module(x).flatten(0, 1), y.flatten()).item()
    assert logged["val/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged["val/ppl"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert logged["val/bpb"] == pytest.approx(expected / math.log(2) / 4.0, rel=1e-5)


def test_hyperparameters_are_plain_data():
    module = tiny_module()
    assert isinstance(module.hparams["config"], dict)
    assert GPTModule(**module.hparams).model.config == module.model.config
