"""Image preprocessing for multimodal requests, in a bounded process pool off the event loop.

A request carries base64 image files. For each request the pool decodes the
images and runs the model's image processor (Qwen2-VL) and hands back the
``pixel_values`` and ``image_grid_thw`` the engine takes.

Why a process pool: decoding and the processor are CPU work that holds the
GIL for long stretches; on the worker's event loop they would stall
heartbeats, probes and Kafka I/O. Why bounded: at most ``max_inflight``
requests (default ``2 × pool_size``) are submitted at once; further callers
wait in :meth:`ImagePreprocessor.process`, so a flood of image requests
backs up to the consumer (Kafka keeps the backlog) instead of queueing
unbounded work and memory inside the worker.

Backends (``PreprocessConfig.backend``):

- ``"torchvision"`` (default): ``torchvision.io.decode_image`` on the raw
  bytes, then transformers' ``Qwen2VLImageProcessor``, which in
  transformers 5.x *is* the torchvision-backed processor (``TorchvisionBackend``;
  the 4.x "fast" class was folded into it), as its subclass
  :class:`~workers.qwen2vl_processor.FusedQwen2VLImageProcessor` (same
  resize and layout; normalise and patchify by exact faster kernels that
  emit ``pixel_dtype`` directly).
- ``"pil"``: ``PIL.Image.open(...).convert("RGB")`` and
  ``Qwen2VLImageProcessorPil`` (PIL/numpy), kept for comparison and parity.

Threads: each pool process runs torch intra-op work. Left alone, torch (and
OpenMP/MKL) size their pools from the host's core count, so ``pool_size``
processes each run that many spin-waiting OpenMP threads on CPUs they do
not have. Measured by ``bench.multimodal`` on 2 CPUs with 2 processes (only
2× oversubscribed, as the host has 2 cores) that halves throughput on a
quiet machine and drops it below the PIL path when other processes compete
for the CPUs; in a container whose quota is a small part of a large host
it is far worse. With ``thread_sizing``
on, the CPUs this process really has (affinity and cgroup quota, see
:mod:`workers.cpus`) are divided among the pool processes and each sets
``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and ``torch.set_num_threads`` to its
share before doing any work. Pool processes are started with ``spawn`` (or
``forkserver``), never ``fork``: the parent may already run torch/OpenMP
threads, which a fork would copy in an undefined state. This module imports
torch only inside the pool processes (and lazily in
:meth:`PreprocessResult.pixel_values`), so the environment is set before
the OpenMP runtime reads it.

What comes back: ``pixel_values`` are large for Qwen2-VL (a 1024×768 image
gives 3996 patches × 1176 values: 18.8 MB as float32), and pickling them
through the pool's result pipe costs several copies and ~150 pipe round
trips per request on both sides, a fixed cost that eats much of what the
torchvision path saves. So by default (``transport="shm"``) pixels travel
through shared-memory slots owned by the caller: the pool process writes
them straight into its request's slot (the dtype conversion is that write)
and the result's ``pixel_data`` is a zero-copy view of the slot, which goes
back to the free list when the last array or tensor viewing it is garbage
collected (the pattern of torch's DataLoader workers). Slots are created on
demand up to ``shm_slots``; when all are taken (callers holding many
results) or /dev/shm is full, pixels go through the pipe instead. A caller
cancelled while its request runs keeps its permit and slot taken until the
pool is done with it, so a slot is never reused under a process still
writing it. Outputs larger than a slot (several large images in one
request) also take the pipe, as everything does with ``transport="pipe"``.

By default the values are
bfloat16 (``pixel_dtype``): the engine runs the vision tower in bf16 and
casts to it anyway, so this is the same rounding done earlier, and it halves
the bytes moved. bf16 has no numpy dtype, so ``pixel_data`` holds its bits
as ``uint16``; :meth:`PreprocessResult.pixel_values` gives the torch tensor
with the right dtype without copying.

Errors: a bad image (invalid base64, unsupported or corrupt file, too many
bytes or pixels, too many images, processor rejection) raises
:class:`PreprocessError` with a ``reason`` code; the caller answers the
request with an error result and dead-letters it. A pool process that dies
(a crash in a native decoder, the OOM killer) breaks the executor: the
preprocessor replaces it, the request that was running fails with reason
``worker_died``, and a request that could not be submitted is retried once
on the new pool (it never ran).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import ctypes
import io
import math
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workers import WorkersError
from workers.cpus import available_cpus, threads_per_worker

if TYPE_CHECKING:
    import torch

Backend = Literal["torchvision", "pil"]
PixelDtype = Literal["bfloat16", "float32"]
Reason = Literal[
    "invalid_base64", "too_many_images", "image_too_large", "too_many_pixels",
    "unsupported_format", "corrupt_image", "processor_failed", "worker_died", "closed",
]

# Formats both decoders (torchvision.io and PIL) read. GIF is left out: it
# may hold several frames, which is a video, not an image.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP"})

_T = TypeVar("_T")

QWEN2VL_MAX_PIXELS = 28 * 28 * 1280  # Qwen2-VL's default resize bound
PATCH_DIM = 3 * 2 * 14 * 14  # channels × temporal patch × patch²


class PreprocessError(WorkersError):
    """An image request cannot be preprocessed: error result and dead letter for it."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason: Reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised inside pool processes and pickled back: rebuild with both fields.
        return (type(self), (self.reason, self.detail))


