"""Scale-out on torch.distributed: process groups, DDP / FSDP2, expert parallelism over all-to-all, a hierarchical
(HFReduce-style) allreduce, and sharded DCP checkpoints with the single-process manager's guarantees.

One process per device, launched by torchrun (`runs/multinode.sh`, `runs/slurm.sbatch`, `runs/8xh100.sh`):

    torchrun --nproc-per-node 2 -m nanoseek.cli pretrain --dp fsdp --run-dir runs_out/fsdp

Pieces, in the order a step meets them:
- `Parallel.setup()`: the process group (gloo on CPU, `cpu:gloo,cuda:nccl` on GPUs, so DCP's async save has a CPU
  backend), a second gloo group for checkpoint collectives (they run in a background thread, beside training's),
  the expert-parallel group and the node groups of the hierarchical allreduce.
- `Parallel.wrap(model)`: shards routed experts over the EP group (E / ep per rank, tokens moved by all-to-all),
  then DDP (with the hierarchical hook if asked) or FSDP2 (`fully_shard` per block, then the root).
- The trainer asks it to reduce the step's loss/metrics (one all-reduce), the MoE expert loads (summed across ranks
  before the bias update, V3 sec. 2.1.2) and the gradient norm (over every shard of every mesh).
- `DistCheckpointManager`: model + optimizer through DCP (sharded, re-shardable onto another number of processes),
  each rank's RNG/data state beside it, the HF-format model gathered on rank 0, a sha256 manifest written last,
  rename + `latest` by rank 0 after every rank has written.

Shape legend as in model.py: M tokens, k experts per token, A = M*k assignments, E experts, D hidden, F expert width.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import socket
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .checkpoint import (CheckpointError, CheckpointManager, _fsync_dir, _hash_and_fsync, _write_json_durable,
                         flatten_state, step_dir_name, unflatten_state, verify_checkpoint, FORMAT)
from .model import MoE, grouped_mm

DP_MODES = ("ddp", "fsdp")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------- hierarchical
@dataclass
class NodeGroups:
    """Ranks split into nodes of `node_size` consecutive ranks (torchrun numbers ranks node by node). `intra` holds
    this rank's node, `leaders` the first rank of every node (None on non-leaders)."""

    node_size: int
    intra: Any
    leaders: Any
    leader_rank: int  # global rank of this node's leader
    world_size: int

    @classmethod
    def build(cls, node_size: int, world_size: int, rank: int, backend: str | None = None) -> "NodeGroups":
        if node_size < 1 or world_size % node_size:
            raise ValueError(f"node size {node_size} must divide the world size {world_size}")
        intra = None
        for start in range(0, world_size, node_size):  # every rank creates every group, in the same order
            g = dist.new_group(list(range(start, start + node_size)), backend=backend)
            if start <= rank < start + node_size:
                intra = g
        leaders = dist.new_group(list(range(0, world_size, node_size)), backend=backend)
        is_leader = rank % node_size == 0
        return cls(node_size, intra, leaders if is_leader else None, rank - rank % node_size, world_size)


def hierarchical_all_reduce_(t: Tensor, groups: NodeGroups) -> Tensor:
    """Sum `t` over all ranks in three hops (HFReduce, Fire-Flyer AI-HPC sec. 6): reduce inside the node onto its
    leader, allreduce among node leaders (the only traffic between nodes: one copy per node instead of one per
    rank), broadcast inside the node. Same sum as a flat allreduce up to the order of the additions."""
    if groups.node_size > 1:
        dist.reduce(t, dst=groups.leader_rank, group=groups.intra)
    if groups.leaders is not None and groups.world_size > groups.node_size:
        dist.all_reduce(t, group=groups.leaders)
    if groups.node_size > 1:
        dist.broadcast(t, src=groups.leader_rank, group=groups.intra)
    return t


def hierarchical_hook(groups, bucket):  # no annotations: DDP compares them to the real classes, not strings
    """DDP communication hook: the bucket averaged with the hierarchical allreduce instead of DDP's flat one.
    The three hops are issued in order from the hook; on NCCL they only enqueue kernels, on gloo they block."""
    t = bucket.buffer()
    hierarchical_all_reduce_(t, groups).div_(groups.world_size)
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(t)
    return fut


