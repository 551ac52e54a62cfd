"""dspark.ops.linear (csrc/{cpu,ops}/linear) and the models' CPU linears on
it (models.common.DsparkWeight): against a float64 reference under every
instruction set this CPU runs, for float32 and 16-bit weights and inputs;
rows independent of the other rows of a call (bit for bit on AVX2); bad
arguments end in errors naming them; the backend setting."""

import pytest
import torch

import dspark
from dspark import ops
from dspark.ops.linear import _linear_launch

ISAS = dspark.backends()["cpu"]["isas"]
SHAPES = [(1, 7, 13), (3, 65, 576), (8, 200, 96), (33, 130, 1536), (5, 1, 1), (4, 16, 0), (0, 4, 4), (2, 0, 3)]


@pytest.fixture
def restore_isa():
    before = dspark.cpu_isa()
    yield
    dspark.set_cpu_isa(before)


def reference(x, w, b):
    y = x.double() @ w.double().t()
    return y + b.double() if b is not None else y


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_a_float64_reference(restore_isa, isa, w_dtype):
    """Each output is the float32-accumulated dot product of its row: within a
    bound of the float64 one that grows with K (float32 summation), for every
    shape, with and without bias, under every ISA this CPU runs."""
    dspark.set_cpu_isa(isa)
    g = torch.Generator().manual_seed(0)
    for M, N, K in SHAPES:
        x = torch.randn(M, K, generator=g)
        w = torch.randn(N, K, generator=g).to(w_dtype)
        for b in (None, torch.randn(N, generator=g)):
            y = ops.linear(x, w, b)
            assert y.shape == (M, N) and y.dtype == torch.float32
            bound = 1e-6 * (K + 1) * (x.abs().max().item() if x.numel() else 1.0) * 4 + 1e-6
            assert (y.double() - reference(x, w, b)).abs().max().item() <= bound if y.numel() else True


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_with_16_bit_inputs_rounds_once(dtype):
    """16-bit x: widened, accumulated in float32, rounded once to x's dtype: the
    float64 result rounded, except where float32 summation sits on a rounding
    boundary (then one unit in the last place)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 300, generator=g).to(dtype)
    w = torch.randn(40, 300, generator=g).to(dtype)
    b = torch.randn(40, generator=g).to(dtype)
    y = ops.linear(x, w, b)
    assert y.dtype == dtype
    ref = reference(x, w, b).to(dtype)
    ulp = (ref.float().abs() * (2.0 ** -7 if dtype == torch.bfloat16 else 2.0 ** -10)).clamp(min=1e-3)
    assert ((y.float() - ref.float()).abs() <= ulp).all()
    assert (y == ref).float().mean().item() > 0.9


def test_linear_takes_leading_dimensions_and_strided_rows():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 64, generator=g)
    w = torch.randn(10, 64, generator=g)
    torch.testing.assert_close(ops.linear(x, w), (x.double() @ w.double().t()).float(), rtol=1e-5, atol=1e-5)
    wide = torch.randn(5, 100, generator=g)
    rows = wide[:, :64]  # rows 100 elements apart
    torch.testing.assert_close(ops.linear(rows, w), (rows.double() @ w.double().t()).float(), rtol=1e-5,
                               atol=1e-5)
    cols = torch.randn(64, 5, generator=g).t()  # unit stride along the rows, not along K: copied
    torch.testing.assert_close(ops.linear(cols, w), (cols.double() @ w.double().t()).float(), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("isa", ISAS)
def test_a_row_does_not_depend_on_the_other_rows(restore_isa, isa):
    """A row computed alone, or among 2 .. 33 rows, at any position: on AVX2 the
    same bits (the order of an element's sum is fixed by K), elsewhere the
    same to float32 rounding."""
    dspark.set_cpu_isa(isa)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(97, 576, generator=g)
    x = torch.randn(33, 576, generator=g)
    for w_dtype in (torch.float32, torch.bfloat16):
        wd = w.to(w_dtype)
        alone = torch.cat([ops.linear(x[i:i + 1], wd) for i in range(33)])
        for m in (2, 4, 5, 8, 33):
            together = ops.linear(x[:m], wd)
            if isa == "avx2":
                assert torch.equal(together, alone[:m])
            else:
                torch.testing.assert_close(together, alone[:m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call,error,match", [
    (lambda: ops.linear("x", torch.ones(2, 2)), TypeError, "argument 'x' must be a torch.Tensor"),
    (lambda: ops.linear(torch.ones(2, 3).long(), torch.ones(4, 3)), TypeError, "argument 'x' must be float32"),
    (lambda: ops.linear(torch.ones(2, 3), torch.ones(4, 3).int()), TypeError, "argument 'weight' must be float32"),
    (lambda: ops.linear(torch.ones(2, 3), torch.ones(4, 5)), ValueError, "argument 'weight' must have K = 3"),
    (lambda: ops.linear(torch.ones(2, 3), torch.ones(4, 3, 1)), ValueError, "argument 'weight' must be 2-D"),
    (lambda: ops.linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(5)), ValueError, "argument 'bias' must have"),
    (lambda: ops.linear(torch.ones(()), torch.ones(4, 3)), ValueError, "argument 'x' must have at least 1"),
    (lambda: ops.linear(torch.ones(2, 3), torch.ones(4, 3), torch.ones(4).bool()), TypeError, "argument 'bias'"),
])
def test_linear_refuses_bad_arguments_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_the_kernel_checks_what_python_does_not():
    """The launcher without Python checks (the models' path): the C++ layer
    refuses every inconsistent tensor, naming it."""
    x, w, out = torch.ones(2, 3), torch.ones(4, 3), torch.empty(2, 4)
    shared = torch.ones(16)
    cases = [
        ((x, w, None, torch.empty(2, 4, dtype=torch.bfloat16)), TypeError, "'out' must have x's dtype"),
        ((x, w, None, torch.empty(3, 4)), ValueError, "'out' must have M"),
        ((x, w, None, torch.empty(4, 2).t()), ValueError, "'out' must be contiguous"),
        ((x, torch.ones(3, 4).t(), None, out), ValueError, "'weight' must be contiguous"),
        ((x, torch.ones(4, 2), None, out), ValueError, "'weight' must have K"),
        ((x, w, torch.ones(3), out), ValueError, "'bias' must have N"),
        ((shared[:6].view(2, 3), w, None, shared[:8].view(2, 4)), ValueError, "'out' is written by the op"),
        ((torch.ones(2, 3, 1), w, None, out), ValueError, "'x' must have 2 dimensions"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            _linear_launch(*args)
    _linear_launch(x, w, None, out)
    assert torch.equal(out, torch.full((2, 4), 3.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_linear_refuses_cuda_tensors():
    with pytest.raises(ValueError, match="CPU only"):
        ops.linear(torch.ones(2, 3, device="cuda"), torch.ones(4, 3, device="cuda"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_linear_on_dspark_weights_equals_torch_and_never_goes_stale(monkeypatch, dtype):
    """With DSPARK_CPU_LINEAR=dspark a float32 Linear runs on DsparkWeight (a
    16-bit one does where oneDNN cannot pack it): torch's results to rounding;
    after its weight changes, or under autograd, the weight itself."""
    from dspark.models.common import DsparkWeight, Linear, PackedWeight

    monkeypatch.setenv("DSPARK_CPU_LINEAR", "dspark")
    torch.manual_seed(4)
    layer = Linear(96, 200, bias=True).to(dtype)
    if dtype != torch.float32 and PackedWeight.usable(layer.weight):
        pytest.skip("this CPU packs 16-bit weights for oneDNN instead")
    assert layer.pack_cpu() and isinstance(layer.packed, DsparkWeight)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    for rows in (1, 8, 33):
        x = torch.randn(rows, 96).to(dtype)
        with torch.inference_mode():
            y = layer(x)
            assert torch.equal(y, layer.packed(x, layer.bias))  # it ran dspark's product
            torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias), **tol)
    x = torch.randn(5, 96).to(dtype)
    with torch.no_grad():
        layer.weight.mul_(-1.0)  # stale now
    with torch.inference_mode():
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    layer.pack_cpu()
    y = layer(x.requires_grad_(True))
    y.float().sum().backward()
    assert x.grad is not None


def test_the_float32_backend_setting(monkeypatch):
    """DSPARK_CPU_LINEAR decides (checked); the older DSPARK_CPU_PACK_FLOAT32
    on / off means oneDNN / BLAS; auto is measured once and reported."""
    from dspark.models import common

    monkeypatch.setenv("DSPARK_CPU_LINEAR", "fastest")
    with pytest.raises(ValueError, match="DSPARK_CPU_LINEAR"):
        common.float32_backend()
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "dspark")
    assert common.float32_backend() == "dspark" and not common.float32_packing_pays()  # as asked
    assert common.DsparkWeight.usable(torch.ones(4, 4)) and not common.PackedWeight.usable(torch.ones(4, 4))
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "blas")
    assert common.cpu_weight(torch.ones(4, 4)) is None
    monkeypatch.setenv("DSPARK_CPU_LINEAR", "auto")
    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "off")
    assert common.float32_backend() == "blas"
    monkeypatch.setenv("DSPARK_CPU_PACK_FLOAT32", "on")
    assert common.float32_backend() == ("onednn" if common._packing_available() else "blas")
    monkeypatch.delenv("DSPARK_CPU_PACK_FLOAT32")
    monkeypatch.setattr(common, "_float32_decision", {})
    calls = []

    def fake_measure(shapes=None):
        calls.append(shapes)
        return {"backend": "onednn", "pays": True, "packed_ms": 2.0, "blas_ms": 3.0, "weights": "four weights"}

    monkeypatch.setattr(common, "_measure_float32_packing", fake_measure)
    monkeypatch.setattr(dspark._backends, "cpu_isa", lambda: "avx512")  # no few-row split
    assert common.float32_packing_report() == ""
    assert common.float32_backend([(8, 4)]) == "onednn" and common.float32_backend() == "onednn"
    assert calls == [[(8, 4)]]  # once, on the first caller's shapes
    assert common.float32_packing_pays()
    assert common.float32_packing_report() == ("float32 linears on oneDNN packed weights (measured for 1 + 8 rows "
                                               "over four weights: oneDNN packed 2.00 ms, BLAS 3.00 ms)")
    monkeypatch.setattr(dspark._backends, "cpu_isa", lambda: "avx2")
    assert common.float32_few_rows_backend() == "dspark" and common.float32_backend() == "onednn"
    assert common.float32_packing_report().startswith("float32 linears on oneDNN packed weights, up to 16 rows on "
                                                      "dspark's product (AVX2) (measured")
    assert calls == [[(8, 4)]]


@pytest.mark.parametrize("setting", ["dspark", "onednn", "blas"])
def test_a_set_backend_serves_every_row_count(monkeypatch, setting):
    """DSPARK_CPU_LINEAR set: one product for every row count, also on AVX2."""
    from dspark.models import common

    monkeypatch.setenv("DSPARK_CPU_LINEAR", setting)
    monkeypatch.setattr(dspark._backends, "cpu_isa", lambda: "avx2")
    assert common.float32_few_rows_backend() == common.float32_backend()
    assert not common.SplitWeight.usable(torch.ones(4, 4))


@pytest.mark.parametrize("many", ["onednn", "blas"])
def test_a_split_weight_serves_few_rows_on_dspark_and_more_on_the_other(monkeypatch, many):
    """Under auto on AVX2 a float32 Linear splits by the call's rows: up to
    FEW_ROWS on dspark's product (bit for bit DsparkWeight's), above on
    oneDNN's packed copy or BLAS (bit for bit theirs); 16-bit weights and
    other ISAs do not split; a changed weight is not served."""
    from dspark.models import common

    monkeypatch.delenv("DSPARK_CPU_LINEAR", raising=False)
    monkeypatch.delenv("DSPARK_CPU_PACK_FLOAT32", raising=False)
    if many == "onednn" and not common._packing_available():
        pytest.skip("this PyTorch has no oneDNN packed linear")
    monkeypatch.setattr(common, "_float32_decision", {"backend": many, "packed_ms": 1.0, "blas_ms": 1.0})
    monkeypatch.setattr(dspark._backends, "cpu_isa", lambda: "avx2")
    torch.manual_seed(6)
    layer = common.Linear(72, 40, bias=True)
    assert layer.pack_cpu() and isinstance(layer.packed, common.SplitWeight)
    split = layer.packed
    assert (split.many is not None) == (many == "onednn")
    reference = common.DsparkWeight(layer.weight)
    with torch.inference_mode():
        for rows in (1, 8, common.FEW_ROWS, common.FEW_ROWS + 1, 40):
            x = torch.randn(rows, 72)
            y = layer(x)
            if rows <= common.FEW_ROWS:
                assert torch.equal(y, reference(x, layer.bias))
            elif many == "onednn":
                assert torch.equal(y, split.many(x, layer.bias))
            else:
                assert torch.equal(y, torch.nn.functional.linear(x, layer.weight, layer.bias))
            torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        x3 = torch.randn(2, 4, 72)
        assert torch.equal(layer(x3), reference(x3, layer.bias))  # 8 rows in all: dspark's
        with torch.no_grad():
            layer.weight.mul_(2.0)
        assert not split.matches(layer.weight)
        assert torch.equal(layer(x3), torch.nn.functional.linear(x3, layer.weight, layer.bias))
    assert not common.SplitWeight.usable(torch.ones(4, 4, dtype=torch.bfloat16))
    monkeypatch.setattr(dspark._backends, "cpu_isa", lambda: "avx512")
    assert not common.SplitWeight.usable(torch.ones(4, 4))


def test_auto_times_onednn_against_blas_and_never_takes_dspark(monkeypatch):
    """dspark's float32 product is taken only when asked: auto times oneDNN
    against BLAS (on the model's shapes) and packs when oneDNN is under 0.95
    of BLAS."""
    from dspark.models import common

    timed = []

    def medians(fns, repeats):
        timed.append(sorted(fns))
        return {"blas": 1.0, "onednn": ratio}

    monkeypatch.setattr(common, "interleaved_medians", medians)
    for ratio, want in ((0.9, "onednn"), (0.96, "blas")):
        d = common._measure_float32_packing([(64, 32)])
        if not common._packing_available():
            assert d["backend"] == "blas" and not timed
            return
        assert d["backend"] == want and d["pays"] == (want == "onednn")
        assert "64 x 32" in d["weights"]
    assert timed == [["blas", "onednn"]] * 2
