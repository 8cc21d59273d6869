// CPU kernel for tgate::post_gate_residual_norm.
//
// After the T-GATE gate step a transformer block's cross-attention output is a
// cached tensor, so what is left between self-attention and the feed-forward is
// two residual additions and a LayerNorm (plus PixArt's adaLN modulation).  Eager
// PyTorch runs that as five or six memory-bound passes over (B, N, D); this kernel
// does it in one: every row of the inputs is read once and both outputs are written
// once, while the row itself stays in L1 between the sum, the statistics and the
// normalisation.
//
// The operator schema is defined once, in Python (tgate_kernels/ops/_library.py);
// this file only registers the CPU implementation.  The dispatcher checks the C++
// signature below against that schema when both are registered, so the two cannot
// drift apart silently.

#include <ATen/ATen.h>
#include <ATen/Dispatch_v2.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

// The extension is built with the compiler's baseline flags (SSE2 on x86-64) so
// that one wheel runs everywhere.  The float row loops below are where all the
// arithmetic happens, so they are compiled several times and the best clone for
// the running CPU is picked by the loader (GNU ifunc).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define TGATE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define TGATE_MULTIVERSION
#endif

// `omp simd` lets the float reductions below vectorise without -ffast-math.
#if defined(_OPENMP)
#define TGATE_PRAGMA(text) _Pragma(#text)
#define TGATE_SIMD TGATE_PRAGMA(omp simd)
#define TGATE_SIMD_SUM(var) TGATE_PRAGMA(omp simd reduction(+ : var))
#else
#define TGATE_SIMD
#define TGATE_SIMD_SUM(var)
#endif

