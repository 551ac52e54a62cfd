// The pybind11 module dspark._C: the only file that knows about Python.
// Tensors arrive as plain tuples (data_ptr, dtype code, device type, device
// index, shape, strides) built by python/dspark/_tensor.py, or None.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "dspark/ops.h"
#include "dspark/philox.h"
#include "dspark/dtype_load.h"
#include "dspark/numerics.h"

namespace py = pybind11;

namespace pybind11::detail {

template <>
struct type_caster<dspark::TensorView> {
  PYBIND11_TYPE_CASTER(dspark::TensorView, const_name("TensorView"));

  bool load(handle src, bool) {
    if (src.is_none()) {
      value = dspark::TensorView{};
      return true;
    }
    if (!py::isinstance<py::tuple>(src)) return false;
    const auto t = reinterpret_borrow<py::tuple>(src);
    if (t.size() != 6) return false;
    dspark::TensorView v;
    v.data = reinterpret_cast<void*>(t[0].cast<uintptr_t>());
    v.dtype = static_cast<dspark::DType>(t[1].cast<int32_t>());
    v.device.type = static_cast<dspark::DeviceType>(t[2].cast<int32_t>());
    v.device.index = t[3].cast<int32_t>();
    const auto shape = t[4].cast<py::tuple>();
    const auto strides = t[5].cast<py::tuple>();
    if (shape.size() > dspark::TensorView::kMaxDims || strides.size() != shape.size())
      throw dspark::ValueError("tensor with more than 6 dimensions or mismatched strides");
    v.ndim = static_cast<int32_t>(shape.size());
    for (int i = 0; i < v.ndim; ++i) {
      v.shape[i] = shape[i].cast<int64_t>();
      v.strides[i] = strides[i].cast<int64_t>();
    }
    v.present = true;
    value = v;
    return true;
  }

  static handle cast(const dspark::TensorView&, return_value_policy, handle) {
    return py::none().release();
  }
};

}  // namespace pybind11::detail

