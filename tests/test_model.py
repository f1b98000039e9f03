"""The GPT in plain torch: shapes, causality, parameter counts, initialisation, every architecture switch."""

import itertools

import pytest
import torch

from conftest import tiny_gpt
from project.model import GPT, GPTConfig, apply_rope, rope_cache

TINY = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
ARCHITECTURES = [
    dict(positions=p, norm=n, mlp=m, n_kv_head=kv, bias=b, tie_embeddings=t)
    for p, n, m, kv, b, t in itertools.product(
        ["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"], [None, 2, 1], [True, False], [True, False]
    )
]


def tiny(**overrides) -> GPT:
    return tiny_gpt(**{**TINY, **overrides})


def test_logits_shape():
    model = tiny()
    idx = torch.randint(0, 97, (3, 17))
    assert model(idx).shape == (3, 17, 97)


def test_gpt2_small_has_exactly_124_439_808_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.wte.weight


@pytest.mark.parametrize("arch", ARCHITECTURES, ids=lambda a: "-".join(str(v) for v in a.values()))
def test_every_architecture_is_causal_and_trains(arch):
    model = tiny(**arch)
    idx = torch.randint(0, 97, (2, 20))
    logits = model(idx)
    changed = idx.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    # tokens after position 11 must not influence logits at positions <= 11
    torch.testing.assert_close(model(changed)[:, :12], logits[:, :12])
    assert not torch.allclose(model(changed)[:, 12:], logits[:, 12:])
    model.train()
    model(idx).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def expected_params(c: GPTConfig) -> int:
    """Parameter count from the architecture, written independently of the module tree."""
    C, L, V, D = c.n_embd, c.n_layer, c.vocab_size, c.head_dim
    b = 1 if c.bias else 0
    norm = C * (2 if c.norm == "layernorm" and c.bias else 1)
    attn = (C + b) * c.n_head * D + 2 * (C + b) * c.kv_heads * D + (C + b) * C  # q, k, v, out
    hidden = c.hidden_dim
    mats = 3 if c.mlp == "swiglu" else 2
    mlp = (mats - 1) * (C * hidden + b * hidden) + hidden * C + b * C
    total = V * C + L * (2 * norm + attn + mlp) + norm
    total += c.block_size * C if c.positions == "learned" else 0
    total += 0 if c.tie_embeddings else V * C
    return total


@pytest.mark.parametrize("arch", ARCHITECTURES[::5], ids=lambda a: "-".join(str(v) for v in a.values()))
def test_parameter_count_matches_formula(arch):
    model = tiny(**arch)
    assert model.num_params() == expected_params(model.config)


def test_swiglu_default_width_keeps_parameter_count_close_to_gelu():
    gelu, swiglu = tiny(n_embd=384, n_head=6), tiny(n_embd=384, n_head=6, mlp="swiglu")
    assert swiglu.config.hidden_dim % 64 == 0
    assert abs(swiglu.num_params() / gelu.num_params() - 1) < 0.03


def test_gpt2_initialisation_scales_residual_projections():
    model = GPT(GPTConfig(vocab_size=1000, block_size=64, n_layer=8, n_head=8, n_embd=256))
    assert model.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    expected = 0.02 / (2 * 8) ** 0.5
    assert model.blocks[0].attn.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(expected, rel=0.05)
    assert torch.all(model.blocks[0].attn.q_proj.bias == 0)


@pytest.mark.parametrize("overrides", [ARCHITECTURES[0], ARCHITECTURES[-1]], ids=["gpt2", "llama"])
@pytest.mark.parametrize("seq_len", [8, 32])
def test_flops_per_token_matches_counted_matmuls(overrides, seq_len):
    """torch's FlopCounterMode counts the multiply-adds of a forward + backward. Attention runs through the
    math kernel there, which the counter sees as plain matmuls (full T x T scores, as the estimate assumes)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny(**overrides).train()
    idx = torch.randint(0, TINY["vocab_size"], (2, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx).sum().backward()
    # the estimate counts 6 FLOPs for every parameter; norm weights and biases take part in no matmul
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert model.flops_per_token(seq_len) - 6 * vectors == counter.get_total_flops() / idx.numel()


def test_rope_score_depends_only_on_relative_distance():
    config = GPTConfig(**{**TINY, "positions": "rope"})
    cos, sin = rope_cache(config)
    q = torch.randn(1, 1, 1, config.head_dim)
    k = torch.randn(1, 1, 1, config.head_dim)

    def score(m, n):
        qm = apply_rope(q, cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k, cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(5 + 9, 2 + 9))
    torch.testing.assert_close(score(3, 3), score(20, 20))
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_gqa_with_all_kv_heads_equals_multi_head_attention():
    mha, gqa = tiny(), tiny(n_kv_head=4)
    gqa.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(gqa(idx), mha(idx))


def test_grouped_query_attention_equals_repeated_kv_heads():
    """GQA must behave as MHA whose k/v heads are copies shared by consecutive query heads."""
    gqa = tiny(n_kv_head=2)
    mha = tiny()
    state = gqa.state_dict()
    D = gqa.config.head_dim
    for key in list(state):
        if key.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
            w = state[key]
            heads = w.view(2, D, *w.shape[1:])
            state[key] = heads.repeat_interleave(2, dim=0).reshape(4 * D, *w.shape[1:])
    mha.load_state_dict(state)
    idx = torch.randint(0, 97, (2, 16))
    torch.testing.assert_close(mha(idx), gqa(idx))


def test_attention_maps_are_causal_distributions():
    maps = tiny(positions="rope", n_kv_head=2).attention_maps(torch.randint(0, 97, (1, 10)))
    assert maps.shape == (2, 1, 4, 10, 10)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 1, 4, 10))
    assert torch.all(maps.triu(diagonal=1) == 0)


@pytest.mark.parametrize("bad, message", [
    (dict(n_embd=30, n_head=4), "divisible by n_head"),
    (dict(n_kv_head=3), "n_kv_head"),
    (dict(dropout=1.5), "dropout"),
])
def test_invalid_config_is_refused_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**TINY, **bad})


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))