class PreprocessConfig(BaseModel):
    """How the pool runs. Invalid values raise :class:`pydantic.ValidationError`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = "torchvision"
    pool_size: Annotated[int, Field(ge=1, le=64)] = 2
    # Divide the CPUs this process really has among the pool processes and set
    # each one's intra-op threads to its share; off leaves library defaults.
    thread_sizing: bool = True
    # CPUs to divide; None detects them (affinity, cgroup quota).
    cpus: Annotated[int, Field(ge=1, le=4096)] | None = None
    # Requests submitted to the pool at once; None = 2 × pool_size (one
    # running and one queued per process keeps every process busy).
    max_inflight: Annotated[int, Field(ge=1, le=1024)] | None = None
    # Per-request and per-image guards, checked before decoding. The event
    # schema allows 8 images of 8 Mi base64 characters (6 MiB) each.
    max_images: Annotated[int, Field(ge=1, le=64)] = 8
    max_image_bytes: Annotated[int, Field(ge=1)] = 6 * 1024 * 1024
    # Decoded width × height; refuses decompression bombs before allocating.
    max_image_pixels: Annotated[int, Field(ge=1)] = 40_000_000
    # The processor's resize bounds (pixels after resize); None = Qwen2-VL's
    # defaults (56·56 and 28·28·1280).
    processor_min_pixels: Annotated[int, Field(ge=1)] | None = None
    processor_max_pixels: Annotated[int, Field(ge=1)] | None = None
    pixel_dtype: PixelDtype = "bfloat16"
    # How pixel_values come back from the pool (see the module docstring).
    transport: Literal["shm", "pipe"] = "shm"
    # Bytes per shared-memory slot; None = one image at the processor's
    # largest size in pixel_dtype (12 MB in bf16 with Qwen2-VL's defaults).
    shm_slot_bytes: Annotated[int, Field(ge=4096)] | None = None
    # Most slots alive at once (in the pool and held by results); None = 2 ×
    # max in flight. More results held than that go through the pipe.
    shm_slots: Annotated[int, Field(ge=1, le=4096)] | None = None
    start_method: Literal["spawn", "forkserver"] = "spawn"
    # glibc only: keep freed large buffers in the pool processes' heaps (see
    # _tune_malloc). Off leaves the allocator's defaults, for comparison.
    malloc_tuning: bool = True

    @model_validator(mode="after")
    def _check_bounds(self) -> PreprocessConfig:
        lo, hi = self.processor_min_pixels, self.processor_max_pixels
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"processor_min_pixels {lo} exceeds processor_max_pixels {hi}")
        return self

    @property
    def inflight_limit(self) -> int:
        return self.max_inflight if self.max_inflight is not None else 2 * self.pool_size

    def threads_per_process(self) -> int | None:
        """Intra-op threads each pool process sets, or None when sizing is off."""
        if not self.thread_sizing:
            return None
        return threads_per_worker(self.pool_size, self.cpus or available_cpus())

    @property
    def slot_limit(self) -> int:
        return self.shm_slots if self.shm_slots is not None else 2 * self.inflight_limit

    @property
    def slot_bytes(self) -> int:
        if self.shm_slot_bytes is not None:
            return self.shm_slot_bytes
        # Qwen2-VL: one patch per 14×14 resized pixels, 3·2·14·14 values each.
        patches = (self.processor_max_pixels or QWEN2VL_MAX_PIXELS) // (14 * 14) + 1
        return patches * PATCH_DIM * (2 if self.pixel_dtype == "bfloat16" else 4)

    @property
    def max_b64_chars(self) -> int:
        # Base64 of max_image_bytes, plus slack for line breaks some encoders add.
        return 4 * math.ceil(self.max_image_bytes / 3) + 1024


@dataclass(frozen=True)
class WorkerInfo:
    """What one pool process really runs (the bench prints it)."""

    pid: int
    backend: Backend
    processor: str  # type(processor).__name__
    processor_backend: str  # the processor's own ``backend`` attribute
    torch_threads: int
    interop_threads: int
    omp_num_threads: str | None  # the environment variable as the process sees it
    malloc_tuned: bool


@dataclass(frozen=True)
class PreprocessResult:
    """Preprocessed images of one request."""

    # (total patches, patch dim) in ``pixel_dtype``; bfloat16 stored as its uint16 bits.
    # With shm transport a view of a shared-memory slot, freed when no longer referenced.
    pixel_data: np.ndarray
    pixel_dtype: PixelDtype
    image_grid_thw: tuple[tuple[int, int, int], ...]
    images: int
    processor: str
    worker_pid: int
    decode_s: float  # in the pool process
    process_s: float  # in the pool process (processor + dtype conversion)
    total_s: float  # seen by the caller: waiting for a permit, queueing, transfer

    def pixel_values(self) -> torch.Tensor:
        """The engine's ``pixel_values`` tensor (shares memory with ``pixel_data``)."""
        import torch

        tensor = torch.from_numpy(self.pixel_data)
        return tensor.view(torch.bfloat16) if self.pixel_dtype == "bfloat16" else tensor

    def grid_thw(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.image_grid_thw, dtype=torch.int64).reshape(-1, 3)