namespace {

using dspark::TensorView;

void rejection_sample(TensorView target_logits, TensorView draft_tokens, TensorView cu_num_draft,
                      TensorView draft_logits, TensorView draft_probs, TensorView draft_vocab, double temperature,
                      TensorView temperatures, int64_t seed, TensorView seeds, int64_t offset,
                      TensorView offsets, int64_t max_num_draft, TensorView bonus_tokens, int64_t top_k,
                      TensorView top_ks, double top_p, TensorView top_ps, double min_p, TensorView min_ps,
                      TensorView output_tokens, TensorView num_accepted, TensorView soft_acceptance,
                      TensorView output_logprobs, TensorView workspace, uintptr_t stream) {
  dspark::RejectionSampleArgs a;
  a.target_logits = target_logits;
  a.draft_tokens = draft_tokens;
  a.cu_num_draft = cu_num_draft;
  a.draft_logits = draft_logits;
  a.draft_probs = draft_probs;
  a.draft_vocab = draft_vocab;
  a.temperature = static_cast<float>(temperature);
  a.temperatures = temperatures;
  a.seed = static_cast<uint64_t>(seed);  // any 64-bit pattern
  a.seeds = seeds;
  if (offset < 0) throw dspark::ValueError("rejection_sample: argument 'offset' must be in [0, 2^32), got " + std::to_string(offset));
  a.offset = static_cast<uint64_t>(offset);
  a.offsets = offsets;
  if (max_num_draft < 0 || max_num_draft > INT32_MAX)
    throw dspark::ValueError("rejection_sample: argument 'max_num_draft' must be in [0, 2^31)");
  a.max_num_draft = static_cast<int32_t>(max_num_draft);
  a.bonus_tokens = bonus_tokens;
  if (top_k < 0 || top_k > INT32_MAX)
    throw dspark::ValueError("rejection_sample: argument 'top_k' must be in [0, V] (0: off), got " +
                             std::to_string(top_k));
  a.top_k = static_cast<int32_t>(top_k);
  a.top_ks = top_ks;
  a.top_p = static_cast<float>(top_p);
  a.top_ps = top_ps;
  a.min_p = static_cast<float>(min_p);
  a.min_ps = min_ps;
  a.output_tokens = output_tokens;
  a.num_accepted = num_accepted;
  a.soft_acceptance = soft_acceptance;
  a.output_logprobs = output_logprobs;
  a.workspace = workspace;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::rejection_sample(a);
}

void schedule_prefix(TensorView conf, TensorView cap, int32_t mode, TensorView sps, int64_t budget,
                     TensorView budgets, double threshold, TensorView lengths, TensorView throughput,
                     TensorView capacity, uintptr_t stream) {
  if (mode < 0 || mode > static_cast<int32_t>(dspark::schedule::Mode::kFixed))
    throw dspark::ValueError("schedule_prefix: unknown mode " + std::to_string(mode));
  dspark::SchedulePrefixArgs a;
  a.conf = conf;
  a.cap = cap;
  a.mode = static_cast<dspark::schedule::Mode>(mode);
  a.sps = sps;
  a.budget = budget;
  a.budgets = budgets;
  a.threshold = static_cast<float>(threshold);
  a.lengths = lengths;
  a.throughput = throughput;
  a.capacity = capacity;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::schedule_prefix(a);
}

void markov_sample(TensorView base_logits, TensorView anchor_tokens, TensorView w1, TensorView w2,
                   TensorView draft_vocab, int32_t head, TensorView gate_weight, TensorView gate_bias, TensorView joint_weight,
                   TensorView joint_bias, TensorView hidden, double temperature, TensorView temperatures,
                   int64_t seed, TensorView seeds, int64_t offset, TensorView offsets, int64_t top_k,
                   TensorView top_ks, double top_p, TensorView top_ps, double min_p, TensorView min_ps,
                   TensorView draft_tokens, TensorView logprobs, TensorView lse, TensorView corrected,
                   TensorView workspace, uintptr_t stream) {
  if (head < 0 || head > static_cast<int32_t>(dspark::markov::Head::kRnn))
    throw dspark::ValueError("markov_sample: unknown head " + std::to_string(head));
  if (offset < 0) throw dspark::ValueError("markov_sample: argument 'offset' must be in [0, 2^32)");
  dspark::MarkovSampleArgs a;
  a.base_logits = base_logits;
  a.anchor_tokens = anchor_tokens;
  a.w1 = w1;
  a.w2 = w2;
  a.draft_vocab = draft_vocab;
  a.head = static_cast<dspark::markov::Head>(head);
  a.gate_weight = gate_weight;
  a.gate_bias = gate_bias;
  a.joint_weight = joint_weight;
  a.joint_bias = joint_bias;
  a.hidden = hidden;
  a.temperature = static_cast<float>(temperature);
  a.temperatures = temperatures;
  a.seed = static_cast<uint64_t>(seed);
  a.seeds = seeds;
  a.offset = static_cast<uint64_t>(offset);
  a.offsets = offsets;
  if (top_k < 0 || top_k > INT32_MAX)
    throw dspark::ValueError("markov_sample: argument 'top_k' must be in [0, V_d] (0: off), got " +
                             std::to_string(top_k));
  a.top_k = static_cast<int32_t>(top_k);
  a.top_ks = top_ks;
  a.top_p = static_cast<float>(top_p);
  a.top_ps = top_ps;
  a.min_p = static_cast<float>(min_p);
  a.min_ps = min_ps;
  a.draft_tokens = draft_tokens;
  a.logprobs = logprobs;
  a.lse = lse;
  a.corrected = corrected;
  a.workspace = workspace;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::markov_sample(a);
}

void confidence(TensorView hidden, TensorView w1, TensorView anchor_tokens, TensorView draft_tokens,
                TensorView weight, TensorView bias, TensorView temperatures, TensorView logits,
                TensorView conf, TensorView survival, uintptr_t stream) {
  dspark::ConfidenceArgs a;
  a.hidden = hidden;
  a.w1 = w1;
  a.anchor_tokens = anchor_tokens;
  a.draft_tokens = draft_tokens;
  a.weight = weight;
  a.bias = bias;
  a.temperatures = temperatures;
  a.logits = logits;
  a.conf = conf;
  a.survival = survival;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::confidence(a);
}

void append_kv(TensorView k, TensorView v, TensorView k_cache, TensorView v_cache, TensorView slot_mapping,
               uintptr_t stream) {
  dspark::AppendKvArgs a;
  a.k = k;
  a.v = v;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.slot_mapping = slot_mapping;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::append_kv(a);
}

void paged_attention(TensorView q, TensorView k_cache, TensorView v_cache, TensorView block_table,
                     TensorView kv_lens, TensorView cu_q, int32_t mask, double scale, int64_t window,
                     TensorView out, TensorView lse, TensorView workspace, uintptr_t stream) {
  if (mask != 0 && mask != 1) throw dspark::ValueError("paged_attention: unknown mask " + std::to_string(mask));
  dspark::PagedAttentionArgs a;
  a.q = q;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.block_table = block_table;
  a.kv_lens = kv_lens;
  a.cu_q = cu_q;
  a.mask = static_cast<dspark::AttentionMask>(mask);
  a.scale = static_cast<float>(scale);
  a.window = window;
  a.out = out;
  a.lse = lse;
  a.workspace = workspace;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::paged_attention(a);
}

void rope(TensorView q, TensorView k, TensorView positions, TensorView inv_freq, uintptr_t stream) {
  dspark::RopeArgs a;
  a.q = q;
  a.k = k;
  a.positions = positions;
  a.inv_freq = inv_freq;
  a.stream = reinterpret_cast<void*>(stream);
  dspark::rope(a);
}

void linear(TensorView x, TensorView weight, TensorView bias, TensorView out) {
  dspark::LinearArgs a;
  a.x = x;
  a.weight = weight;
  a.bias = bias;
  a.out = out;
  dspark::linear(a);
}

py::tuple philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
  const dspark::Philox4x32 r = dspark::philox4x32_10(c0, c1, c2, c3, k0, k1);
  return py::make_tuple(r.v[0], r.v[1], r.v[2], r.v[3]);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "dspark kernels (CPU and CUDA backends)";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const dspark::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const dspark::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const dspark::CudaError& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("build_info", [] {
    const dspark::BuildInfo b = dspark::build_info();
    py::dict d;
    d["cuda_compiled"] = b.cuda_compiled;
    d["cuda_archs"] = b.cuda_archs;
    d["cuda_runtime_version"] = b.cuda_runtime_version;
    d["compiler"] = b.compiler;
    return d;
  });
  m.def("cuda_device_count", [] {
    std::string reason;
    const int n = dspark::cuda_device_count(&reason);
    return py::make_tuple(n, reason);
  });
  m.def("cuda_driver_version", &dspark::cuda_driver_version);
  m.def("cuda_driver_problem", &dspark::cuda_driver_problem, py::arg("driver_version"), py::arg("runtime_version"));
  m.def("cpu_isa", &dspark::cpu_isa);
  m.def("cpu_isas_supported", &dspark::cpu_isas_supported);
  m.def("set_cpu_isa", &dspark::set_cpu_isa, py::arg("name"));
  m.def("num_threads", &dspark::cpu_num_threads);
  m.def("set_num_threads", &dspark::set_cpu_num_threads, py::arg("n"));

