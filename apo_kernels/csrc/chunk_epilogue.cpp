// CPU epilogues of the chunked linear_logprobs strategy (apo_kernels/chunked/).
//
// The GEMM (MKL/oneDNN through torch.mm) writes a chunk's raw logits x = h_c @ W.T into a reused
// fp32 buffer (a [tokens, vocabulary block] slice); these kernels then make ONE sweep per row
// over it from memory (a block row, e.g. 8960 fp32 = 35 KiB, stays in cache for the forward's
// second loop):
//
//   forward  (apo_chunk_native::forward_partials): z = T(x + b) written back in place, and per
//            row the partial statistics of the block (max m, s1 = sum exp(z - m), the label
//            logit, and optionally u, s2, sum z, max before the label: the partials of
//            kernels/linear_logprobs_fwd.py); blocks merge with a stable log-add in Python.
//   backward (apo_chunk_native::grad_inplace): x is overwritten by d loss / d x, i.e.
//            dz = g [v = y] - p (g + e (z - E[z])) chained through temperature/softcap/scale.
//
// Rows are spread over torch's intra-op thread pool (at::parallel_for). Inner loops work on
// fixed 16-lane blocks with branch-free code (a polynomial exp, a select-based tanh) so that
// g++ -O3 vectorises them without -ffast-math; sums are kept per 1024-element segment in fp32
// lanes and added up in fp64, so a 256k vocabulary sums as accurately as a short one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace {

// 16 fp32 lanes as a GCC/Clang vector extension: one AVX-512 register (two AVX2 ones); the
// compiler emits the SIMD code for the -march it is given, no intrinsics needed.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
constexpr int64_t kSegment = 1024;  // elements summed in fp32 lanes before the fp64 accumulate
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline vf load(const float* p) { vf v; std::memcpy(&v, p, sizeof(vf)); return v; }
inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(vf)); }
inline vf splat(float x) { return vf{} + x; }
// A partial last block: missing lanes get `fill`.
inline vf load_tail(const float* p, int64_t n, float fill) {
  vf v = splat(fill);
  for (int64_t k = 0; k < n; ++k) v[k] = p[k];
  return v;
}
inline void store_tail(float* p, vf v, int64_t n) { for (int64_t k = 0; k < n; ++k) p[k] = v[k]; }

inline vf select(vi m, vf a, vf b) { return m ? a : b; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }  // NaN in a is dropped (see forward_row)
inline float hmax(vf a) { float m = a[0]; for (int k = 1; k < kLanes; ++k) m = a[k] > m ? a[k] : m; return m; }
inline double hsum(vf a) { double s = 0; for (int k = 0; k < kLanes; ++k) s += a[k]; return s; }

// exp(x) to ~2 ulp (Cephes expf): x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial in r,
// scaled by 2^n through the exponent bits. -inf and x < -88.37 give 0; NaN stays NaN
// (a NaN compares false in the clamps and poisons the polynomial).
inline vf exp_poly(vf x) {
  x = select(x < -88.3762626647949f, splat(-88.3762626647949f), x);
  x = select(x > 88.3762626647949f, splat(88.3762626647949f), x);
  vf t = x * 1.44269504088896341f + 0.5f;
  vf fx = __builtin_convertvector(__builtin_convertvector(t, vi), vf);  // trunc
  fx = select(fx > t, fx - 1.0f, fx);                                    // floor
  vf r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  vf y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  vi n = __builtin_convertvector(fx, vi) + 127;
  n = n < 0 ? vi{} : n;
  return y * (vf)(n << 23);
}

// tanh with ~1 ulp relative error, as kernels/common.py's accurate_tanh: (1 - e) / (1 + e) with
// e = exp(-2|x|), and the odd Taylor series to x^7 below |x| = 1/8 where 1 - e cancels.
inline vf tanh_poly(vf x) {
  vf ax = select(x < 0.0f, -x, x);
  vf e = exp_poly(-2.0f * ax);
  vf large = (1.0f - e) / (1.0f + e);
  vf x2 = ax * ax;
  vf small = ax * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  vf t = select(ax < 0.125f, small, large);
  return select(x < 0.0f, -t, t);
}

struct Transform {
  float scale;     // logit_scale
  float softcap;   // unused without HAS_CAP
  float inv_temp;  // 1 / temperature
};

