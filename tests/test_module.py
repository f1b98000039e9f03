"""The LightningModule's loss, metrics, optimizer groups and schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from project.model import GPTConfig
from project.training.module import GPTModule
from project.training.optim import OptimizerSettings, build_optimizer, warmup_cosine


def tiny_module(**kwargs) -> GPTModule:
    torch.manual_seed(0)
    module = GPTModule(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16), **kwargs)
    module.configure_model()
    return module


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
    optimizer, _ = build_optimizer(model, OptimizerSettings(weight_decay=0.1), total_steps=100)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == model.num_params()


@pytest.mark.parametrize("split", ["val", "test"])
def test_evaluation_metrics_are_loss_perplexity_and_bits_per_byte(split):
    module = tiny_module()
    module.bytes_per_token = {split: 4.0}
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    x, y = torch.randint(0, 50, (3, 16)), torch.randint(0, 50, (3, 16))
    step, epoch_end = ((module.validation_step, module.on_validation_epoch_end) if split == "val"
                       else (module.test_step, module.on_test_epoch_end))
    step((x, y), 0)
    epoch_end()
    expected = F.cross_entropy(module(x).flatten(0, 1), y.flatten()).item()
    assert set(logged) == {f"{split}/loss", f"{split}/ppl", f"{split}/bpb"}
    assert logged[f"{split}/loss"] == pytest.approx(expected, rel=1e-5)
    assert logged[f"{split}/ppl"] == pytest.approx(math.exp(expected), rel=1e-4)
    assert logged[f"{split}/bpb"] == pytest.approx(expected / math.log(2) / 4.0, rel=1e-5)


def test_hyperparameters_are_plain_data_and_rebuild_the_module():
    module = tiny_module(optimizer=OptimizerSettings(name="muon", betas=(0.8, 0.9), warmup_steps=3))
    assert isinstance(module.hparams["config"], dict) and isinstance(module.hparams["optimizer"], dict)
    assert module.hparams["optimizer"]["betas"] == [0.8, 0.9]  # a list: weights-only checkpoints hold no tuples
    again = GPTModule(**module.hparams)
    assert again.model.config == module.model.config and again.optimizer_settings == module.optimizer_settings


@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", -1.0, "learning_rate must be a positive number"),
    ("learning_rate", float("nan"), "learning_rate must be a positive number"),
    ("min_lr_ratio", 1.5, "min_lr_ratio must be in"),
    ("warmup_steps", -1, "warmup_steps must be >= 0"),
    ("weight_decay", -0.1, "weight_decay must be >= 0"),
    ("betas", (0.9, 1.0), "betas must be two numbers in"),
    ("name", "sgd", "adamw or muon"),
])
def test_optimizer_settings_check_themselves_naming_the_flag(field, value, message):
    with pytest.raises(ValueError, match=f"--model.optimizer.{field}|{message}") as refused:
        OptimizerSettings(**{field: value})
    assert message in str(refused.value)


def test_validation_loss_in_chunks_and_perplexity_from_it_equal_the_full_computations():
    """The validation step never holds more than one float32 chunk of the logits: the chunked loss equals the loss
    on all of them, and val/ppl from the token-weighted mean loss equals torchmetrics' Perplexity on the logits."""
    from torchmetrics.text import Perplexity

    from project.training.module import PerplexityFromLoss, chunked_cross_entropy

    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(b, 9, 50, generator=generator).to(torch.bfloat16), torch.randint(0, 50, (b, 9)))
               for b in (3, 1)]  # batches of different sizes: the mean is weighted by tokens
    ours, reference = PerplexityFromLoss(), Perplexity()
    for logits, targets in batches:
        loss = chunked_cross_entropy(logits, targets, rows=4)  # 27 positions: 7 chunks, the last one short
        full = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
        ours.update(loss, weight=targets.numel())
        reference.update(logits.float(), targets)
    torch.testing.assert_close(ours.compute(), reference.compute(), rtol=1e-5, atol=0)
