"""What keeps a GPU waiting, counted on the CPU (benchmarks/gpu_path_stats.py): host syncs per optimiser step and
distinct packed shapes."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rlxf.data.packing import pack_pairs
from rlxf.engine import Engine, TrainConfig
from rlxf.trainers.dpo import DPOConfig, collate_dpo, dpo_batch_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from gpu_path_stats import SyncCounter, ToHostCounter  # noqa: E402


def test_counter_sees_item_tolist_and_data_dependent_shapes():
    counter = SyncCounter()
    x = torch.arange(6.0)
    with ToHostCounter(counter.counts), counter:
        x.sum().item()
        x.tolist()
        x[x > 2]
        torch.nonzero(x)
        x * 2  # no sync
    assert counter.counts["aten._local_scalar_dense"] == 1 and counter.counts["Tensor.tolist"] == 1
    assert counter.counts["aten.nonzero"] == 1 and counter.counts["aten.index(bool mask)"] == 1
    assert sum(counter.counts.values()) == 4


def test_one_host_sync_per_update_and_two_per_logged_step(tiny_model_dir, tmp_path):
    """Packed DPO through the engine: one sync per update (losses and gradient norm checked together, so a GPU host
    waits once per step) and one more on a logged step (all metrics at once). The packed rows' 4-D mask goes to
    SDPA as it is; a 2-D padding mask would add 2 syncs per forward (transformers' `_ignore_causal_mask_sdpa`)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rng = random.Random(0)
    ids = lambda n: [rng.randrange(3, model.config.vocab_size) for _ in range(n)]  # noqa: E731
    rows = [
        {"prompt_ids": ids(rng.randint(2, 9)), "chosen_ids": ids(rng.randint(1, 6)), "rejected_ids": ids(3),
         "ref_chosen_logp": -9.0, "ref_rejected_logp": -9.5}
        for _ in range(24)
    ]  # fmt: skip
    cfg = TrainConfig(
        batch_size=8, per_device_batch_size=4, max_steps=3, log_every=3, progress=False, report_to="none"
    )
    engine = Engine(cfg, tmp_path, model, len(rows))
    dpo = DPOConfig(model="unused", train_file="unused")
    counts = []
    for micro in engine.steps(rows, lambda b: collate_dpo(b, 0, False, pack=True)):
        counter = SyncCounter()
        with ToHostCounter(counter.counts), counter:
            engine.train_step(micro, lambda batch: dpo_batch_loss(engine.model, None, batch, dpo))
        counts.append(dict(counter.counts))
    assert counts == [{"Tensor.tolist": 1}, {"Tensor.tolist": 1}, {"Tensor.tolist": 2}], counts


def test_shape_buckets_repeat_shapes():
    lengths = [(p, c, r) for p in range(3, 40, 7) for c in range(1, 30, 9) for r in range(2, 30, 11)]
    rows = [{"prompt_ids": [5] * p, "chosen_ids": [6] * c, "rejected_ids": [7] * r} for p, c, r in lengths]
    batches = [rows[i : i + 8] for i in range(0, len(rows), 8)]
    tight = {tuple(pack_pairs(b, 0)["input_ids"].shape) for b in batches}
    bucketed = {tuple(pack_pairs(b, 0, length_multiple=64, rows_multiple=2)["input_ids"].shape) for b in batches}
    assert len(bucketed) < len(tight)
    assert {r for r, _ in bucketed} <= {2, 4, 6, 8} and {n for _, n in bucketed} <= {64, 128}


def test_reference_runs_under_the_policys_precision(tiny_model_dir, factworld_dir, tmp_path, monkeypatch):
    """With mixed precision the DPO reference (live and cached) runs under the policy's autocast: its logits come
    out in bf16 like the policy's (before, the reference ran in fp32 outside the engine's autocast)."""
    import rlxf.trainers.dpo as dpo

    seen: dict[str, set] = {}
    load = dpo.load_model

    def load_and_watch(*args, **kwargs):
        model = load(*args, **kwargs)
        what = kwargs.get("what", "policy")
        model.lm_head.register_forward_hook(lambda m, i, out: seen.setdefault(what, set()).add(out.dtype))
        return model

    monkeypatch.setattr(dpo, "load_model", load_and_watch)
    for reference in ("live", "cached"):
        seen.clear()
        train = TrainConfig(max_steps=1, batch_size=4, per_device_batch_size=4, mixed_precision="bf16",
                            progress=False, report_to="none")  # fmt: skip
        cfg = dpo.DPOConfig(model=str(tiny_model_dir), train_file=str(factworld_dir / "preferences_train.jsonl"),
                            out=str(tmp_path / reference), reference=reference, train=train)  # fmt: skip
        dpo.train_dpo(cfg)
        assert seen == {"policy": {torch.bfloat16}, "reference model": {torch.bfloat16}}, (reference, seen)
