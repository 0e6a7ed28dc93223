"""Checkpoints: exact round trips, async snapshot semantics, damage detection, atomicity under SIGKILL."""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import nanoseek.checkpoint as ckpt_mod
from nanoseek.checkpoint import (
    CheckpointError,
    CheckpointManager,
    capture_rng_state,
    flatten_state,
    load_optimizer_state_dict,
    load_plain_model,
    optimizer_state_dict,
    restore_rng_state,
    save_plain_model,
    should_save,
    unflatten_state,
    verify_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]


def manager(tmp_path, **kw):
    return CheckpointManager(tmp_path, save_model=save_plain_model, load_model=load_plain_model, **kw)


def assert_same(a, b, path="state"):
    """Deep equality that also checks container types and tensor dtypes (torch.equal ignores neither)."""
    assert type(a) is type(b), f"{path}: {type(a)} != {type(b)}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and a != a:
        assert b != b, path
    else:
        assert a == b, path


def tiny_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    return model, opt


def train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(5, 8, generator=g)
        model(x).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def small_state(step):
    return {"w": torch.full((64, 64), float(step))}


# ----------------------------------------------------------------------------------------------------


def test_flatten_unflatten_round_trip_is_exact(tmp_path):
    random.seed(3)
    np.random.seed(3)
    state = {
        "f32": torch.randn(3, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "i64": torch.arange(7),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "int_scalar": torch.tensor(7, dtype=torch.int32),
        "transposed": torch.randn(3, 5).t(),  # non-contiguous input
        "nested": {"list": [1, 2.5, "x", None, True, [torch.ones(2)]], "tuple": (1, (2, 3), torch.zeros(1))},
        "int_keys": {0: "a", 1: {"b": torch.ones(1)}},
        "tagged_looking_key": {"__tuple__": 1},
        "floats": [float("nan"), float("inf"), -0.0, 0.1 + 0.2, 1e-310],
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state(),
        "np_scalar_vs_int": 5,
    }
    tensors, meta = flatten_state(state)
    # Through the real storage formats: JSON text and a safetensors file (the tensors must be contiguous).
    from safetensors.torch import load_file, save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "t.safetensors")
    back = unflatten_state(load_file(tmp_path / "t.safetensors"), json.loads(json.dumps(meta)))
    assert_same(state["nested"], back["nested"])
    state["transposed"] = state["transposed"].contiguous()
    assert_same(state, back)
    assert back["floats"][2] == 0.0 and str(back["floats"][2]) == "-0.0"


def test_flatten_rejects_objects_that_would_need_pickle():
    with pytest.raises(TypeError, match="no pickle"):
        flatten_state({"fn": object()})


def test_async_save_then_load_is_exact_and_resumes_bitwise(tmp_path):
    model, opt = tiny_model_and_optimizer()
    train(model, opt, 3, seed=1)
    torch.manual_seed(11), random.seed(11), np.random.seed(11)
    state = {"optimizer": optimizer_state_dict(model, opt), "rng": capture_rng_state(),
             "data": {"position": 17, "epoch": 0}, "lr_schedule": {"last_step": 3}}
    expected_draws = (torch.rand(3), random.random(), np.random.rand(2))

    mgr = manager(tmp_path)
    mgr.save(3, model_state=model.state_dict(), model_meta={"name": "tiny"}, state=state)
    # Training goes on while the writer runs: the checkpoint must hold the values at save() time.
    model_at_save = {k: v.clone() for k, v in model.state_dict().items()}
    tensors, meta = flatten_state(optimizer_state_dict(model, opt))  # a deep copy (the dict holds live tensors)
    opt_at_save = unflatten_state({k: v.clone() for k, v in tensors.items()}, meta)
    train(model, opt, 2, seed=2)
    mgr.wait()

    loaded = mgr.load()
    assert loaded["step"] == 3 and loaded["model_meta"] == {"name": "tiny"}
    assert_same(dict(sorted(model_at_save.items())), dict(sorted(loaded["model_state"].items())))
    assert_same(opt_at_save, loaded["state"]["optimizer"])
    assert loaded["state"]["data"] == {"position": 17, "epoch": 0}

    # Restore into fresh objects and continue: bitwise the same as the run that never stopped.
    model2, opt2 = tiny_model_and_optimizer(seed=123)
    model2.load_state_dict(loaded["model_state"])
    load_optimizer_state_dict(model2, opt2, loaded["state"]["optimizer"])
    reference, ref_opt = tiny_model_and_optimizer(seed=123)
    reference.load_state_dict(model_at_save)
    load_optimizer_state_dict(reference, ref_opt, opt_at_save)
    train(model2, opt2, 3, seed=5)
    train(reference, ref_opt, 3, seed=5)
    for (k, a), b in zip(model2.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), k
    assert_same(optimizer_state_dict(model2, opt2), optimizer_state_dict(reference, ref_opt))

    restore_rng_state(loaded["state"]["rng"])
    draws = (torch.rand(3), random.random(), np.random.rand(2))
    assert torch.equal(draws[0], expected_draws[0]) and draws[1] == expected_draws[1]
    assert np.array_equal(draws[2], expected_draws[2])


