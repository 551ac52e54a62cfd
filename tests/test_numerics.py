"""The counter-based generator and the random-number shapes: the extension
(shared C++ numerics) and dspark.reference (tensor ops) agree bit for bit, and
both match the published Philox4x32-10 known answers."""

import math

import pytest
import torch

from dspark import reference
from dspark._ext import C

# Random123's kat_vectors for philox4x32_10: counter, key, expected output.
KATS = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (
        (0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF),
        (0xFFFFFFFF, 0xFFFFFFFF),
        (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
    ),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", KATS)
def test_philox_known_answers(counter, key, expected):
    assert C.numerics.philox4x32_10(*counter, *key) == expected
    got = reference.philox4x32_10(torch.tensor(counter), torch.tensor(key))
    assert tuple(int(x) for x in got) == expected


def test_reference_philox_matches_extension_on_random_inputs():
    g = torch.Generator().manual_seed(7)
    counters = torch.randint(0, 2**32, (500, 4), generator=g, dtype=torch.int64)
    keys = torch.randint(0, 2**32, (500, 2), generator=g, dtype=torch.int64)
    got = reference.philox4x32_10(counters, keys)
    for c, k, out in zip(counters.tolist(), keys.tolist(), got.tolist()):
        assert C.numerics.philox4x32_10(*c, *k) == tuple(out)


def test_random_bits_address_layout():
    """random_bits(seed, offset, request, position, purpose, column) is word
    column & 3 of Philox at counter ((column >> 2) | purpose << 24, position,
    request, offset) and key (seed low, seed high)."""
    seed, offset, request, position, purpose = 0x0123456789ABCDEF, 9, 5, 3, reference.PURPOSE_RACE
    columns = torch.arange(0, 40)
    bits = reference.random_bits(seed, offset, request, position, purpose, columns)
    for col in columns.tolist():
        words = C.numerics.philox4x32_10(
            (col >> 2) | (purpose << 24), position, request, offset, seed & 0xFFFFFFFF, seed >> 32
        )
        assert int(bits[col]) == words[col & 3]


def test_exponential_and_uniform_match_the_extension():
    g = torch.Generator().manual_seed(3)
    bits = torch.cat(
        [
            torch.randint(0, 2**32, (4000,), generator=g, dtype=torch.int64),
            torch.tensor([0, 1, 2, 255, 256, 2**24, 2**31, 2**32 - 256, 2**32 - 1]),
        ]
    )
    ref_e = reference.exponential(bits)
    ref_u = reference.uniform(bits)
    for b, e, u in zip(bits.tolist(), ref_e.tolist(), ref_u.tolist()):
        got = C.numerics.exponential(b)
        assert got > 0 and math.isfinite(got)
        assert abs(got - e) <= 1e-6 * e  # float32 polynomial vs float64 log1p
        assert C.numerics.uniform(b) == u  # exact


def test_exponential_has_unit_mean_times_log2e():
    """E / ln 2 with E ~ Exp(1): mean log2(e), variance log2(e)^2."""
    g = torch.Generator().manual_seed(11)
    e = reference.exponential(torch.randint(0, 2**32, (200000,), generator=g, dtype=torch.int64))
    log2e = 1 / math.log(2)
    # 200k samples: the standard error of the mean is log2e / 447; 6 sigma.
    assert abs(float(e.mean()) - log2e) < 6 * log2e / math.sqrt(200000)


def test_exp2_log2_accuracy():
    for x in [-99.5, -20.25, -1.0, -0.5, 0.0, 0.3, 1.0, 10.5, 100.0]:
        assert C.numerics.exp2(x) == pytest.approx(2.0**x, rel=2.5e-7)
    for x in [1e-30, 0.1, 0.75, 1.0, 1.5, 3.0, 1e10]:
        assert C.numerics.log2(x) == pytest.approx(math.log2(x), rel=2.5e-7, abs=2.5e-7)
    assert C.numerics.exp2(-100.5) == 0.0
