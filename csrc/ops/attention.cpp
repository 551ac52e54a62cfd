// Argument validation and dispatch of append_kv, paged_attention and rope.
#include <algorithm>
#include <cstdint>

#include "dspark/dtype_load.h"
#include "dspark/ops.h"
#include "attention_workspace.h"

namespace dspark {
namespace {

void check_cache(const char* op, const char* name, const TensorView& t, const Device& device) {
  check::defined(op, name, t);
  check::ndim(op, name, t, 4);
  check::dtype_in(op, name, t, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check::same_device(op, name, t, device);
  check::contiguous(op, name, t);
}

void check_int_vector(const char* op, const char* name, const TensorView& t, const Device& device, int64_t size,
                      std::initializer_list<DType> dtypes) {
  check::defined(op, name, t);
  check::ndim(op, name, t, 1);
  check::dtype_in(op, name, t, dtypes);
  check::same_device(op, name, t, device);
  check::contiguous(op, name, t);
  if (size >= 0) check::dim_size(op, name, t, 0, size, "size");
}

}  // namespace

void append_kv(const AppendKvArgs& a) {
  constexpr const char* op = "append_kv";
  check::defined(op, "k", a.k);
  const Device device = a.k.device;
  check_cache(op, "k_cache", a.k_cache, device);
  check_cache(op, "v_cache", a.v_cache, device);
  const int64_t pages = a.k_cache.size(0), page_size = a.k_cache.size(1), H = a.k_cache.size(2), D = a.k_cache.size(3);
  DSPARK_CHECK_VALUE(a.v_cache.ndim == 4 && a.v_cache.size(0) == pages && a.v_cache.size(1) == page_size &&
                         a.v_cache.size(2) == H && a.v_cache.size(3) == D && a.v_cache.dtype == a.k_cache.dtype,
                     op, ": 'v_cache' must match 'k_cache' ", a.k_cache.shape_str(), ", got ", a.v_cache.shape_str());
  for (const auto* t : {&a.k, &a.v}) {
    const char* name = t == &a.k ? "k" : "v";
    check::defined(op, name, *t);
    check::ndim(op, name, *t, 3);
    check::dtype_in(op, name, *t, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
    check::same_device(op, name, *t, device);
    check::inner_contiguous(op, name, *t);
    DSPARK_CHECK_VALUE(t->size(1) == H && t->size(2) == D, op, ": argument '", name, "' must be [T, H_kv, D] = [T, ",
                       H, ", ", D, "] like the cache, got ", t->shape_str());
  }
  const int64_t T = a.k.size(0);
  DSPARK_CHECK_VALUE(a.v.size(0) == T, op, ": 'k' and 'v' must have the same number of tokens");
  // One source dtype for both (the CUDA kernel converts k and v with one type).
  DSPARK_CHECK_TYPE(a.v.dtype == a.k.dtype, op, ": argument 'v' must have k's dtype ", dtype_name(a.k.dtype),
                    ", got ", dtype_name(a.v.dtype));
  check_int_vector(op, "slot_mapping", a.slot_mapping, device, T, {DType::kInt64});
  check::no_aliasing(op, {{"k_cache", &a.k_cache}, {"v_cache", &a.v_cache}},
                     {{"k", &a.k}, {"v", &a.v}, {"slot_mapping", &a.slot_mapping}});
  if (device.type == DeviceType::kCPU) {
    const int64_t* slots = a.slot_mapping.ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
      DSPARK_CHECK_VALUE(slots[t] < pages * page_size, op, ": slot ", slots[t], " of token ", t,
                         " is past the cache's ", pages * page_size, " slots");
    cpu::append_kv(a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  cuda::append_kv(a);
#else
  DSPARK_CHECK_VALUE(false, op, ": this build of dspark has no CUDA backend");
#endif
}

size_t paged_attention_workspace_bytes(int64_t T, int64_t R, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_pages,
                                       int64_t page_size, DType dtype, int64_t window, AttentionMask mask) {
  const bool tensor_cores = AttentionPlan::tensor_core_shapes(dtype != DType::kFloat32, Hq, Hkv, D);
  return AttentionWorkspace::layout(T, R, Hq, Hkv, D, max_pages, page_size, tensor_cores, std::max<int64_t>(window, 0),
                                    mask == AttentionMask::kCausal)
      .bytes;
}

void paged_attention(const PagedAttentionArgs& a) {
  constexpr const char* op = "paged_attention";
  check::defined(op, "q", a.q);
  const Device device = a.q.device;
  check::ndim(op, "q", a.q, 3);
  check::dtype_in(op, "q", a.q, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
  check::inner_contiguous(op, "q", a.q);
  const int64_t T = a.q.size(0), Hq = a.q.size(1), D = a.q.size(2);
  DSPARK_CHECK_VALUE(D >= 1, op, ": argument 'q' must have a head dim >= 1, got ", a.q.shape_str());
  check_cache(op, "k_cache", a.k_cache, device);
  check_cache(op, "v_cache", a.v_cache, device);
  const int64_t pages = a.k_cache.size(0), page_size = a.k_cache.size(1), Hkv = a.k_cache.size(2);
  DSPARK_CHECK_VALUE(a.k_cache.size(3) == D, op, ": head dim of 'k_cache' (", a.k_cache.size(3),
                     ") must equal q's (", D, ")");
  DSPARK_CHECK_VALUE(a.v_cache.size(0) == pages && a.v_cache.size(1) == page_size && a.v_cache.size(2) == Hkv &&
                         a.v_cache.size(3) == D && a.v_cache.dtype == a.k_cache.dtype,
                     op, ": 'v_cache' must match 'k_cache' ", a.k_cache.shape_str(), ", got ", a.v_cache.shape_str());
  DSPARK_CHECK_VALUE(a.k_cache.dtype == a.q.dtype, op, ": 'k_cache' dtype ", dtype_name(a.k_cache.dtype),
                     " must equal q's ", dtype_name(a.q.dtype));
  DSPARK_CHECK_VALUE(Hkv >= 1 && Hq % Hkv == 0, op, ": query heads (", Hq, ") must be a multiple of kv heads (", Hkv,
                     ")");
  DSPARK_CHECK_VALUE(page_size >= 1, op, ": page size must be >= 1");
  check::defined(op, "block_table", a.block_table);
  check::ndim(op, "block_table", a.block_table, 2);
  check::dtype_in(op, "block_table", a.block_table, {DType::kInt32});
  check::same_device(op, "block_table", a.block_table, device);
  check::contiguous(op, "block_table", a.block_table);
  const int64_t R = a.block_table.size(0), max_pages = a.block_table.size(1);
  check_int_vector(op, "kv_lens", a.kv_lens, device, R, {DType::kInt32});
  check_int_vector(op, "cu_q", a.cu_q, device, R + 1, {DType::kInt32});
  DSPARK_CHECK_VALUE(a.scale > 0.0f && a.scale < num::kFloatMax, op, ": 'scale' must be positive and finite");
  DSPARK_CHECK_VALUE(a.window >= 0 && a.window <= INT32_MAX, op, ": 'window' must be in [0, 2^31) (0: no window), got ",
                     a.window);
  check::defined(op, "out", a.out);
  check::ndim(op, "out", a.out, 3);
  check::dtype_in(op, "out", a.out, {a.q.dtype});
  check::same_device(op, "out", a.out, device);
  check::contiguous(op, "out", a.out);
  DSPARK_CHECK_VALUE(a.out.size(0) == T && a.out.size(1) == Hq && a.out.size(2) == D, op,
                     ": argument 'out' must have q's shape ", a.q.shape_str(), ", got ", a.out.shape_str());
  if (a.lse.defined()) {
    check::ndim(op, "lse", a.lse, 2);
    check::dtype_in(op, "lse", a.lse, {DType::kFloat32});
    check::same_device(op, "lse", a.lse, device);
    check::contiguous(op, "lse", a.lse);
    DSPARK_CHECK_VALUE(a.lse.size(0) == T && a.lse.size(1) == Hq, op, ": argument 'lse' must be [T, H_q]");
  }
  check::no_aliasing(op, {{"out", &a.out}, {"lse", &a.lse}},
                     {{"q", &a.q}, {"k_cache", &a.k_cache}, {"v_cache", &a.v_cache}, {"block_table", &a.block_table},
                      {"kv_lens", &a.kv_lens}, {"cu_q", &a.cu_q}});
  if (device.type == DeviceType::kCPU) {
    const int32_t* cu = a.cu_q.ptr<int32_t>();
    const int32_t* lens = a.kv_lens.ptr<int32_t>();
    const int32_t* table = a.block_table.ptr<int32_t>();
    DSPARK_CHECK_VALUE(cu[0] == 0 && cu[R] == T, op, ": 'cu_q' must run from 0 to the number of queries ", T);
    for (int64_t r = 0; r < R; ++r) {
      DSPARK_CHECK_VALUE(cu[r + 1] >= cu[r], op, ": 'cu_q' must be non-decreasing (request ", r, ")");
      DSPARK_CHECK_VALUE(lens[r] >= 0 && lens[r] <= max_pages * page_size, op, ": kv_lens[", r, "] = ", lens[r],
                         " does not fit the block table (", max_pages, " pages of ", page_size, ")");
      for (int64_t i = 0; i < (lens[r] + page_size - 1) / page_size; ++i)
        DSPARK_CHECK_VALUE(table[r * max_pages + i] >= 0 && table[r * max_pages + i] < pages, op,
                           ": block_table[", r, ", ", i, "] = ", table[r * max_pages + i], " is not a page in [0, ",
                           pages, ")");
    }
    cpu::paged_attention(a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  const size_t need = paged_attention_workspace_bytes(T, R, Hq, Hkv, D, max_pages, page_size, a.q.dtype, a.window,
                                                      a.mask);
  check::defined(op, "workspace", a.workspace);
  check::same_device(op, "workspace", a.workspace, device);
  DSPARK_CHECK_VALUE(static_cast<size_t>(a.workspace.numel()) >= need &&
                         reinterpret_cast<uintptr_t>(a.workspace.data) % 256 == 0,
                     op, ": argument 'workspace' must hold ", need, " bytes, 256-byte aligned");
  cuda::paged_attention(a);
#else
  DSPARK_CHECK_VALUE(false, op, ": this build of dspark has no CUDA backend");
#endif
}

void rope(const RopeArgs& a) {
  constexpr const char* op = "rope";
  check::defined(op, "q", a.q);
  const Device device = a.q.device;
  check::defined(op, "inv_freq", a.inv_freq);
  check_int_vector(op, "inv_freq", a.inv_freq, device, -1, {DType::kFloat32});
  const int64_t half = a.inv_freq.size(0);
  for (const auto* t : {&a.q, &a.k}) {
    if (!t->defined()) continue;
    const char* name = t == &a.q ? "q" : "k";
    check::ndim(op, name, *t, 3);
    check::dtype_in(op, name, *t, {DType::kFloat32, DType::kFloat16, DType::kBFloat16});
    check::same_device(op, name, *t, device);
    check::inner_contiguous(op, name, *t);
    DSPARK_CHECK_VALUE(2 * half <= t->size(2), op, ": rotary dim ", 2 * half, " exceeds the head dim of '", name, "' (",
                       t->size(2), ")");
    DSPARK_CHECK_VALUE(t->size(0) == a.q.size(0), op, ": 'q' and 'k' must have the same number of tokens");
  }
  check_int_vector(op, "positions", a.positions, device, a.q.size(0), {DType::kInt32, DType::kInt64});
  // q and k are rotated in place: an element reached twice would be rotated twice.
  check::no_internal_overlap(op, "q", a.q);
  if (a.k.defined()) check::no_internal_overlap(op, "k", a.k);
  check::no_aliasing(op, {{"q", &a.q}, {"k", &a.k}}, {{"positions", &a.positions}, {"inv_freq", &a.inv_freq}});
  if (device.type == DeviceType::kCPU) {
    cpu::rope(a);
    return;
  }
#if defined(DSPARK_WITH_CUDA)
  cuda::rope(a);
#else
  DSPARK_CHECK_VALUE(false, op, ": this build of dspark has no CUDA backend");
#endif
}

}  // namespace dspark