namespace tgate {
namespace {

constexpr const char* kOpName = "tgate::post_gate_residual_norm";

// ---------------------------------------------------------------------------
// Row primitives on float32 data.
// ---------------------------------------------------------------------------

// Reductions keep kLanes independent partial sums: a single vector accumulator
// would serialise on the add latency, while 64 lanes (4 AVX-512 or 8 AVX2
// registers) keep the FP units busy.  Every supported row length (320 ... 1280)
// is a multiple of 64; other lengths finish with a short scalar tail.
constexpr int64_t kLanes = 64;

inline float sum_lanes(const float* acc, float tail) {
  float total = tail;
  for (int64_t j = 0; j < kLanes; ++j) {
    total += acc[j];
  }
  return total;
}

// out = hidden + gate * attn_out + cross (gate may be null); returns sum(out).
TGATE_MULTIVERSION
float residual_sum_row(
    float* out,
    const float* hidden,
    const float* attn_out,
    const float* cross,
    const float* gate,
    int64_t d) {
  float acc[kLanes] = {};
  float tail = 0.f;
  int64_t i = 0;
  if (gate != nullptr) {
    for (; i + kLanes <= d; i += kLanes) {
      TGATE_SIMD
      for (int64_t j = 0; j < kLanes; ++j) {
        const float v = (hidden[i + j] + gate[i + j] * attn_out[i + j]) + cross[i + j];
        out[i + j] = v;
        acc[j] += v;
      }
    }
    for (; i < d; ++i) {
      out[i] = (hidden[i] + gate[i] * attn_out[i]) + cross[i];
      tail += out[i];
    }
  } else {
    for (; i + kLanes <= d; i += kLanes) {
      TGATE_SIMD
      for (int64_t j = 0; j < kLanes; ++j) {
        const float v = (hidden[i + j] + attn_out[i + j]) + cross[i + j];
        out[i + j] = v;
        acc[j] += v;
      }
    }
    for (; i < d; ++i) {
      out[i] = (hidden[i] + attn_out[i]) + cross[i];
      tail += out[i];
    }
  }
  return sum_lanes(acc, tail);
}

TGATE_MULTIVERSION
float row_sum(const float* h, int64_t d) {
  float acc[kLanes] = {};
  float tail = 0.f;
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    TGATE_SIMD
    for (int64_t j = 0; j < kLanes; ++j) {
      acc[j] += h[i + j];
    }
  }
  for (; i < d; ++i) {
    tail += h[i];
  }
  return sum_lanes(acc, tail);
}

// Second pass over a row that is still in L1: as cheap as Welford here and more
// accurate than E[x^2] - mean^2, since the mean is removed before squaring.
TGATE_MULTIVERSION
float row_rstd(const float* h, float mean, float eps, int64_t d) {
  float acc[kLanes] = {};
  float tail = 0.f;
  int64_t i = 0;
  for (; i + kLanes <= d; i += kLanes) {
    TGATE_SIMD
    for (int64_t j = 0; j < kLanes; ++j) {
      const float centred = h[i + j] - mean;
      acc[j] += centred * centred;
    }
  }
  for (; i < d; ++i) {
    const float centred = h[i] - mean;
    tail += centred * centred;
  }
  return 1.f / std::sqrt(sum_lanes(acc, tail) / static_cast<float>(d) + eps);
}

// `mul` and `add` fold the LayerNorm affine and the adaLN modulation into one
// multiply-add per element (see FoldedAffine); either may be absent.
TGATE_MULTIVERSION
void normalize_row(
    float* out,
    const float* h,
    float mean,
    float rstd,
    const float* mul,
    const float* add,
    int64_t d) {
  if (mul != nullptr && add != nullptr) {
    TGATE_SIMD
    for (int64_t i = 0; i < d; ++i) {
      out[i] = (h[i] - mean) * rstd * mul[i] + add[i];
    }
  } else if (mul != nullptr) {
    TGATE_SIMD
    for (int64_t i = 0; i < d; ++i) {
      out[i] = (h[i] - mean) * rstd * mul[i];
    }
  } else if (add != nullptr) {
    TGATE_SIMD
    for (int64_t i = 0; i < d; ++i) {
      out[i] = (h[i] - mean) * rstd + add[i];
    }
  } else {
    TGATE_SIMD
    for (int64_t i = 0; i < d; ++i) {
      out[i] = (h[i] - mean) * rstd;
    }
  }
}

template <typename scalar_t>
void load_row(float* dst, const scalar_t* src, int64_t d) {
  TGATE_SIMD
  for (int64_t i = 0; i < d; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

template <typename scalar_t>
void store_row(scalar_t* dst, const float* src, int64_t d) {
  TGATE_SIMD
  for (int64_t i = 0; i < d; ++i) {
    dst[i] = static_cast<scalar_t>(src[i]);
  }
}

// ---------------------------------------------------------------------------
// Input validation.  The wording matches tgate_kernels/ops/_reference.py so that
// every backend reports a bad argument the same way.
// ---------------------------------------------------------------------------

std::string shape_str(c10::IntArrayRef sizes) {
  std::string s = "(";
  for (const auto i : c10::irange(sizes.size())) {
    if (i > 0) {
      s += ", ";
    }
    s += std::to_string(sizes[i]);
  }
  s += sizes.size() == 1 ? ",)" : ")";
  return s;
}

void check_same_dtype_and_device(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  TORCH_CHECK(
      t.scalar_type() == hidden.scalar_type(),
      kOpName, ": `", name, "` has dtype ", t.scalar_type(), " but `hidden` has dtype ",
      hidden.scalar_type(), "; all tensor arguments must share one dtype");
  TORCH_CHECK(
      t.device() == hidden.device(),
      kOpName, ": `", name, "` is on device ", t.device(), " but `hidden` is on device ",
      hidden.device(), "; all tensor arguments must be on one device");
}

// Returns how many modulation rows the tensor holds: 1 (shared by every row) or B
// (one per batch item, broadcast over the N tokens).
int64_t check_modulation(const at::Tensor& t, const char* name, const at::Tensor& hidden) {
  check_same_dtype_and_device(t, name, hidden);
  const int64_t d = hidden.size(-1);
  const bool is_3d = hidden.dim() == 3;
  const int64_t batch = is_3d ? hidden.size(0) : 1;
  const auto sizes = t.sizes();
  const bool shared = (t.dim() == 1 && sizes[0] == d) ||
      (t.dim() == hidden.dim() && sizes.back() == d && t.numel() == d);
  const bool per_batch = is_3d && t.dim() == 3 && sizes[0] == batch && sizes[1] == 1 && sizes[2] == d;
  if (per_batch) {
    return batch;
  }
  if (shared) {
    return 1;
  }
  const std::string allowed = is_3d
      ? "(B, 1, D) = " + shape_str({batch, 1, d}) + ", (1, 1, D) or (D,)"
      : std::string("(1, D) = ") + shape_str({1, d}) + " or (D,)";
  TORCH_CHECK(
      false,
      kOpName, ": `", name, "` must have shape ", allowed, " to broadcast over `hidden` of shape ",
      shape_str(hidden.sizes()), "; got ", shape_str(sizes));
  return 0;
}

void check_inputs(
    const at::Tensor& hidden,
    const at::Tensor& attn_out,
    const at::Tensor& cross,
    const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(
      hidden.dim() == 2 || hidden.dim() == 3,
      kOpName, ": `hidden` must be 3-D (B, N, D) or 2-D (rows, D); got shape ", shape_str(hidden.sizes()));
  const auto dtype = hidden.scalar_type();
  TORCH_CHECK(
      dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
      kOpName, ": `hidden` has dtype ", dtype, "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(
      hidden.size(-1) > 0,
      kOpName, ": `hidden` must have a non-empty last dimension to normalise over; got shape ",
      shape_str(hidden.sizes()));
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{attn_out, "attn_out"}, {cross, "cross"}}) {
    check_same_dtype_and_device(t, name, hidden);
    TORCH_CHECK(
        t.sizes() == hidden.sizes(),
        kOpName, ": `", name, "` must have the same shape as `hidden` ", shape_str(hidden.sizes()),
        "; got ", shape_str(t.sizes()));
  }
  const int64_t d = hidden.size(-1);
  for (const auto& [t, name] : {std::pair<const std::optional<at::Tensor>&, const char*>{weight, "weight"}, {bias, "bias"}}) {
    if (t.has_value()) {
      check_same_dtype_and_device(*t, name, hidden);
      TORCH_CHECK(
          t->dim() == 1 && t->size(0) == d,
          kOpName, ": `", name, "` must have shape (D,) = (", d, ",) to match the last dimension of `hidden`; got ",
          shape_str(t->sizes()));
    }
  }
  TORCH_CHECK(
      scale.has_value() == shift.has_value(),
      kOpName, ": `scale` and `shift` must be given together (adaLN modulation n * (1 + scale) + shift); got only `",
      scale.has_value() ? "scale" : "shift", "`");
}

// ---------------------------------------------------------------------------
// Kernel.
// ---------------------------------------------------------------------------

// Per-row float32 copies of the small per-channel operands, modulation rows first.
// The LayerNorm affine and the adaLN modulation are folded together:
//   ((x̂ * w + b) * (1 + s) + t)  ==  x̂ * [w (1 + s)]  +  [b (1 + s) + t]
// so the hot loop does one multiply-add per element however many are present.
struct FoldedAffine {
  std::vector<float> gate;  // rows x D, or empty
  std::vector<float> mul;   // rows x D, or empty (= 1)
  std::vector<float> add;   // rows x D, or empty (= 0)
  int64_t gate_row_stride = 0;    // 0 when one row is shared by the whole batch
  int64_t affine_row_stride = 0;
};

template <typename scalar_t>
std::vector<float> to_float_vector(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  const scalar_t* src = c.const_data_ptr<scalar_t>();
  return std::vector<float>(src, src + c.numel());
}

template <typename scalar_t>
FoldedAffine fold_affine(
    int64_t d,
    const std::optional<at::Tensor>& gate,
    int64_t gate_rows,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale,
    int64_t scale_rows,
    const std::optional<at::Tensor>& shift,
    int64_t shift_rows) {
  FoldedAffine folded;
  if (gate.has_value()) {
    folded.gate = to_float_vector<scalar_t>(*gate);
    folded.gate_row_stride = gate_rows > 1 ? d : 0;
  }
  const bool modulated = scale.has_value();
  if (!modulated && !weight.has_value() && !bias.has_value()) {
    return folded;
  }
  const std::vector<float> w = weight.has_value() ? to_float_vector<scalar_t>(*weight) : std::vector<float>();
  const std::vector<float> b = bias.has_value() ? to_float_vector<scalar_t>(*bias) : std::vector<float>();
  const std::vector<float> s = modulated ? to_float_vector<scalar_t>(*scale) : std::vector<float>();
  const std::vector<float> t = modulated ? to_float_vector<scalar_t>(*shift) : std::vector<float>();
  const int64_t rows = modulated ? std::max(scale_rows, shift_rows) : 1;
  const bool has_mul = modulated || weight.has_value();
  const bool has_add = modulated || bias.has_value();
  if (has_mul) {
    folded.mul.resize(rows * d);
  }
  if (has_add) {
    folded.add.resize(rows * d);
  }
  for (const auto r : c10::irange(rows)) {
    const float* s_row = modulated ? s.data() + (scale_rows > 1 ? r * d : 0) : nullptr;
    const float* t_row = modulated ? t.data() + (shift_rows > 1 ? r * d : 0) : nullptr;
    for (const auto i : c10::irange(d)) {
      const float one_plus_s = modulated ? 1.f + s_row[i] : 1.f;
      if (has_mul) {
        folded.mul[r * d + i] = (w.empty() ? 1.f : w[i]) * one_plus_s;
      }
      if (has_add) {
        folded.add[r * d + i] = (b.empty() ? 0.f : b[i] * one_plus_s) + (modulated ? t_row[i] : 0.f);
      }
    }
  }
  folded.affine_row_stride = rows > 1 ? d : 0;
  return folded;
}

template <typename scalar_t>
void post_gate_residual_norm_rows(
    const scalar_t* hidden,
    const scalar_t* attn_out,
    const scalar_t* cross,
    scalar_t* h_out,
    scalar_t* n_out,
    const FoldedAffine& folded,
    int64_t rows,
    int64_t rows_per_batch,
    int64_t d,
    float eps) {
  const float* gate = folded.gate.empty() ? nullptr : folded.gate.data();
  const float* mul = folded.mul.empty() ? nullptr : folded.mul.data();
  const float* add = folded.add.empty() ? nullptr : folded.add.data();
  // Enough rows per task that scheduling overhead stays small next to the work.
  const int64_t grain = std::max<int64_t>(1, 32768 / d);

  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;
    // Reduced-precision rows are widened into float scratch once; float rows are
    // used in place and h is written straight to its output.
    std::vector<float> scratch(kIsFloat ? 0 : 4 * d);
    float* x = scratch.data();
    float* a = x + d;
    float* c = a + d;
    float* h = c + d;

    for (int64_t r = begin; r < end; ++r) {
      const int64_t batch = r / rows_per_batch;
      const float* gate_row = gate ? gate + batch * folded.gate_row_stride : nullptr;
      const float* mul_row = mul ? mul + batch * folded.affine_row_stride : nullptr;
      const float* add_row = add ? add + batch * folded.affine_row_stride : nullptr;
      const int64_t offset = r * d;
      if constexpr (kIsFloat) {
        float* h_row = h_out + offset;
        const float sum = residual_sum_row(h_row, hidden + offset, attn_out + offset, cross + offset, gate_row, d);
        const float mean = sum / static_cast<float>(d);
        normalize_row(n_out + offset, h_row, mean, row_rstd(h_row, mean, eps, d), mul_row, add_row, d);
      } else {
        load_row(x, hidden + offset, d);
        load_row(a, attn_out + offset, d);
        load_row(c, cross + offset, d);
        residual_sum_row(h, x, a, c, gate_row, d);
        // Normalise the h that is returned (rounded to the output dtype), so that
        // n == layer_norm(h) holds for the tensors the caller actually sees.
        store_row(h_out + offset, h, d);
        load_row(h, h_out + offset, d);
        const float mean = row_sum(h, d) / static_cast<float>(d);
        normalize_row(x, h, mean, row_rstd(h, mean, eps, d), mul_row, add_row, d);
        store_row(n_out + offset, x, d);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> post_gate_residual_norm_cpu(
    const at::Tensor& hidden,
    const at::Tensor& attn_out,
    const at::Tensor& cross,
    const std::optional<at::Tensor>& gate,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    const std::optional<at::Tensor>& scale,
    const std::optional<at::Tensor>& shift) {
  check_inputs(hidden, attn_out, cross, gate, weight, bias, scale, shift);
  const int64_t gate_rows = gate.has_value() ? check_modulation(*gate, "gate", hidden) : 0;
  const int64_t scale_rows = scale.has_value() ? check_modulation(*scale, "scale", hidden) : 0;
  const int64_t shift_rows = shift.has_value() ? check_modulation(*shift, "shift", hidden) : 0;

  const int64_t d = hidden.size(-1);
  const int64_t rows = hidden.numel() / d;
  const int64_t rows_per_batch = hidden.dim() == 3 ? hidden.size(1) : rows;

  // Strided inputs are compacted here (a no-op for the usual contiguous case);
  // the outputs are always contiguous.
  const at::Tensor hidden_c = hidden.contiguous();
  const at::Tensor attn_c = attn_out.contiguous();
  const at::Tensor cross_c = cross.contiguous();
  at::Tensor h_out = at::empty(hidden.sizes(), hidden.options());
  at::Tensor n_out = at::empty(hidden.sizes(), hidden.options());
  if (rows == 0) {
    return {h_out, n_out};
  }

  AT_DISPATCH_V2(hidden.scalar_type(), kOpName, AT_WRAP([&] {
    const FoldedAffine folded =
        fold_affine<scalar_t>(d, gate, gate_rows, weight, bias, scale, scale_rows, shift, shift_rows);
    post_gate_residual_norm_rows<scalar_t>(
        hidden_c.const_data_ptr<scalar_t>(),
        attn_c.const_data_ptr<scalar_t>(),
        cross_c.const_data_ptr<scalar_t>(),
        h_out.mutable_data_ptr<scalar_t>(),
        n_out.mutable_data_ptr<scalar_t>(),
        folded,
        rows,
        rows_per_batch,
        d,
        static_cast<float>(eps));
  }), at::kFloat, at::kHalf, at::kBFloat16);
  return {h_out, n_out};
}

}  // namespace

TORCH_LIBRARY_IMPL(tgate, CPU, m) {
  m.impl("post_gate_residual_norm", &post_gate_residual_norm_cpu);
}

}  // namespace tgate
