"""``python -m dspark bench {sampling,markov,attention,scheduler,linear} --quick`` on
the CPU: each suite runs to the end and writes rows that hold what its table
prints (positive timings of dspark and of its baseline, measured in the same
run), with the shapes the README quotes."""

import json
import math

import pytest

from dspark import bench


def run_suite(suite, tmp_path, capsys):
    path = tmp_path / f"{suite}.json"
    assert bench.run(suite, quick=True, json_path=str(path), devices=["cpu"]) == 0
    printed = capsys.readouterr().out
    data = json.loads(path.read_text())
    assert data["suite"] == suite
    return data["results"], printed


def positive(*values):
    return all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in values)


def test_bench_sampling_times_dspark_against_eager_and_reference(tmp_path, capsys):
    results, _ = run_suite("sampling", tmp_path, capsys)
    assert results["rows"] and results["truncation"]
    for row in results["rows"]:
        assert row["device"] == "cpu"
        assert positive(row["dspark_ms"], row["eager_ms"], row["reference_ms"])
        assert row["speedup_vs_eager"] == pytest.approx(row["eager_ms"] / row["dspark_ms"])
    for row in results["truncation"]:
        assert positive(row["fused_ms"], row["mask_first_ms"], row["plain_ms"])


def test_bench_markov_times_dspark_against_the_bare_products(tmp_path, capsys):
    results, _ = run_suite("markov", tmp_path, capsys)
    assert {row["weights"] for row in results} == {"float32", "bfloat16"}
    for row in results:
        assert positive(row["dspark_ms"], row["eager_ms"], row["bare_products_ms"])
        assert row["ratio_to_bare_products"] == pytest.approx(row["dspark_ms"] / row["bare_products_ms"])


def test_bench_attention_has_smollm2_rows_in_bfloat16(tmp_path, capsys):
    results, printed = run_suite("attention", tmp_path, capsys)
    smollm2 = [row for row in results if row["layer"] == "smollm2"]
    # a one-token step and a batch-1 verification of gamma + 1 = 8 tokens
    assert {(row["R"], row["q_len"], row["context"]) for row in smollm2} == {(1, 1, 256), (1, 8, 256)}
    assert all((row["H_q"], row["H_kv"], row["D"], row["dtype"]) == (9, 3, 64, "bfloat16") for row in smollm2)
    assert "smollm2 (H_q 9, H_kv 3, D 64" in printed
    for row in results:
        assert positive(row["dspark_ms"], row["sdpa_ms"], row["gbytes_per_s"])


def test_bench_scheduler_times_and_simulates(tmp_path, capsys):
    results, _ = run_suite("scheduler", tmp_path, capsys)
    assert results["timing"] and results["simulation"]
    for row in results["timing"]:
        assert positive(row["dspark_us"], row["eager_us"], row["reference_us"])
    assert {row["domain"] for row in results["simulation"]} >= {"code"}
    for row in results["simulation"]:
        assert positive(row["tokens_per_s"])


def test_bench_linear_times_every_product_against_the_baseline(tmp_path, capsys):
    results, printed = run_suite("linear", tmp_path, capsys)
    products = {row["product"] for row in results["rows"]}
    assert {"float32, BLAS", "float32, dspark", "bfloat16, torch", "bfloat16, dspark"} <= products
    assert results["baseline"] in products
    assert {row["rows"] for row in results["rows"]} == {1, 4, 8}
    for row in results["rows"]:
        assert positive(row["ms"]) and row["ratio_low"] <= row["ratio"] <= row["ratio_high"]
        if row["product"] == results["baseline"]:
            assert row["ratio"] == row["ratio_low"] == row["ratio_high"] == 1.0
    assert "time against " + results["baseline"] in printed