# --------------------------------------------------------------------------------------------------- expert parallel
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits that autograd can go through: the backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        g = grad.new_empty((sum(in_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(g, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return g, None, None, None


def all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _local(t: Tensor) -> Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class ExpertParallel:
    """MoE's routed experts sharded over an expert-parallel group: rank r holds experts [r*E/ep, (r+1)*E/ep).
    Installed on MoE.expert_parallel by `shard_experts`; MoE.forward calls it instead of its local grouped matmul.

    Dispatch: assignments sorted by expert are already grouped by destination rank; the per-expert counts go first
    (one small all-to-all) so every rank knows how many rows it receives (uneven splits, no capacity, no token
    dropped, V3 sec. 2.1.2), then the rows. The received rows are regrouped by local expert, run through one grouped
    matmul, put back in arrival order and returned by the reverse all-to-all. Gradients go through both exchanges."""

    def __init__(self, group, ep_size: int, ep_rank: int):
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank

    def __call__(self, experts: nn.Module, x_MD: Tensor, idx_Mk: Tensor, counts_E: Tensor) -> Tensor:
        """Expert outputs y_AD for the assignments in the order of idx_Mk.flatten()."""
        E, ep, k = counts_E.numel(), self.ep_size, idx_Mk.shape[1]
        E_local = E // ep
        order_A = idx_Mk.flatten().argsort(stable=True)
        x_AD = x_MD[order_A // k]
        recv_counts = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts, counts_E, group=self.group)  # [source rank, my local expert]
        recv_SE = recv_counts.view(ep, E_local)
        send_splits = counts_E.view(ep, E_local).sum(1).tolist()  # the one host sync: split sizes must be known
        recv_splits = recv_SE.sum(1).tolist()
        x_RD = all_to_all(x_AD, recv_splits, send_splits, self.group)
        # Rows arrive by source rank, then by expert; the grouped matmul wants them by local expert.
        expert_R = torch.arange(E_local, device=x_RD.device).repeat(ep).repeat_interleave(recv_SE.flatten())
        perm_R = expert_R.argsort(stable=True)
        offsets = recv_SE.sum(0).cumsum(0).to(torch.int32)
        w_gate_up, w_down = _local(experts.gate_up_proj), _local(experts.down_proj)
        if hasattr(experts, "ffn"):  # FP8 experts (nanoseek/fp8.py)
            y_RD = experts.ffn(x_RD[perm_R], offsets, w_gate_up, w_down)
        else:
            gate_RF, up_RF = grouped_mm(x_RD[perm_R], w_gate_up.transpose(1, 2), offsets).chunk(2, dim=-1)
            y_RD = grouped_mm(torch.nn.functional.silu(gate_RF) * up_RF, w_down.transpose(1, 2), offsets)
        y_RD = torch.empty_like(y_RD).index_copy_(0, perm_R, y_RD)  # back to arrival order
        y_AD = all_to_all(y_RD, send_splits, recv_splits, self.group)
        return torch.empty_like(y_AD).index_copy_(0, order_A, y_AD)


def shard_experts(model: nn.Module, mesh) -> list[nn.Parameter]:
    """Keeps only this rank's slice of every MoE's stacked experts, as DTensors Shard(0) on the 1-D EP `mesh` (so
    DCP saves and re-shards them and the full-state gather rebuilds all experts). Returns the expert parameters,
    which data parallelism must leave alone (their gradients are already complete: every token that chose a local
    expert was sent here)."""
    from torch.distributed.tensor import DTensor, Shard

    ep, r = mesh.size(), mesh.get_local_rank()
    out = []
    for moe in model.moe_layers():
        E = moe.n_experts
        if E % ep:
            raise ValueError(f"--ep {ep} must divide the number of routed experts ({E})")
        n = E // ep
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(moe.experts, name)
            local = full.detach()[r * n:(r + 1) * n].clone()
            p = nn.Parameter(DTensor.from_local(local, mesh, [Shard(0)], run_check=False))
            setattr(moe.experts, name, p)
            out.append(p)
        moe.expert_parallel = ExpertParallel(mesh.get_group(), ep, r)
    return out


def node_limited_routing(model: nn.Module, nodes: int, max_nodes: int) -> None:
    """Turns on node-limited routing in every gate (V3 sec. 2.1.2): the E experts lie on `nodes` nodes in equal
    consecutive slices (as shard_experts places them when nodes divide the EP group) and each token goes to at most
    `max_nodes` of them, ranked by the sum of their K/M highest biased scores, so a token's all-to-all traffic
    crosses at most M nodes. V3 (K=8, M=4, 8 nodes) is the same rule as its group-limited routing (n_group=8,
    topk_group=4, top-2 sums), which is how the released model expresses it; off by default (HF parity)."""
    for moe in model.moe_layers():
        g, E, k = moe.gate, moe.n_experts, moe.top_k
        if nodes < 1 or E % nodes:
            raise ValueError(f"nodes ({nodes}) must divide the number of routed experts ({E})")
        if not 1 <= max_nodes <= nodes or k % max_nodes or k // max_nodes > E // nodes:
            raise ValueError(f"max_nodes ({max_nodes}) must be in [1, nodes={nodes}], divide experts per token ({k}), "
                             f"and K/M ({k // max(max_nodes, 1)}) must not exceed experts per node ({E // nodes})")
        g.node_limit = (nodes, max_nodes)


# --------------------------------------------------------------------------------------------------- the job
class Parallel:
    """This process's view of a multi-process job: ranks, groups, how the model is wrapped, and the reductions the
    trainer needs. Build with `Parallel.setup(...)` (reads torchrun's environment), then `wrap(model)` before the
    optimizer is built."""

    def __init__(self, dp: str, rank: int, world_size: int, local_rank: int, device: torch.device, *,
                 ep: int = 1, node_size: int | None = None, hierarchical: bool = False):
        if dp not in DP_MODES:
            raise ValueError(f"--dp must be one of {DP_MODES}, got {dp!r}")
        self.dp, self.rank, self.world_size, self.local_rank, self.device = dp, rank, world_size, local_rank, device
        self.ep, self.hierarchical = ep, hierarchical
        self.node_size = node_size or int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        self.forward_model: nn.Module | None = None
        self.expert_params: list[nn.Parameter] = []
        # Checkpoint collectives run in DCP's background thread: they get their own gloo group.
        self.ckpt_group = dist.new_group(backend="gloo")
        self.nodes = NodeGroups.build(self.node_size, world_size, rank) if hierarchical else None
        self.ep_mesh = None
        if ep > 1:
            if world_size % ep:
                raise ValueError(f"--ep {ep} must divide the number of processes {world_size}")
            if ep != world_size:
                raise ValueError(f"--ep {ep} < world size {world_size} (experts replicated over several EP groups) "
                                 f"is not supported yet; use --ep {world_size}")
            if dp != "fsdp":
                raise ValueError("expert parallelism composes with --dp fsdp (DDP cannot skip the sharded experts)")
            from torch.distributed.device_mesh import init_device_mesh

            self.ep_mesh = init_device_mesh(device.type, (ep,), mesh_dim_names=("ep",))

    @classmethod
    def setup(cls, dp: str = "ddp", *, ep: int = 1, node_size: int | None = None, hierarchical: bool = False,
              timeout_s: float = 600.0) -> "Parallel":
        """Joins the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR/PORT); a plain `python` run becomes a
        one-process job. `timeout_s` bounds every collective: a rank that never arrives fails the others."""
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()))
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
            backend = "cpu:gloo,cuda:nccl"
        else:
            device, backend = torch.device("cpu"), "gloo"
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=timeout_s)
            restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
            if restart is None:
                dist.init_process_group(backend, timeout=timeout)
            else:
                # torchrun keeps one TCP store for all restarts of the worker group (shared with its rendezvous):
                # without a per-attempt prefix a restarted rank reads the dead ranks' gloo addresses and fails
                # with "connectFullMesh ... Connection refused".
                agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
                store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                      is_master=rank == 0 and not agent_store, timeout=timeout)
                dist.init_process_group(backend, store=dist.PrefixStore(f"nanoseek/attempt_{restart}", store),
                                        rank=rank, world_size=world, timeout=timeout)
        return cls(dp, rank, world, local_rank, device, ep=ep, node_size=node_size, hierarchical=hierarchical)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier(group=self.ckpt_group)

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---------------------------------------------------------------------------------------------- wrapping
    def wrap(self, model: nn.Module) -> nn.Module:
        """Applies EP, then DDP or FSDP2. Returns the module to call forward on (the DDP wrapper, or `model` itself,
        which fully_shard changes in place); build the optimizer on `model.parameters()` afterwards."""
        model.to(self.device)
        if self.ep_mesh is not None:
            self.expert_params = shard_experts(model, self.ep_mesh)
            # The data-parallel loss is the mean of the ranks' losses (DDP/FSDP average the other gradients); an
            # expert's gradient arrives summed over every rank's tokens through the all-to-all backward.
            for p in self.expert_params:
                p.register_hook(lambda g: g / self.world_size)
        if self.dp == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            # broadcast_buffers=False: expert_load counts are per rank until reduced, and the routing bias is
            # updated identically everywhere from the reduced loads.
            with warnings.catch_warnings():  # its deprecation note itself says to keep it for rank-local buffers
                warnings.simplefilter("ignore", FutureWarning)
                ddp = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                          broadcast_buffers=False)
            if self.nodes is not None:
                ddp.register_comm_hook(self.nodes, hierarchical_hook)
            self.forward_model = ddp
        else:
            from torch.distributed.fsdp import fully_shard

            ignored = set(self.expert_params) or None
            # One FSDP unit per decoder block (main stack and MTP); the MTP module's own norms/projection and
            # shared head stay with the root, since the loss calls them outside the block's forward.
            blocks = list(model.layers) + [m.block for m in getattr(model, "mtp", [])]
            for block in blocks:
                fully_shard(block, ignored_params=ignored)
            fully_shard(model, ignored_params=ignored)
            self.forward_model = model
        return self.forward_model

    def grad_sync(self, sync: bool):
        """Context for one micro-batch: gradients are reduced only on the last one of a step."""
        m = self.forward_model
        if self.dp == "ddp":
            return contextlib.nullcontext() if sync else m.no_sync()
        m.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    # ---------------------------------------------------------------------------------------------- reductions
    def mean_(self, values: Tensor) -> Tensor:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values.div_(self.world_size)

    def reduce_expert_loads(self, model: nn.Module) -> None:
        """Sum every MoE layer's expert_load over ranks (one all-reduce), so the bias update sees the step's loads
        across the whole job (V3 sec. 2.1.2) and every rank moves the bias identically."""
        moes = model.moe_layers()
        if not moes:
            return
        loads = torch.stack([m.expert_load for m in moes])
        dist.all_reduce(loads)
        for m, load in zip(moes, loads):
            m.expert_load.copy_(load)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Global L2 norm over all gradients, clipped to max_norm; works for plain tensors (DDP: already reduced,
        identical on every rank) and DTensors on any mesh (FSDP shards, EP shards: squares summed per mesh)."""
        from torch.distributed.tensor import DTensor

        plain = torch.zeros((), device=self.device, dtype=torch.float32)
        per_mesh: dict[Any, Tensor] = {}
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        for g in grads:
            if isinstance(g, DTensor):
                sq = g.to_local().float().pow(2).sum()
                if all(pl.is_replicate() for pl in g.placements):
                    plain += sq
                else:
                    per_mesh[g.device_mesh] = per_mesh.get(g.device_mesh, 0) + sq
            else:
                plain += g.float().pow(2).sum()
        total = plain
        for mesh, sq in per_mesh.items():
            dist.all_reduce(sq, group=mesh.get_group())
            total = total + sq
        norm = total.sqrt()
        if max_norm > 0:
            coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for g in grads:
                _local(g).mul_(coef.to(g.dtype))
        return norm

    def checkpoint_manager(self, run_dir, keep_last: int | None = 3, async_save: bool = True):
        return DistCheckpointManager(run_dir, self, keep_last=keep_last, async_save=async_save)


def unwrap(model: nn.Module) -> nn.Module:
    """The Transformer inside a DDP wrapper (FSDP2 changes the module in place; there is nothing to unwrap)."""
    return getattr(model, "module", model)


# --------------------------------------------------------------------------------------------------- checkpoints
class DistCheckpointManager(CheckpointManager):
    """Sharded checkpoints with the guarantees of CheckpointManager (same folder layout, `latest`, manifest,
    keep_last, fallback past damaged checkpoints):

        step_000500/
            dcp/                  model + optimizer through torch.distributed.checkpoint (shards + .metadata)
            model/                HF format, the full state gathered on rank 0 (Transformer.from_pretrained loads it)
            rank_00000.json/.safetensors, ...   each rank's RNG state, data position, guard, step (flatten_state)
            manifest.json         written last by rank 0: sha256 of every file above

    save(): every rank writes into `.tmp_step_N_<rank 0 pid>/`; DCP's save runs in a background thread on its own
    gloo group (dcp.async_save: the state is staged into CPU copies first, which is all the loop waits for, plus
    the HF gather). When DCP's final collective returns on rank 0 every rank has written; rank 0 then writes the
    HF folder and the manifest, renames the folder and replaces `latest`. A crash at any point leaves the
    previous `latest` intact. DCP re-shards on load, so a checkpoint saved by 4 processes loads on 2."""

    def __init__(self, run_dir, parallel: Parallel, *, keep_last: int | None = 3, async_save: bool = True):
        self.parallel = parallel
        super().__init__(run_dir, keep_last=keep_last, async_save=async_save)
        pid = [os.getpid()]
        dist.broadcast_object_list(pid, src=0, group=parallel.ckpt_group)
        self.pid0 = pid[0]
        self._future = None
        parallel.barrier()

    def _remove_stale(self) -> None:
        if self.parallel.is_main:  # only rank 0 owns the folder structure
            super()._remove_stale()

    def _prune(self) -> None:
        if self.parallel.is_main:
            super()._prune()

    # -- writing ---------------------------------------------------------------------------------------
    def save_distributed(self, step: int, model: nn.Module, optimizer, *, config, state: dict,
                         blocking: bool = False) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

        t0 = time.perf_counter()
        self.wait()
        p = self.parallel
        name = step_dir_name(step)
        tmp = self.dir / f".tmp_{name}_{self.pid0}"
        if p.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        p.barrier()
        tensors, meta = flatten_state(state)
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().clone() for k, v in tensors.items()}, tmp / f"rank_{p.rank:05d}.safetensors")
        (tmp / f"rank_{p.rank:05d}.json").write_text(json.dumps({"format": FORMAT, "step": step, "state": meta}))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        full = {k: v.detach().clone() for k, v in full.items()} if p.is_main else None  # a snapshot, not live views
        msd, osd = get_state_dict(model, optimizer)
        future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=str(tmp / "dcp"),
                                process_group=p.ckpt_group)
        args = (step, future, tmp, full, config)
        if blocking or not self.async_save:
            self._commit_in_thread(*args)
            self.last_blocking_s = time.perf_counter() - t0
            self.wait()
            return
        self._thread = threading.Thread(target=self._commit_in_thread, args=args, name=f"checkpoint-{step}")
        self._thread.start()
        self.last_blocking_s = time.perf_counter() - t0

    def _commit_in_thread(self, step, future, tmp: Path, full, config) -> None:
        try:
            future.result()  # DCP's finish step gathered every rank's write results: all shards are on disk
            if self.parallel.is_main:
                self._commit(step, tmp, full, config)
        except BaseException as e:
            self._error, self._error_step = e, step

    def _commit(self, step: int, tmp: Path, full: dict, config) -> None:
        from .hf import save_hf

        name = step_dir_name(step)
        final, trash = self.dir / name, self.dir / f".trash_{name}_{os.getpid()}"
        try:
            save_hf(tmp / "model", config, full)
            files = {}
            for file in sorted(q for q in tmp.rglob("*") if q.is_file()):
                files[file.relative_to(tmp).as_posix()] = _hash_and_fsync(file)
            _write_json_durable(tmp / "manifest.json", {"format": FORMAT, "step": step, "files": files,
                                                        "world_size": self.parallel.world_size})
            for d in sorted((q for q in tmp.rglob("*") if q.is_dir()), reverse=True):
                _fsync_dir(d)
            _fsync_dir(tmp)
            if final.exists():
                os.rename(final, trash)
            os.rename(tmp, final)
            _fsync_dir(self.dir)
            self._write_latest(name)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if trash.exists() and not final.exists():
                os.rename(trash, final)
            raise
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        self._prune()

    # -- reading ---------------------------------------------------------------------------------------
    def latest(self) -> Path | None:
        """Rank 0 verifies (sha256) and every rank gets its answer, so all ranks load the same step."""
        name = [None]
        if self.parallel.is_main:
            path = super().latest()
            name[0] = path.name if path is not None else None
        dist.broadcast_object_list(name, src=0, group=self.parallel.ckpt_group)
        return None if name[0] is None else self.dir / name[0]

    def load_distributed(self, path: Path, model: nn.Module, optimizer, config) -> dict:
        """Loads model + optimizer in place (re-sharded to this job's layout) and returns this rank's trainer state
        (rank r's own file when the checkpoint has one, else rank 0's: a different world size resumes the data
        position and step exactly, the RNG streams of the extra ranks start from rank 0's)."""
        import torch.distributed.checkpoint as dcp
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        from .config import ModelConfig

        path = Path(path)
        if not (path / "dcp").is_dir():
            raise CheckpointError(f"{path} is not a distributed checkpoint (no dcp/); it was written by a "
                                  f"single-process run: resume it without --dp, or start a new --run-dir")
        saved = ModelConfig.load(path / "model")
        if saved != config:
            from .trainer import RunDirError

            raise RunDirError(f"the checkpoint in {path} is for another model config; resume with the options it "
                              f"was started with, or use a new --run-dir")
        msd, osd = get_state_dict(model, optimizer)
        sd = {"model": msd, "optim": osd}
        dcp.load(sd, checkpoint_id=str(path / "dcp"), process_group=self.parallel.ckpt_group)
        set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
        own = path / f"rank_{self.parallel.rank:05d}.json"
        if not own.exists():
            own = path / "rank_00000.json"
        doc = json.loads(own.read_text())
        return unflatten_state(load_file(own.with_suffix(".safetensors")), doc["state"])