// z = T(x + b) and, for the backward, jac = dz/dx, for one block of lanes.
template <bool HAS_BIAS, bool HAS_CAP>
inline vf transform(vf x, vf b, const Transform& t, vf* jac) {
  if (HAS_BIAS) x += b;
  x *= t.scale;
  if (HAS_CAP) {
    vf th = tanh_poly(x / t.softcap);
    *jac = (t.scale * t.inv_temp) * (1.0f - th * th);
    return (t.softcap * t.inv_temp) * th;
  }
  *jac = splat(t.scale * t.inv_temp);
  return x * t.inv_temp;
}

// Per-row partial statistics of one vocabulary block, in the order of the [7, C] output (the
// partials of kernels/linear_logprobs_fwd.py): m, s1 = sum exp(z - m), the label logit (0 when
// the label is outside the block), u = sum exp(z - m) (z - m), s2 = sum exp(2 (z - m)), sum z,
// max of z before the label. Blocks merge with a stable log-add (chunked/epilogue.py).
enum Out { kMax = 0, kS1, kZy, kU, kS2, kSumZ, kMaxBefore, kNumOut };

template <bool HAS_BIAS, bool HAS_CAP, bool ENTROPY, bool STATS>
void forward_row(float* z, const float* bias, int64_t V, int64_t y, const Transform& t,
                 float* out, int64_t out_stride) {
  const vi lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  const vf neg_inf = splat(kNegInf);
  // Loop 1 (streams the row from memory): transform in place, row max, sum z, max before y.
  vf mx = neg_inf, mb = neg_inf, sz = vf{};
  double sumz = 0.0;
  for (int64_t s0 = 0; s0 < V; s0 += kSegment) {
    const int64_t se = s0 + kSegment < V ? s0 + kSegment : V;
    for (int64_t v0 = s0; v0 < se; v0 += kLanes) {
      const int64_t n = se - v0 < kLanes ? se - v0 : kLanes;
      vf jac;
      vf x = n == kLanes ? load(z + v0) : load_tail(z + v0, n, 0.0f);
      vf b = HAS_BIAS ? (n == kLanes ? load(bias + v0) : load_tail(bias + v0, n, 0.0f)) : vf{};
      vf zv = transform<HAS_BIAS, HAS_CAP>(x, b, t, &jac);
      if (n == kLanes) store(z + v0, zv); else store_tail(z + v0, zv, n);
      vi valid = lane < (int32_t)n;
      mx = vmax(select(valid, zv, neg_inf), mx);
      if (STATS) {
        sz += select(valid, zv, vf{});
        vi before = (lane + (int32_t)(v0 - y)) < 0;  // v < y (y relative to the block)
        mb = vmax(select(before & valid, zv, neg_inf), mb);
      }
    }
    if (STATS) { sumz += hsum(sz); sz = vf{}; }
  }
  // The max skips NaN; the sums below do not (exp(NaN - m) is NaN), so a NaN reaches logp.
  const float m = hmax(mx);

  // Loop 2 (the row is in cache now): e = exp(z - m); s1 = sum e, u = sum e (z - m), s2 = sum e^2.
  vf a1 = vf{}, au = vf{}, a2 = vf{};
  double s1 = 0.0, u = 0.0, s2 = 0.0;
  for (int64_t s0 = 0; s0 < V; s0 += kSegment) {
    const int64_t se = s0 + kSegment < V ? s0 + kSegment : V;
    for (int64_t v0 = s0; v0 < se; v0 += kLanes) {
      const int64_t n = se - v0 < kLanes ? se - v0 : kLanes;
      vf d = (n == kLanes ? load(z + v0) : load_tail(z + v0, n, kNegInf)) - m;
      vf e = exp_poly(d);  // 0 in missing lanes
      a1 += e;
      if (ENTROPY) au += select(e > 0.0f, e * d, vf{});  // 0 * -inf would be NaN
      if (STATS) a2 += e * e;
    }
    s1 += hsum(a1); a1 = vf{};
    if (ENTROPY) { u += hsum(au); au = vf{}; }
    if (STATS) { s2 += hsum(a2); a2 = vf{}; }
  }
  out[kMax * out_stride] = m;
  out[kS1 * out_stride] = static_cast<float>(s1);
  out[kZy * out_stride] = (y >= 0 && y < V) ? z[y] : 0.0f;
  if (ENTROPY) out[kU * out_stride] = static_cast<float>(u);
  if (STATS) {
    out[kS2 * out_stride] = static_cast<float>(s2);
    out[kSumZ * out_stride] = static_cast<float>(sumz);
    out[kMaxBefore * out_stride] = hmax(mb);
  }
}

