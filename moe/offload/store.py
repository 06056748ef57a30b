"""Tiered expert store: safetensors on disk (mmap) -> CPU RAM (pinned with CUDA) -> device cache.

Each expert is one coalesced flat buffer [w_in (D x F) | w_out (H x D)], so a tier change is a
single transfer. Disk reads run on one worker thread; an expert already in RAM is copied from the
calling thread. On CUDA the host -> device copies run on two copy streams (demand misses,
prefetches), so both overlap compute.

With quantized experts (OffloadConfig.expert_quant) the buffers are uint8 and the shapes are
moe.offload.quantized.QuantizedExpertShape: the same code moves and counts the quantized bytes.

Shape legend: D model dim, H expert hidden dim, F = 2H (SwiGLU).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

__all__ = ["Key", "ExpertShape", "Reader", "DeviceEntry", "ExpertStore"]


Key = tuple[int, int]


@dataclass(frozen=True)
class ExpertShape:
    """Shapes of one expert: w_in [dim, width], w_out [hidden, dim]."""

    dim: int
    hidden: int
    width: int

    @property
    def numel(self) -> int:
        """Elements of one coalesced expert buffer: D * F (w_in) + H * D (w_out)."""
        return self.dim * self.width + self.hidden * self.dim

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_in [D, F], w_out [H, D]) views of a coalesced buffer."""
        n_in = self.dim * self.width
        return flat[:n_in].view(self.dim, self.width), flat[n_in : self.numel].view(self.hidden, self.dim)


# reader(key, out_flat): fills a host buffer with the expert's coalesced weights.
Reader = Callable[[Key, torch.Tensor], None]


@dataclass
class DeviceEntry:
    """A device-resident expert: its buffer and what signals that its copy finished."""

    flat: torch.Tensor
    future: Future[None] | None = None
    event: torch.cuda.Event | None = None


