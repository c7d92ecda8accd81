"""impl="auto" trusts the Triton head only after it matched the chunked head on a probe (CPU: interpreter)."""

from __future__ import annotations

import warnings

import pytest
import torch

from edpo_plugin.ops import dispatch, resolve_impl, triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.fixture
def selfcheck(monkeypatch):
    from edpo_plugin.ops import triton_selfcheck

    monkeypatch.setattr(triton_selfcheck, "_RESULTS", {})
    return triton_selfcheck


def test_probe_passes_on_a_working_kernel(selfcheck):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.triton_passes_self_check(torch.device("cpu"), torch.float32)


def test_probe_passes_when_first_called_under_inference_mode(selfcheck):
    """An evaluation loop may be the first caller: no_grad/inference_mode must not fail the probe."""
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert selfcheck.triton_passes_self_check(torch.device("cpu"), torch.float32)


def test_launch_failure_warns_once_naming_device_and_error_then_falls_back(selfcheck, monkeypatch):
    from edpo_plugin.ops import triton_fold

    def broken(*args, **kwargs):
        raise RuntimeError("PTX codegen error (forced by the test)")

    monkeypatch.setattr(triton_fold, "fold_triton", broken)
    dev = torch.device("cpu")
    with pytest.warns(RuntimeWarning, match=r"cpu.*PTX codegen error \(forced by the test\).*chunked"):
        assert not selfcheck.triton_passes_self_check(dev, torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cached: no second warning, no second probe
        assert not selfcheck.triton_passes_self_check(dev, torch.float32)


def test_wrong_numbers_are_caught(selfcheck, monkeypatch):
    from edpo_plugin.ops import triton_fold

    real = triton_fold.fold_triton

    def off_by_a_bit(z, b_p, b_r, stats, *args, **kwargs):
        out = real(z, b_p, b_r, stats, *args, **kwargs)
        stats.sum.mul_(1.01)
        return out

    monkeypatch.setattr(triton_fold, "fold_triton", off_by_a_bit)
    with pytest.warns(RuntimeWarning, match="policy stream differs"):
        assert not selfcheck.triton_passes_self_check(torch.device("cpu"), torch.float32)


def test_wrong_gradients_are_caught(selfcheck, monkeypatch):
    from edpo_plugin.ops import triton_fold

    real = triton_fold.grad_fold_triton

    def scaled(*args, **kwargs):
        return real(*args, **kwargs) * 1.1

    monkeypatch.setattr(triton_fold, "grad_fold_triton", scaled)
    with pytest.warns(RuntimeWarning, match="trainable head: hidden gradient differs"):
        assert not selfcheck.triton_passes_self_check(torch.device("cpu"), torch.float32)


def test_auto_consults_the_self_check_on_cuda_only(selfcheck, monkeypatch):
    calls = []

    def verdict(ok):
        def check(device, dtype):
            calls.append((device.type, dtype))
            return ok

        return check

    cuda = torch.device("cuda", 0)  # resolve_impl only inspects the device; nothing runs on it
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(selfcheck, "triton_passes_self_check", verdict(False))
    assert resolve_impl("auto", cuda, torch.bfloat16) == "chunked"
    monkeypatch.setattr(selfcheck, "triton_passes_self_check", verdict(True))
    assert resolve_impl("auto", cuda, torch.bfloat16) == "triton"
    assert resolve_impl("auto", torch.device("cpu"), torch.bfloat16) == "chunked"
    assert resolve_impl("triton", torch.device("cpu")) == "triton"  # an explicit choice is not second-guessed
    assert calls == [("cuda", torch.bfloat16)] * 2