template <bool HAS_BIAS, bool HAS_CAP, bool ENTROPY>
void grad_row(float* x, const float* bias, int64_t V, int64_t y, const Transform& t, float m,
              float log_norm, float g, float ge, float ez_rel) {
  // The label's jacobian from its raw logit before the row is overwritten: its one-hot term
  // g [v = y] is added at the end. y is relative to this vocabulary block; outside it, no term.
  const bool has_label = y >= 0 && y < V;
  vf jac_y = vf{};
  if (has_label)
    transform<HAS_BIAS, HAS_CAP>(splat(x[y]), splat(HAS_BIAS ? bias[y] : 0.0f), t, &jac_y);
  for (int64_t v0 = 0; v0 < V; v0 += kLanes) {
    const int64_t n = V - v0 < kLanes ? V - v0 : kLanes;
    vf jac;
    vf raw = n == kLanes ? load(x + v0) : load_tail(x + v0, n, 0.0f);
    vf b = HAS_BIAS ? (n == kLanes ? load(bias + v0) : load_tail(bias + v0, n, 0.0f)) : vf{};
    vf zr = transform<HAS_BIAS, HAS_CAP>(raw, b, t, &jac) - m;
    vf p = exp_poly(zr - log_norm);
    vf coef = ENTROPY ? g + ge * (zr - ez_rel) : splat(g);
    vf d = -p * coef * jac;
    if (n == kLanes) store(x + v0, d); else store_tail(x + v0, d, n);
  }
  if (has_label) x[y] += g * jac_y[0];
}

void check_chunk(const at::Tensor& logits, const at::Tensor& labels,
                 const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(logits.device().is_cpu() && logits.scalar_type() == at::kFloat && logits.dim() == 2,
              "logits must be a 2-D fp32 CPU tensor");
  TORCH_CHECK(logits.stride(1) == 1, "logits rows must be contiguous");
  TORCH_CHECK(labels.scalar_type() == at::kLong && labels.is_contiguous() &&
                  labels.numel() == logits.size(0),
              "labels must be contiguous int64 with one entry per logits row");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                    bias->numel() == logits.size(1),
                "bias must be contiguous fp32 [V]");
  }
}

// Dispatch the four compile-time flags to one template instance.
template <template <bool, bool, bool, bool> class F, typename... Args>
void dispatch4(bool a, bool b, bool c, bool d, Args&&... args) {
#define APO_CASE(A, B, C, D) \
  if (a == A && b == B && c == C && d == D) return F<A, B, C, D>::run(args...);
  APO_CASE(false, false, false, false) APO_CASE(false, false, false, true)
  APO_CASE(false, false, true, false) APO_CASE(false, false, true, true)
  APO_CASE(false, true, false, false) APO_CASE(false, true, false, true)
  APO_CASE(false, true, true, false) APO_CASE(false, true, true, true)
  APO_CASE(true, false, false, false) APO_CASE(true, false, false, true)
  APO_CASE(true, false, true, false) APO_CASE(true, false, true, true)
  APO_CASE(true, true, false, false) APO_CASE(true, true, false, true)
  APO_CASE(true, true, true, false) APO_CASE(true, true, true, true)
#undef APO_CASE
}

template <bool HB, bool HC, bool HE, bool HS>
struct ForwardRows {
  static void run(float* z, int64_t ld, const float* bias, int64_t V, const int64_t* labels,
                  const Transform& t, float* out, int64_t rows) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        forward_row<HB, HC, HE, HS>(z + r * ld, bias, V, labels[r], t, out + r, rows);
    });
  }
};

template <bool HB, bool HC, bool HE, bool Unused>
struct GradRows {
  static void run(float* x, int64_t ld, const float* bias, int64_t V, const int64_t* labels,
                  const Transform& t, const float* m, const float* ln, const float* g,
                  const float* ge, const float* ez, int64_t rows) {
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        grad_row<HB, HC, HE>(x + r * ld, bias, V, labels[r], t, m[r], ln[r], g[r],
                             HE ? ge[r] : 0.0f, HE ? ez[r] : 0.0f);
    });
  }
};