class ExpertStore:
    """Moves experts between disk, a RAM tier and the device.

    Args:
        reader: fills a host buffer for a key (disk tier; e.g. moe.offload.checkpoint reads).
        shapes: expert shape per layer.
        dtype: dtype of the stored buffers.
        device: compute device; the device tier lives there.
        ram_cache_bytes: RAM tier budget (None = keep every expert read; 0 = stream from disk).
    """

    def __init__(
        self,
        reader: Reader,
        shapes: dict[int, ExpertShape],
        dtype: torch.dtype,
        device: torch.device,
        ram_cache_bytes: int | None = None,
    ) -> None:
        self.reader, self.shapes, self.dtype, self.device = reader, shapes, dtype, torch.device(device)
        self.ram_cache_bytes = ram_cache_bytes
        self.pin = self.device.type == "cuda" and torch.cuda.is_available()
        # Two copy streams: copies on one stream run in order, and a demand miss, needed now,
        # must not wait behind prefetches for later layers. Copies on the two share the link.
        self.copy_stream = torch.cuda.Stream(self.device, priority=-1) if self.pin else None
        self.prefetch_stream = torch.cuda.Stream(self.device) if self.pin else None
        self.ram: OrderedDict[Key, torch.Tensor] = OrderedDict()  # changed under _lock
        self.ram_bytes = 0
        self.device_entries: dict[Key, DeviceEntry] = {}
        self.disk_reads = 0
        self._lock = threading.Lock()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moe-offload")

    def expert_bytes(self, layer: int) -> int:
        """Bytes of one expert of `layer` (its coalesced buffer in the store's dtype)."""
        return self.shapes[layer].numel * torch.empty((), dtype=self.dtype).element_size()

    # ---- RAM tier (filled by the worker thread; looked up under the lock) ----
    def _ram_get(self, key: Key) -> torch.Tensor | None:
        with self._lock:
            buf = self.ram.get(key)
            if buf is not None:
                self.ram.move_to_end(key)
            return buf

    def _host(self, key: Key) -> torch.Tensor:
        buf = self._ram_get(key)
        if buf is not None:
            return buf
        buf = torch.empty(self.shapes[key[0]].numel, dtype=self.dtype, pin_memory=self.pin)
        self.reader(key, buf)
        nbytes = buf.numel() * buf.element_size()
        with self._lock:
            self.disk_reads += 1
            if self.ram_cache_bytes is None or nbytes <= self.ram_cache_bytes:
                self.ram[key] = buf
                self.ram_bytes += nbytes
                while self.ram_cache_bytes is not None and self.ram_bytes > self.ram_cache_bytes:
                    _, old = self.ram.popitem(last=False)
                    self.ram_bytes -= old.numel() * old.element_size()
        return buf

    def host(self, key: Key) -> torch.Tensor:
        """The expert's coalesced buffer in RAM (read from disk if needed); blocks."""
        buf = self._ram_get(key)  # in RAM: no need to queue behind the worker's pending reads
        return buf if buf is not None else self._worker.submit(self._host, key).result()

    # ---- device tier ----
    def fetch(self, key: Key, prefetch: bool = False) -> DeviceEntry:
        """Starts an asynchronous copy of key to the device; returns its entry at once.

        prefetch=True puts the copy on the prefetch stream (CUDA), so that demand copies do not
        queue behind it.

        An expert already in RAM is copied from this thread: on CUDA the copy is only enqueued on
        the copy stream, and a worker thread would first wait for the GIL, up to the interpreter's
        switch interval (5 ms) while this thread runs the model, so a prefetch would land a layer
        late. On a CPU device the RAM buffer itself serves as the device copy (same memory).
        Only disk reads go to the worker.
        """
        host = self._ram_get(key)
        if self.copy_stream is None:
            if host is not None:
                entry = DeviceEntry(host)
            else:
                flat = torch.empty(self.shapes[key[0]].numel, dtype=self.dtype, device=self.device)

                def copy_cpu() -> None:
                    flat.copy_(self._host(key))

                entry = DeviceEntry(flat, future=self._worker.submit(copy_cpu))
            self.device_entries[key] = entry
            return entry
        # Every buffer is allocated on the demand copy stream (one caching-allocator pool: two
        # pools could together hold twice the budget); a prefetch copy on the other stream is
        # recorded on the block, so it is not reused before that copy finishes. ready() records
        # each compute-stream use the same way.
        stream = self.prefetch_stream if prefetch else self.copy_stream
        assert stream is not None and self.copy_stream is not None
        with torch.cuda.stream(self.copy_stream):
            flat = torch.empty(self.shapes[key[0]].numel, dtype=self.dtype, device=self.device)
        if stream is not self.copy_stream:
            flat.record_stream(stream)
        event = torch.cuda.Event()
        entry = DeviceEntry(flat, event=event)

        def copy_cuda(src: torch.Tensor) -> None:
            with torch.cuda.stream(stream):
                flat.copy_(src, non_blocking=True)
                event.record(stream)

        if host is not None:
            copy_cuda(host)
        else:
            entry.future = self._worker.submit(lambda: copy_cuda(self._host(key)))
        self.device_entries[key] = entry
        return entry

    def in_flight(self) -> int:
        """Device copies started and not finished yet (a disk read still pending counts; a copy
        that ready() has handed to the compute stream no longer does)."""
        return sum(
            (e.future is not None and not e.future.done()) or (e.event is not None and not e.event.query())
            for e in self.device_entries.values()
        )

    def ready(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """Waits for key's copy (the compute stream waits on CUDA) and returns (w_in, w_out) on the device."""
        entry = self.device_entries[key]
        if entry.future is not None:
            entry.future.result()
            entry.future = None
        if entry.event is not None:
            torch.cuda.current_stream(self.device).wait_event(entry.event)
            entry.event = None
        if self.copy_stream is not None:
            entry.flat.record_stream(torch.cuda.current_stream(self.device))
        return self.shapes[key[0]].views(entry.flat)

    def drop(self, key: Key) -> None:
        """Frees key's device buffer: a copy still queued is cancelled, one under way is waited for."""
        entry = self.device_entries.pop(key, None)
        if entry is not None and entry.future is not None and not entry.future.cancel():
            entry.future.exception()  # waits; a failed read must not fail the eviction that drops it

    def close(self) -> None:
        """Stops the copy worker thread, after the copies already queued."""
        self._worker.shutdown(wait=True)
