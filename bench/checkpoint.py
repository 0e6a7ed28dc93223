"""What a checkpoint costs the training loop: async vs synchronous save, load, checksums.

    python bench/checkpoint.py                 # ~20M and ~200M parameters (+ 2 AdamW moments each)
    python bench/checkpoint.py --sizes 20      # only the small one

The model is written by the stand-in writer (`save_plain_model`: one safetensors file + meta.json), not by
nanoseek.hf, so this measures the checkpoint machinery independent of the model code. State = parameters
+ exp_avg + exp_avg_sq in fp32 (3x params), plus RNG states and a few counters, as a trainer saves it.

Target (TRANSOM, torchtitan): the blocking part of an async save <= 10% of a synchronous save.
"""

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nanoseek.checkpoint import (  # noqa: E402
    CheckpointManager,
    capture_rng_state,
    load_plain_model,
    save_plain_model,
    verify_checkpoint,
)


def make_state(num_params: int):
    # Transformer-like mix of shapes: square projections and a few wide ones, 1M to 16M elements each.
    shapes, total, i = [], 0, 0
    while total < num_params:
        shape = (1024, 1024) if i % 4 else (4096, 1024)
        shapes.append(shape)
        total += shape[0] * shape[1]
        i += 1
    g = torch.Generator().manual_seed(0)
    model = {f"layers.{i}.weight": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    optim = {f"state.{k}.{m}": torch.randn(v.shape, generator=g).abs() for k, v in model.items()
             for m in ("exp_avg", "exp_avg_sq")}
    state = {"optimizer": optim, "rng": capture_rng_state(), "data": {"position": 12345}, "step": 1}
    return model, state, total


def best_of(n, fn):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def train_like_work(seconds_hint: float) -> float:
    """Matmul loop standing in for training compute; returns its throughput (iterations per second)."""
    a = torch.randn(512, 512)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds_hint:
        a = torch.tanh(a @ a * 1e-3)
        n += 1
    return n / (time.perf_counter() - t0)


def bench(num_params_m: int, root: Path, repeats: int) -> dict:
    model, state, total = make_state(num_params_m * 1_000_000)
    nbytes = 3 * total * 4
    run = root / f"run_{num_params_m}m"
    kw = dict(keep_last=1, save_model=save_plain_model, load_model=load_plain_model)
    mgr = CheckpointManager(run, **kw)
    step = iter(range(1, 1000))

    def sync_save():
        mgr.save(next(step), model_state=model, model_meta={"n": total}, state=state, blocking=True)

    def async_save():
        mgr.save(next(step), model_state=model, model_meta={"n": total}, state=state)
        blocking = mgr.last_blocking_s
        mgr.wait()
        return blocking

    sync_s = best_of(repeats, sync_save)
    async_blocking = min(async_save() for _ in range(repeats))  # buffers warm after the first save
    async_total = best_of(repeats, async_save)
    # First save ever (buffers allocated on the spot) and without buffer reuse (a fresh clone each time).
    cold = CheckpointManager(root / f"cold_{num_params_m}m", **kw)
    cold.save(1, model_state=model, model_meta={}, state=state)
    cold_blocking = cold.last_blocking_s
    cold.wait()
    noreuse = CheckpointManager(root / f"noreuse_{num_params_m}m", reuse_buffers=False, **kw)
    noreuse_blocking = []
    for s in range(2, 2 + repeats):
        noreuse.save(s, model_state=model, model_meta={}, state=state)
        noreuse_blocking.append(noreuse.last_blocking_s)
        noreuse.wait()
    shutil.rmtree(root / f"cold_{num_params_m}m")
    shutil.rmtree(root / f"noreuse_{num_params_m}m")

    path = mgr.latest()
    verify_s = best_of(repeats, lambda: verify_checkpoint(path))  # sha256 of every file (page cache hot)
    load_s = best_of(repeats, lambda: mgr.load(path))  # verify + read

    # Interference: training-like compute while the writer thread runs vs alone (2 cores here).
    alone = train_like_work(1.0)
    mgr.save(next(step), model_state=model, model_meta={}, state=state)
    t0 = time.perf_counter()
    during = train_like_work(1.0)
    mgr.wait()
    shutil.rmtree(run)
    return dict(params_m=total / 1e6, gb=nbytes / 1e9, sync=sync_s, async_blocking=async_blocking,
                cold_blocking=cold_blocking, noreuse_blocking=min(noreuse_blocking), async_total=async_total,
                verify=verify_s, load=load_s, slowdown=1 - during / alone)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[20, 200], help="parameter counts, in millions")
    p.add_argument("--repeats", type=int, default=3, help="saves per measurement (best is reported)")
    p.add_argument("--dir", default=None, help="where to write (default: a temp dir; needs ~3x 12 B/param)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="nanoseek_ckpt_bench_", dir=args.dir))
    try:
        rows = [bench(n, root, args.repeats) for n in args.sizes]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, threads {torch.get_num_threads()}; "
          "model written by the stand-in safetensors writer (not nanoseek.hf)")
    print(f"{'params':>8} {'GB':>5} {'sync save':>10} {'async blk':>10} {'ratio':>6} {'1st async':>10} "
          f"{'no reuse':>9} {'async tot':>10} {'sha256':>7} {'sha %':>6} {'load':>7} {'slowdown':>8}")
    for r in rows:
        print(f"{r['params_m']:>7.0f}M {r['gb']:>5.2f} {r['sync']:>9.2f}s {r['async_blocking']:>9.3f}s "
              f"{r['async_blocking'] / r['sync']:>6.1%} {r['cold_blocking']:>9.3f}s {r['noreuse_blocking']:>8.3f}s "
              f"{r['async_total']:>9.2f}s {r['verify']:>6.2f}s {r['verify'] / r['sync']:>6.1%} "
              f"{r['load']:>6.2f}s {r['slowdown']:>8.1%}")
    print("sync save = snapshot + write + sha256 + fsync + rename; async blk = what save() blocks the loop for "
          "(warm buffers); 1st async = first save, buffers allocated; no reuse = fresh clone every save;\n"
          "sha256 = verifying every file (page cache hot), share of sync save; load = verify + read; "
          "slowdown = matmul throughput lost while the writer thread runs.")


if __name__ == "__main__":
    main()