// logits [C, V] fp32 raw logits of a vocabulary block (rows contiguous; a column slice of a
// wider buffer is fine), overwritten by z; labels [C] int64 relative to the block's first
// column (outside [0, V): not in this block) -> fp32 [7, C] partials (see Out; rows of the
// partials not asked for are left unwritten).
at::Tensor forward_partials(at::Tensor logits, const at::Tensor& labels,
                            const c10::optional<at::Tensor>& bias, double logit_scale,
                            c10::optional<double> softcap, double temperature, bool with_entropy,
                            bool with_stats) {
  check_chunk(logits, labels, bias);
  const int64_t C = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({kNumOut, C}, logits.options());
  Transform t{static_cast<float>(logit_scale), static_cast<float>(softcap.value_or(1.0)),
              static_cast<float>(1.0 / temperature)};
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  dispatch4<ForwardRows>(bias.has_value(), softcap.has_value(), with_entropy, with_stats,
                         logits.data_ptr<float>(), logits.stride(0), b, V,
                         labels.data_ptr<int64_t>(), t, out.data_ptr<float>(), C);
  return out;
}

// logits [C, V] fp32 raw (untransformed) logits of a vocabulary block (a column slice with
// contiguous rows is fine), overwritten in place by d loss / d logits; labels relative to the
// block's first column (outside [0, V): no label term in this block).
// row_max, log_norm, grad_logp [C] fp32; grad_entropy and expected_logit (E[z] - m) [C] fp32 or
// both absent.
void grad_inplace(at::Tensor logits, const at::Tensor& labels, const c10::optional<at::Tensor>& bias,
                  double logit_scale, c10::optional<double> softcap, double temperature,
                  const at::Tensor& row_max, const at::Tensor& log_norm, const at::Tensor& grad_logp,
                  const c10::optional<at::Tensor>& grad_entropy,
                  const c10::optional<at::Tensor>& expected_logit) {
  check_chunk(logits, labels, bias);  // labels: relative to the block, any value allowed
  const int64_t C = logits.size(0), V = logits.size(1);
  for (const at::Tensor* p : {&row_max, &log_norm, &grad_logp}) {
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->is_contiguous() && p->numel() == C,
                "row statistics must be contiguous fp32 [C]");
  }
  const bool ent = grad_entropy.has_value();
  TORCH_CHECK(ent == expected_logit.has_value(),
              "grad_entropy and expected_logit come together");
  if (ent) {
    TORCH_CHECK(grad_entropy->scalar_type() == at::kFloat && grad_entropy->is_contiguous() &&
                    expected_logit->scalar_type() == at::kFloat && expected_logit->is_contiguous(),
                "grad_entropy/expected_logit must be contiguous fp32 [C]");
  }
  Transform t{static_cast<float>(logit_scale), static_cast<float>(softcap.value_or(1.0)),
              static_cast<float>(1.0 / temperature)};
  const float* b = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  dispatch4<GradRows>(bias.has_value(), softcap.has_value(), ent, false, logits.data_ptr<float>(),
                      logits.stride(0), b, V, labels.data_ptr<int64_t>(), t,
                      row_max.data_ptr<float>(), log_norm.data_ptr<float>(),
                      grad_logp.data_ptr<float>(), ent ? grad_entropy->data_ptr<float>() : nullptr,
                      ent ? expected_logit->data_ptr<float>() : nullptr, C);
}

}  // namespace

TORCH_LIBRARY(apo_chunk_native, m) {
  m.def("forward_partials(Tensor(a!) logits, Tensor labels, Tensor? bias, float logit_scale, "
        "float? softcap, float temperature, bool with_entropy, bool with_stats) -> Tensor");
  m.def("grad_inplace(Tensor(a!) logits, Tensor labels, Tensor? bias, float logit_scale, "
        "float? softcap, float temperature, Tensor row_max, Tensor log_norm, Tensor grad_logp, "
        "Tensor? grad_entropy, Tensor? expected_logit) -> ()");
}

TORCH_LIBRARY_IMPL(apo_chunk_native, CPU, m) {
  m.impl("forward_partials", &forward_partials);
  m.impl("grad_inplace", &grad_inplace);
}
