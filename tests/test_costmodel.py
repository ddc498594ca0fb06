"""The cost model (apo_kernels.costmodel) and ``apo-kernels model``: counts equal closed forms,
bytes scale as they should, the roofline takes the max, the CLI labels everything a PREDICTION."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest

from apo_kernels.cli import main
from apo_kernels.costmodel import HEADS, STRATEGIES, Options, Problem, device, parse_shape, predict
from apo_kernels.costmodel.launch import Launch
from apo_kernels.costmodel.peers import PEERS
from apo_kernels.costmodel.predict import skip_to_reach_floor, time_launch

# Divisible by every tile and chunk size the strategies use, so padding adds nothing.
N, D, V = 4096, 512, 16384
H100, H200 = device("h100"), device("h200")


def _tc(strategy: str, p: Problem, phase: str | None = None, opts: Options | None = None) -> float:
    pred = predict(STRATEGIES[strategy], p, H100, opts)
    return sum(t.launch.tc_flops * t.launch.count for t in pred.times
               if phase is None or t.launch.phase == phase)


def _bytes(strategy: str, p: Problem, select=lambda launch: True) -> float:
    pred = predict(STRATEGIES[strategy], p, H100)
    return sum(t.launch.hbm_bytes * t.launch.count for t in pred.times if select(t.launch))


@pytest.mark.parametrize("strategy", ["fused-atomic", "fused-atomic-relaxed", "fused-owner",
                                      "chunked-cublas-f32", "chunked-cublas-bf16", "ordinary"])
def test_flops_are_the_closed_forms(strategy):
    p = Problem(N, D, V)
    ndv = float(N) * D * V
    assert _tc(strategy, p, "forward") == pytest.approx(2 * ndv, rel=1e-12)
    # the ordinary way keeps its logits (4NDV); every other strategy recomputes them (6NDV)
    back = 4 if strategy == "ordinary" else 6
    assert _tc(strategy, p, "backward") == pytest.approx(back * ndv, rel=1e-12)


def test_gradients_in_the_forward_cost_6ndv_and_no_backward():
    p = Problem(N, D, V)
    assert _tc("chunked-fwdgrad", p, "forward") == pytest.approx(6.0 * N * D * V, rel=1e-12)
    assert _tc("chunked-fwdgrad", p, "backward") == 0


@pytest.mark.parametrize("strategy", ["fused-owner", "fused-atomic"])
@pytest.mark.parametrize("skip", [0.25, 0.5, 0.9])
def test_preskip_removes_its_fraction_of_recompute_and_gradient_flops(strategy, skip):
    p = Problem(N, D, V)
    ndv = float(N) * D * V
    skipped = dataclasses.replace(p, skip=skip)
    assert _tc(strategy, skipped, "forward") == pytest.approx(2 * ndv, rel=1e-12)
    assert _tc(strategy, skipped, "backward") == pytest.approx(6 * ndv * (1 - skip), rel=1e-12)
    assert predict(STRATEGIES[strategy], skipped, H100).total_s < predict(STRATEGIES[strategy], p, H100).total_s


def test_cublas_and_pytorch_strategies_ignore_the_skip_fraction():
    p = Problem(N, D, V, skip=0.5)
    for name in ("ordinary", "chunked-cublas-f32", "chunked-fwdgrad"):
        assert _tc(name, p) == _tc(name, dataclasses.replace(p, skip=0.0))


def test_padding_only_adds_work_on_odd_shapes():
    p = Problem(1000, 900, 50001)
    for name in STRATEGIES:
        assert _tc(name, p) >= 6.0 * p.ndv * (1 - 1e-12)


def test_atomics_are_counted_per_tile_and_per_label():
    p = Problem(N, D, V, skip=0.5)
    label = float(N) * D  # the sparse label term: one fp32 add per token per hidden unit
    tiles = float(N) * D * V * (1 / 64 + 1 / 64) * 0.5
    pred_atomic = predict(STRATEGIES["fused-atomic"], p, H100)
    assert pred_atomic.totals()["atomics"] == pytest.approx(tiles + label)
    assert predict(STRATEGIES["fused-owner"], p, H100).totals()["atomics"] == pytest.approx(label)
    assert predict(STRATEGIES["chunked-cublas-f32"], p, H100).totals()["atomics"] == 0


def _is_pass(launch: Launch) -> bool:
    """Elementwise passes over [N, V] data (no GEMM, not the fixed-size gradient buffers)."""
    return not launch.tc and "dW" not in launch.name and "dH" not in launch.name and launch.name != "gather"


@pytest.mark.parametrize("strategy", ["ordinary", "chunked-cublas-f32", "chunked-cublas-bf16"])
def test_logit_passes_scale_with_n_and_v_not_d(strategy):
    base = _bytes(strategy, Problem(N, D, V), _is_pass)
    assert base > 0
    assert _bytes(strategy, Problem(2 * N, D, V), _is_pass) == pytest.approx(2 * base, rel=1e-3)
    assert _bytes(strategy, Problem(N, D, 2 * V), _is_pass) == pytest.approx(2 * base, rel=1e-3)
    assert _bytes(strategy, Problem(N, 2 * D, V), _is_pass) == pytest.approx(base, rel=1e-3)


def test_owner_dz_traffic_scales_with_n_v_and_the_kept_fraction():
    def dz_written(p: Problem) -> float:
        pred = predict(STRATEGIES["fused-owner"], p, H100)
        return sum(t.launch.hbm_write * t.launch.count for t in pred.times if t.launch.name.startswith("K1"))

    base = dz_written(Problem(N, D, V))
    assert dz_written(Problem(2 * N, D, V)) == pytest.approx(2 * base, rel=1e-3)
    assert dz_written(Problem(N, D, 2 * V)) == pytest.approx(2 * base, rel=1e-3)
    assert dz_written(Problem(N, 2 * D, V)) == pytest.approx(base, rel=1e-3)
    assert dz_written(Problem(N, D, V, skip=0.5)) == pytest.approx(0.5 * base, rel=1e-2)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("dim", ["n", "d", "v"])
def test_total_bytes_grow_when_a_dimension_doubles(strategy, dim):
    """Not bounded by 2x: an operand that stops fitting L2, or a fixed buffer budget that
    halves the chunk, can add re-reads."""
    p = Problem(N, D, V)
    assert _bytes(strategy, dataclasses.replace(p, **{dim: 2 * getattr(p, dim)})) > _bytes(strategy, p)


def test_gemm_operand_traffic_follows_the_stated_l2_rule():
    from apo_kernels.costmodel.launch import gemm_hbm

    usable = H100.l2_usable
    small, big = usable / 2, 40 * usable
    # the smaller operand stays in L2: both read once
    assert gemm_hbm(8192, 8192, small, big, sms=132, l2_usable=usable)[0] == small + big
    # neither fits: A re-read per 1408-wide super-tile column of C, B per super-tile row
    reads, note = gemm_hbm(4 * 1408, 2 * 1408, big, 2 * big, sms=132, l2_usable=usable)
    assert reads == big * 2 + 2 * big * 4 and "1408" in note


def test_roofline_takes_the_max_of_compute_memory_and_atomics_plus_overhead():
    r = H100
    overhead = r.launch_us * 1e-6
    compute = Launch("c", "forward", "cublas", tc=((r.gemm_flops * 1e-3, "cublas"),), hbm_read=1e6)
    memory = Launch("m", "forward", "torch", hbm_read=r.hbm_bytes_per_s * 2e-3, alu_ops=1e6)
    atomics = Launch("a", "backward", "triton", atomics=r.atomic_tadds * 1e12 * 3e-3, hbm_read=1e6)
    for launch, expect, bound in ((compute, 1e-3, "compute"), (memory, 2e-3, "memory"),
                                  (atomics, 3e-3, "atomics")):
        t = time_launch(launch, r)
        assert t.total_s == pytest.approx(expect + overhead)
        assert t.bound == bound
    # fenced atomics stall on top of the roofline; count multiplies everything
    fenced = dataclasses.replace(atomics, fences_per_program=10, grid=r.sms * 4, count=3)
    t = time_launch(fenced, r)
    assert t.total_s == pytest.approx(3 * (3e-3 + 4 * 10 * r.fence_us * 1e-6 + overhead))


def test_a_partial_last_wave_costs_a_full_wave():
    r = H100
    full = Launch("w", "forward", "triton", tc=((1e12, "cublas"),), grid=r.sms, resident=1)
    one_more = dataclasses.replace(full, grid=r.sms + 1, tc=((1e12 * (r.sms + 1) / r.sms, "cublas"),))
    assert time_launch(one_more, r).compute_s == pytest.approx(2 * time_launch(full, r).compute_s)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("skip", [0.0, 0.5])
def test_h200_is_never_slower_than_h100(head, skip):
    p = dataclasses.replace(parse_shape(head), skip=skip)
    for strategy in STRATEGIES.values():
        a, b = predict(strategy, p, H100), predict(strategy, p, H200)
        for ta, tb in zip(a.times, b.times):
            assert tb.total_s <= ta.total_s * (1 + 1e-12), (strategy.name, ta.launch.name)


def test_floor_is_6ndv_at_the_measured_rate_and_skip_for_floor_reaches_it():
    p = parse_shape("llama-3-8b")
    pred = predict(STRATEGIES["fused-owner"], p, H100)
    assert pred.floor_s == pytest.approx(6 * 16384 * 4096 * 128256 / 790e12)
    assert pred.floor_fraction == pytest.approx(pred.floor_s / pred.total_s)
    f = skip_to_reach_floor(STRATEGIES["fused-owner"], p, H100)
    assert f is not None and 0 < f < 1
    at = predict(STRATEGIES["fused-owner"], dataclasses.replace(p, skip=f), H100).floor_fraction
    below = predict(STRATEGIES["fused-owner"], dataclasses.replace(p, skip=f - 0.01), H100).floor_fraction
    assert at >= 1.0 > below
    assert skip_to_reach_floor(STRATEGIES["ordinary"], p, H100) is None


def test_shapes_and_bad_input():
    assert parse_shape("gemma-2-2b").softcap == 30.0
    assert parse_shape("gemma-2-2b").n == 16384
    assert (parse_shape("4096x128256", tokens=8).n, parse_shape("1x2x3").v) == (8, 3)
    assert parse_shape("8x16x32:sc30").softcap == 30.0
    with pytest.raises(ValueError, match="head name"):
        parse_shape("llama-9")
    with pytest.raises(ValueError, match="skip"):
        Problem(1, 1, 1, skip=1.0)
    with pytest.raises(ValueError, match="device"):
        device("a100")
    with pytest.raises(ValueError, match="dw_accum"):
        Options(dw_accum="bf16")


def test_published_numbers_are_self_consistent():
    for peer in PEERS:
        if peer.ms and peer.tflops:
            flops = {"forward": 2, "backward": 4}.get(peer.phase, 6) * peer.n * peer.d * peer.v
            assert flops / (peer.ms * 1e-3) / 1e12 == pytest.approx(peer.tflops, rel=0.01), peer


def test_cli_prints_the_prediction_label_and_the_floor_fraction(capsys):
    assert main(["model", "--device", "h100", "--shapes", "llama-3-8b", "qwen2.5-0.5b",
                 "--strategy", "fused-owner", "ordinary", "--launches"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION" in out and "% of floor" in out
    assert "| h100 | llama-3-8b | 16384 | 4096 | 128256 |" in out  # piped: Markdown
    assert "K2 dW[chunk] = dz.T @ H (owner)" in out  # the launch breakdown
    assert "Liger-Kernel#1422" in out and "TRL#7244" in out  # the peer table
    assert "GUESS" in out  # the assumptions are printed under the tables


def test_cli_csv_writes_one_row_per_launch_and_a_total(tmp_path, capsys):
    path = tmp_path / "model.csv"
    assert main(["model", "--device", "h200", "--shapes", "2048x1024x32000", "--skip-fraction", "0",
                 "0.5", "--strategy", "fused-owner", "chunked-cublas-bf16", "--csv", str(path),
                 "--no-peers"]) == 0
    rows = list(csv.DictReader(path.open()))
    assert {r["label"] for r in rows} == {"PREDICTION"}
    totals = [r for r in rows if r["level"] == "total"]
    # fused-owner at two skip fractions, chunked-cublas once (it cannot skip)
    assert [(r["strategy"], float(r["skip"])) for r in totals] == [
        ("fused-owner", 0.0), ("chunked-cublas-bf16", 0.0), ("fused-owner", 0.5)]
    for t in totals:
        launches = [r for r in rows if r["level"] == "launch" and (r["strategy"], r["skip"]) == (t["strategy"], t["skip"])]
        assert sum(float(r["ms"]) for r in launches) == pytest.approx(float(t["ms"]))
        assert float(t["floor_fraction"]) == pytest.approx(float(t["floor_ms"]) / float(t["ms"]))
        assert t["device"] == "h200"


def test_cli_puts_measurements_beside_predictions(tmp_path, capsys):
    bench = tmp_path / "bench.csv"
    columns = ["device", "provider", "mode", "n", "d", "v", "status", "median_ms", "peak_above_inputs_mib"]
    with bench.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for dev, provider, mode, ms in (("NVIDIA H100 80GB HBM3", "ordinary", "forward+backward", "123.45"),
                                        ("NVIDIA H100 80GB HBM3", "trl", "forward+backward", "150.5"),
                                        ("NVIDIA A100-SXM4-80GB", "ours", "forward", "9")):
            w.writerow({"device": dev, "provider": provider, "mode": mode, "n": 16384, "d": 4096,
                        "v": 128256, "status": "ok", "median_ms": ms, "peak_above_inputs_mib": "1"})
    assert main(["model", "--device", "h100", "--shapes", "llama-3-8b", "--strategy", "ordinary",
                 "--measured", str(bench), "--no-peers"]) == 0
    out = capsys.readouterr().out
    assert "measured ms" in out and "123.45" in out and "150.50" in out and "MEASURED" in out
    assert "A100" in out  # the row it could not place is reported, not dropped silently


def test_cli_rejects_bad_arguments(capsys, tmp_path):
    assert main(["model", "--shapes", "12xfoo"]) == 2
    assert "shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["model", "--skip-fraction", "1.5"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["model", "--rate", "warp_speed=9"])
    not_bench = tmp_path / "x.csv"
    not_bench.write_text("a,b\n1,2\n")
    assert main(["model", "--measured", str(not_bench)]) == 2
    assert "not a bench.csv" in capsys.readouterr().err


def test_rate_overrides_change_the_prediction(capsys):
    slow = device("h100", fence_us=1.0)
    p = parse_shape("llama-3-8b")
    assert predict(STRATEGIES["fused-atomic"], p, slow).total_s > predict(STRATEGIES["fused-atomic"], p, H100).total_s
    assert main(["model", "--device", "h100", "--shapes", "llama-3-8b", "--strategy", "fused-owner",
                 "--skip-fraction", "0", "--rate", "tc.triton-128x128=1.0", "--no-peers", "--pivot"]) == 0
    faster = capsys.readouterr().out
    assert main(["model", "--device", "h100", "--shapes", "llama-3-8b", "--strategy", "fused-owner",
                 "--skip-fraction", "0", "--no-peers", "--pivot"]) == 0
    assert faster != capsys.readouterr().out
    assert math.isfinite(predict(STRATEGIES["ordinary"], p, slow).total_s)


def test_only_sxm_gpus_map_to_the_model_rates():
    from apo_kernels.costmodel.measured import device_key

    assert device_key("NVIDIA H100 80GB HBM3") == "h100"
    assert device_key("NVIDIA H200") == "h200"
    assert device_key("NVIDIA H100 PCIe") is None
    assert device_key("NVIDIA A100-SXM4-80GB") is None


def test_cli_draws_a_rich_table_on_a_terminal(capsys, monkeypatch):
    import sys

    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["model", "--device", "h100", "--shapes", "1024x256x4096", "--strategy", "fused-owner",
                 "--skip-fraction", "0", "--no-peers"]) == 0
    out = capsys.readouterr().out
    assert "PREDICTION" in out and "│" in out and "| device |" not in out