def test_save_returns_before_the_write_and_snapshots_the_tensors(tmp_path):
    release, writing = threading.Event(), threading.Event()

    def slow_writer(path, model_state, meta):
        writing.set()
        assert release.wait(10)
        save_plain_model(path, model_state, meta)

    mgr = CheckpointManager(tmp_path, save_model=slow_writer, load_model=load_plain_model)
    w = torch.zeros(4)
    mgr.save(1, model_state={"w": w}, model_meta={}, state={"x": torch.ones(2)})
    assert writing.wait(10)
    assert mgr.list() == [] and mgr.latest() is None  # save() returned while the write was pending
    w += 5  # the trainer mutates its tensors in place right away
    release.set()
    mgr.wait()
    assert torch.equal(mgr.load()["model_state"]["w"], torch.zeros(4))


def test_flipped_byte_is_detected_and_previous_checkpoint_used(tmp_path):
    mgr = manager(tmp_path)
    for step in (1, 2):
        mgr.save(step, model_state=small_state(step), model_meta={}, state={"s": torch.tensor(step)})
    mgr.wait()
    for damaged in ("state.safetensors", "model/model.safetensors"):
        file = tmp_path / "checkpoints" / "step_000002" / damaged
        data = bytearray(file.read_bytes())
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
        with pytest.warns(UserWarning, match=damaged.replace(".", r"\.") + ".*sha256"):
            assert mgr.latest().name == "step_000001"
        with pytest.warns(UserWarning):
            assert mgr.load()["step"] == 1
        with pytest.raises(CheckpointError, match="damaged"):
            mgr.load(tmp_path / "checkpoints" / "step_000002")
        data[len(data) // 2] ^= 0x01
        file.write_bytes(bytes(data))
        assert mgr.latest().name == "step_000002"


def test_missing_manifest_or_file_is_skipped(tmp_path):
    mgr = manager(tmp_path)
    for step in (1, 2):
        mgr.save(step, model_state=small_state(step), model_meta={}, state={}, blocking=True)
    step2 = tmp_path / "checkpoints" / "step_000002"
    (step2 / "model" / "meta.json").unlink()
    with pytest.warns(UserWarning, match="meta.json.*missing"):
        assert mgr.latest().name == "step_000001"
    (step2 / "manifest.json").unlink()  # what a kill mid-write would look like without the tmp dir
    with pytest.warns(UserWarning, match="manifest.json is missing"):
        assert mgr.latest().name == "step_000001"


def test_stale_tmp_dirs_of_dead_processes_are_removed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    ckdir = tmp_path / "checkpoints"
    stale = [ckdir / f".tmp_step_000005_{dead.pid}", ckdir / f".trash_step_000003_{dead.pid}"]
    live = ckdir / f".tmp_step_000009_{os.getpid()}"  # a writer that is still running
    for d in stale + [live]:
        (d / "model").mkdir(parents=True)
        (d / "model" / "x.safetensors").write_bytes(b"partial")
    (ckdir / f".latest.tmp_{dead.pid}").write_text("step_000005\n")
    manager(tmp_path)
    assert not any(d.exists() for d in stale) and live.exists()
    assert not (ckdir / f".latest.tmp_{dead.pid}").exists()


def test_keep_last_prunes_old_but_never_the_one_latest_names(tmp_path):
    mgr = manager(tmp_path, keep_last=2)
    for step in (10, 20, 30, 40):
        mgr.save(step, model_state=small_state(step), model_meta={}, state={})
    mgr.wait()
    assert [p.name for p in mgr.list()] == ["step_000030", "step_000040"]
    # After a rollback the trainer saves an older step: it becomes `latest` and must survive pruning.
    mgr.save(25, model_state=small_state(25), model_meta={}, state={}, blocking=True)
    assert [p.name for p in mgr.list()] == ["step_000025", "step_000030", "step_000040"]
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_000025\n"
    assert mgr.latest().name == "step_000025"


def test_failed_write_keeps_previous_checkpoint_and_raises_clearly(tmp_path, monkeypatch):
    mgr = manager(tmp_path)
    mgr.save(1, model_state=small_state(1), model_meta={}, state={"k": torch.ones(3)}, blocking=True)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"\0" * 1000)  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(filename))

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    mgr.save(2, model_state=small_state(2), model_meta={}, state={"k": torch.ones(3)})
    with pytest.raises(CheckpointError, match=r"step_000002.*No space left.*intact \(`latest` -> step_000001\)"):
        mgr.wait()
    ckdir = tmp_path / "checkpoints"
    assert (ckdir / "latest").read_text() == "step_000001\n"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_000001"]  # tmp folder removed
    assert mgr.load()["step"] == 1

    monkeypatch.undo()
    mgr.wait()  # the error was reported once; the manager is usable again
    mgr.save(2, model_state=small_state(2), model_meta={}, state={}, blocking=True)
    assert mgr.latest().name == "step_000002"


