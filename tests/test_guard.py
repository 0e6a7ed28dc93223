"""Anomaly guard: non-finite and spike detection, false positives, rollback, state, untouched optimizer."""

import json
import random

import pytest
import torch

from nanoseek.guard import Guard, grads_finite


def warmed_guard(steps=64, seed=0, **kw):
    guard = Guard(**kw)
    rng = random.Random(seed)
    for _ in range(steps):
        assert guard.check(2.0 + 0.01 * rng.gauss(0, 1), 1.0 + 0.05 * rng.gauss(0, 1)).ok
    return guard


def test_nonfinite_loss_is_skipped_even_during_warmup():
    guard = Guard()
    for bad in (float("nan"), float("inf")):
        verdict = guard.check(bad, 1.0)
        assert verdict.skip and not verdict.rollback and verdict.reason == "nonfinite_loss"
    assert guard.counts["nonfinite_loss"] == 2 and len(guard.losses) == 0


def test_nan_in_a_gradient_is_skipped():
    layer = torch.nn.Linear(4, 3)
    layer(torch.randn(2, 4)).sum().backward()
    assert grads_finite(layer.parameters())
    layer.weight.grad[1, 2] = float("nan")
    assert not grads_finite(layer.parameters())
    guard = warmed_guard()
    assert guard.check(2.0, 1.0, grads_finite=grads_finite(layer.parameters())).reason == "nonfinite_grad"
    assert guard.check(2.0, float("nan")).reason == "nonfinite_grad"
    # Huge but finite gradients are not "non-finite" (their fp32 norm would overflow to inf).
    layer.weight.grad.fill_(1e30)
    assert grads_finite(layer.parameters())


def test_gradient_norm_spike_after_stable_history_is_skipped():
    guard = warmed_guard()
    verdict = guard.check(2.0, 1e4)
    assert verdict.skip and verdict.reason == "grad_spike" and "grad=" in verdict.detail
    assert guard.check(5.0, 1.0).reason == "loss_spike"
    assert guard.check(1.0, 0.5).ok  # one-sided: a drop is fine


def test_spike_detection_waits_for_min_history():
    for history, expected in ((15, "ok"), (16, "skip")):
        guard = Guard(min_history=16)
        for i in range(history):
            assert guard.check(2.0 + 0.01 * (i % 3), 1.0).ok
        assert guard.check(2.0, 1e4).action == expected  # with 15 values too few to judge


def test_only_accepted_steps_enter_the_window():
    guard = warmed_guard()
    before = list(guard.grad_norms)
    for _ in range(20):  # were spikes admitted, the std would grow until they stopped being spikes
        assert guard.check(2.0, 30.0).reason == "grad_spike"
    assert list(guard.grad_norms) == before


def test_normal_noise_is_never_flagged():
    rng = random.Random(1234)
    guard = Guard(max_consecutive=1)
    for step in range(600):
        loss = 4.0 * (0.997 ** step) + 2.0 + 0.05 * rng.gauss(0, 1)  # decaying, noisy loss
        grad_norm = 0.8 * rng.lognormvariate(0, 0.15)  # heavier-tailed, positive grad norms
        verdict = guard.check(loss, grad_norm, batch=step)
        assert verdict.ok, (step, verdict)
    assert guard.counts["ok"] == 600 and guard.bad_batches == []


def test_rollback_after_max_consecutive_anomalies():
    guard = warmed_guard(max_consecutive=3)
    assert [guard.check(float("nan"), 1.0, batch=b).action for b in (100, 101)] == ["skip", "skip"]
    assert guard.check(2.0, 1.0, batch=102).ok  # an accepted step ends the run of anomalies
    actions = [guard.check(2.0, 1e4, batch=b).action for b in (103, 104, 105, 106)]
    assert actions == ["skip", "skip", "rollback", "skip"]  # the counter restarts after a rollback
    assert guard.counts["rollback"] == 1 and guard.counts["grad_spike"] == 4
    assert guard.bad_batches == [100, 101, 103, 104, 105, 106]
    assert guard.is_bad_batch(104) and not guard.is_bad_batch(102)


def test_state_dict_round_trip_gives_identical_decisions():
    rng = random.Random(7)
    stream = [(2.0 + 0.02 * rng.gauss(0, 1), 1.0 + 0.1 * abs(rng.gauss(0, 1))) for _ in range(400)]
    for i in (150, 151, 260, 300, 301, 302):  # spikes and NaNs on both sides of the save
        stream[i] = (float("nan"), 1.0) if i % 2 else (2.0, 50.0)
    a = Guard(window=32, max_consecutive=2)
    for i, (loss, gn) in enumerate(stream[:200]):
        a.check(loss, gn, batch=i)
    b = Guard(window=32, max_consecutive=2)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # through JSON, as in a checkpoint
    assert b.state_dict() == a.state_dict()
    verdicts_a = [a.check(loss, gn, batch=i) for i, (loss, gn) in enumerate(stream[200:], 200)]
    verdicts_b = [b.check(loss, gn, batch=i) for i, (loss, gn) in enumerate(stream[200:], 200)]
    assert verdicts_a == verdicts_b
    assert {v.action for v in verdicts_a} == {"ok", "skip", "rollback"}


def test_bad_batches_survive_the_rollback_that_restores_an_older_guard_state():
    guard = warmed_guard(max_consecutive=2)
    saved = json.loads(json.dumps(guard.state_dict()))  # saved with the last good checkpoint
    window = list(guard.losses)
    assert guard.check(float("nan"), 1.0, batch=70).skip
    assert guard.check(float("nan"), 1.0, batch=71).rollback
    guard.load_state_dict(saved)  # the trainer restores the checkpoint
    assert list(guard.losses) == window  # statistics are the checkpoint's
    assert guard.bad_batches == [70, 71] and guard.state_dict()["bad_batches"] == [70, 71]
    assert guard.counts["rollback"] == 1 and guard.counts["nonfinite_loss"] == 2


def test_skipped_step_leaves_parameters_and_adamw_state_bitwise_untouched():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = Guard(min_history=8)

    def step(x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        verdict = guard.check(loss.item(), grad_norm.item(), grads_finite=grads_finite(model.parameters()))
        if verdict.ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return verdict

    def snapshot():
        params = [p.detach().clone() for p in model.parameters()]
        state = [{k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for s in opt.state.values()]
        return params, state

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and all(
            s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1) for s1, s2 in zip(a[1], b[1]))

    x, y = torch.randn(16, 6), torch.randn(16, 3)
    for _ in range(12):
        assert step(x + 0.01 * torch.randn_like(x), y).ok
    before = snapshot()
    x_nan = x.clone()
    x_nan[0, 0] = float("nan")
    assert step(x_nan, y).reason == "nonfinite_loss"
    assert step(x * 1e4, y).reason in ("loss_spike", "grad_spike")
    assert same(before, snapshot())
    assert step(x, y).ok and not same(before, snapshot())  # an accepted step does update


def test_bad_configuration_is_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="min_history <= window"):
        Guard(window=8, min_history=16)