# -- inside the pool processes ------------------------------------------------------
@dataclass(frozen=True)
class _WorkerOutput:
    pixel_data: np.ndarray | None  # None: written to the request's shared-memory slot
    shape: tuple[int, ...]
    grid: tuple[tuple[int, int, int], ...]
    decode_s: float
    process_s: float
    pid: int
    processor: str


@dataclass
class _WorkerState:
    config: PreprocessConfig
    processor: Any
    info: WorkerInfo


_STATE: _WorkerState | None = None
# Slots this process has attached, by name (attaching maps the segment: do it once).
_ATTACHED: dict[str, shared_memory.SharedMemory] = {}


def _init_worker(config: PreprocessConfig, threads: int | None) -> None:
    """Pool initializer: size threads (before torch loads), build the processor once."""
    global _STATE
    malloc_tuned = _tune_malloc() if config.malloc_tuning else False
    if threads is not None:
        # Set before importing torch, so OpenMP/MKL read them when they load;
        # set_num_threads below also covers a runtime that loaded earlier.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(1)  # nothing here runs inter-op parallel work
        except RuntimeError:  # already started (can't be in a fresh process; be safe)
            pass
    processor = _build_processor(config)
    _STATE = _WorkerState(config=config, processor=processor, info=WorkerInfo(
        pid=os.getpid(), backend=config.backend, processor=type(processor).__name__,
        processor_backend=str(getattr(processor, "backend", "?")),
        torch_threads=torch.get_num_threads(), interop_threads=torch.get_num_interop_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), malloc_tuned=malloc_tuned))


# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _tune_malloc() -> bool:
    """Stop glibc from unmapping and re-faulting the large per-request buffers.

    Every request allocates and frees buffers of tens of MB (the decoded
    image, its resized float copy, the 18.8 MB patch array). With glibc's
    defaults those are mmapped or trimmed off the heap top when freed, and
    the next request page-faults them back in: measured here ~6100-6700
    minor faults (~25 MB, ~15 ms of kernel time) on every PIL-path request
    and 2000-5000 per torchvision request on average (bursts of ~10000),
    which cost the torchvision path 40% of its throughput in
    ``bench.multimodal`` (59 vs 104 req/s). A fixed mmap threshold of 64 MB
    and a trim threshold of 256 MB keep the memory in the process for
    reuse; the cost is that a pool process's RSS stays at its high-water
    mark (tens of MB for one image per request).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 64 << 20) and mallopt(_M_TRIM_THRESHOLD, 256 << 20))


def _build_processor(config: PreprocessConfig) -> Any:
    """Qwen2-VL's image processor with its default parameters, built locally (no hub).

    In transformers 5.x ``Qwen2VLImageProcessor`` is the torchvision backend
    and ``Qwen2VLImageProcessorPil`` the PIL/numpy one. The torchvision path
    uses its subclass with exact faster normalise/patchify kernels that emit
    ``pixel_dtype`` directly (:mod:`workers.qwen2vl_processor`).
    """
    kwargs: dict[str, Any] = {}
    if config.processor_min_pixels is not None:
        kwargs["min_pixels"] = config.processor_min_pixels
    if config.processor_max_pixels is not None:
        kwargs["max_pixels"] = config.processor_max_pixels
    if config.backend == "torchvision":
        from workers.qwen2vl_processor import FusedQwen2VLImageProcessor

        return FusedQwen2VLImageProcessor(output_dtype=_torch_dtype(config.pixel_dtype), **kwargs)
    from transformers.models.qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(**kwargs)


def _state() -> _WorkerState:
    if _STATE is None:  # the initializer always runs first; this is a programming error
        raise RuntimeError("preprocess pool process not initialised")
    return _STATE


def _worker_info(linger_s: float = 0.0) -> WorkerInfo:
    # Lingering makes the warm-up tasks land on different processes.
    if linger_s:
        time.sleep(linger_s)
    return _state().info


def _decode_b64(index: int, text: str, max_bytes: int) -> bytes:
    # Strict: a lenient decoder silently drops stray characters and turns
    # garbage into "unsupported format". Only MIME line breaks are tolerated.
    try:
        try:
            data = base64.b64decode(text, validate=True)
        except binascii.Error:
            if not any(c.isspace() for c in text[:200]):
                raise
            data = base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise PreprocessError("invalid_base64", f"image {index}: {e}") from None
    if not data:
        raise PreprocessError("corrupt_image", f"image {index}: empty")
    if len(data) > max_bytes:
        raise PreprocessError("image_too_large",
                              f"image {index}: {len(data)} bytes > limit {max_bytes}")
    return data


def _check_header(index: int, data: bytes, config: PreprocessConfig) -> None:
    """Format and size from the file header alone, before any pixel is decoded.

    PIL's ``open`` is lazy: it parses the header (JPEG markers up to the
    frame header, PNG's IHDR) and allocates nothing for pixels.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (width, height) = im.format, im.size
    except Image.DecompressionBombError as e:
        raise PreprocessError("too_many_pixels", f"image {index}: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise PreprocessError("unsupported_format",
                              f"image {index}: not a readable image ({e})") from None
    if fmt not in SUPPORTED_FORMATS:
        raise PreprocessError("unsupported_format",
                              f"image {index}: {fmt} (supported: {sorted(SUPPORTED_FORMATS)})")
    if width * height > config.max_image_pixels:
        raise PreprocessError("too_many_pixels", f"image {index}: {width}×{height} > limit "
                              f"{config.max_image_pixels} pixels")


