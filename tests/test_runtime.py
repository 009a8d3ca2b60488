"""The process a run lives in: device choice, bf16, the stop-signal helper."""

import os
import signal

import pytest
import torch

from cnnlab.errors import CnnlabError
from cnnlab.runtime import StopRequest, resolve_device


def test_precision_choice(monkeypatch):
    from cnnlab import runtime as train

    cpu, messages = torch.device("cpu"), []
    assert train.autocast_dtype("fp32", cpu) is None and train.autocast_dtype("auto", cpu) is None
    assert train.autocast_dtype("auto", torch.device("cuda")) is torch.bfloat16
    monkeypatch.setattr(train, "_cpu_has_bf16", lambda: False)
    assert train.autocast_dtype("bf16", cpu, messages.append) is None
    assert "no bf16 instructions" in messages[0]
    monkeypatch.setattr(train, "_cpu_has_bf16", lambda: True)
    assert train.autocast_dtype("bf16", cpu) is torch.bfloat16



def test_resolve_device_refuses_a_missing_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(CnnlabError, match="no CUDA GPU"):
        resolve_device("cuda")


def test_a_stop_inside_nested_requests_reaches_every_one_and_the_second_signal_aborts():
    """tune's worker loop holds a StopRequest while a trial's training holds its own: a SIGTERM that
    arrives inside the trial (its evaluation, its save) must also stop the loop around it."""
    before = signal.getsignal(signal.SIGTERM)
    with StopRequest(message=None) as outer:
        with StopRequest(message=None) as inner:
            os.kill(os.getpid(), signal.SIGTERM)
            assert inner.requested and outer.requested and inner.exit_code() == 143
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGTERM)
        with StopRequest(message=None) as later:  # new work started after the stop sees it at once
            assert later.requested
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers are given back


@pytest.mark.parametrize("asked", [512, 100_000])
def test_threads_beyond_the_cores_are_clamped_with_a_warning(asked):
    from cnnlab.runtime import set_threads, usable_cores

    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        assert set_threads(asked, lines.append) == usable_cores() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert len(lines) == 1 and f"train.threads={asked:,}" in lines[0] and f"using {usable_cores()}" in lines[0]


def test_threads_within_the_cores_are_kept_without_a_word():
    from cnnlab.runtime import set_threads

    before = torch.get_num_threads()
    lines: list[str] = []
    try:
        assert set_threads(1, lines.append) == 1
    finally:
        torch.set_num_threads(before)
    assert lines == []


def test_memory_available_reads_an_address_space_cap():
    import resource

    from cnnlab.runtime import memory_available

    free = memory_available()
    assert free is not None and free > 0  # Linux: /proc/meminfo at least
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    # a cap just above what the process maps now leaves almost nothing; restored at once
    mapped = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (mapped + (64 << 20), hard))
    try:
        assert memory_available() <= 64 << 20
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
