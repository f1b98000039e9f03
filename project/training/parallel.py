"""How the GPT is split across devices under Lightning's ModelParallelStrategy: tensor parallel + FSDP2.

    trainer:
      strategy:
        class_path: lightning.pytorch.strategies.ModelParallelStrategy
        init_args: {data_parallel_size: 2, tensor_parallel_size: 2}   # 4 devices: a 2 x 2 mesh

The strategy builds a 2-D device mesh ("data_parallel", "tensor_parallel") and calls
`GPTModule.configure_model`, which calls `parallelize` below. The model file stays single-device: every
choice about sharding lives here.

1. Tensor parallelism (Megatron style) on the "tensor_parallel" dimension, inside every block:
   q/k/v and the MLP's fc/gate are split by output features (column-wise: each rank computes a slice of
   the heads / hidden units), attention's and the MLP's `proj` by input features (row-wise: partial sums,
   all-reduced). Two all-reduces per block forward; embeddings, norms and the LM head stay replicated.
   Needs n_head, n_kv_head and the MLP width divisible by the tensor-parallel size. With dropout > 0 the
   tensor-parallel ranks must draw the same masks: `seed_everything` seeds every rank alike.
2. FSDP2 (`fully_shard`) on the "data_parallel" dimension: each block is its own unit (all-gathered just
   before it runs, freed after), then the root (embeddings, final norm, tied LM head).

Activation checkpointing (`--model.activation_checkpointing`) is the model's own (`GPT.activation_checkpointing`).
Checkpoints are distributed (DCP) folders; `python -m project consolidate` or `load_checkpoint` turn them
into single-device weights (see project/formats/checkpoint.py).
"""

from __future__ import annotations

import torch

from project.model import GPT


def tensor_parallel_plan(model: GPT) -> dict:
    """Per-block plan: module path inside a Block -> its ParallelStyle."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {
        "attn.q_proj": ColwiseParallel(),
        "attn.k_proj": ColwiseParallel(),
        "attn.v_proj": ColwiseParallel(),
        "attn.proj": RowwiseParallel(),
        "mlp.fc": ColwiseParallel(),
        "mlp.proj": RowwiseParallel(),
    }
    if model.config.mlp == "swiglu":
        plan["mlp.gate"] = ColwiseParallel()
    return plan


def check_tensor_parallel_size(model: GPT, tp_size: int) -> None:
    cfg = model.config
    for name, value in (("n_head", cfg.n_head), ("n_kv_head", cfg.kv_heads), ("MLP width", cfg.hidden_dim)):
        if value % tp_size != 0:
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide the model's {name} ({value}): "
                "choose another --trainer.strategy.tensor_parallel_size or model size"
            )


def parallelize(model: GPT, device_mesh, compile: bool = False) -> GPT:
    """Shard `model` in place over `device_mesh` (dims "data_parallel" and "tensor_parallel"); idempotent."""
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if isinstance(model, FSDPModule) or is_sharded(model):
        return model  # configure_model can be called again (e.g. fit then test in one process)
    tp_mesh, dp_mesh = device_mesh["tensor_parallel"], device_mesh["data_parallel"]

    if tp_mesh.size() > 1:
        check_tensor_parallel_size(model, tp_mesh.size())
        plan = tensor_parallel_plan(model)
        for block in model.blocks:
            parallelize_module(block, tp_mesh, plan)

    if compile:
        for block in model.blocks:
            block.compile()  # per block, before sharding: FSDP hooks stay outside the compiled graph

    if dp_mesh.size() > 1:
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)  # the rest: embeddings, final norm, tied LM head
    return model


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (split or replicated over a device mesh)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """Clip gradients by their global norm when some are DTensors (sharded) and some plain (replicated).

    torch.nn.utils.clip_grad_norm_ refuses such a mix (tensor parallelism leaves embeddings and norms
    replicated); here each gradient's norm is reduced over the ranks that shard it, and replicated
    gradients count once, so every rank gets the same total norm and the same scale.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in parameters if p.grad is not None]
    total = torch.zeros((), dtype=torch.float32)
    for grad in grads:
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        total += norm.cpu() ** 2
    total = total.sqrt()
    scale = min(1.0, max_norm / (float(total) + 1e-6))
    if scale < 1.0:
        for grad in grads:
            grad.mul_(scale)
    return total
