"""The process a run lives in: device, threads, memory, bf16, random state, torchrun's process
group, the cache folder and stop signals. One home for each, used by training, lr-find, tune,
predict, explain, serve and the commands; nothing here knows about models or runs."""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CnnlabError


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CnnlabError("train.device: cuda was asked for but no CUDA GPU is available (use --device cpu or auto)")
    return torch.device(name)


def set_threads(threads: int, log=None) -> int:
    """One PyTorch thread per physical core: hyper-threads only add contention to conv kernels.

    More threads than the cores this process may run on are clamped, with a warning: each extra one
    only waits for a core (512 threads on 2 cores trained 19 times slower), and 100,000 of them
    exhaust memory before the first step. Returns the threads used."""
    cores = usable_cores()
    if threads <= 0:
        threads = max(1, (os.cpu_count() or 2) // (2 if _has_smt() else 1))
        threads = min(threads, cores)
    elif threads > cores:
        (log or _warn)(f"warning: train.threads={threads:,} is more than the {cores} core(s) this process may use; "
                       f"using {cores}")
        threads = cores
    torch.set_num_threads(threads)
    return threads


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity: a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _warn(line: str) -> None:
    print(line, file=sys.stderr)


def memory_available() -> int | None:
    """Bytes this process can still allocate, the least of: the machine's available memory, its
    cgroup's limit, and its address-space limit (`prlimit --as`, `ulimit -v`) less what it already
    maps. None when none of them can be read (not Linux)."""
    import resource

    found = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        mapped = 0
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmSize:"):
                    mapped = int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        found.append(max(0, soft - mapped))
    return min(found) if found else None


def keep_freed_memory() -> None:
    """Let glibc keep freed activation memory in the process instead of returning it every step.

    By default glibc serves large blocks with mmap and unmaps them on free, so each training step
    page-faults its activations in again: cifar-fast spent a third of its CPU time in the kernel,
    and these settings trained it 35% faster (benchmarks/NOTES.md). Linux with glibc only.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # another C library: nothing to tune
        return
    mallopt(-3, 32 * 2**20)   # M_MMAP_THRESHOLD: blocks below 32 MiB (glibc's maximum) come from the heap
    mallopt(-1, 256 * 2**20)  # M_TRIM_THRESHOLD: give heap memory back only beyond 256 MiB free
    mallopt(-2, 64 * 2**20)   # M_TOP_PAD: grow the heap in 64 MiB steps


def _has_smt() -> bool:
    try:
        return Path("/sys/devices/system/cpu/smt/active").read_text().strip() == "1"
    except OSError:
        return False


def autocast_dtype(precision: str, device: torch.device, log=print) -> torch.dtype | None:
    """The autocast dtype for training, or None for plain fp32.

    bf16 halves the memory traffic and, on GPUs and on CPUs with bf16 instructions (AVX512-BF16,
    AMX), runs matrix products about twice as fast; weights, the loss and the optimizer stay fp32.
    """
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if device.type == "cpu" and not _cpu_has_bf16():
        log("warning: train.precision=bf16, but this CPU has no bf16 instructions (emulated bf16 is slower "
            "than fp32): training in fp32")
        return None
    return torch.bfloat16


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


def cache_root() -> Path:
    """Where cnnlab keeps what it can make again (downloads, decoded folders, unpacked archives):
    $CNNLAB_CACHE, else ~/.cache/cnnlab."""
    return Path(os.environ.get("CNNLAB_CACHE") or Path.home() / ".cache" / "cnnlab").expanduser()


def downloads_allowed() -> bool:
    """False when CNNLAB_OFFLINE is set (tests set it): nothing may touch the network."""
    return not os.environ.get("CNNLAB_OFFLINE")


def get_model_rng(device: torch.device) -> torch.Tensor:
    # dropout draws from the global generator of the device it runs on
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_model_rng(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state.cpu(), device)
    else:
        torch.set_rng_state(state.cpu())


# Set once this process has joined a torchrun process group: the program must then end with
# os._exit (`cli.exit_process`), see there.
process_group_used = False


def init_distributed() -> tuple[Distributed, bool]:
    """The process group torchrun asks for, and whether this call created it (and so must destroy it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(), False
    import torch.distributed as torch_dist

    global process_group_used
    created = not torch_dist.is_initialized()
    if created:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch_dist.init_process_group(backend)
    process_group_used = True
    return Distributed(rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size()), created


class StopRequest:
    """The one stop-signal helper: inside `with StopRequest() as stop`, the first SIGINT/SIGTERM sets
    `stop.requested` (the work ends at its next safe point: after a training step, after a trial) and
    the second raises KeyboardInterrupt (stop now).

    Requests nest: a stop that arrives inside an inner `with` (a trial's training inside tune's worker
    loop) is a stop for every enclosing one too, so the outer loop never starts new work after it,
    whenever the signal came (a step, the evaluation, the save).
    """

    _active: list["StopRequest"] = []  # the open `with` blocks, outermost first

    def __init__(self, message: str | None = "stopping after this step and saving where it stopped "
                                           "(Ctrl-C again to abort) ..."):
        self.message = message
        self.requested = False
        self.signal = 0
        self.position: dict[str, Any] | None = None  # training: the mid-epoch state to save
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        outer = self._active[-1] if self._active else None
        if outer is not None and outer.requested:  # a stop already asked for reaches new work at once
            self.requested, self.signal = True, outer.signal
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals go to the main thread's handler
                pass
        self._active.append(self)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: stop now
            raise KeyboardInterrupt
        for request in self._active:
            request.requested, request.signal = True, signum
        if self.message:
            print(f"\n{self.message}", file=sys.stderr, flush=True)

    def exit_code(self) -> int:
        """130 after Ctrl-C (SIGINT), 143 after SIGTERM: the shell's codes for a process ended by them."""
        return 130 if self.signal == signal.SIGINT else 143

    def __exit__(self, *exc) -> bool:
        if self in self._active:
            self._active.remove(self)
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