def test_error_of_an_async_save_is_raised_by_the_next_save(tmp_path):
    def broken_writer(path, model_state, meta):
        raise OSError(errno.EIO, "Input/output error")

    mgr = CheckpointManager(tmp_path, save_model=broken_writer, load_model=load_plain_model)
    mgr.save(1, model_state=small_state(1), model_meta={}, state={})
    with pytest.raises(CheckpointError, match="step_000001.*Input/output error"):
        mgr.save(2, model_state=small_state(2), model_meta={}, state={})


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from nanoseek.checkpoint import CheckpointManager, save_plain_model, load_plain_model
    mgr = CheckpointManager(sys.argv[1], keep_last=2, save_model=save_plain_model, load_model=load_plain_model)
    state = {"opt": {"m": torch.randn(2_000_000), "v": torch.randn(2_000_000)}}
    model = {"w": torch.randn(2_000_000)}
    print("ready", flush=True)
    for i in range(1000):
        mgr.save(int(sys.argv[2]) + i, model_state=model, model_meta={"i": i}, state=state)
""")


def test_sigkill_mid_write_never_leaves_latest_pointing_at_an_incomplete_checkpoint(tmp_path):
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ckdir = tmp_path / "checkpoints"
    killed_mid_write = 0
    for run in range(5):
        proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(tmp_path), str(run * 1000)],
                                stdout=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))  # each save of ~24 MB takes ~0.1 s here: land mid-write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_mid_write += any(p.name.startswith(".tmp_step_") for p in ckdir.iterdir())
        named = (ckdir / "latest").read_text().strip() if (ckdir / "latest").exists() else None
        if named is not None:
            verify_checkpoint(ckdir / named)  # raises if `latest` names anything incomplete
    assert killed_mid_write >= 1, "no kill landed mid-write: the test did not test anything"
    mgr = manager(tmp_path)  # cleans the killed writers' leftovers
    assert not [p for p in ckdir.iterdir() if p.name.startswith(".")]
    assert mgr.latest() is not None
    assert mgr.load()["model_meta"]["i"] >= 0


def test_should_save_by_steps_or_minutes():
    assert should_save(100, every_steps=50, every_minutes=None, last_save_time=0.0, now=1.0)
    assert not should_save(101, every_steps=50, every_minutes=None, last_save_time=0.0, now=1e9)
    assert should_save(101, every_steps=50, every_minutes=5, last_save_time=0.0, now=300.0)
    assert not should_save(101, every_steps=50, every_minutes=5, last_save_time=0.0, now=299.0)
    assert not should_save(7, every_steps=None, every_minutes=None, last_save_time=0.0)


def test_default_model_writer_is_nanoseek_hf(tmp_path):
    # The contract with nanoseek.hf: save_hf(path, config, state_dict), load_hf(path) -> (config, state_dict).
    from nanoseek.config import ModelConfig
    from nanoseek.model import Transformer

    config = ModelConfig.from_name("tiny")
    torch.manual_seed(0)
    model_state = Transformer(config).state_dict()
    mgr = CheckpointManager(tmp_path)
    mgr.save(7, model_state=model_state, model_meta=config, state={"step": 7}, blocking=True)
    assert (tmp_path / "checkpoints" / "step_000007" / "model" / "config.json").is_file()
    loaded = mgr.load()
    assert loaded["model_meta"] == config and loaded["state"] == {"step": 7}
    assert_same(dict(sorted(model_state.items())), dict(sorted(loaded["model_state"].items())))
