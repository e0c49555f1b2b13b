"""FSDP2 (`torch.distributed.fsdp.fully_shard`) on CPU processes with gloo: the toy SFT problem of engine_toy.py.

Accelerate builds FSDP only on GPUs (on CPUs its state falls back to DDP; rlxf warns), so this runs torch's
`fully_shard` directly, the API Accelerate's FSDP2 plugin calls: each decoder layer and then the root module are
sharded, parameters are DTensors split over the processes, gradients are reduce-scattered. The loss is rlxf's
(`completion_nll`: summed over tokens, divided by the tokens of the whole step over all processes, as the engine
does), so 2 processes × 4 rows give the losses of 1 process × 8 rows.

    python -m torch.distributed.run --nproc_per_node 2 tests/fsdp2_toy.py MODEL_DIR STEPS RESULT_JSON
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_toy import toy_rows  # noqa: E402

from rlxf.engine import end_distributed_run  # noqa: E402
from rlxf.trainers.sft import collate_sft, completion_nll  # noqa: E402

BATCH = 8


def main(model_dir: str, steps: int, result: str) -> None:
    torch.set_num_threads(1)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if distributed:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert isinstance(model, FSDPModule)
        local = sum(p.to_local().numel() for p in model.parameters())
        full = sum(p.numel() for p in model.parameters())
        assert local < full, "nothing was sharded"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = toy_rows(model.config.vocab_size, n=BATCH * steps)
    losses = []
    for step in range(steps):
        batch_rows = rows[step * BATCH : (step + 1) * BATCH][rank::world]
        batch = collate_sft(batch_rows, pad_id=0)
        units = torch.tensor(float(batch["num_units"]))
        if distributed:
            dist.all_reduce(units)
        nll, _ = completion_nll(model, batch)
        # FSDP averages gradients over processes; × world turns that average into the sum over the whole step.
        (nll * world / units).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = nll.detach().clone()
        if distributed:
            dist.all_reduce(total)
        losses.append(float(total / units))
    if rank == 0:
        Path(result).write_text(json.dumps({"losses": losses, "world_size": world}))
    end_distributed_run()  # a gloo launch can abort at exit after a finished run (see its docstring)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
