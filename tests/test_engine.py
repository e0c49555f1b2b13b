import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from engine_toy import run_toy, toy_rows
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rlxf.engine import Engine, NonFiniteLossError, TrainConfig, accumulation_steps
from rlxf.trainers.sft import collate_sft, completion_nll

HERE = Path(__file__).parent


def test_loss_falls_and_every_parameter_changes(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    before = {
        n: p.detach().clone() for n, p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).named_parameters()
    }
    losses, model = run_toy(tiny_model_dir, tmp_path, max_steps=8, batch_size=24, per_device_batch_size=24)
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    unchanged = [n for n, p in model.named_parameters() if torch.equal(before[n], p.detach().cpu())]
    assert not unchanged
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 9))
    # where the run is in the data and in time, on every line (batch 24 of the toy's examples)
    assert [x["train/epoch"] for x in lines] == pytest.approx(
        [24 * s / len(toy_rows(model.config.vocab_size)) for s in range(1, 9)]
    )
    elapsed = [x["time/elapsed_s"] for x in lines]
    assert elapsed == sorted(elapsed) and elapsed[0] >= 0


def first_step_gradients(model_dir, out_dir, **overrides) -> dict[str, torch.Tensor]:
    """The gradients the optimiser sees at step 1 (after accumulation and clipping)."""
    grads = {}

    def capture(optimizer, args, kwargs):
        if not grads:
            grads.update({str(i): p.grad.detach().clone() for i, p in enumerate(optimizer.param_groups[0]["params"])})

    handle = register_optimizer_step_pre_hook(capture)
    try:
        run_toy(model_dir, out_dir, max_steps=1, **overrides)
    finally:
        handle.remove()
    return grads


def test_gradient_accumulation_is_exact(tiny_model_dir, tmp_path):
    # Batch 8 × accumulation 1 and batch 1 × accumulation 8 see the same 8 rows per step and divide by the same
    # token count, so gradients agree up to float summation order (in fp32: on a GPU, bf16 autocast would round each
    # micro-batch's activations differently).
    fp32 = {"mixed_precision": "no", "max_grad_norm": 0}
    whole = first_step_gradients(tiny_model_dir, tmp_path / "a", per_device_batch_size=8, **fp32)
    accum = first_step_gradients(tiny_model_dir, tmp_path / "b", per_device_batch_size=1, **fp32)
    assert whole.keys() == accum.keys() and len(whole) > 10
    for name in whole:
        torch.testing.assert_close(whole[name], accum[name], msg=name)
    losses_whole, _ = run_toy(
        tiny_model_dir, tmp_path / "c", per_device_batch_size=8, max_steps=3, mixed_precision="no"
    )
    losses_accum, _ = run_toy(
        tiny_model_dir, tmp_path / "d", per_device_batch_size=2, max_steps=3, mixed_precision="no"
    )
    torch.testing.assert_close(torch.tensor(losses_whole), torch.tensor(losses_accum))


def test_resume_continues_exactly(tiny_model_dir, tmp_path):
    full, _ = run_toy(tiny_model_dir, tmp_path / "full", max_steps=6)
    first, _ = run_toy(tiny_model_dir, tmp_path / "cut", max_steps=6, stop_after=3)
    assert len(first) == 3 and (tmp_path / "cut" / "checkpoints" / "step-0000003").is_dir()
    assert not list((tmp_path / "cut" / "checkpoints").glob(".tmp-*"))  # written atomically
    rest, _ = run_toy(tiny_model_dir, tmp_path / "cut", max_steps=6, resume=True)
    assert len(rest) == 3
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=0, atol=1e-6)
    steps = [json.loads(x)["step"] for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # each step logged once across the two runs


def test_non_finite_loss_stops_before_any_update(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    rows = toy_rows(model.config.vocab_size)
    engine = Engine(
        TrainConfig(batch_size=8, per_device_batch_size=4, max_steps=5, progress=False), tmp_path, model, len(rows)
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = {"n": 0}

    def loss_fn(batch):
        calls["n"] += 1
        nll, _ = completion_nll(engine.model, batch)
        return (nll * float("nan") if calls["n"] == 4 else nll), {}  # step 2, second micro-batch

    with pytest.raises(NonFiniteLossError, match="at step 2"):
        for micro in engine.steps(rows, lambda b: collate_sft(b, pad_id=0)):
            engine.train_step(micro, loss_fn)
    assert engine.step == 1
    after_step_1 = {n: p.detach().clone() for n, p in engine.unwrap().named_parameters()}
    assert any(not torch.equal(before[n], after_step_1[n]) for n in before)  # step 1 applied
    assert all(p.grad is None for p in engine.unwrap().parameters())  # the half-accumulated step 2 was dropped


def test_batch_size_must_divide():
    with pytest.raises(ValueError, match="not a multiple"):
        accumulation_steps(TrainConfig(batch_size=10, per_device_batch_size=4), world_size=1)
    assert accumulation_steps(TrainConfig(batch_size=16, per_device_batch_size=4), world_size=2) == 2


def test_data_order_depends_only_on_seed_and_step(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    engine = Engine(TrainConfig(batch_size=8, per_device_batch_size=8, epochs=2, progress=False), tmp_path, model, 12)
    order = [i for s in range(engine.total_steps) for i in engine.step_indices(s)]
    assert engine.total_steps == 3
    assert sorted(order[:12]) == list(range(12)) and sorted(order[12:]) == list(range(12))[:12]  # 2 epochs
    assert order[:12] != order[12:]  # each epoch reshuffled
    assert engine.step_indices(1) == engine.step_indices(1)


@pytest.mark.multiprocess
def test_two_gloo_processes_train_like_one(tiny_model_dir, tmp_path):
    """2 CPU processes × per-device batch 4 == 1 process × batch 8 (losses within 1e-5)."""
    single, _ = run_toy(tiny_model_dir, tmp_path / "one", per_device_batch_size=8, max_steps=4)
    result = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
        str(HERE / "engine_toy.py"), str(tiny_model_dir), str(tmp_path / "two"), "4", str(result),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(result.read_text())
    assert two["world_size"] == 2  # a launch that silently trains alone must not pass
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(single), rtol=0, atol=1e-5)


def test_engines_of_different_precision_in_one_process(tiny_model_dir, tmp_path):
    # Accelerate keeps one precision per process and refuses a second Accelerator asking for another; a pipeline that
    # trains one model in bf16 and the next in fp32 (or a test suite on a GPU) needs both
    from transformers import AutoModelForCausalLM

    for i, precision in enumerate(("no", "bf16", "no")):
        cfg = TrainConfig(
            batch_size=2, per_device_batch_size=2, max_steps=1, mixed_precision=precision, progress=False
        )
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        engine = Engine(cfg, tmp_path / str(i), model, num_examples=2)
        assert engine.accelerator.mixed_precision == precision
        engine.close()
