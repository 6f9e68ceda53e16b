"""Image preprocessing: CPU sizing from cgroup files, both backends, errors, pool survival."""

from __future__ import annotations

import asyncio
import base64
import io
import os
import platform
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
from pydantic import ValidationError

from workers import WorkersError
from workers.cpus import available_cpus, cgroup_cpu_limit, threads_per_worker

pytest.importorskip("torch")
pytest.importorskip("torchvision")
pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from workers.preprocess import (  # noqa: E402  (after the importorskips)
    Backend,
    ImagePreprocessor,
    PixelDtype,
    PreprocessConfig,
    PreprocessError,
)


# -- CPU sizing ----------------------------------------------------------------------
def _fake_cgroup(tmp_path: Path, files: dict[str, str],
                 proc_line: str = "0::/") -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    root.mkdir(exist_ok=True)
    proc = tmp_path / "proc_self_cgroup"
    proc.write_text(proc_line + "\n")
    return root, proc


@pytest.mark.parametrize(
    ("files", "proc_line", "affinity", "expected"),
    [
        pytest.param({"cpu.max": "max 100000"}, "0::/", 8, 8, id="v2-unlimited"),
        pytest.param({"cpu.max": "150000 100000"}, "0::/", 8, 1, id="v2-1.5-cpus-floors-to-1"),
        pytest.param({"cpu.max": "50000 100000"}, "0::/", 8, 1, id="v2-half-cpu-at-least-1"),
        pytest.param({"cpu.max": "400000 100000"}, "0::/", 2, 2, id="v2-affinity-smaller"),
        pytest.param({"cpu.max": "400000 100000"}, "0::/", 16, 4, id="v2-quota-smaller"),
        pytest.param({"a/b/cpu.max": "max 100000", "a/cpu.max": "200000 100000"},
                     "0::/a/b", 8, 2, id="v2-parent-limit-applies"),
        pytest.param({"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"},
                     "4:cpu,cpuacct:/\n0::/", 8, 3, id="v1-quota"),
        pytest.param({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"},
                     "4:cpu,cpuacct:/", 8, 8, id="v1-unlimited"),
        pytest.param({"cpu,cpuacct/pod/cpu.cfs_quota_us": "250000",
                      "cpu,cpuacct/pod/cpu.cfs_period_us": "100000"},
                     "4:cpu,cpuacct:/pod", 8, 2, id="v1-nested-cpu-cpuacct"),
        pytest.param({}, "0::/", 6, 6, id="no-cgroup-files"),
        pytest.param({"cpu.max": "garbage"}, "0::/", 3, 3, id="unparsable-ignored"),
    ],
)
def test_available_cpus_from_fake_cgroup(tmp_path: Path, files: dict[str, str], proc_line: str,
                                         affinity: int, expected: int) -> None:
    root, proc = _fake_cgroup(tmp_path, files, proc_line)
    assert available_cpus(cgroup_root=root, proc_cgroup=proc, affinity=affinity) == expected


def test_cgroup_limit_none_when_unlimited(tmp_path: Path) -> None:
    root, proc = _fake_cgroup(tmp_path, {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None


def test_available_cpus_real_host_within_affinity() -> None:
    cpus = available_cpus()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize(("pool", "cpus", "expected"),
                         [(2, 2, 1), (1, 2, 2), (3, 8, 2), (4, 2, 1), (2, 1, 1)])
def test_threads_per_worker(pool: int, cpus: int, expected: int) -> None:
    assert threads_per_worker(pool, cpus) == expected


def test_threads_per_worker_rejects_empty_pool() -> None:
    with pytest.raises(ValueError):
        threads_per_worker(0, 4)


def test_config_validates_by_raising() -> None:
    with pytest.raises(ValidationError):
        PreprocessConfig(pool_size=0)
    with pytest.raises(ValidationError):
        PreprocessConfig(processor_min_pixels=10_000, processor_max_pixels=100)
    with pytest.raises(ValidationError):
        PreprocessConfig(backend="opencv")  # type: ignore[arg-type]
    cfg = PreprocessConfig(pool_size=3, cpus=8)
    assert cfg.inflight_limit == 6 and cfg.threads_per_process() == 2
    assert PreprocessConfig(thread_sizing=False).threads_per_process() is None


# -- images --------------------------------------------------------------------------
def _image_b64(width: int, height: int, fmt: str = "PNG", mode: str = "RGB") -> str:
    rng = np.random.default_rng(width * 7919 + height)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1),
                    (x + y) % 256], axis=-1).astype(np.int16)
    arr = np.clip(arr + rng.integers(-8, 9, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    PIL_Image.fromarray(arr).convert(mode).save(buf, fmt)
    return base64.b64encode(buf.getvalue()).decode()


MAX_BYTES = 150_000
MAX_PIXELS = 1_000_000


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pools() -> AsyncIterator[dict[Backend, ImagePreprocessor]]:
    """One single-process pool per backend for the module (starting one takes seconds)."""
    backends: tuple[Backend, ...] = ("torchvision", "pil")
    started = {b: ImagePreprocessor(PreprocessConfig(
        backend=b, pool_size=1, max_inflight=2, max_images=3, max_image_bytes=MAX_BYTES,
        max_image_pixels=MAX_PIXELS)) for b in backends}
    try:
        await asyncio.gather(*(p.start() for p in started.values()))
        yield started
    finally:
        await asyncio.gather(*(p.close() for p in started.values()))


@pytest.fixture(params=["torchvision", "pil"])
def pre(request: pytest.FixtureRequest,
        pools: dict[Backend, ImagePreprocessor]) -> ImagePreprocessor:
    return pools[request.param]


def test_preprocess_error_is_a_workers_error() -> None:
    err = PreprocessError("corrupt_image", "x")
    assert isinstance(err, WorkersError) and err.reason == "corrupt_image"


async def test_workers_report_the_class_and_threads(pre: ImagePreprocessor) -> None:
    (info,) = pre.workers
    expected = {"torchvision": ("FusedQwen2VLImageProcessor", "torchvision"),
                "pil": ("Qwen2VLImageProcessorPil", "pil")}[pre.config.backend]
    assert (info.processor, info.processor_backend) == expected
    assert info.torch_threads == pre.threads_per_process == available_cpus()  # pool of one
    assert info.omp_num_threads == str(pre.threads_per_process)
    assert info.malloc_tuned == (platform.libc_ver()[0] == "glibc")


async def test_grid_shapes(pre: ImagePreprocessor) -> None:
    # Qwen2-VL resizes each side to a multiple of 28 (patch 14 × merge 2):
    # 100×80 -> 112×84 -> 6×8 patches; 224×160 JPEG -> 224×168 -> 12×16 patches.
    result = await pre.process([_image_b64(100, 80, "PNG"), _image_b64(224, 160, "JPEG")])
    assert result.images == 2
    assert result.image_grid_thw == ((1, 6, 8), (1, 12, 16))
    pixels = result.pixel_values()
    assert tuple(pixels.shape) == (6 * 8 + 12 * 16, 3 * 2 * 14 * 14)
    assert str(pixels.dtype) == "torch.bfloat16"
    assert tuple(result.grid_thw().shape) == (2, 3)
    # Normalised with CLIP's mean/std: values live roughly in [-1.8, 2.2].
    assert -2.5 < float(pixels.float().min()) < float(pixels.float().max()) < 2.5


async def test_greyscale_and_alpha_become_rgb(pre: ImagePreprocessor) -> None:
    result = await pre.process([_image_b64(64, 64, "PNG", "L"), _image_b64(64, 64, "PNG", "RGBA")])
    assert result.image_grid_thw == ((1, 4, 4), (1, 4, 4))


async def test_backends_agree(pools: dict[Backend, ImagePreprocessor]) -> None:
    # Same image through both backends: same grid, values close (bicubic
    # implementations and bf16 rounding differ slightly).
    image = _image_b64(320, 240, "JPEG")
    out = {b: await p.process([image]) for b, p in pools.items()}
    assert out["torchvision"].image_grid_thw == out["pil"].image_grid_thw
    diff = (out["torchvision"].pixel_values().float() - out["pil"].pixel_values().float()).abs()
    assert float(diff.mean()) < 0.05


async def test_mime_line_breaks_are_accepted(pre: ImagePreprocessor) -> None:
    text = _image_b64(56, 56)
    wrapped = "\n".join(text[i:i + 76] for i in range(0, len(text), 76))
    assert (await pre.process([wrapped])).image_grid_thw == ((1, 4, 4),)


def _truncated_jpeg() -> str:
    data = base64.b64decode(_image_b64(200, 150, "JPEG"))
    return base64.b64encode(data[: len(data) // 2]).decode()


def _gif() -> str:
    buf = io.BytesIO()
    PIL_Image.new("RGB", (32, 32), (200, 10, 10)).save(buf, "GIF")
    return base64.b64encode(buf.getvalue()).decode()


def _random_noise_png(side: int) -> str:  # incompressible: many bytes
    arr = np.random.default_rng(1).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL_Image.fromarray(arr).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _flat_png(width: int, height: int) -> str:  # compresses to almost nothing
    buf = io.BytesIO()
    PIL_Image.new("RGB", (width, height), (90, 90, 90)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


BAD_IMAGES = {
    "invalid_base64": lambda: "this is !!! not base64 ===",
    "unsupported_format": lambda: base64.b64encode(b"hello, definitely not an image").decode(),
    "unsupported_format-gif": _gif,
    "corrupt_image": _truncated_jpeg,
    "image_too_large": lambda: _random_noise_png(300),  # ~270 KB > 150 KB
    "too_many_pixels": lambda: _flat_png(1200, 1000),  # tiny file, 1.2 MP > 1 MP
    "processor_failed": lambda: _flat_png(600, 2),  # aspect ratio 300 > Qwen2-VL's 200
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
async def test_bad_image_raises_and_pool_keeps_working(pre: ImagePreprocessor, case: str) -> None:
    good = _image_b64(56, 56)
    with pytest.raises(PreprocessError) as err:
        await pre.process([good, BAD_IMAGES[case]()])
    assert err.value.reason == case.split("-")[0]
    assert "image 1" in str(err.value) or err.value.reason == "processor_failed"
    result = await pre.process([good])
    assert result.image_grid_thw == ((1, 4, 4),)


async def test_oversize_base64_refused_before_the_pool(pre: ImagePreprocessor) -> None:
    with pytest.raises(PreprocessError) as err:
        await pre.process(["A" * (pre.config.max_b64_chars + 4)])
    assert err.value.reason == "image_too_large"


async def test_too_many_images(pre: ImagePreprocessor) -> None:
    with pytest.raises(PreprocessError) as err:
        await pre.process([_image_b64(56, 56)] * 4)
    assert err.value.reason == "too_many_images"


async def test_no_images_needs_no_pool(pre: ImagePreprocessor) -> None:
    result = await pre.process([])
    assert result.images == 0 and result.image_grid_thw == ()


async def test_inflight_is_bounded(pre: ImagePreprocessor) -> None:
    image = _image_b64(448, 448, "JPEG")
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, pre.inflight)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(pre.process([image]) for _ in range(8)))
    watcher.cancel()
    assert len(results) == 8 and peak <= pre.config.inflight_limit == 2
    assert pre.inflight == 0


async def test_pool_survives_a_killed_process(pools: dict[Backend, ImagePreprocessor]) -> None:
    p = pools["torchvision"]
    image = _image_b64(56, 56)
    first = await p.process([image])
    restarts = p.restarts
    os.kill(first.worker_pid, signal.SIGKILL)
    # Depending on whether the pool noticed the death before the next submit,
    # the next request is resubmitted on a new pool or fails with
    # worker_died; either way the one after it is served.
    try:
        second = await p.process([image])
    except PreprocessError as e:
        assert e.reason == "worker_died"
        second = await p.process([image])
    assert second.worker_pid != first.worker_pid and p.restarts == restarts + 1
    assert second.image_grid_thw == ((1, 4, 4),)


async def test_closed_preprocessor_refuses() -> None:
    p = ImagePreprocessor(PreprocessConfig(pool_size=1))
    await p.close()  # never started: no process was spawned
    with pytest.raises(PreprocessError) as err:
        await p.process([_image_b64(56, 56)])
    assert err.value.reason == "closed"


async def test_cancelled_request_keeps_its_permit_until_the_pool_is_done(
        pools: dict[Backend, ImagePreprocessor]) -> None:
    p = pools["pil"]
    big = _image_b64(1024, 768, "JPEG")
    task = asyncio.create_task(p.process([big]))
    await asyncio.sleep(0.02)  # let it reach the pool process (a 1024×768 JPEG takes longer)
    assert p.inflight == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(2000):  # the permit comes back once the pool process finishes
        if p.inflight == 0:
            break
        await asyncio.sleep(0.005)
    assert p.inflight == 0
    # The slot it held is reused without stale data leaking into the next result.
    small = await p.process([_image_b64(56, 56)])
    assert small.image_grid_thw == ((1, 4, 4),)
    assert tuple(small.pixel_values().shape) == (16, 1176)


def test_slot_and_pipe_give_the_same_pixels() -> None:
    # The pool-process functions run here (no pool): threads=None leaves this
    # process's thread settings alone.
    from multiprocessing import shared_memory

    from workers import preprocess as pp

    config = PreprocessConfig(backend="torchvision", shm_slot_bytes=16 * 1176 * 2)
    pp._init_worker(config, None)
    image = _image_b64(56, 56)
    piped = pp._preprocess_in_worker([image], None)
    assert piped.pixel_data is not None and piped.shape == (16, 1176)
    shm = shared_memory.SharedMemory(create=True, size=config.slot_bytes)
    try:
        slotted = pp._preprocess_in_worker([image], shm.name)
        assert slotted.pixel_data is None  # written into the slot
        assert shm.buf is not None
        in_slot = np.frombuffer(shm.buf, dtype=np.uint16, count=16 * 1176).reshape(16, 1176)
        assert np.array_equal(in_slot, piped.pixel_data)
        del in_slot
        # Too big for the slot (two images): falls back to the pipe.
        both = pp._preprocess_in_worker([image, image], shm.name)
        assert both.pixel_data is not None and both.shape == (32, 1176)
    finally:
        pp._ATTACHED.pop(shm.name).close()
        shm.close()
        shm.unlink()


async def test_results_hold_their_slot_until_collected(
        pools: dict[Backend, ImagePreprocessor]) -> None:
    import gc

    p = pools["torchvision"]
    slots = p._slot_pool
    assert slots is not None and slots.limit == 4  # 2 × max_inflight
    images = [_image_b64(56 + 28 * i, 56) for i in range(6)]
    held = [await p.process([images[0]])]
    snapshot = held[0].pixel_data.copy()
    held += [await p.process([image]) for image in images[1:]]  # 6 results > 4 slots
    assert slots.counts() == (4, 0)  # the last two came through the pipe
    assert np.array_equal(held[0].pixel_data, snapshot)  # a held slot is never reused
    for i, result in enumerate(held):
        assert result.image_grid_thw == ((1, 4, 4 + 2 * i),)
    tensor = held[0].pixel_values()  # a tensor view keeps the slot too
    del held
    gc.collect()
    assert slots.counts() == (4, 3)
    del tensor
    gc.collect()
    assert slots.counts() == (4, 4)


@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", id="bf16"),
                                   pytest.param("float32", id="f32")])
@pytest.mark.parametrize("size", [pytest.param((200, 150), id="landscape"),
                                  pytest.param((90, 333), id="portrait-resized"),
                                  pytest.param((640, 480), id="several-chunks")])
def test_fused_processor_matches_the_stock_processor(dtype: PixelDtype,
                                                     size: tuple[int, int]) -> None:
    # The torchvision path normalises after patchify, on uint8 patches, and
    # writes into the slot; the engine must get exactly what transformers'
    # own processor gives, bit for bit.
    import torch
    from torchvision.io import decode_image
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor

    from workers import preprocess as pp

    pp._init_worker(PreprocessConfig(backend="torchvision", pixel_dtype=dtype), None)
    image = _image_b64(*size, "JPEG")
    piped = pp._preprocess_in_worker([image], None)
    assert piped.pixel_data is not None
    raw = torch.frombuffer(bytearray(base64.b64decode(image)), dtype=torch.uint8)
    reference = Qwen2VLImageProcessor()(images=[decode_image(raw)],
                                        return_tensors="pt")["pixel_values"]
    expected = reference.to(pp._torch_dtype(dtype))
    got = torch.from_numpy(piped.pixel_data)
    assert torch.equal(got.view(expected.dtype), expected)
    # The same values when written in place into a shared-memory slot.
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=expected.numel() * expected.itemsize)
    try:
        assert pp._preprocess_in_worker([image], shm.name).pixel_data is None
        assert shm.buf is not None
        in_slot = torch.frombuffer(shm.buf, dtype=torch.uint8).view(expected.dtype)
        assert torch.equal(in_slot.view(expected.shape), expected)
        del in_slot
    finally:
        pp._ATTACHED.pop(shm.name).close()
        shm.close()
        shm.unlink()
