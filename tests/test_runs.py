"""Output directories and runs (issue 16): one run per directory, resume that refuses what it cannot continue,
damaged files on resume, a safe swap of final/, early checks of settings and permissions, warnings for diverged or
collapsed training, and dropout off in training."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pytest
import torch
from engine_toy import run_toy, toy_rows

from rlxf.engine import Engine, RunDirError, TrainConfig, disable_dropout
from rlxf.trainers.sft import collate_sft, completion_nll

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOY = {"batch_size": 8, "per_device_batch_size": 8, "max_steps": 6, "lr": 1e-2, "progress": False,
       "report_to": "none", "mixed_precision": "no"}  # fmt: skip


def toy(model_dir, out_dir, **overrides):
    return run_toy(model_dir, out_dir, **(TOY | overrides))


def metric_steps(out_dir: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out_dir / "metrics.jsonl").read_text().splitlines()]


def trainer_like(model_dir, out_dir, loss_scale=None, **overrides) -> Engine:
    """What every trainer does with the engine: train while `steps` yields, save final/ when finished."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = toy_rows(model.config.vocab_size)
    engine = Engine(TrainConfig(**(TOY | overrides)), out_dir, model, num_examples=len(rows))

    def loss_fn(batch):
        nll, _ = completion_nll(engine.model, batch)
        if loss_scale is not None:
            nll = nll * loss_scale(engine.step + 1)
        return nll, {"loss/nll": nll.detach()}

    for micro in engine.steps(rows, lambda b: collate_sft(b, pad_id=0)):
        engine.train_step(micro, loss_fn)
    if engine.finished:
        engine.save_final(AutoTokenizer.from_pretrained(model_dir))
    engine.close()
    return engine


# --------------------------------------------------------------------------------------------------------- item 1
def test_fresh_run_refuses_a_directory_holding_another_run(tiny_model_dir, tmp_path):
    toy(tiny_model_dir, tmp_path, max_steps=4, save_every=2)
    with pytest.raises(RunDirError, match="overwrite") as err:
        toy(tiny_model_dir, tmp_path, max_steps=4)
    assert str(tmp_path) in str(err.value)
    trainer_like(tiny_model_dir, tmp_path / "done", max_steps=2)  # final/ only, no checkpoint
    with pytest.raises(RunDirError, match="final"):
        trainer_like(tiny_model_dir, tmp_path / "done", max_steps=2)


def test_overwrite_replaces_the_old_run_and_resume_continues_the_new_one(tiny_model_dir, tmp_path):
    # The case: an old run's step-20 sorted after the new run's step-3, so pruning deleted the new checkpoint
    # and resume loaded the old run's.
    toy(tiny_model_dir, tmp_path, max_steps=20, save_every=10)
    full, _ = toy(tiny_model_dir, tmp_path / "full", max_steps=6)
    first, _ = toy(tiny_model_dir, tmp_path, max_steps=6, stop_after=3, overwrite=True, keep_checkpoints=1)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000003"]
    rest, _ = toy(tiny_model_dir, tmp_path, max_steps=6, resume=True)
    torch.testing.assert_close(torch.tensor(first + rest), torch.tensor(full), rtol=0, atol=1e-6)
    assert metric_steps(tmp_path) == list(range(1, 7))


def test_resume_refuses_other_settings_but_allows_a_longer_run(tiny_model_dir, tmp_path):
    toy(tiny_model_dir, tmp_path, stop_after=2)
    with pytest.raises(RunDirError, match=r"train\.lr") as err:
        toy(tiny_model_dir, tmp_path, resume=True, lr=1e-3)
    assert "step-0000002" in str(err.value)
    with pytest.raises(RunDirError, match=r"train\.seed"):
        toy(tiny_model_dir, tmp_path, resume=True, seed=1)
    # bookkeeping may change: the length of the run, the logging and checkpoint cadence
    losses, _ = toy(tiny_model_dir, tmp_path, resume=True, max_steps=8, log_every=2, save_every=4, keep_checkpoints=3)
    assert len(losses) == 3  # steps 4, 6, 8 logged
    assert (tmp_path / "checkpoints" / "step-0000008").is_dir()


# --------------------------------------------------------------------------------------------------------- item 2
def test_keep_checkpoints_0_keeps_the_checkpoint_just_written(tiny_model_dir, tmp_path):
    toy(tiny_model_dir, tmp_path, stop_after=3, keep_checkpoints=0)
    assert (tmp_path / "checkpoints" / "step-0000003").is_dir()
    toy(tiny_model_dir, tmp_path, resume=True, save_every=1, keep_checkpoints=0)
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-0000006"]


