"""Multimodal preprocessing benchmark: torchvision with sized threads vs PIL vs threads unset.

Acceptance: requests/s of the worker's preprocessing path (base64 decode,
torchvision decode, Qwen2-VL image processor, pixel_values back to the
caller; 2 pool processes, thread sizing on) ÷ the PIL path in the same run
≥ 3.0. The same torchvision path with threads left unset is the third
configuration: each process then runs as many OpenMP threads as the host
has cores.

Every configuration is the real :class:`workers.preprocess.ImagePreprocessor`
driven through its async API by ``max_inflight`` closed-loop clients (one
request running and one queued per pool process), one 1024×768 JPEG per
request. The three pools are started once and measured in interleaved
rounds (the order rotates each round) so that load from elsewhere on the
machine hits all of them alike; a configuration's figure is the median of
its rounds. CPU time per request is read from /proc for the pool processes
and from getrusage for this process (which receives the pixel_values).

    python -m bench.multimodal [--rounds 5 --seconds 3 --pool-size 2]
                               [--transport shm|pipe] [--malloc-tuning on|off]

``--transport pipe`` pickles pixel_values back through the result pipe
instead of shared memory, ``--malloc-tuning off`` leaves glibc's allocator
defaults in the pool processes (see ``workers.preprocess._tune_malloc``;
the ``faults`` column shows what that costs); both apply to every
configuration alike.

The last line of stdout is one JSON object with the figures.

This module must not import torch at the top: spawned pool processes
re-import the main module, and torch must load only after their
initializer has set the thread environment.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from workers.cpus import available_cpus
from workers.preprocess import ImagePreprocessor, PixelDtype, PreprocessConfig

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def synthetic_jpeg(width: int = 1024, height: int = 768, quality: int = 90, seed: int = 0) -> bytes:
    """A photo-like JPEG made locally: smooth gradients, soft blobs, hard edges, sensor noise."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([90 + 100 * x / width, 70 + 120 * y / height,
                    160 - 80 * (x + y) / (width + height)], axis=-1)
    for _ in range(12):  # soft blobs of colour (objects, out-of-focus background)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(30, 220)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        img += blob * rng.uniform(-90, 90, 3).astype(np.float32)
    for _ in range(8):  # hard-edged rectangles (buildings, text boxes)
        x0, y0 = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 80))
        x1, y1 = x0 + int(rng.integers(40, 300)), y0 + int(rng.integers(40, 200))
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * 0.5 + rng.uniform(0, 255, 3) * 0.5
    img += rng.normal(0, 6, img.shape)  # sensor noise and fine texture
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _proc_cpu_s(pids: Sequence[int]) -> tuple[float, int]:
    """(utime + stime, minor page faults) of live processes, from /proc; a vanished one counts 0.

    Page faults are the allocator's signature: glibc returning large freed
    buffers to the OS and faulting them in again on the next request.
    """
    total, faults = 0, 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        faults += int(fields[7])  # minflt (field 10)
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / _CLK_TCK, faults


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _host_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq) / _CLK_TCK, steal / _CLK_TCK


@dataclass
class RunStats:
    rps: list[float] = field(default_factory=list)
    pool_cpu_ms: list[float] = field(default_factory=list)  # per request
    parent_cpu_ms: list[float] = field(default_factory=list)  # per request
    worker_ms: list[float] = field(default_factory=list)  # decode + process, in the pool
    faults: list[float] = field(default_factory=list)  # pool minor page faults per request
    # CPUs' worth of work by other processes on the machine while this ran:
    # the noise indicator (the machine is shared).
    other_cores: list[float] = field(default_factory=list)

    @property
    def median_rps(self) -> float:
        return statistics.median(self.rps)


async def measure(pre: ImagePreprocessor, image_b64: str, seconds: float, concurrency: int,
                  stats: RunStats) -> None:
    pids = [w.pid for w in pre.workers]
    done = 0
    worker_s = 0.0
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done, worker_s
        while time.perf_counter() < deadline:
            result = await pre.process([image_b64])
            done += 1
            worker_s += result.decode_s + result.process_s

    (busy0, steal0), (cpu0, flt0), self0 = _host_busy_s(), _proc_cpu_s(pids), _self_cpu_s()
    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    (busy1, steal1), (cpu1, flt1), self1 = _host_busy_s(), _proc_cpu_s(pids), _self_cpu_s()
    others = (busy1 - busy0) + (steal1 - steal0) - (cpu1 - cpu0) - (self1 - self0)
    stats.other_cores.append(max(0.0, others) / elapsed)
    stats.rps.append(done / elapsed)
    stats.pool_cpu_ms.append(1000 * (cpu1 - cpu0) / done)
    stats.parent_cpu_ms.append(1000 * (self1 - self0) / done)
    stats.worker_ms.append(1000 * worker_s / done)
    stats.faults.append((flt1 - flt0) / done)


def configs(pool_size: int, pixel_dtype: PixelDtype, transport: Literal["shm", "pipe"],
            malloc_tuning: bool) -> dict[str, PreprocessConfig]:
    common = {"pool_size": pool_size, "pixel_dtype": pixel_dtype, "transport": transport,
              "malloc_tuning": malloc_tuning}
    return {
        "torchvision_sized": PreprocessConfig(backend="torchvision", thread_sizing=True, **common),
        "pil": PreprocessConfig(backend="pil", thread_sizing=True, **common),
        "torchvision_unset": PreprocessConfig(backend="torchvision", thread_sizing=False,
                                              **common),
    }