  m.def("rejection_sample_workspace_bytes", &dspark::rejection_sample_workspace_bytes,
        py::arg("num_requests"), py::arg("num_draft_rows"), py::arg("vocab"),
        py::arg("draft_rows"), py::arg("soft_acceptance"), py::arg("draft_columns"), py::arg("draft_vocab"));
  m.def("rejection_sample", &rejection_sample, py::arg("target_logits"), py::arg("draft_tokens"),
        py::arg("cu_num_draft"), py::arg("draft_logits"), py::arg("draft_probs"), py::arg("draft_vocab"),
        py::arg("temperature"), py::arg("temperatures"), py::arg("seed"), py::arg("seeds"),
        py::arg("offset"), py::arg("offsets"), py::arg("max_num_draft"), py::arg("bonus_tokens"),
        py::arg("top_k"), py::arg("top_ks"), py::arg("top_p"), py::arg("top_ps"), py::arg("min_p"),
        py::arg("min_ps"), py::arg("output_tokens"), py::arg("num_accepted"), py::arg("soft_acceptance"),
        py::arg("output_logprobs"), py::arg("workspace"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("schedule_prefix", &schedule_prefix, py::arg("conf"), py::arg("cap"), py::arg("mode"),
        py::arg("sps"), py::arg("budget"), py::arg("budgets"), py::arg("threshold"),
        py::arg("lengths"), py::arg("throughput"), py::arg("capacity"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.attr("schedule_max_candidates_cuda") = dspark::kScheduleMaxCandidatesCuda;

  m.def("markov_sample_workspace_bytes",
        [](int64_t R, int64_t gamma, int64_t V, int64_t rank, int64_t d, int32_t head, bool truncation) {
          return dspark::markov_sample_workspace_bytes(R, gamma, V, rank, d, static_cast<dspark::markov::Head>(head),
                                                       truncation);
        },
        py::arg("num_requests"), py::arg("gamma"), py::arg("vocab"), py::arg("rank"), py::arg("hidden_size"),
        py::arg("head"), py::arg("truncation") = false);
  m.def("markov_sample", &markov_sample, py::arg("base_logits"), py::arg("anchor_tokens"), py::arg("w1"),
        py::arg("w2"), py::arg("draft_vocab"), py::arg("head"), py::arg("gate_weight"), py::arg("gate_bias"), py::arg("joint_weight"),
        py::arg("joint_bias"), py::arg("hidden"), py::arg("temperature"), py::arg("temperatures"),
        py::arg("seed"), py::arg("seeds"), py::arg("offset"), py::arg("offsets"), py::arg("top_k"),
        py::arg("top_ks"), py::arg("top_p"), py::arg("top_ps"), py::arg("min_p"), py::arg("min_ps"),
        py::arg("draft_tokens"), py::arg("logprobs"), py::arg("lse"), py::arg("corrected"), py::arg("workspace"),
        py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("confidence", &confidence, py::arg("hidden"), py::arg("w1"), py::arg("anchor_tokens"),
        py::arg("draft_tokens"), py::arg("weight"), py::arg("bias"), py::arg("temperatures"), py::arg("logits"),
        py::arg("conf"), py::arg("survival"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());

  m.def("append_kv", &append_kv, py::arg("k"), py::arg("v"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("slot_mapping"), py::arg("stream"), py::call_guard<py::gil_scoped_release>());
  m.def("paged_attention_workspace_bytes",
        [](int64_t T, int64_t R, int64_t Hq, int64_t Hkv, int64_t D, int64_t max_pages, int64_t page_size,
           int32_t dtype, int64_t window, int32_t mask) {
          if (mask != 0 && mask != 1)
            throw dspark::ValueError("paged_attention_workspace_bytes: unknown mask " + std::to_string(mask));
          return dspark::paged_attention_workspace_bytes(T, R, Hq, Hkv, D, max_pages, page_size,
                                                         static_cast<dspark::DType>(dtype), window,
                                                         static_cast<dspark::AttentionMask>(mask));
        },
        py::arg("num_tokens"), py::arg("num_requests"), py::arg("q_heads"), py::arg("kv_heads"), py::arg("head_dim"),
        py::arg("max_pages"), py::arg("page_size"), py::arg("dtype"), py::arg("window") = 0, py::arg("mask") = 0);
  m.def("paged_attention", &paged_attention, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("kv_lens"), py::arg("cu_q"), py::arg("mask"), py::arg("scale"),
        py::arg("window"), py::arg("out"), py::arg("lse"), py::arg("workspace"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());
  m.def("rope", &rope, py::arg("q"), py::arg("k"), py::arg("positions"), py::arg("inv_freq"), py::arg("stream"),
        py::call_guard<py::gil_scoped_release>());

  m.def("linear", &linear, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("out"),
        py::call_guard<py::gil_scoped_release>());

  // Shared numerics, exposed so that tests can compare them with the reference.
  py::module_ t = m.def_submodule("numerics", "the shared __host__ __device__ numerics");
  t.def("philox4x32_10", &philox4x32_10);
  t.def("exp2", [](float x) { return dspark::num::exp2(x); });
  t.def("log2", [](float x) { return dspark::num::log2(x); });
  t.def("exponential", [](uint32_t bits) { return dspark::num::exponential(bits); });
  t.def("uniform", [](uint32_t bits) { return dspark::num::uniform(bits); });
  t.def("to_fixed", [](float w) { return dspark::num::to_fixed(w); });
  t.def("round_to_bf16", [](float x) { return dspark::round_to_bf16(x); });
  t.def("round_to_fp16", [](float x) { return dspark::round_to_fp16(x); });
}
