"""Peak memory per rank while a sharded GPT is built: the whole model first, then split, against the project's way
(meta device, split, then each rank allocates and fills only its slices). 2 gloo processes on a CPU; results in
benchmarks/README.md ("Scaling").

    python benchmarks/sharded_init.py          # a 16 x 1024 GPT-2-style model: 254M parameters, 969 MiB in float32

Each measurement runs in fresh processes, with large freed blocks returned to the OS (MALLOC_MMAP_THRESHOLD_), and
reads the growth of each rank's peak resident set (ru_maxrss) over the build.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(rank: int, world: int, port: int, how: str, shape: tuple[int, int], sizes: dict, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from project.model import GPT, GPTConfig
    from project.training.parallel import materialize, parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", shape, mesh_dim_names=("data_parallel", "tensor_parallel"))
    config = GPTConfig(**sizes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    if how == "whole model first":
        model = parallelize(GPT(config), mesh)
    else:
        with torch.device("meta"):
            model = GPT(config)
        parallelize(model, mesh)
        materialize(model, "cpu")
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before
    local = sum(p.to_local().numel() * 4 for p in model.parameters()) / 2**20
    full = sum(p.numel() * 4 for p in model.parameters()) / 2**20
    Path(f"{out}.{rank}").write_text(f"{growth:.0f} {local:.0f} {full:.0f}")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    import tempfile

    import torch.multiprocessing as mp

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()
    sizes = dict(vocab_size=50257, block_size=1024, n_layer=args.layers, n_head=16, n_embd=args.width)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # inherited by the spawned ranks
    print("| plan | how | rank 0 peak growth (MiB) | rank 1 | its shards | whole model |")
    print("|---|---|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as folder:
        for plan, shape in (("FSDP2 2 x 1", (2, 1)), ("TP 1 x 2", (1, 2))):
            for how in ("whole model first", "meta, then own slices"):
                out = str(Path(folder) / "rank")
                mp.spawn(build, args=(2, free_port(), how, shape, sizes, out), nprocs=2, join=True)
                ranks = [Path(f"{out}.{r}").read_text().split() for r in (0, 1)]
                print(f"| {plan} | {how} | {ranks[0][0]} | {ranks[1][0]} | {ranks[0][1]} | {ranks[0][2]} |")


if __name__ == "__main__":
    main()