async def run(args: argparse.Namespace) -> dict[str, object]:
    jpeg = synthetic_jpeg(args.width, args.height, args.quality)
    image_b64 = base64.b64encode(jpeg).decode()
    cpus = available_cpus()
    print(f"image: {args.width}×{args.height} JPEG q{args.quality}, {len(jpeg)} bytes; "
          f"available CPUs {cpus} (host reports {os.cpu_count()}); "
          f"OMP_NUM_THREADS in the environment: {os.environ.get('OMP_NUM_THREADS')}"
          + "".join(f"; {k}={v}" for k, v in sorted(os.environ.items())
                    if k.startswith("MALLOC_")))
    pres = {name: ImagePreprocessor(cfg)
            for name, cfg in configs(args.pool_size, args.pixel_dtype, args.transport,
                                     args.malloc_tuning == "on").items()}
    stats = {name: RunStats() for name in pres}
    load_before = os.getloadavg()[0]
    try:
        for name, pre in pres.items():
            t0 = time.perf_counter()
            await pre.start()
            for _ in range(3):  # warm up: first calls pay lazy imports and allocator growth
                await asyncio.gather(*(pre.process([image_b64])
                                       for _ in range(pre.config.inflight_limit)))
            print(f"started {name}: {len(pre.workers)} processes in "
                  f"{time.perf_counter() - t0:.1f}s")
        names = list(pres)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                pre = pres[name]
                await asyncio.sleep(0.3)  # let the previous pool's OpenMP threads go idle
                await measure(pre, image_b64, args.seconds,
                              args.concurrency or pre.config.inflight_limit, stats[name])
            print(f"round {r + 1}: " + "  ".join(f"{n} {stats[n].rps[-1]:.1f}" for n in names)
                  + " req/s (other processes: " + " / ".join(f"{stats[n].other_cores[-1]:.2f}"
                                                             for n in names) + " CPUs)")
    finally:
        await asyncio.gather(*(pre.close() for pre in pres.values()))
    load_after = os.getloadavg()[0]

    print()
    header = (f"{'configuration':<18} {'processor class':<26} {'torch thr':>9} {'OMP env':>7} "
              f"{'malloc':>6} "
              f"{'req/s':>7} {'min':>6} {'max':>6} {'pool ms':>8} {'parent ms':>9} "
              f"{'in-pool ms':>10} {'faults':>7}")
    print(header)
    print("-" * len(header))
    for name, pre in pres.items():
        s = stats[name]
        w = pre.workers[0]
        med = statistics.median
        print(f"{name:<18} {w.processor:<26} {w.torch_threads:>9} {w.omp_num_threads or '-':>7} "
              f"{'tuned' if w.malloc_tuned else 'libc':>6} "
              f"{s.median_rps:>7.1f} {min(s.rps):>6.1f} {max(s.rps):>6.1f} "
              f"{med(s.pool_cpu_ms):>8.1f} {med(s.parent_cpu_ms):>9.1f} {med(s.worker_ms):>10.1f} "
              f"{med(s.faults):>7.0f}")
    print("(req/s: median over rounds; pool/parent ms: CPU per request in the pool processes / "
          "this process; in-pool ms: wall time of decode + processor per request; faults: minor "
          "page faults per request in the pool)")
    sized, pil, unset = (stats[n].median_rps for n in names)
    paired = [a / b for a, b in zip(stats["torchvision_sized"].rps, stats["pil"].rps, strict=True)]
    print(f"torchvision sized / PIL          = {sized / pil:.2f}  (per round: "
          + ", ".join(f"{p:.2f}" for p in paired) + ")")
    print(f"torchvision sized / threads unset = {sized / unset:.2f}")
    others = [c for n in names for c in stats[n].other_cores]
    print(f"load average (1 min) before {load_before:.2f}, after {load_after:.2f} (includes "
          f"this bench); other processes used {statistics.median(others):.2f} CPUs "
          f"(median over runs, max {max(others):.2f}) of {cpus}")
    threads = pres["torchvision_sized"].threads_per_process
    return {
        "bench": "multimodal",
        "torchvision_sized_rps": round(sized, 2),
        "pil_rps": round(pil, 2),
        "torchvision_unset_rps": round(unset, 2),
        "ratio": round(sized / pil, 3),
        "ratio_over_unset": round(sized / unset, 3),
        "cpus": cpus,
        "threads_per_process": threads,
        "pool_size": args.pool_size,
        "pixel_dtype": args.pixel_dtype,
        "transport": args.transport,
        "malloc_tuning": args.malloc_tuning,
        "processors": {n: pres[n].workers[0].processor for n in names},
        "unset_torch_threads": pres["torchvision_unset"].workers[0].torch_threads,
        "load_avg_before": round(load_before, 2),
        "other_cpus_median": round(statistics.median(others), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0, help="per configuration per round")
    parser.add_argument("--pool-size", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=0,
                        help="closed-loop clients (default: the pool's max_inflight)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--pixel-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--transport", choices=["shm", "pipe"], default="shm",
                        help="how pixel_values come back from the pool")
    parser.add_argument("--malloc-tuning", choices=["on", "off"], default="on",
                        help="glibc mallopt in the pool processes (off: allocator defaults)")
    args = parser.parse_args()
    figures = asyncio.run(run(args))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