def test_resume_of_a_finished_run_touches_nothing(tiny_model_dir, tmp_path, caplog):
    trainer_like(tiny_model_dir, tmp_path)  # no checkpoints: save_every 0, no stop_after
    before = {p: p.read_bytes() for p in [tmp_path / "metrics.jsonl", *(tmp_path / "final").iterdir()]}
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    with caplog.at_level(logging.INFO, logger="rlxf.engine"):
        engine = trainer_like(tiny_model_dir, tmp_path, resume=True)
    assert {p: p.stat().st_mtime_ns for p in before} == mtimes
    assert {p: p.read_bytes() for p in before} == before
    assert engine.finished and engine.finished_before and engine.history == {}
    assert "finished at step 6" in caplog.text


def test_resumed_finished_sft_run_exits_0_without_rewriting_final(tiny_model_dir, tmp_path, capsys):
    from rlxf.cli import main

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": "the cat is", "completion": " red."}) + "\n" for _ in range(8)))
    args = ["sft", "--model", str(tiny_model_dir), "--train_file", str(data), "--out", str(tmp_path / "run"),
            "--train.max_steps", "2", "--train.batch_size", "4", "--train.per_device_batch_size", "4",
            "--train.progress", "false", "--train.report_to", "none"]  # fmt: skip
    assert main(args) == 0
    weights = tmp_path / "run" / "final" / "model.safetensors"
    umask = os.umask(0)
    os.umask(umask)
    for path in (tmp_path / "run" / "final").iterdir():  # readable like every other file (transformers wrote 0600)
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, path.name
    mtime = weights.stat().st_mtime_ns
    assert main([*args, "--train.resume"]) == 0
    assert weights.stat().st_mtime_ns == mtime
    assert main(args) == 2  # a fresh run into the finished run's directory
    assert "--train.overwrite" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- item 3
def test_partial_metrics_line_is_dropped_on_resume(tiny_model_dir, tmp_path, caplog):
    toy(tiny_model_dir, tmp_path, stop_after=3)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss/nl')  # killed mid-write
    with caplog.at_level(logging.WARNING, logger="rlxf.engine"):
        toy(tiny_model_dir, tmp_path, resume=True)
    assert metric_steps(tmp_path) == list(range(1, 7))
    assert "metrics.jsonl" in caplog.text and "line 4" in caplog.text


def test_damaged_newest_checkpoint_falls_back_to_the_previous(tiny_model_dir, tmp_path, caplog):
    full, _ = toy(tiny_model_dir, tmp_path / "full")
    first, _ = toy(tiny_model_dir, tmp_path / "cut", save_every=2, stop_after=4)
    newest = tmp_path / "cut" / "checkpoints" / "step-0000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with caplog.at_level(logging.WARNING, logger="rlxf.engine"):
        rest, _ = toy(tiny_model_dir, tmp_path / "cut", resume=True, save_every=2)
    assert "step-0000004" in caplog.text and "damaged" in caplog.text
    assert len(rest) == 4  # steps 3-6 again, from step-0000002
    torch.testing.assert_close(torch.tensor(first[:2] + rest), torch.tensor(full), rtol=0, atol=1e-6)
    assert metric_steps(tmp_path / "cut") == list(range(1, 7))


# --------------------------------------------------------------------------------------------------------- item 4
def test_crash_while_replacing_final_keeps_a_model(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    trainer_like(tiny_model_dir, tmp_path, stop_after=3)
    engine = trainer_like(tiny_model_dir, tmp_path, resume=True)
    old = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    real_replace = os.replace

    def crash_moving_the_new_model_in(src, dst):
        if Path(src).name == ".tmp-final":
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_moving_the_new_model_in)
    with pytest.raises(OSError, match="killed"):
        engine.save_final(AutoTokenizer.from_pretrained(tiny_model_dir))
    monkeypatch.undo()
    assert (tmp_path / "final").is_dir() or (tmp_path / ".old-final").is_dir()  # a complete model is still on disk
    # the next start (here: resume of the finished run) puts the old model back, rather than training again
    assert trainer_like(tiny_model_dir, tmp_path, resume=True).history == {}
    restored = AutoModelForCausalLM.from_pretrained(tmp_path / "final").state_dict()
    assert all(torch.equal(old[k], restored[k]) for k in old)
    assert not list(tmp_path.glob(".old-*"))


# --------------------------------------------------------------------------------------------------------- item 5
def test_unwritable_checkpoint_dir_fails_before_step_1(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "checkpoints").write_text("not a directory")  # fails for root too, unlike a chmod
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with pytest.raises(RunDirError, match="checkpoints"):
        Engine(TrainConfig(**(TOY | {"save_every": 2})), tmp_path, model, num_examples=24)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permissions")
