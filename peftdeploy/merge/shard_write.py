"""Streaming safetensors shards out: `ShardWriter` computes the header up front from the known names, dtypes and
shapes, then streams each tensor's bytes in order (one tensor held at a time) through a `WriteQueue` (a writer
thread, block-aligned buffers, O_DIRECT where the filesystem takes it). The files are byte-for-byte what the
safetensors library itself accepts (header padded with spaces to a multiple of 8, contiguous data,
``__metadata__ = {"format": "pt"}``). Reading is shard_read.py."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from peftdeploy import safetensors_format as _format
from peftdeploy.merge.shard_read import ST_ITEMSIZE, pread_exact

if TYPE_CHECKING:  # numpy / torch are imported where a shard is written, not when this module is
    import numpy as np
    import torch


def tensor_bytes(t: "torch.Tensor") -> memoryview:
    """The raw little-endian bytes of a tensor (contiguous, CPU), without copying when possible."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
    while len(mv):
        n = os.write(fd, mv)
        mv = mv[n:]


def copy_range(src_fd: int, dst_fd: int, offset: int, nbytes: int, *, bufsize: int = 8 << 20) -> None:
    """Copy bytes `offset:offset+nbytes` of src to the current position of dst (kernel-side when possible)."""
    remaining = nbytes
    pos = offset
    if hasattr(os, "copy_file_range"):
        try:
            while remaining:
                n = os.copy_file_range(src_fd, dst_fd, min(remaining, 1 << 30), pos)
                if n <= 0:
                    break
                remaining -= n
                pos += n
        except OSError:
            pass  # e.g. EXDEV on old kernels, or an fs that refuses; finish in user space
    if remaining:
        buf = memoryview(bytearray(min(bufsize, remaining)))
        while remaining:
            k = min(len(buf), remaining)
            chunk = pread_exact(src_fd, k, pos, buf)
            write_all(dst_fd, chunk)
            remaining -= k
            pos += k


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = ST_ITEMSIZE[self.dtype]
        for s in self.shape:
            n *= s
        return n