def _decode_torchvision(index: int, data: bytes) -> Any:
    import torch
    from torchvision.io import ImageReadMode, decode_image

    try:
        # bytearray: frombuffer wants a writable buffer (bytes would warn).
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_image(raw, mode=ImageReadMode.RGB)  # uint8 (3, H, W)
    except RuntimeError as e:
        raise PreprocessError("corrupt_image", f"image {index}: {e}") from None


def _decode_pil(index: int, data: bytes) -> Any:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")  # convert() loads: truncated files fail here
    except (OSError, SyntaxError, ValueError) as e:
        raise PreprocessError("corrupt_image", f"image {index}: {e}") from None


def _preprocess_in_worker(images_b64: Sequence[str], slot: str | None = None) -> _WorkerOutput:
    """Decode and preprocess one request; pixels go to shared-memory ``slot`` when they fit."""
    state = _state()
    config = state.config
    t0 = time.perf_counter()
    decoded = []
    for i, text in enumerate(images_b64):
        data = _decode_b64(i, text, config.max_image_bytes)
        _check_header(i, data, config)
        decoded.append(_decode_torchvision(i, data) if config.backend == "torchvision"
                       else _decode_pil(i, data))
    t1 = time.perf_counter()
    try:
        if config.backend == "torchvision" and slot is not None and len(decoded) == 1:
            out = state.processor.preprocess_into(decoded[0], _attach(slot).buf)
        elif config.backend == "torchvision":
            out = state.processor(images=decoded, return_tensors="pt")
        else:
            out = state.processor(images=decoded, return_tensors="np")
    except (ValueError, RuntimeError, TypeError) as e:  # e.g. aspect ratio over 200
        raise PreprocessError("processor_failed", str(e)) from None
    pixel_values = out["pixel_values"]
    shape = tuple(int(d) for d in pixel_values.shape)
    written = slot is not None and _write_slot(pixel_values, slot, config)
    pixel_data = None if written else _to_wire(pixel_values, config.pixel_dtype)
    grid = tuple((int(t), int(h), int(w)) for t, h, w in np.asarray(out["image_grid_thw"]))
    t2 = time.perf_counter()
    return _WorkerOutput(pixel_data=pixel_data, shape=shape, grid=grid, decode_s=t1 - t0,
                         process_s=t2 - t1, pid=os.getpid(), processor=state.info.processor)


def _torch_dtype(dtype: PixelDtype) -> torch.dtype:
    import torch

    return torch.bfloat16 if dtype == "bfloat16" else torch.float32


def _write_slot(pixel_values: Any, slot: str, config: PreprocessConfig) -> bool:
    """Convert ``pixel_values`` to ``pixel_dtype`` straight into the slot; False if too big."""
    import torch

    src = torch.as_tensor(pixel_values)
    dtype = _torch_dtype(config.pixel_dtype)
    nbytes = src.numel() * dtype.itemsize
    if nbytes > config.slot_bytes:
        return False
    dst = torch.frombuffer(_attach(slot).buf, dtype=torch.uint8, count=nbytes)
    if dst.data_ptr() != src.data_ptr():  # not already written there by preprocess_into
        dst.view(dtype).view(src.shape).copy_(src)
    return True


def _attach(slot: str) -> shared_memory.SharedMemory:
    shm = _ATTACHED.get(slot)
    if shm is None:
        shm = _ATTACHED[slot] = shared_memory.SharedMemory(name=slot)
    return shm


def _to_wire(pixel_values: Any, dtype: PixelDtype) -> np.ndarray:
    """A numpy array that pickles as one contiguous buffer (no torch shared-memory handoff)."""
    import torch

    tensor = torch.as_tensor(pixel_values).to(_torch_dtype(dtype)).contiguous()
    return tensor.view(torch.uint16).numpy() if dtype == "bfloat16" else tensor.numpy()


