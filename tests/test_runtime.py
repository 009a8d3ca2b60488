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