def build_header(tensors: Iterable[OutTensor], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header for tensors laid out contiguously in the given order."""
    return _format.build_header([(t.name, t.dtype, t.shape, t.nbytes) for t in tensors], metadata)


DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length in multiples of the block size


def aligned_buffer(nbytes: int) -> "np.ndarray":
    """An uninitialized uint8 array of `nbytes` at a block-aligned address (for O_DIRECT).

    Plain 4 KiB pages on purpose: asking for transparent huge pages (madvise) did not shorten the
    median merge and, on a kernel that compacts memory for them on demand (``defrag=madvise``),
    stalled now and then (1.67 GB merge, 12 runs each: max 1.00 s with huge pages vs 0.75 s
    without; 1.91 s once in another 10)."""
    import numpy as np

    raw = np.empty(nbytes + DIRECT_ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % DIRECT_ALIGN
    return raw[skip:skip + nbytes]


class WriteQueue:
    """A writer thread and a few block-aligned staging buffers, shared by the ShardWriters of one
    output: the caller fills a buffer while the thread writes the previous ones, and a shard's
    last block and close are queued too, so the next shard's bytes are produced while the last
    ones of this shard still go to the disk. Errors of the thread are raised in the caller at the
    next buffer it takes, and by :meth:`close`, which waits for everything queued."""

    def __init__(self, buffer_bytes: int = 16 << 20, buffers: int = 4):
        import queue
        import threading

        import numpy as np

        self.buffer_bytes = max(DIRECT_ALIGN, buffer_bytes // DIRECT_ALIGN * DIRECT_ALIGN)
        self._free: "queue.Queue[np.ndarray]" = queue.Queue()
        self._todo: "queue.Queue[tuple[Any, np.ndarray | None] | None]" = queue.Queue()
        self._nbuf = max(2, buffers)
        self._made = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="peftdeploy-write", daemon=True)
        self._thread.start()

    def _new_buffer(self) -> "np.ndarray":
        self._made += 1
        return aligned_buffer(self.buffer_bytes)

    def buffer(self) -> "np.ndarray":
        """A free staging buffer (waits for the writer to give one back when all are in flight)."""
        import queue

        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = self._new_buffer() if self._made < self._nbuf else self._free.get()
        self.check()
        return buf

    def submit(self, op: Any, buf: "np.ndarray | None" = None) -> None:
        """Run op() on the writer thread after everything queued before; give `buf` back after it."""
        self._todo.put((op, buf))

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def _loop(self) -> None:
        while True:
            item = self._todo.get()
            if item is None:
                return
            op, buf = item
            try:
                if self._error is None:
                    op()
            except BaseException as e:  # noqa: BLE001 - raised in the caller's thread
                self._error = e
            finally:
                if buf is not None:
                    self._free.put(buf)

    def close(self, *, check: bool = True) -> None:
        """Wait for everything queued, stop the thread; raise its first error (if `check`)."""
        if self._thread.is_alive():
            self._todo.put(None)
            self._thread.join()
        if check:
            self.check()


class ShardWriter:
    """Write one safetensors file by streaming tensors in a layout fixed up front.

    `direct=True` writes with ``O_DIRECT`` where the filesystem allows it: the bytes go through
    block-aligned staging buffers straight to the disk instead of into the page cache. Buffered
    writes of a new file cost the kernel a page allocation (and, on a machine whose memory is full
    of cache, a reclaim) per 4 KiB: as much CPU as the rest of a merge and very variable; direct
    writes cost no CPU but the disk's time. The buffers and the thread that writes them come from
    a :class:`WriteQueue` (`queue`, shared by the shards of one output; without one the writer
    makes its own of `buffer_bytes` × `buffers` and :meth:`close` waits for it). Falls back to
    buffered writes (silently) where ``O_DIRECT`` is refused (tmpfs, some network filesystems) or
    a direct write fails with EINVAL.

    Tensors are added in order with :meth:`write_bytes` (bytes at hand), :meth:`copy_from` (a byte
    range of another file) or :meth:`spans` (the caller computes the bytes straight into the
    staging buffer). With a shared queue, :meth:`close` only queues the end of the file: the
    queue's own close confirms it.
    """

    def __init__(self, path: Path, tensors: list[OutTensor], metadata: dict[str, str] | None = None, *,
                 direct: bool = False, buffer_bytes: int = 8 << 20, buffers: int = 3,
                 queue: WriteQueue | None = None, hasher: Any = None):
        self.path = Path(path)
        self.tensors = tensors
        self._expected = [(t.name, t.nbytes) for t in tensors]
        self._i = 0
        header = build_header(tensors, metadata if metadata is not None else {"format": "pt"})
        self.size = len(header) + sum(t.nbytes for t in tensors)
        self.direct = False
        self.fd = -1
        self._staged = False
        self._q: WriteQueue | None = None
        self._own_q = False
        self._buf = self._mv = None
        # `hasher` (e.g. manifest.stream_hasher()): the file's bytes, in order, on the writer thread
        # (direct mode only: buffered writes leave the digest to a hash of the file, `digest` None)
        self._hasher = hasher
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, flags | os.O_DIRECT, 0o644)
                self.direct = True
            except OSError:
                self.fd = -1
        if self.fd < 0:
            self.fd = os.open(self.path, flags, 0o644)
        if not self.direct:
            self._hasher = None
        try:
            if self.direct:
                self._staged = True
                self._own_q = queue is None
                self._q = queue if queue is not None else WriteQueue(buffer_bytes, buffers)
                self._pos = 0  # bytes written to the file (by the writer thread)
                self._buf = self._q.buffer()
                self._mv = memoryview(self._buf)
                self._n = 0  # bytes staged in self._buf
                self._stage(memoryview(header))
            else:
                write_all(self.fd, header)
        except BaseException:
            self.abort()
            raise

    # -- direct I/O staging ------------------------------------------------------------------------
    def _write_block(self, fd: int, mv: memoryview) -> None:  # on the writer thread
        if self.direct:
            try:
                write_all(fd, mv)
            except OSError as e:
                import errno

                if e.errno != errno.EINVAL:
                    raise
                self._to_buffered(fd)
                write_all(fd, mv)
        else:
            write_all(fd, mv)
        self._pos += len(mv)

    def _to_buffered(self, fd: int) -> None:
        import fcntl

        fl = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_DIRECT)
        os.lseek(fd, self._pos, os.SEEK_SET)
        self.direct = False

    def _flush(self, final: bool = False) -> None:
        n = real = self._n
        if final and n % DIRECT_ALIGN:
            pad = -n % DIRECT_ALIGN
            self._buf[n:n + pad] = 0
            n += pad
        buf, self._n = self._buf, 0
        if n:
            fd = self.fd
            h = self._hasher
            if h is not None:  # on the writer thread too, before the buffer is reused; not the padding
                self._q.submit(lambda: h.update(memoryview(buf)[:real]))
            self._q.submit(lambda: self._write_block(fd, memoryview(buf)[:n]), buf)
        elif final:
            self._q.submit(lambda: None, buf)  # give the buffer back in order
        if final:
            self._buf = self._mv = None
        else:
            if n:
                self._buf = self._q.buffer()
                self._mv = memoryview(self._buf)
            self._q.check()

    def _stage(self, mv: memoryview) -> None:
        import numpy as np

        src = np.frombuffer(mv, dtype=np.uint8) if len(mv) else None
        done = 0
        cap = len(self._buf)
        while done < len(mv):
            k = min(len(mv) - done, cap - self._n)
            np.copyto(self._buf[self._n:self._n + k], src[done:done + k])  # drops the GIL
            self._n += k
            done += k
            if self._n == cap:
                self._flush()

    def _stage_from(self, src_fd: int, offset: int, nbytes: int) -> None:
        cap = len(self._buf)
        while nbytes:
            k = min(nbytes, cap - self._n)
            pread_exact(src_fd, k, offset, self._mv[self._n:self._n + k])
            self._n += k
            offset += k
            nbytes -= k
            if self._n == cap:
                self._flush()

    # -- API -------------------------------------------------------------------------------------
    def _next(self, name: str, nbytes: int) -> None:
        if self._i >= len(self._expected):
            raise RuntimeError(f"{self.path}: unexpected tensor {name}")
        exp_name, exp_bytes = self._expected[self._i]
        if (exp_name, exp_bytes) != (name, nbytes):
            raise RuntimeError(f"{self.path}: expected {exp_name} ({exp_bytes} B), got {name} ({nbytes} B)")
        self._i += 1

    def write_bytes(self, name: str, data: memoryview | bytes) -> None:
        mv = memoryview(data).cast("B")
        self._next(name, len(mv))
        if self._staged:
            self._stage(mv)
        else:
            write_all(self.fd, mv)

    def copy_from(self, name: str, src_fd: int, offset: int, nbytes: int) -> None:
        self._next(name, nbytes)
        if self._staged:
            self._stage_from(src_fd, offset, nbytes)  # pread into the staging buffer: one copy
        else:
            copy_range(src_fd, self.fd, offset, nbytes)

    def spans(self, name: str, nbytes: int, unit: int = 1, max_bytes: int = 8 << 20) -> "Iterator[np.ndarray]":
        """The next tensor's bytes as writable uint8 arrays, in order, for the caller to fill
        (each before asking for the next): slices of the staging buffer where they fit whole
        `unit`s (the element size), otherwise (unbuffered mode, or an element split by the end of
        a staging buffer) a scratch array of at most `max_bytes` that is written once filled."""
        import numpy as np

        self._next(name, nbytes)
        left = nbytes
        while left:
            if self._staged:
                k = min(left, len(self._buf) - self._n) // unit * unit
                if k:
                    yield self._buf[self._n:self._n + k]
                    self._n += k
                    left -= k
                    if self._n == len(self._buf):
                        self._flush()
                    continue
                tmp = np.empty(min(left, unit), np.uint8)  # an element across two staging buffers
                yield tmp
                self._stage(memoryview(tmp))
                left -= len(tmp)
            else:
                tmp = getattr(self, "_scratch", None)
                want = min(left, max(unit, max_bytes // unit * unit))
                if tmp is None or len(tmp) < want:
                    tmp = self._scratch = np.empty(want, np.uint8)
                yield tmp[:want]
                write_all(self.fd, memoryview(tmp[:want]))
                left -= want

    def close(self, *, fsync: bool = False) -> None:
        """Finish the file (checks that every tensor was written). With a shared queue the end of
        the file is queued and the queue's close confirms it; otherwise it is done on return."""
        if self.fd < 0:
            return
        if self._i != len(self._expected):
            self.abort()
            raise RuntimeError(f"{self.path}: closed after {self._i}/{len(self._expected)} tensors")
        if not self._staged:
            try:
                if fsync:
                    os.fsync(self.fd)
            finally:
                os.close(self.fd)
                self.fd = -1
            return
        fd, size = self.fd, self.size
        self._flush(final=True)

        def finish() -> None:
            try:
                os.ftruncate(fd, size)  # drop the padding of the last block
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)

        self.fd = -1
        self._q.submit(finish)
        if self._own_q:
            self._q.close()

    def digest(self) -> str | None:
        """``<algo>:<hex>`` of the file's bytes when a `hasher` saw them all (direct mode), read once the
        writes are done (the queue closed); None otherwise."""
        if self._hasher is None:
            return None
        return f"{self._hasher.name}:{self._hasher.hexdigest()}"

    def abort(self) -> None:
        """Give up on the file (the caller removes it): the fd is closed after what is queued."""
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self._q is None:
            os.close(fd)
            return
        if self._buf is not None:
            self._q.submit(lambda: None, self._buf)
            self._buf = self._mv = None
        self._q.submit(lambda: os.close(fd))
        if self._own_q:
            self._q.close(check=False)