def _wire_numpy_dtype(dtype: PixelDtype) -> type[np.generic]:
    return np.uint16 if dtype == "bfloat16" else np.float32


# -- the caller's side ----------------------------------------------------------------
class _Shm(shared_memory.SharedMemory):
    """A slot segment; collected quietly while a result still views it (at exit)."""

    def __del__(self) -> None:
        try:
            super().__del__()
        except BufferError:
            pass


class _SlotPool:
    """Shared-memory slots for results; thread-safe (array finalizers run on any thread)."""

    def __init__(self, slot_bytes: int, limit: int) -> None:
        self.slot_bytes = slot_bytes
        self.limit = limit
        self._lock = threading.Lock()
        self._free: list[shared_memory.SharedMemory] = []
        self._all: list[shared_memory.SharedMemory] = []
        self._closed = False

    def take(self) -> shared_memory.SharedMemory | None:
        """A free slot, a new one while under the limit, or None (use the pipe)."""
        with self._lock:
            if self._closed:
                return None
            if self._free:
                return self._free.pop()
            if len(self._all) >= self.limit:
                return None
            try:
                shm = _Shm(create=True, size=self.slot_bytes)
            except OSError:
                self.limit = len(self._all)
                return None
            try:
                # Reserve the pages now: writing to a tmpfs mapping that cannot get
                # a page (a full /dev/shm, 64 MB in a default Docker container)
                # kills the writer with SIGBUS; fallocate fails cleanly instead.
                fd = getattr(shm, "_fd", -1)
                if fd >= 0:
                    os.posix_fallocate(fd, 0, self.slot_bytes)
            except OSError:
                shm.close()
                shm.unlink()
                self.limit = len(self._all)  # /dev/shm is full: stop growing
                return None
            self._all.append(shm)
            return shm

    def counts(self) -> tuple[int, int]:
        """(slots alive, slots free)."""
        with self._lock:
            return len(self._all), len(self._free)

    def give(self, shm: shared_memory.SharedMemory) -> None:
        with self._lock:
            if not self._closed:
                self._free.append(shm)
                return
        _close_slot(shm)

    def view(self, shm: shared_memory.SharedMemory, dtype: type[np.generic],
             shape: tuple[int, ...]) -> np.ndarray:
        """A zero-copy array over the slot; the slot comes back when it is collected."""
        buf = shm.buf
        if buf is None:
            raise RuntimeError("shared memory slot is closed")
        base = np.frombuffer(buf, dtype=dtype, count=math.prod(shape))
        # On the base array: numpy views, reshapes and torch.from_numpy of it
        # all keep it alive, so the slot is free only when none is left.
        finalizer = weakref.finalize(base, self.give, shm)
        finalizer.atexit = False
        return base.reshape(shape)

    def close(self) -> None:
        """Unlink every slot; those still viewed by results stay mapped until collected."""
        with self._lock:
            self._closed = True
            free, self._free = self._free, []
            held = [shm for shm in self._all if all(shm is not f for f in free)]
            self._all = []
        for shm in free:
            _close_slot(shm)
        for shm in held:  # the name goes now, the memory when the last view does
            try:
                shm.unlink()
            except OSError:
                pass


