"""How the GPT is split across devices under Lightning's ModelParallelStrategy: tensor parallel + FSDP2.

    trainer:
      strategy:
        class_path: lightning.pytorch.strategies.ModelParallelStrategy
        init_args: {data_parallel_size: 2, tensor_parallel_size: 2}   # 4 devices: a 2 x 2 mesh

The strategy builds a 2-D device mesh ("data_parallel", "tensor_parallel") and calls
`GPTModule.configure_model`, which calls `parallelize` and `materialize` below. The model file stays
single-device: every choice about sharding lives here.

0. Never the whole model on one rank: `GPTModule` builds the GPT on the meta device (no memory), `parallelize`
   splits the empty parameters, and `materialize` allocates each rank's own slices and fills them from the
   model's seeded initialisation (`GPT.initial_weights`), drawn one whole parameter at a time, so the
   weights equal a one-device model's for the same seed and the peak is one full parameter.
1. Tensor parallelism (Megatron style) on the "tensor_parallel" dimension, over the whole model, so every
   parameter is a DTensor: q/k/v and the MLP's fc/gate are split by output features (column-wise: each rank
   computes a slice of the heads / hidden units), attention's and the MLP's `proj` by input features (row-wise:
   partial sums, all-reduced); the token and position embeddings by rows (each rank looks up its part of the
   vocabulary, the partial sums are all-reduced), the LM head by vocabulary rows (its logits all-gathered), the
   tied embedding and head sharing one split weight; norms replicated. Needs n_head, n_kv_head and the MLP
   width divisible by the tensor-parallel size (the vocabulary and the context need not be). With dropout > 0
   the tensor-parallel ranks must draw the same masks: `seed_everything` seeds every rank alike.
2. FSDP2 (`fully_shard`) on the "data_parallel" dimension: each block is its own unit (all-gathered just
   before it runs, freed after), then the root (embeddings, final norm, tied LM head).

With every parameter a DTensor on one mesh, torch's own `clip_grad_norm_` (`get_total_norm`, then
`clip_grads_with_norm_`) takes the global gradient norm in one reduction, with no host sync, and AdamW's fused
and foreach kernels apply. Activation checkpointing (`--model.activation_checkpointing`) is the model's own
(`GPT.activation_checkpointing`). Checkpoints are distributed (DCP) folders (project/training/strategy.py).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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


def embedding_and_head_plan(model: GPT) -> dict:
    """Plan for the modules outside the blocks: embeddings split by rows, the head by vocabulary rows."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {"wte": RowwiseParallel(input_layouts=Replicate()),  # token ids replicated in, embeddings all-reduced
            "lm_head": ColwiseParallel(output_layouts=Replicate())}  # logits all-gathered: plain (B, T, V) out
    if model.wpe is not None:
        plan["wpe"] = RowwiseParallel(input_layouts=Replicate())
    return plan


def replicate_parameters(module: nn.Module, mesh) -> None:
    """Make `module`'s own parameters Replicate DTensors on `mesh` (plain tensors in and out), so every parameter
    of the model is a DTensor and gradient clipping is one reduction."""
    from torch.distributed.tensor import DTensor, Replicate, distribute_module

    def parameters_to_dtensors(name, mod, mesh) -> None:
        for param_name, param in list(mod.named_parameters(recurse=False)):
            dtensor = DTensor.from_local(param, mesh, [Replicate()], run_check=False)
            mod.register_parameter(param_name, nn.Parameter(dtensor, requires_grad=param.requires_grad))

    def inputs_to_dtensors(mod, inputs, mesh):
        return tuple(DTensor.from_local(t, mesh, [Replicate()], run_check=False)
                     if isinstance(t, torch.Tensor) and not isinstance(t, DTensor) else t for t in inputs)

    def output_to_local(mod, output, mesh):
        return output.to_local()

    distribute_module(module, mesh, parameters_to_dtensors, inputs_to_dtensors, output_to_local)


def check_tensor_parallel_size(model: GPT, tp_size: int) -> None:
    cfg = model.config
    for name, value in (("n_head", cfg.n_head), ("n_kv_head", cfg.kv_heads), ("MLP width", cfg.hidden_dim)):
        if value % tp_size != 0:
            raise ValueError(
                f"tensor_parallel_size {tp_size} must divide the model's {name} ({value}): "
                "choose another --trainer.strategy.tensor_parallel_size or model size"
            )


def parallelize(model: GPT, device_mesh, compile: bool = False) -> GPT:
    """Shard `model` in place over `device_mesh` (dims "data_parallel" and "tensor_parallel"); best on the meta
    device (then `materialize`). Does nothing to a model that is sharded already (configure_model runs again
    when one process fits, then tests)."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module

    if is_sharded(model):
        return model
    tp_mesh, dp_mesh = device_mesh["tensor_parallel"], device_mesh["data_parallel"]

    if tp_mesh.size() > 1:
        check_tensor_parallel_size(model, tp_mesh.size())
        parallelize_module(model, tp_mesh, embedding_and_head_plan(model))
        model.tie_weights()  # the head's split weight is a new Parameter: share the embedding's again
        plan = tensor_parallel_plan(model)
        for block in model.blocks:
            parallelize_module(block, tp_mesh, plan)
            replicate_parameters(block.norm1, tp_mesh)
            replicate_parameters(block.norm2, tp_mesh)
        replicate_parameters(model.norm, tp_mesh)

    if compile:
        for block in model.blocks:
            block.compile()  # per block, before sharding: FSDP hooks stay outside the compiled graph

    if dp_mesh.size() > 1:
        for block in model.blocks:
            fully_shard(block, mesh=dp_mesh)
        fully_shard(model, mesh=dp_mesh)  # the rest: embeddings, final norm, tied LM head
    return model


def materialize(model: GPT, device: torch.device | str, weights: Iterable[tuple[str, torch.Tensor]] | None = None
                ) -> None:
    """Allocate a model built on the meta device (only this rank's slice of each sharded parameter) on `device`
    and fill it: with `weights` ((name, full tensor) pairs), or the model's seeded initialisation."""
    model.to_empty(device=device)
    model.tie_weights()  # to_empty gives each name its own new Parameter
    model.reset_buffers()
    copy_full_weights(model, model.initial_weights(model.init_seed) if weights is None else weights)


@torch.no_grad()
def copy_full_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy full (unsplit) tensors into `model`'s parameters by name: a sharded parameter keeps its own slice,
    cut locally from the full tensor (every rank holds the same full tensor, so nothing is sent)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(model.named_parameters())
    for name, value in weights:
        param = params[name]
        if isinstance(param, DTensor):
            value = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements, src_data_rank=None)
        param.copy_(value)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of `model` is a DTensor (split or replicated over a device mesh)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
