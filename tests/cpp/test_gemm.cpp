// The CPU backend's C = A W^T (csrc/cpu/gemm.h) under every instruction set
// this CPU runs: against a double-precision reference for float32 and 16-bit
// W, every block shape and K tail; and, on AVX2, that an element of C has the
// same bits whatever the number of A rows and W rows and wherever it sits (the
// register blocks change with the shape, the sum of an element does not).
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cpu/gemm.h"
#include "../../csrc/cpu/isa.h"
#include "dspark/dtype_load.h"
#include "dspark/numerics.h"
#include "harness.h"

using dspark::DType;
namespace cpu = dspark::cpu;

namespace {

struct Problem {
  int64_t m, n, k;
  std::vector<float> a, w32;
  std::vector<uint16_t> w16;
};

Problem make(int64_t m, int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  Problem p{m, n, k, {}, {}, {}};
  p.a.resize(static_cast<size_t>(m * k));
  p.w32.resize(static_cast<size_t>(n * k));
  p.w16.resize(static_cast<size_t>(n * k));
  for (auto& x : p.a) x = dist(gen);
  for (size_t i = 0; i < p.w32.size(); ++i) {
    // truncated to bfloat16 (any bfloat16 value will do as a weight): the same values in both dtypes
    p.w16[i] = static_cast<uint16_t>(dspark::num::float_bits(dist(gen)) >> 16);
    p.w32[i] = dspark::bf16_bits_to_float(p.w16[i]);
  }
  return p;
}

std::vector<float> run(const Problem& p, DType dtype, int64_t rows, int64_t first_row) {
  std::vector<float> c(static_cast<size_t>(rows * p.n), -1.0f);
  const void* w = dtype == DType::kFloat32 ? static_cast<const void*>(p.w32.data()) : p.w16.data();
  cpu::matmul_nt(p.a.data() + first_row * p.k, p.k, rows, w, dtype, p.k, p.n, p.k, c.data(), p.n);
  return c;
}

std::vector<cpu::Isa> runnable_isas() {
  std::vector<cpu::Isa> out;
  for (int i = 0; i < cpu::kNumIsa; ++i)
    if (cpu::isa_supported(static_cast<cpu::Isa>(i))) out.push_back(static_cast<cpu::Isa>(i));
  return out;
}

}  // namespace

DSPARK_TEST(matmul_nt_matches_a_double_reference_under_every_isa) {
  const cpu::Isa before = cpu::current_isa();
  for (cpu::Isa isa : runnable_isas()) {
    cpu::set_isa(isa);
    for (int64_t m : {1, 2, 3, 4, 5, 7, 8, 9, 16, 17})
      for (int64_t n : {1, 3, 4, 5, 13, 50})
        for (int64_t k : {1, 7, 8, 17, 64, 577}) {
          const Problem p = make(m, n, k, static_cast<uint32_t>(m * 10007 + n * 101 + k));
          for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
            const std::vector<float> c = run(p, dtype, m, 0);
            for (int64_t r = 0; r < m; ++r)
              for (int64_t j = 0; j < n; ++j) {
                double ref = 0.0, mag = 0.0;
                for (int64_t i = 0; i < k; ++i) {
                  const double x = p.a[r * k + i], y = p.w32[j * k + i];
                  ref += x * y;
                  mag += std::fabs(x * y);
                }
                EXPECT(std::fabs(c[r * n + j] - ref) <= 1e-5 * mag + 1e-30);
              }
          }
        }
  }
  cpu::set_isa(before);
}

DSPARK_TEST(matmul_nt_rows_do_not_depend_on_the_batch_on_avx2) {
  if (!cpu::isa_supported(cpu::Isa::kAvx2)) return;  // not an x86-64 CPU with AVX2
  const cpu::Isa before = cpu::current_isa();
  cpu::set_isa(cpu::Isa::kAvx2);
  for (int64_t k : {8, 13, 576, 1536}) {
    const Problem p = make(16, 29, k, static_cast<uint32_t>(k));
    for (DType dtype : {DType::kFloat32, DType::kBFloat16}) {
      const std::vector<float> full = run(p, dtype, 16, 0);
      for (int64_t rows : {1, 2, 3, 5, 8}) {
        for (int64_t first = 0; first + rows <= 16; first += 3) {
          const std::vector<float> part = run(p, dtype, rows, first);
          EXPECT(std::memcmp(part.data(), full.data() + first * p.n, sizeof(float) * rows * p.n) == 0);
        }
      }
      for (int64_t cols : {1, 4, 7}) {  // a slice of W's rows: the columns a caller's thread takes
        const int64_t first = 3;
        std::vector<float> part(static_cast<size_t>(16 * cols));
        const size_t size = dtype == DType::kFloat32 ? 4 : 2;
        const char* w = dtype == DType::kFloat32 ? reinterpret_cast<const char*>(p.w32.data())
                                                 : reinterpret_cast<const char*>(p.w16.data());
        cpu::matmul_nt(p.a.data(), k, 16, w + first * k * size, dtype, k, cols, k, part.data(), cols);
        for (int64_t r = 0; r < 16; ++r)
          EXPECT(std::memcmp(&part[static_cast<size_t>(r * cols)], &full[static_cast<size_t>(r * p.n + first)],
                             sizeof(float) * cols) == 0);
      }
    }
  }
  cpu::set_isa(before);
}
