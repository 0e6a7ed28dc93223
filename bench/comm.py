"""Collective costs: allreduce bus bandwidth, flat vs hierarchical (HFReduce-style, nanoseek.dist), and the MoE
all-to-all dispatch (uneven splits, counts exchanged first), on gloo here or NCCL under torchrun on GPUs.

    python bench/comm.py                          # 4 CPU processes as 2 simulated nodes x 2, sizes 1..64 MB
    python bench/comm.py --max-mb 256 --reps 3    # the full 1-256 MB sweep (slow on a small box)
    torchrun --nproc-per-node 8 bench/comm.py --node-size 8    # on a GPU node (NCCL)

Bus bandwidth is NCCL's convention for allreduce: bytes * 2 (n - 1) / n / time, comparable across process counts.

What one machine can and cannot show: every "node" here shares one memory system and the same loopback TCP
stack, so the hierarchical allreduce only adds hops (reduce + allreduce + broadcast, three latencies and one more
copy of the data through the leaders); it is expected to be slower than the flat one, as REFERENCE.md notes for
HFReduce on a single machine. Its point, one copy per node crossing the slow inter-node links instead of one per
rank, needs real nodes with a real network. The numbers below check that it works and what it costs in latency,
not that it wins; the all-to-all times likewise measure the software path (split exchange, host sync, copies),
not NVLink/InfiniBand.
"""

import argparse
import datetime
import os
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.dist import NodeGroups, all_to_all, hierarchical_all_reduce_  # noqa: E402


def timed(fn, reps: int, device) -> float:
    fn()  # warm-up (connections, buffers)
    dist.barrier()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    slowest = torch.tensor([min(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a collective is as fast as its slowest rank
    return float(slowest)


def run(rank: int, world: int, args, device) -> None:
    nodes = NodeGroups.build(args.node_size, world, rank)
    sizes_mb = [s for s in (1, 4, 16, 64, 256) if s <= args.max_mb]
    if rank == 0:
        print(f"{world} processes ({world // args.node_size} nodes x {args.node_size}), {dist.get_backend()}, "
              f"{device.type}; best of {args.reps}")
        print(f"{'MB':>6} {'flat ms':>9} {'flat GB/s':>10} {'hier ms':>9} {'hier GB/s':>10} {'hier/flat':>9}")
    for mb in sizes_mb:
        x = torch.randn(mb * (1 << 20) // 4, device=device)
        busbytes = x.numel() * 4 * 2 * (world - 1) / world
        flat = timed(lambda: dist.all_reduce(x), args.reps, device)
        hier = timed(lambda: hierarchical_all_reduce_(x, nodes), args.reps, device)
        if rank == 0:
            print(f"{mb:>6} {flat * 1e3:>9.2f} {busbytes / flat / 1e9:>10.2f} {hier * 1e3:>9.2f} "
                  f"{busbytes / hier / 1e9:>10.2f} {hier / flat:>9.2f}")
        del x
    # MoE dispatch: each rank sends `tokens * k` rows of `hidden` to the ranks owning the chosen experts, with
    # uneven splits drawn like a router's (counts exchanged first, then rows, then the reverse for the combine).
    g = torch.Generator().manual_seed(rank)
    if rank == 0:
        print(f"\nall-to-all dispatch + combine, hidden {args.hidden}, k {args.top_k}, bf16 rows")
        print(f"{'tokens/rank':>12} {'MB/rank':>8} {'ms':>9} {'GB/s/rank':>10}")
    for tokens in (1024, 4096, 16384):
        weights = torch.rand(world, generator=g) + 0.5
        counts = torch.multinomial(weights, tokens * args.top_k, replacement=True, generator=g).bincount(
            minlength=world).to(device)
        rows = torch.randn(int(counts.sum()), args.hidden, device=device, dtype=torch.bfloat16)

        def dispatch_combine():
            recv = torch.empty_like(counts)
            dist.all_to_all_single(recv, counts)
            send_splits, recv_splits = counts.tolist(), recv.tolist()
            y = all_to_all(rows, recv_splits, send_splits, None)
            all_to_all(y, send_splits, recv_splits, None)

        t = timed(dispatch_combine, args.reps, device)
        mbytes = rows.numel() * 2 * 2 / 1e6  # out and back
        if rank == 0:
            print(f"{tokens:>12} {mbytes:>8.1f} {t * 1e3:>9.2f} {mbytes / 1e3 / t:>10.2f}")


def _spawned(rank, world, port, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    try:
        run(rank, world, args, torch.device("cpu"))
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=4, help="processes to spawn when not under torchrun (default 4)")
    p.add_argument("--node-size", type=int, default=2, help="ranks per (simulated) node (default 2)")
    p.add_argument("--max-mb", type=int, default=64, help="largest allreduce, MB (sizes 1, 4, 16, 64, 256)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=1024, help="row width of the all-to-all (V3: 7168)")
    p.add_argument("--top-k", type=int, default=8)
    args = p.parse_args()
    if "RANK" in os.environ:  # under torchrun
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if torch.cuda.is_available() else \
            torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            run(dist.get_rank(), dist.get_world_size(), args, device)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_spawned, args=(args.procs, port, args), nprocs=args.procs, start_method="spawn")


if __name__ == "__main__":
    main()