def _close_slot(shm: shared_memory.SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:  # still viewed (a pool-side failure left a view): unlink anyway
        pass
    try:
        shm.unlink()
    except OSError:  # already unlinked by close()
        pass


@dataclass
class _Permit:
    """One in-flight request: a semaphore permit and, with shm transport, a slot."""

    shm: shared_memory.SharedMemory | None
    future: concurrent.futures.Future[Any] | None = None
    pixels: np.ndarray | None = None  # the slot's view, made by the pool-done callback
    handed_off: bool = False  # the slot now belongs to ``pixels`` (freed by its finalizer)
    view_error: BaseException | None = None
    orphaned: bool = False  # the caller stopped waiting (cancelled) before the pool finished
    released: bool = False


class ImagePreprocessor:
    """Async front of the preprocessing pool. Use ``async with`` or call :meth:`close`."""

    def __init__(self, config: PreprocessConfig | None = None) -> None:
        self.config = config or PreprocessConfig()
        self.threads_per_process = self.config.threads_per_process()
        self._executor: concurrent.futures.ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # executor swaps happen from the loop and callbacks
        self._permits: asyncio.Semaphore | None = None
        self._inflight = 0
        self._closed = False
        self._slot_pool = (_SlotPool(self.config.slot_bytes, self.config.slot_limit)
                           if self.config.transport == "shm" else None)
        self.restarts = 0  # pools replaced after a process died
        self.workers: list[WorkerInfo] = []

    @property
    def inflight(self) -> int:
        """Requests holding a permit (submitted and not yet finished with)."""
        return self._inflight

    async def __aenter__(self) -> ImagePreprocessor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- pool lifecycle
    def _new_executor(self) -> concurrent.futures.ProcessPoolExecutor:
        return concurrent.futures.ProcessPoolExecutor(
            max_workers=self.config.pool_size,
            mp_context=multiprocessing.get_context(self.config.start_method),
            initializer=_init_worker, initargs=(self.config, self.threads_per_process))

    def _current(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise PreprocessError("closed", "the preprocessor is closed")
            if self._executor is None:
                self._executor = self._new_executor()
            return self._executor

    def _replace(self, broken: concurrent.futures.ProcessPoolExecutor) -> None:
        """Swap out a broken executor (once, however many requests saw it break)."""
        with self._lock:
            if self._executor is not broken:
                return
            self._executor = None if self._closed else self._new_executor()
            self.restarts += 1
        broken.shutdown(wait=False, cancel_futures=True)

    async def start(self) -> list[WorkerInfo]:
        """Start every pool process (imports, processor) now rather than on the first request."""
        seen: dict[int, WorkerInfo] = {}
        # Processes finish importing at different times and the first one up
        # would take every task, so ask until each has answered (bounded).
        deadline = time.monotonic() + 120.0
        while len(seen) < self.config.pool_size and time.monotonic() < deadline:
            infos = await asyncio.gather(*(self._call(_worker_info, 0.3)
                                           for _ in range(self.config.pool_size)))
            seen.update((i.pid, i) for i in infos)
        self.workers = list(seen.values())
        return self.workers

    async def close(self) -> None:
        """Stop the pool processes (waits for running tasks in a thread), free the slots."""
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        if self._slot_pool is not None:
            self._slot_pool.close()

    # -- requests
    async def process(self, images_b64: Sequence[str]) -> PreprocessResult:
        """Decode and preprocess one request's images; raises :class:`PreprocessError`."""
        t0 = time.perf_counter()
        if len(images_b64) > self.config.max_images:
            raise PreprocessError("too_many_images",
                                  f"{len(images_b64)} images > limit {self.config.max_images}")
        for i, text in enumerate(images_b64):
            # Cheap length check here: an oversize string is never pickled to the pool.
            if len(text) > self.config.max_b64_chars:
                raise PreprocessError("image_too_large", f"image {i}: {len(text)} base64 "
                                      f"characters > limit {self.config.max_b64_chars}")
        images = list(images_b64)
        wire = _wire_numpy_dtype(self.config.pixel_dtype)
        if not images:
            return PreprocessResult(
                pixel_data=np.zeros((0, PATCH_DIM), wire), pixel_dtype=self.config.pixel_dtype,
                image_grid_thw=(), images=0, processor="", worker_pid=0,
                decode_s=0.0, process_s=0.0, total_s=0.0)
        permit = await self._acquire(want_slot=True)
        try:
            slot = permit.shm.name if permit.shm is not None else None
            out = await self._run(permit, _preprocess_in_worker, images, slot)
            if out.pixel_data is not None:
                pixels = out.pixel_data
            elif permit.pixels is not None:
                pixels = permit.pixels
            else:  # mapping the slot failed (cannot happen short of a bug)
                raise PreprocessError("worker_died", f"reading the result failed: "
                                      f"{permit.view_error!r}")
        finally:
            permit.pixels = None  # the result holds the slot's view now, not the permit
            self._done_waiting(permit)
        return PreprocessResult(
            pixel_data=pixels, pixel_dtype=self.config.pixel_dtype, image_grid_thw=out.grid,
            images=len(images), processor=out.processor, worker_pid=out.pid,
            decode_s=out.decode_s, process_s=out.process_s, total_s=time.perf_counter() - t0)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` in the pool under a permit (no slot)."""
        permit = await self._acquire(want_slot=False)
        try:
            return await self._run(permit, fn, *args)
        finally:
            self._done_waiting(permit)

    async def _acquire(self, want_slot: bool) -> _Permit:
        if self._permits is None:
            self._permits = asyncio.Semaphore(self.config.inflight_limit)
        await self._permits.acquire()
        self._inflight += 1
        try:
            slot_pool = self._slot_pool if want_slot else None
            return _Permit(shm=slot_pool.take() if slot_pool is not None else None)
        except BaseException:
            self._inflight -= 1
            self._permits.release()
            raise

    def _release(self, permit: _Permit) -> None:
        """Give back the permit and slot (on the event loop; idempotent)."""
        if permit.released:
            return
        permit.released = True
        permit.future = None  # breaks permit -> future -> pool_done -> permit
        self._inflight -= 1
        if permit.shm is not None and not permit.handed_off and self._slot_pool is not None:
            self._slot_pool.give(permit.shm)
        if self._permits is not None:
            self._permits.release()

    def _done_waiting(self, permit: _Permit) -> None:
        # A permit (and its slot) stays taken until the pool is done with the
        # task, even if the caller was cancelled: the bound is on real work,
        # and a slot is never reused while a pool process may still write it.
        if permit.future is None or permit.future.done():
            self._release(permit)
        else:
            permit.orphaned = True

    async def _run(self, permit: _Permit, fn: Callable[..., _T], *args: Any) -> _T:
        loop = asyncio.get_running_loop()
        wire = _wire_numpy_dtype(self.config.pixel_dtype)
        slot_pool = self._slot_pool

        def pool_done(future: concurrent.futures.Future[Any]) -> None:
            # In the executor's thread, before the caller's await resumes (callbacks
            # run in order): hand the slot over to a view for the result.
            if (permit.shm is not None and slot_pool is not None and not permit.orphaned
                    and not future.cancelled() and future.exception() is None):
                out = future.result()
                if isinstance(out, _WorkerOutput) and out.pixel_data is None:
                    try:
                        permit.pixels = slot_pool.view(permit.shm, wire, out.shape)
                        permit.handed_off = True
                    except Exception as e:  # reported by process()
                        permit.view_error = e
            try:
                loop.call_soon_threadsafe(self._release_if_orphaned, permit)
            except RuntimeError:  # the loop is gone: nobody waits on the permits
                pass

        for _attempt in range(2):
            executor = self._current()
            try:
                future = executor.submit(fn, *args)
            except BrokenProcessPool:
                self._replace(executor)  # it never ran: safe to submit again
                continue
            except RuntimeError as e:  # shut down under us (close() raced)
                raise PreprocessError("closed", str(e)) from None
            permit.future = future
            future.add_done_callback(pool_done)
            try:
                return await asyncio.wrap_future(future)
            except BrokenProcessPool as e:
                self._replace(executor)
                raise PreprocessError("worker_died", "a preprocessing process died while "
                                      f"this request was in the pool ({e})") from None
        raise PreprocessError("worker_died", "the pool broke again on resubmission")

    def _release_if_orphaned(self, permit: _Permit) -> None:
        if permit.orphaned:
            self._release(permit)
