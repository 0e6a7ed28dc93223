"""Multi-process behaviour on gloo: DDP / FSDP2 / EP equal to one process, the hierarchical allreduce equal to a flat
one, SIGKILL and SIGSTOP drills under torchrun, and a checkpoint saved by 4 processes loaded by 2.

Process groups are started here with torch.multiprocessing (spawn) or torchrun, on fresh ports, with timeouts, and
every process is killed on the way out. Kept small: the tiny preset, 2-4 processes, one thread each."""

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from nanoseek import ModelConfig, Transformer
from nanoseek.hf import read_safetensors
from nanoseek.trainer import read_metrics

STDLIB = Path(os.__file__).parent
TINY = dict(vocab_size=64)
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is unavailable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(fn, world: int, *args, timeout: float = 150.0) -> None:
    """fn(rank, world, port, *args) in `world` spawned processes; fails (and kills them all) on error or timeout."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker_entry, args=(fn, rank, world, port, *args), daemon=True)
             for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.join(max(1.0, deadline - time.time()))
        codes = [p.exitcode for p in procs]
        assert all(c == 0 for c in codes), f"worker exit codes {codes} (None: still running after {timeout}s)"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)


def _worker_entry(fn, rank, world, port, *args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=__import__("datetime").timedelta(seconds=120))
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_name("tiny", **{**TINY, **overrides}))


def batch(rank, B=2, T=16, vocab=64):
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, vocab, (B, T + 1), generator=g)
    return x[:, :-1], x[:, 1:]


# ------------------------------------------------------------------------------------------------ 4 processes
def _job4(rank, world, out: Path):
    """Everything that needs 4 processes, in one process group (start-up is the expensive part on a small box)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    from nanoseek.dist import NodeGroups, Parallel, hierarchical_all_reduce_, hierarchical_hook, shard_experts
    from nanoseek.optim import build_optimizer

    res = {}
    # -- hierarchical allreduce, 2 simulated nodes x 2 ranks, against the flat one
    nodes = NodeGroups.build(2, world, rank)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(10_000, generator=g) * 10 ** rank
    flat = x.clone()
    dist.all_reduce(flat)
    hier = hierarchical_all_reduce_(x.clone(), nodes)
    res["hier_rel"] = rel(hier, flat)
    absum = x.abs()
    dist.all_reduce(absum)  # per element, relative to sum_r |x_r| (where the sum cancels, |flat| is no yardstick)
    res["hier_max_rel"] = float(((hier - flat).abs() / absum).max())
    # ... and as DDP's communication hook: one step's gradients against DDP's own allreduce
    inputs, targets = batch(rank)
    grads = []
    for hook in (False, True):
        model = tiny_model()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            ddp = DDP(model, broadcast_buffers=False)
        if hook:
            ddp.register_comm_hook(nodes, hierarchical_hook)
        ddp(inputs, targets=targets).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    res["ddp_hook_rel"] = rel(grads[1], grads[0])

    # -- expert parallelism on one MoE layer: forward and gradients against the whole MoE on all ranks' tokens
    full = tiny_model()
    moe_ref = full.layers[1].mlp
    xs = [torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(7 + r)) for r in range(world)]
    ws = [torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(70 + r)) for r in range(world)]
    x_ref = torch.cat(xs).requires_grad_()
    y_ref = moe_ref(x_ref)
    (y_ref * torch.cat(ws)).sum().backward()
    model = tiny_model()
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    shard_experts(model, mesh)
    moe = model.layers[1].mlp
    x_mine = xs[rank].clone().requires_grad_()
    y = moe(x_mine)
    (y * ws[rank]).sum().backward()
    n = moe.n_experts // world
    res["ep_out_rel"] = rel(y, y_ref[2 * rank:2 * rank + 2])
    res["ep_dx_rel"] = rel(x_mine.grad, x_ref.grad[2 * rank:2 * rank + 2])
    res["ep_dw_rel"] = max(rel(getattr(moe.experts, k).grad.to_local(),
                               getattr(moe_ref.experts, k).grad[rank * n:(rank + 1) * n])
                           for k in ("gate_up_proj", "down_proj"))
    gate_grad = moe.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)  # the gate is replicated: data parallelism sums its gradient
    res["ep_gate_rel"] = rel(gate_grad, moe_ref.gate.weight.grad)

    # -- the whole model with EP (4-way) and FSDP2 over the rest, through Parallel: loss and every gradient
    ref = tiny_model()
    all_inputs = torch.cat([batch(r)[0] for r in range(world)])
    all_targets = torch.cat([batch(r)[1] for r in range(world)])
    ref_loss = ref(all_inputs, targets=all_targets)
    ref_loss.backward()
    par = Parallel("fsdp", rank, world, rank, torch.device("cpu"), ep=world)
    model = tiny_model()
    par.wrap(model)
    loss = model(inputs, targets=targets)
    loss.backward()
    res["fsdp_ep_loss_rel"] = rel(par.mean_(loss.detach().clone()), ref_loss.detach())
    worst = 0.0
    ref_grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        worst = max(worst, rel(grad, ref_grads[name].grad))
    res["fsdp_ep_grad_rel"] = worst
    # one optimizer step, then a checkpoint from 4 processes for the 2-process job to load
    opt = build_optimizer(model, 1e-2)
    norm = par.clip_grad_norm_(model, 1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    res["clip_norm_rel"] = rel(norm, ref_norm)
    opt.step()
    ckpt = par.checkpoint_manager(out / "run", keep_last=2)
    ckpt.save_distributed(1, model, opt, config=model.config, state={"rank": rank, "rng": torch.get_rng_state()})
    ckpt.wait()
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        torch.save({k: v.clone() for k, v in state.items()}, out / "saved_full.pt")
        torch.save(opt.state_dict()["state"], out / "opt_rank0_local.pt")
    (out / f"res{rank}.json").write_text(json.dumps(res))


def _job2_load(rank, world, out: Path):
    """Loads the 4-process checkpoint on 2 processes (EP 2, FSDP 2) and checks the full state against the save."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    from nanoseek.dist import Parallel
    from nanoseek.optim import build_optimizer

    par = Parallel("fsdp", rank, world, rank, torch.device("cpu"), ep=world)
    model = tiny_model(seed=123)  # different weights: all of them must come from the checkpoint
    par.wrap(model)
    opt = build_optimizer(model, 1e-2)
    ckpt = par.checkpoint_manager(out / "run", keep_last=2)
    path = ckpt.latest()
    state = ckpt.load_distributed(path, model, opt, model.config)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    osd = get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        saved = torch.load(out / "saved_full.pt")
        res = {"path": path.name, "state_rank": state["rank"],
               "model_equal": all(torch.equal(saved[k], full[k]) for k in saved) and saved.keys() == full.keys(),
               "opt_steps": sorted({float(s["step"]) for s in osd["state"].values()}),
               "opt_nonzero": all(float(s["exp_avg_sq"].abs().sum()) > 0 for s in osd["state"].values())}
        hf = read_safetensors(path / "model")  # the HF folder written by rank 0 of the 4-process job
        res["hf_keys"] = len(hf)
        (out / "load2.json").write_text(json.dumps(res))


@pytest.fixture(scope="module")
def four_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("job4")
    run_workers(_job4, 4, out)
    return out, [json.loads((out / f"res{r}.json").read_text()) for r in range(4)]


def test_hierarchical_allreduce_equals_flat(four_process_results):
    _, res = four_process_results
    for r in res:
        assert r["hier_rel"] < 1e-6 and r["hier_max_rel"] < 1e-6, r  # a different order of sums, not bitwise
        assert r["ddp_hook_rel"] < 1e-6, r


def test_expert_parallel_matches_single_process_moe(four_process_results):
    _, res = four_process_results
    for r in res:
        assert r["ep_out_rel"] < 1e-6 and r["ep_dx_rel"] < 1e-6 and r["ep_dw_rel"] < 1e-6, r
        assert r["ep_gate_rel"] < 1e-6, r


def test_fsdp_with_expert_parallel_matches_single_process(four_process_results):
    _, res = four_process_results
    for r in res:
        assert r["fsdp_ep_loss_rel"] < 1e-6 and r["fsdp_ep_grad_rel"] < 1e-5, r
        assert r["clip_norm_rel"] < 1e-6, r


def test_checkpoint_saved_on_4_loads_on_2(four_process_results):
    out, _ = four_process_results
    run_workers(_job2_load, 2, out)
    res = json.loads((out / "load2.json").read_text())
    assert res["path"] == "step_000001" and res["state_rank"] == 0
    assert res["model_equal"] and res["opt_steps"] == [1.0] and res["opt_nonzero"]
    latest = out / "run" / "checkpoints" / "step_000001"
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["world_size"] == 4 and any(f.startswith("dcp/") for f in manifest["files"])
    assert all(f"rank_0000{r}.json" in manifest["files"] for r in range(4))
    model = Transformer.from_pretrained(latest / "model")  # the HF folder stays loadable
    assert model.config == ModelConfig.from_name("tiny", **TINY)


# ------------------------------------------------------------------------------------------------ routing
def test_node_limited_routing():
    from nanoseek.dist import node_limited_routing

    # V3's group-limited routing is node-limited routing with groups as nodes and K/M = 2: same experts chosen.
    model = tiny_model(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    gate = model.layers[1].mlp.gate
    gate.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(256, 64)
    _, idx_groups, _ = gate(x)
    plain = tiny_model(n_routed_experts=16, num_experts_per_tok=4, n_group=1, topk_group=1)
    pgate = plain.layers[1].mlp.gate
    pgate.load_state_dict(gate.state_dict())
    _, idx_free, _ = pgate(x)
    node_limited_routing(plain, nodes=4, max_nodes=2)
    w, idx_nodes, _ = pgate(x)
    assert torch.equal(idx_nodes.sort(-1).values, idx_groups.sort(-1).values)
    nodes_per_token = torch.tensor([len(set((row // 4).tolist())) for row in idx_nodes])
    free_nodes = torch.tensor([len(set((row // 4).tolist())) for row in idx_free])
    assert nodes_per_token.max() <= 2 and free_nodes.max() > 2  # the limit binds
    node_limited_routing(plain, nodes=2, max_nodes=1)
    _, idx_one, _ = pgate(x)
    assert all(len(set((row // 8).tolist())) == 1 for row in idx_one)
    with pytest.raises(ValueError, match="max_nodes"):
        node_limited_routing(plain, nodes=4, max_nodes=3)


# ------------------------------------------------------------------------------------------------ torchrun
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for name in ("bisect.py", "heapq.py", "string.py", "textwrap.py", "json/decoder.py", "json/encoder.py"):
        shutil.copy(STDLIB / name, d / name.replace("/", "_"))
    return d


STEPS = 6


def pretrain_args(run_dir, corpus_dir, batch_size, *extra):
    return ["-m", "nanoseek.cli", "pretrain", "--preset", "tiny", "--run-dir", str(run_dir), "--data",
            str(corpus_dir), "--vocab-size", "384", "--seq-len", "32", "--batch-size", str(batch_size), "--lr", "0.01",
            "--steps", str(STEPS), "--save-every", "2", "--eval-every", "0", "--no-progress", "--threads", "1", *extra]


def torchrun(nproc, args, env=None, timeout=240, restarts=0):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--max-restarts",
           str(restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", *args]
    out = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir, "pretrain") if "loss" in r]


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory, corpus_dir):
    """One process with batch 4, and 2 DDP processes with batch 2 each (the same global batch)."""
    base = tmp_path_factory.mktemp("runs")
    single = base / "single"
    subprocess.run([sys.executable, *pretrain_args(single, corpus_dir, 4)], check=True, timeout=240,
                   capture_output=True)
    ddp = base / "ddp"
    torchrun(2, pretrain_args(ddp, corpus_dir, 2, "--dp", "ddp"))
    return base, single, ddp


def final_weights(run_dir):
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return read_safetensors(run_dir / "checkpoints" / latest / "model")


def test_ddp_matches_single_process(reference_runs):
    _, single, ddp = reference_runs
    a, b = losses(single), losses(ddp)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa, wb = final_weights(single), final_weights(ddp)
    assert max(rel(wb[k], wa[k]) for k in wa) < 1e-4
    tokens = [r["tokens"] for r in read_metrics(ddp, "pretrain") if "loss" in r]
    assert tokens == [4 * 32] * STEPS  # global tokens, logged once by rank 0


def test_sigkill_rank_is_restarted_and_ends_bitwise_equal(reference_runs, corpus_dir):
    """Rank 1 is SIGKILLed after step 5 (first attempt only; rank 0 may be mid-way through the async save of step 4,
    which then fails and is not committed); torchrun restarts both ranks, which resume from the newest committed
    DCP checkpoint. DDP on gloo is deterministic (same reduction order every run), so the end is bitwise equal."""
    base, _, ddp = reference_runs
    run = base / "killed"
    env = {"NANOSEEK_FAULT_CRASH_AT_STEP": "5", "NANOSEEK_FAULT_RANK": "1"}
    out = torchrun(2, pretrain_args(run, corpus_dir, 2, "--dp", "ddp"), env=env, restarts=1)
    assert "exitcode: -9" in out.stderr
    assert "resuming from step 4" in out.stdout or "resuming from step 2" in out.stdout
    a, b = final_weights(ddp), final_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(run, "pretrain") if "loss" in r] == list(range(1, STEPS + 1))


def test_sigstop_rank_is_detected_and_fsdp_ep_run_restarts(reference_runs, corpus_dir):
    """Rank 1 freezes itself with SIGSTOP after step 5 (it cannot run its own watchdog); rank 0 blocks in the next
    collective, its watchdog exits 75, torchrun stops the group (SIGTERM, then SIGKILL for the frozen rank after
    its 30 s grace) and restarts it from the newest committed checkpoint. The run is FSDP2 + expert parallel: its losses
    match one process to fp32 tolerance, not bitwise: the sharded gradient reductions and the per-rank matmuls sum
    in another order than one process does (the DDP drill above is the bitwise one)."""
    base, single, _ = reference_runs
    run = base / "stopped"
    env = {"NANOSEEK_FAULT_STOP_AT_STEP": "5", "NANOSEEK_FAULT_RANK": "1"}
    out = torchrun(2, pretrain_args(run, corpus_dir, 2, "--dp", "fsdp", "--ep", "2", "--watchdog", "5"), env=env,
                   restarts=1, timeout=300)
    assert "watchdog: no training progress" in out.stderr
    assert "resuming from step 4" in out.stdout or "resuming from step 2" in out.stdout
    a, b = losses(single), losses(run)
    assert len(b) == STEPS and max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 1e-5, (a, b)
    wa, wb = final_weights(single), final_weights(run)
    assert max(rel(wb[k], wa[k]) for k in wa) < 1e-4