def test_read_only_out_dir_fails_before_step_1(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        with pytest.raises(RunDirError, match="cannot write"):
            Engine(TrainConfig(**TOY), tmp_path / "ro", AutoModelForCausalLM.from_pretrained(tiny_model_dir), 24)
    finally:
        (tmp_path / "ro").chmod(0o700)


# --------------------------------------------------------------------------------------------------------- item 6
def test_loss_spike_is_warned_and_recorded(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rlxf.engine"):
        trainer_like(tiny_model_dir, tmp_path, max_steps=6, lr=1e-4, log_every=10,
                     loss_scale=lambda step: 1000.0 if step == 5 else 1.0)  # fmt: skip
    assert "loss" in caplog.text and "step 5" in caplog.text and "median" in caplog.text
    lines = {x["step"]: x for x in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())}
    assert lines[5]["train/loss_spike"] > 100  # logged although log_every is 10
    assert not any("train/loss_spike" in x for s, x in lines.items() if s != 5)


def test_zero_gradient_is_warned_and_recorded(tiny_model_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="rlxf.engine"):
        trainer_like(tiny_model_dir, tmp_path, max_steps=5, loss_scale=lambda step: 0.0 if step >= 3 else 1.0)
    assert "gradient norm is exactly 0 at step 3" in caplog.text
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("train/grad_norm_zero") == 1.0] == [3, 4, 5]
    assert lines[0]["train/grad_norm"] > 0 and "train/grad_norm_zero" not in lines[0]


# --------------------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize(
    "field, value",
    [("max_steps", -5), ("batch_size", 0), ("per_device_batch_size", 0), ("epochs", -1.0), ("epochs", 0.0),
     ("save_every", -1), ("eval_every", -1), ("log_every", 0), ("keep_checkpoints", -1), ("stop_after", -2),
     ("warmup_steps", -1), ("lr", 0.0), ("lr", float("inf")), ("weight_decay", -0.1), ("max_grad_norm", -1.0),
     ("seed", -1), ("lr_schedule", "cosin"), ("mixed_precision", "fp8"), ("report_to", "wandb")],
)  # fmt: skip
def test_invalid_train_settings_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"train\.{field}"):
        TrainConfig(**{field: value})


def test_invalid_settings_are_one_line_cli_errors(tiny_model_dir, tmp_path, capsys):
    from rlxf.cli import main

    assert main(["sft", "--model", str(tiny_model_dir), "--train_file", "x.jsonl", "--train.max_steps", "-5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rlxf: error:") and "train.max_steps" in err and "Traceback" not in err
    assert main(["sft", "--model", "m", "--train_file", "x", "--train.resume", "--train.overwrite"]) == 2
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field, value", [("max_new_tokens", 0), ("batch_size", 0), ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5)]
)
def test_invalid_generation_settings_name_the_field(field, value):
    from rlxf.sampling import GenerationSettings

    with pytest.raises(ValueError, match=field):
        GenerationSettings(**{field: value})


# --------------------------------------------------------------------------------------------------------- item 8
def test_disable_dropout_zeroes_modules_and_attention_probabilities():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.1))  # fmt: skip
    assert disable_dropout(model) >= 1
    assert all(m.self_attn.attention_dropout == 0.0 for m in model.model.layers)
    assert model.config.attention_dropout == 0.1  # a saved model keeps its own setting


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, factworld_model_dir):
    """A tiny GPT-2 with dropout 0.1 everywhere, on the small FactWorld's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(factworld_model_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.1,
                        embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)  # fmt: skip
    out = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("dropout", [False, True])
def test_dpo_starts_at_ln2_with_dropout_off(gpt2_dir, factworld_dir, tmp_path, dropout):
    from rlxf.trainers.dpo import DPOConfig, train_dpo

    train = TrainConfig(batch_size=8, per_device_batch_size=8, max_steps=1, lr=1e-3, progress=False,
                        report_to="none", mixed_precision="no", **({"dropout": True} if dropout else {}))  # fmt: skip
    cfg = DPOConfig(model=str(gpt2_dir), train_file=str(factworld_dir / "preferences_train.jsonl"), out=str(tmp_path),
                    max_length=192, reference="live", train=train)  # fmt: skip
    first = train_dpo(cfg)["history"]["loss/dpo"][0]
    if dropout:  # the policy's log-probs are noisy against the reference's
        assert abs(first - math.log(2.0)) > 1e-4
    else:  # policy = reference, h = 0 for every pair
        assert first == pytest.approx(math.log(2.0), abs=1e-6)


def test_threads_setting_reaches_torch(tiny_model_dir, tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        toy(tiny_model_dir, tmp_path, max_steps=1, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="train.threads"):
        TrainConfig(threads=-1)
