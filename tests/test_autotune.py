"""backend="auto" per device: selection, disk cache, corruption, env override, self-check
fallback, on CPU with a fake timer and a fake "cuda" device (the real Triton kernels run under
the interpreter, so the self-check compares real kernels with the torch path)."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from apo_kernels.ops import autotune
from apo_kernels.ops.autotune import Candidate

FAKE_GPU = ("cuda", "Fake GPU 80GB")


def fake_key(device):
    return FAKE_GPU


class FakeTimer:
    """Seconds per candidate name; records what was timed (and runs each step once)."""

    def __init__(self, **seconds):
        self.seconds, self.calls = seconds, []

    def __call__(self, name, fn):
        fn()
        self.calls.append(name)
        return self.seconds[name]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.CACHE_ENV, str(tmp_path / "cache"))
    autotune.reset_memory_cache()
    yield tmp_path / "cache"
    autotune.reset_memory_cache()


def _torch_only_candidates(**wrong):
    """The real torch path as both candidates; ``wrong`` replaces "triton" with a broken one."""
    cands = autotune.default_candidates()
    if wrong.get("offset"):
        real = cands["torch"].run

        def bad(h, w, y):
            logp, ent = real(h, w, y)
            return logp + wrong["offset"], ent

        cands["triton"] = Candidate("triton", bad)
    elif wrong.get("raises"):
        def boom(h, w, y):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        cands["triton"] = Candidate("triton", boom)
    else:
        cands["triton"] = Candidate("triton", cands["torch"].run)
    return cands


def choose(n=100, d=16, v=64, dtype=torch.float32, real=False, **kw):
    """The tuner on a fake GPU; the "triton" candidate is the real kernels (interpreter) only
    with ``real`` (slow), else a second copy of the torch path."""
    kw.setdefault("device_key", fake_key)
    if not real:
        kw.setdefault("candidates", _torch_only_candidates())
    return autotune.choose_backend(torch.device("cpu"), dtype, d, v, n, **kw)


def test_cpu_is_torch_without_timing():
    def timer(name, fn):
        raise AssertionError("no timing on CPU")

    assert autotune.choose_backend(torch.device("cpu"), torch.float32, 16, 64, 100, timer=timer) == "torch"
    assert not autotune.cache_path().exists()


def test_env_override_and_default_location(monkeypatch, cache_dir):
    assert autotune.cache_path() == cache_dir / "autotune.json"
    monkeypatch.delenv(autotune.CACHE_ENV)
    assert autotune.cache_path().parts[-3:] == (".cache", "apo_kernels", "autotune.json")


@pytest.mark.parametrize("fast", ["triton", "torch"])
def test_real_kernels_pass_the_self_check_and_the_faster_wins(fast):
    timer = FakeTimer(triton=1.0 if fast == "triton" else 3.0, torch=2.0)
    assert choose(n=8, timer=timer, real=fast == "triton") == fast
    assert sorted(timer.calls) == ["torch", "triton"]
    data = json.loads(autotune.cache_path().read_text())
    assert data["self_check"]["Fake GPU 80GB|float32"] == {"ok": True, "failures": {}}
    (entry,) = data["choices"].values()
    assert entry["backend"] == fast and entry["seconds"]["torch"] == 2.0


def test_cached_choice_is_reused_across_processes_and_buckets():
    timer = FakeTimer(triton=1.0, torch=2.0)
    assert choose(n=100, timer=timer) == "triton"
    assert len(timer.calls) == 2
    assert choose(n=128, timer=timer) == "triton"  # same power-of-two bucket
    autotune.reset_memory_cache()  # a new process reads the file
    assert choose(n=65, timer=FakeTimer(triton=9.0, torch=1.0)) == "triton"
    assert len(timer.calls) == 2
    timer2 = FakeTimer(triton=9.0, torch=1.0)
    assert choose(n=129, timer=timer2) == "torch"  # new bucket: timed again
    assert len(timer2.calls) == 2
    assert choose(n=100, dtype=torch.float16, timer=FakeTimer(triton=1.0, torch=2.0)) == "triton"
    keys = json.loads(autotune.cache_path().read_text())["choices"]
    assert set(keys) == {"Fake GPU 80GB|float32|D=16|V=64|N=128", "Fake GPU 80GB|float32|D=16|V=64|N=256",
                         "Fake GPU 80GB|float16|D=16|V=64|N=128"}


def test_bucket():
    assert [autotune.n_bucket(n) for n in (0, 1, 2, 3, 1000, 1024, 1025)] == [1, 1, 2, 4, 1024, 1024, 2048]


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", '{"format": 99}', ""])
def test_corrupted_cache_is_ignored_with_a_warning(garbage):
    path = autotune.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(garbage)
    with pytest.warns(UserWarning, match="corrupted"):
        assert choose(timer=FakeTimer(triton=1.0, torch=2.0), candidates=_torch_only_candidates()) == "triton"
    data = json.loads(path.read_text())  # rewritten, valid
    assert data["format"] == 1 and len(data["choices"]) == 1


@pytest.mark.parametrize("wrong", [dict(offset=1e-2), dict(raises=True)])
def test_wrong_kernel_falls_back_with_one_warning(wrong):
    timer = FakeTimer(triton=0.1, torch=2.0)  # the broken one would be "faster"
    with pytest.warns(RuntimeWarning, match="failed their self-check on Fake GPU 80GB"):
        assert choose(timer=timer, candidates=_torch_only_candidates(**wrong)) == "torch"
    assert timer.calls == []  # nothing left to time
    entry = json.loads(autotune.cache_path().read_text())["self_check"]["Fake GPU 80GB|float32"]
    assert entry["ok"] is False and "triton" in entry["failures"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert choose(timer=timer, candidates=_torch_only_candidates(**wrong)) == "torch"
    autotune.reset_memory_cache()  # a new process: recorded failure, warned again, not re-checked
    with pytest.warns(RuntimeWarning):
        assert choose(timer=timer, candidates=_torch_only_candidates()) == "torch"


def test_a_small_mismatch_is_caught():
    """The tolerance is tight enough to see a kernel off by 1e-3 in fp32."""
    reason = autotune.self_check(_torch_only_candidates(offset=1e-3)["triton"], autotune.default_candidates()["torch"],
                                 16, 64, torch.float32, torch.device("cpu"))
    assert reason is not None and reason.startswith("log-probs")


def test_concurrent_writers_leave_a_valid_file():
    path = autotune.cache_path()

    def write(i):
        for j in range(10):
            autotune._store(path, "choices", f"k{i}-{j}", {"backend": "torch", "seconds": {}})

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    data = json.loads(path.read_text())
    assert data["format"] == 1 and data["choices"]
    assert not list(path.parent.glob(".autotune-*"))  # no temporary left behind


def test_distributed_ranks_take_rank_zero_choice(monkeypatch):
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)

    def broadcast(box, src):
        assert src == 0
        box[0] = "torch"  # rank 0 chose torch

    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    assert choose(timer=FakeTimer(triton=1.0, torch=2.0)) == "torch"


def test_auto_through_the_ops_on_a_fake_gpu(monkeypatch):
    """linear_logprobs(backend="auto") consults the tuner (fake GPU key, fake timer)."""
    from apo_kernels import linear_logprobs
    from apo_kernels.ops import backend as backend_mod

    timer = FakeTimer(triton=1.0, torch=2.0)
    monkeypatch.setattr(autotune, "default_device_key", fake_key)
    monkeypatch.setattr(autotune, "default_timer", timer)
    monkeypatch.setattr(backend_mod, "triton_available", lambda: True)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, 16, generator=g, requires_grad=True)
    w = torch.randn(64, 16, generator=g)
    y = torch.randint(0, 64, (9,), generator=g)
    seen = []
    real = backend_mod.resolve_backend

    def spy(*a, **k):
        out = real(*a, **k)
        seen.append(out)
        return out

    import sys

    monkeypatch.setattr(sys.modules["apo_kernels.ops.linear_logprobs"], "resolve_backend", spy)
    out = linear_logprobs(h, w, y, backend="auto")
    out.sum().backward()
    assert seen[-1] == "triton" and sorted(timer.calls) == ["torch", "triton"]  # (inner: explicit)
    ref = torch.log_softmax(h.detach() @ w.T, -1).gather(-1, y[:, None])[:, 0]
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
