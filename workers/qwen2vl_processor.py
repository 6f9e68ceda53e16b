"""Qwen2-VL's torchvision image processor, reordered to move a quarter of the bytes.

Imported only inside preprocessing pool processes (it loads torch and
transformers). The class *is* transformers' ``Qwen2VLImageProcessor``: its
resize policy (``smart_resize``), grouping by shape, grid and output layout
are inherited unchanged, and every output value is computed by the same
float32 operations as the parent's. What changes is the order:

- the parent converts the resized uint8 image to float32, normalises it in
  two passes, patchifies it with a strided copy that also repeats each patch
  for the temporal patch size (18.8 MB of float32 for 1024×768), and the
  caller then converts that to the engine's dtype;
- here ``rescale_and_normalize`` is deferred, ``patchify`` gathers the
  *uint8* pixels (one byte each, not yet repeated), normalises those
  (per column: the patch dimension is channel-major, so each column has one
  channel) and writes them, repeated and converted to ``output_dtype``, with
  contiguous-block copies, straight into the caller's buffer when it has
  one (:meth:`FusedQwen2VLImageProcessor.preprocess_into`: a shared-memory
  slot).

Measured with two processes on the two cores here (the bench's setting,
where memory traffic, not arithmetic, is what the processes contend for):
the parent's path from resized image to bfloat16 slot ~13–18 ms per
1024×768 image, this one ~6–7 ms. ``tests/unit/test_preprocess.py`` checks
the output against the stock processor: bit-identical in both dtypes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from transformers.models.qwen2_vl import Qwen2VLImageProcessor

# float32 values normalised per chunk: 1 MB, within a core's L2 here (2 MB).
_CHUNK_VALUES = 256 * 1024


@dataclass(frozen=True)
class _Deferred:
    """The parent's rescale/normalise for one group, to apply after patchify."""

    do_rescale: bool
    rescale_factor: float
    # The parent's fused mean and std as float32, shaped (1, channels, 1) to broadcast
    # over (patches, channels, values); None without normalisation.
    mean: torch.Tensor | None
    std: torch.Tensor | None


class FusedQwen2VLImageProcessor(Qwen2VLImageProcessor):
    """``Qwen2VLImageProcessor`` whose pixel values come out in ``output_dtype``."""

    def __init__(self, *, output_dtype: torch.dtype = torch.bfloat16, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.output_dtype = output_dtype
        self._deferred: _Deferred | None = None
        self._destination: memoryview | None = None
        self._scratch: torch.Tensor | None = None

    def preprocess_into(self, image: torch.Tensor, destination: memoryview) -> Any:
        """Process one image, writing its pixel values straight into ``destination`` if they fit.

        The result's ``pixel_values`` is then a view of ``destination``; when
        they don't fit it is an ordinary tensor.
        """
        self._destination = destination
        try:
            return self(images=[image], return_tensors="pt")
        finally:
            self._destination = None

    def rescale_and_normalize(self, images: torch.Tensor, do_rescale: bool,
                              rescale_factor: float, do_normalize: bool,
                              image_mean: float | list[float],
                              image_std: float | list[float]) -> torch.Tensor:
        if images.dtype != torch.uint8:  # not a decoded image: the parent's general path
            out: torch.Tensor = super().rescale_and_normalize(
                images, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            return out.to(self.output_dtype)
        mean, std, do_rescale = self._fuse_mean_std_and_rescale_factor(  # lru-cached: hashable
            do_normalize=do_normalize, image_mean=_hashable(image_mean),
            image_std=_hashable(image_std),
            do_rescale=do_rescale, rescale_factor=rescale_factor, device=images.device)
        channels = images.shape[1]
        self._deferred = _Deferred(
            do_rescale, rescale_factor,
            _per_channel(mean, channels) if do_normalize else None,
            _per_channel(std, channels) if do_normalize else None)
        return images  # patchify applies it, on a quarter of the bytes

    def patchify(self, images: torch.Tensor, patch_size: int, merge_size: int,
                 temporal_patch_size: int) -> tuple[torch.Tensor, int, int]:
        deferred, self._deferred = self._deferred, None
        if deferred is None:  # already normalised (parent path above)
            return super().patchify(images, patch_size, merge_size, temporal_patch_size)
        batch, channels, height, width = images.shape
        grid_h, grid_w = height // patch_size, width // patch_size
        patches = grid_h * grid_w
        # [batch, grid_h/merge, grid_w/merge, merge, merge, channel, patch, patch]:
        # the parent's order, without the temporal repeat.
        gathered = images.reshape(batch, channels, grid_h // merge_size, merge_size, patch_size,
                                  grid_w // merge_size, merge_size, patch_size
                                  ).permute(0, 2, 5, 3, 6, 1, 4, 7
                                            ).reshape(batch * patches, channels, patch_size ** 2)
        out = self._output((batch * patches, channels, temporal_patch_size, patch_size ** 2))
        # In chunks of patches whose float32 values stay in the core's cache: the
        # normalised values never travel to memory and back (a whole image's are
        # 9.4 MB), which is what two processes on two cores contend for.
        step = max(1, _CHUNK_VALUES // (channels * patch_size ** 2))
        scratch = self._float_scratch(min(step, batch * patches) * channels * patch_size ** 2)
        for start in range(0, batch * patches, step):
            rows = gathered[start:start + step]
            values = _normalise(rows, deferred, scratch[:rows.numel()])
            # The dtype conversion once, then the temporal repeats as same-dtype copies.
            chunk = out[start:start + step]
            chunk[:, :, 0].copy_(values)
            for t in range(1, temporal_patch_size):
                chunk[:, :, t].copy_(chunk[:, :, 0])
        flat = out.view(batch, patches, channels * temporal_patch_size * patch_size ** 2)
        return flat, grid_h, grid_w

    def _float_scratch(self, count: int) -> torch.Tensor:
        """A float32 buffer of ``count`` values, reused across calls (values are copied out)."""
        if self._scratch is None or self._scratch.numel() < count:
            self._scratch = torch.empty(count, dtype=torch.float32)
        return self._scratch[:count]

    def _output(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The patch array: in the caller's destination (once per call) or a new one."""
        destination, self._destination = self._destination, None
        nbytes = math.prod(shape) * self.output_dtype.itemsize
        if destination is None or nbytes > destination.nbytes:
            return torch.empty(shape, dtype=self.output_dtype)
        raw = torch.frombuffer(destination, dtype=torch.uint8, count=nbytes)
        return raw.view(self.output_dtype).view(shape)


def _hashable(value: float | list[float]) -> float | tuple[float, ...]:
    return tuple(value) if isinstance(value, list) else value


def _per_channel(value: Any, channels: int) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float32).expand(channels).view(1, channels, 1)


def _normalise(gathered: torch.Tensor, deferred: _Deferred, scratch: torch.Tensor
               ) -> torch.Tensor:
    """The parent's float32 arithmetic, element for element, on (n, channels, k) uint8.

    In place in ``scratch`` (flat float32, as many values): converting first and
    then subtracting and dividing in place runs ~3x faster than letting ``sub``
    promote the uint8 operand itself, with the same results.
    """
    values = scratch.view(gathered.shape)
    values.copy_(gathered)
    if deferred.mean is not None and deferred.std is not None:
        # torchvision's normalize: (x - mean) / std, on float32.
        return values.sub_(deferred.mean).div_(deferred.std)
    if deferred.do_rescale:
        return values.mul_(deferred.rescale_factor)
    return values


__all__ = ["FusedQwen2VLImageProcessor"]
