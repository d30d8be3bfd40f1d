// Exact softmax attention, softmax(q k^T / sqrt(d)) v, for the CPU: the UNet's widest self-attention.
//
// PyTorch's CPU flash-attention kernel runs the first attention level's self-attention (1024 tokens, head width
// 32, batch 2 x 8 heads) at ~125 GFLOP/s, in float32 and in bfloat16 alike: it multiplies small blocks through
// a general GEMM and passes over each block of scores several times. Here one task takes a (batch, head) pair
// and a chunk of queries, copies that head's keys (transposed, in 32-key panels) and values once into
// contiguous buffers, then for each tile of R queries:
//   1. scores: the whole row of scores (all L keys, L * 4 bytes) in R x 2W register blocks, with the row max;
//   2. softmax numerators exp(s - max) in place and their sum (an exact two-pass softmax: the rows fit in L1);
//   3. out = P V / sum, accumulated in registers (blocked sums of 128 keys, then added up).
// float32: everything in float32 (GCC vector extensions: 16 floats built for AVX-512, 8 for AVX2; see W).
// bfloat16 on CPUs with AVX512-BF16: both products by vdpbf16ps (see tile_dp), the rest in float32, the
// probabilities rounded to bfloat16 for P V as PyTorch's kernel does; elsewhere bfloat16 is widened to float32
// when copied. Head widths that are multiples of 16 up to 8W (128; the AVX2 build: 64). 2 threads, Zen 4, the
// shape above: float32 14 ms (PyTorch 16.5 ms), bfloat16 9.5 ms (PyTorch 17.5 ms); relative errors no larger
// than PyTorch's. Held to AVX2 (Zen 5), the AVX2 build: float32 13.6 ms (PyTorch 14.9 ms).
// Called as torch.ops.audioldm2.attention(q, k, v) with q (B, H, N, d) and k, v (B, H, L, d), any strides with
// unit last stride; returns (B, N, H, d) contiguous.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <cmath>
#include <type_traits>
#include <vector>

namespace {

// The vector width is the ISA's, and the register blocks are sized for its register file: built for AVX-512
// (-mavx512f), 16-float vectors and tiles of 8 queries (8 x 2 score accumulators of AVX-512's 32 registers);
// built for AVX2 (-mavx2 -mfma), 8-float vectors and tiles of 6 queries (6 x 2 accumulators, 2 keys and a
// query of AVX2's 16). (16-float vectors compiled for AVX2 are pairs of registers, and the AVX-512 blocks then
// need 32 of 16 registers: the spills made that build 30x slower than PyTorch's kernel.)
#if defined(__AVX512F__)
#define VBYTES 64
constexpr int W = 16;  // floats per vector
constexpr int R = 8;   // queries per tile
constexpr int NREG = 32;
#else
#define VBYTES 32
constexpr int W = 8;
constexpr int R = 6;
constexpr int NREG = 16;
#endif
typedef float vf __attribute__((vector_size(VBYTES)));
typedef int vi __attribute__((vector_size(VBYTES)));
typedef unsigned vu __attribute__((vector_size(VBYTES)));
typedef float vf_unaligned __attribute__((vector_size(VBYTES), aligned(4)));
typedef uint16_t vh_unaligned __attribute__((vector_size(VBYTES / 2), aligned(2)));  // W bfloat16
// Rows per pass of step 3 (out = P V): G * ND accumulators, ND values and a probability in the registers, and
// G divides the tile's R rows (the score buffer holds R rows).
template <int ND>
constexpr int rows_per_pass() {
  int g = std::max(1, (NREG / 2) / (ND <= 2 ? 2 : ND <= 4 ? 4 : 8));
  while (R % g) g--;
  return g;
}
constexpr int KW = 2 * W;    // keys per score block (and per panel of the transposed keys)
constexpr int64_t QCHUNK = 256 / R * R;  // queries per task: whole tiles, so that no two tasks share a row

inline vf load(const float* p) { return *(const vf_unaligned*)p; }
inline void store(float* p, vf v) { *(vf_unaligned*)p = v; }
inline vf splat(float s) { return vf{} + s; }
// 16 floats rounded to bfloat16 (to nearest even; finite values) and stored
inline void store_bf16(uint16_t* p, vf x) {
  vu b = (vu)x;
  *(vh_unaligned*)p = __builtin_convertvector((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16, vh_unaligned);
}
inline float hmax(vf v) { float m = v[0]; for (int i = 1; i < W; i++) m = std::max(m, v[i]); return m; }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; i++) s += v[i]; return s; }

// exp(x) for x <= 0 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, a degree-5 polynomial for e^r; ~1 ulp).
inline vf exp_nonpositive(vf x) {
  x = x < -87.3f ? splat(-87.3f) : x;                  // exp(-87.3) ~ 1e-38: flushes to 0 as the reference does
  vf n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln2) by the 1.5 * 2^23 trick
  vf r = x - n * 0.693359375f + n * 2.12194440e-4f;              // ln2 in two parts: r exact to ~1 ulp
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  vi e = (__builtin_convertvector(n, vi) + 127) << 23;  // 2^n as float bits
  return p * (vf)e;
}

inline void store_out(float* p, vf y) { store(p, y); }
inline void store_out(c10::BFloat16* p, vf y) { store_bf16(reinterpret_cast<uint16_t*>(p), y); }
inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) { return static_cast<float>(x); }

// Scores a[r][0..1] of keys j..j+31 into row r of s (the keys past L set to -inf, so exp gives 0), and each
// row's running max.
inline void store_scores(vf (&a)[R][2], int j, int L, float* s, int ss, vf (&mx)[R]) {
  if (j + KW > L)
    for (int r = 0; r < R; r++)
      for (int l = std::max(L - j, 0); l < KW; l++) a[r][l / W][l % W] = -INFINITY;
  for (int r = 0; r < R; r++) {
    store(s + r * ss + j, a[r][0]);
    store(s + r * ss + j + W, a[r][1]);
    mx[r] = a[r][0] > mx[r] ? a[r][0] : mx[r];
    mx[r] = a[r][1] > mx[r] ? a[r][1] : mx[r];
  }
}

// 2. exp(s - max) for each row and 1 / their sum; the numerators go back into s, or (ToBF16, for the dot-product
//    path) into pb rounded to bfloat16.
template <bool ToBF16>
inline void numerators(float* s, uint16_t* pb, int ss, int Lp, const vf (&mx)[R], float (&inv)[R]) {
  for (int r = 0; r < R; r++) {
    const float m = hmax(mx[r]);
    vf sum = vf{};
    for (int j = 0; j < Lp; j += W) {
      vf e = exp_nonpositive(load(s + r * ss + j) - m);
      if constexpr (ToBF16)
        store_bf16(pb + r * ss + j, e);
      else
        store(s + r * ss + j, e);
      sum += e;
    }
    inv[r] = 1.f / hsum(sum);
  }
}

// One tile of `rows` <= R queries against all keys. kt: keys in panels [L/KW][d][KW] (zero past L); vp: values
// [L][d]; s: R score rows of stride ss; o: output rows of stride so.
template <int ND, typename T>
void tile(const T* q, int64_t sq, int rows, const float* kt, const float* vp, int L, int Lp, float* s, int ss,
          T* o, int64_t so, float scale) {
  constexpr int D = ND * W;
  constexpr int G = rows_per_pass<ND>();
  float qs[R][D];
  for (int r = 0; r < R; r++)
    for (int d = 0; d < D; d++) qs[r][d] = r < rows ? to_float(q[r * sq + d]) * scale : 0.f;

  // 1. scores, R rows x 2W keys at a time, and each row's running max
  vf mx[R];
  for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY);
  for (int j = 0; j < Lp; j += KW) {
    vf a[R][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = vf{};
    const float* panel = kt + (int64_t)j * D;
    for (int d = 0; d < D; d++) {
      vf k0 = load(panel + d * KW), k1 = load(panel + d * KW + W);
      for (int r = 0; r < R; r++) {
        a[r][0] += qs[r][d] * k0;
        a[r][1] += qs[r][d] * k1;
      }
    }
    store_scores(a, j, L, s, ss, mx);
  }

  float inv[R];
  numerators<false>(s, nullptr, ss, Lp, mx, inv);  // 2.

  // 3. out = P V / sum, G rows at a time; blocks of 128 keys summed in registers, then added up (blocked
  //    summation: the rounding error grows with L / 128 + 128 terms instead of L)
  for (int r0 = 0; r0 < rows; r0 += G) {
    vf total[G][ND];
    for (int g = 0; g < G; g++)
      for (int n = 0; n < ND; n++) total[g][n] = vf{};
    for (int j0 = 0; j0 < L; j0 += 128) {
      vf acc[G][ND];
      for (int g = 0; g < G; g++)
        for (int n = 0; n < ND; n++) acc[g][n] = vf{};
      for (int j = j0; j < std::min(L, j0 + 128); j++) {
        vf v[ND];
        for (int n = 0; n < ND; n++) v[n] = load(vp + (int64_t)j * D + n * W);
        for (int g = 0; g < G; g++) {
          const float p = s[(r0 + g) * ss + j];
          for (int n = 0; n < ND; n++) acc[g][n] += p * v[n];
        }
      }
      for (int g = 0; g < G; g++)
        for (int n = 0; n < ND; n++) total[g][n] += acc[g][n];
    }
    for (int g = 0; g < G && r0 + g < rows; g++) {
      for (int n = 0; n < ND; n++) store_out(o + (r0 + g) * so + n * W, total[g][n] * inv[r0 + g]);
    }
  }
}

// f(std::integral_constant<int, nd>) for nd = head width / W in 1..8 (checked by the caller): the head width
// as a compile-time constant, so that the register blocks are fully unrolled.
template <typename F>
void with_vectors_per_head(int64_t nd, F f) {
  switch (nd) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    case 6: return f(std::integral_constant<int, 6>{});
    case 7: return f(std::integral_constant<int, 7>{});
    case 8: return f(std::integral_constant<int, 8>{});
  }
}

template <int ND, typename T>
void attention_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  constexpr int D = ND * W;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2);
  const int Lp = (int)((L + KW - 1) / KW * KW), ss = Lp + W;  // + W: score rows not 4 KiB apart (L1 sets)
  const float scale = 1.f / std::sqrt((float)D);
  const int64_t chunks = (N + QCHUNK - 1) / QCHUNK;
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> kt((size_t)D * Lp, 0.f), vp((size_t)L * D), s((size_t)R * ss);
    int64_t packed = -1;  // the (batch, head) whose keys and values are in kt / vp
    for (int64_t t = begin; t < end; t++) {
      const int64_t bh = t / chunks, c = t % chunks, b = bh / H, h = bh % H;
      if (bh != packed) {
        const T* kb = K + b * k.stride(0) + h * k.stride(1);
        const T* vb = V + b * v.stride(0) + h * v.stride(1);
        for (int64_t j = 0; j < L; j++) {
          float* panel = kt.data() + (j / KW) * KW * D + j % KW;
          for (int d = 0; d < D; d++) {
            panel[d * KW] = to_float(kb[j * k.stride(2) + d]);
            vp[j * D + d] = to_float(vb[j * v.stride(2) + d]);
          }
        }
        packed = bh;
      }
      const T* qb = Q + b * q.stride(0) + h * q.stride(1);
      for (int64_t i = c * QCHUNK; i < std::min(N, (c + 1) * QCHUNK); i += R)
        tile<ND, T>(qb + i * q.stride(2), q.stride(2), (int)std::min<int64_t>(R, N - i), kt.data(), vp.data(), (int)L,
                    Lp, s.data(), ss, O + ((b * N + i) * H + h) * D, H * D, scale);
    }
  });
}


#if defined(__x86_64__) && defined(__GNUC__) && defined(__AVX512F__)
// bfloat16 inputs on CPUs with AVX512-BF16 (Zen 4, Sapphire Rapids): both products as vdpbf16ps, which
// multiplies pairs of bfloat16 exactly and adds them into float32 lanes, twice the multiply-adds of an FMA.
// Keys are packed in panels [L/KW][d/2][KW][2] and values as [L/2][d][2] (the pair axis innermost, as the
// instruction reads it); the probabilities are rounded to bfloat16 for the second product, as PyTorch's
// kernel does. Compiled for that ISA only here (target attribute) and chosen at run time.
#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
using bf16 = c10::BFloat16;

template <int ND>
BF16_TARGET void tile_dp(const bf16* q, int64_t sq, int rows, const uint16_t* kt, const uint16_t* vp, int L, int Lp,
                         float* s, uint16_t* pb, int ss, bf16* o, int64_t so, float scale) {
  constexpr int D = ND * W, DP = D / 2;
  uint32_t qp[R][DP];  // each query as pairs of bfloat16
  for (int r = 0; r < R; r++)
    for (int d = 0; d < DP; d++) qp[r][d] = 0u;
  for (int r = 0; r < rows; r++) std::memcpy(qp[r], q + r * sq, D * sizeof(bf16));

  vf mx[R];
  for (int r = 0; r < R; r++) mx[r] = splat(-INFINITY);
  for (int j = 0; j < Lp; j += KW) {
    __m512 a[R][2];
    for (int r = 0; r < R; r++) a[r][0] = a[r][1] = _mm512_setzero_ps();
    const uint16_t* panel = kt + (int64_t)j * D;
    for (int d = 0; d < DP; d++) {
      __m512bh k0 = (__m512bh)_mm512_loadu_si512(panel + d * 2 * KW);
      __m512bh k1 = (__m512bh)_mm512_loadu_si512(panel + d * 2 * KW + 2 * W);
      for (int r = 0; r < R; r++) {
        __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qp[r][d]);
        a[r][0] = _mm512_dpbf16_ps(a[r][0], qq, k0);
        a[r][1] = _mm512_dpbf16_ps(a[r][1], qq, k1);
      }
    }
    vf b[R][2];
    for (int r = 0; r < R; r++) {
      b[r][0] = (vf)a[r][0] * scale;
      b[r][1] = (vf)a[r][1] * scale;
    }
    store_scores(b, j, L, s, ss, mx);
  }

  float inv[R];
  numerators<true>(s, pb, ss, Lp, mx, inv);

  constexpr int G = rows_per_pass<ND>();
  const int pairs = (L + 1) / 2;
  for (int r0 = 0; r0 < rows; r0 += G) {
    vf total[G][ND];
    for (int g = 0; g < G; g++)
      for (int n = 0; n < ND; n++) total[g][n] = vf{};
    for (int j0 = 0; j0 < pairs; j0 += 64) {
      __m512 acc[G][ND];
      for (int g = 0; g < G; g++)
        for (int n = 0; n < ND; n++) acc[g][n] = _mm512_setzero_ps();
      for (int j = j0; j < std::min(pairs, j0 + 64); j++) {
        __m512bh v[ND];
        for (int n = 0; n < ND; n++) v[n] = (__m512bh)_mm512_loadu_si512(vp + (int64_t)j * 2 * D + n * 2 * W);
        for (int g = 0; g < G; g++) {
          int pair;
          std::memcpy(&pair, pb + (r0 + g) * ss + 2 * j, sizeof pair);
          __m512bh p = (__m512bh)_mm512_set1_epi32(pair);
          for (int n = 0; n < ND; n++) acc[g][n] = _mm512_dpbf16_ps(acc[g][n], p, v[n]);
        }
      }
      for (int g = 0; g < G; g++)
        for (int n = 0; n < ND; n++) total[g][n] += (vf)acc[g][n];
    }
    for (int g = 0; g < G && r0 + g < rows; g++)
      for (int n = 0; n < ND; n++) store_out(o + (r0 + g) * so + n * W, total[g][n] * inv[r0 + g]);
  }
}

template <int ND>
BF16_TARGET void attention_dp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  constexpr int D = ND * W;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), L = k.size(2);
  const int Lp = (int)((L + KW - 1) / KW * KW), ss = Lp + W;
  const float scale = 1.f / std::sqrt((float)D);
  const int64_t chunks = (N + QCHUNK - 1) / QCHUNK;
  const bf16 *Q = q.data_ptr<bf16>(), *K = k.data_ptr<bf16>(), *V = v.data_ptr<bf16>();
  bf16* O = out.data_ptr<bf16>();
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> kt((size_t)D * Lp, 0), vp((size_t)(L + 1) / 2 * 2 * D, 0), pb((size_t)R * ss);
    std::vector<float> s((size_t)R * ss);
    int64_t packed = -1;
    for (int64_t t = begin; t < end; t++) {
      const int64_t bh = t / chunks, c = t % chunks, b = bh / H, h = bh % H;
      if (bh != packed) {
        const uint16_t* kb = (const uint16_t*)(K + b * k.stride(0) + h * k.stride(1));
        const uint16_t* vb = (const uint16_t*)(V + b * v.stride(0) + h * v.stride(1));
        for (int64_t j = 0; j < L; j++) {
          uint16_t* panel = kt.data() + (j / KW) * KW * D + (j % KW) * 2;
          for (int d = 0; d < D; d++) {
            panel[(d / 2) * 2 * KW + d % 2] = kb[j * k.stride(2) + d];
            vp[(j / 2) * 2 * D + d * 2 + j % 2] = vb[j * v.stride(2) + d];
          }
        }
        packed = bh;
      }
      const bf16* qb = Q + b * q.stride(0) + h * q.stride(1);
      for (int64_t i = c * QCHUNK; i < std::min(N, (c + 1) * QCHUNK); i += R)
        tile_dp<ND>(qb + i * q.stride(2), q.stride(2), (int)std::min<int64_t>(R, N - i), kt.data(), vp.data(), (int)L,
                    Lp, s.data(), pb.data(), ss, O + ((b * N + i) * H + h) * D, H * D, scale);
    }
  });
}

bool has_bf16_dot() { return __builtin_cpu_supports("avx512bf16"); }

bool dispatch_dp(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  if (!has_bf16_dot()) return false;
  with_vectors_per_head(q.size(3) / W, [&](auto nd) { attention_dp<nd.value>(q, k, v, out); });
  return true;
}
#else
bool has_bf16_dot() { return false; }
bool dispatch_dp(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&) { return false; }
#endif

template <typename T>
void dispatch(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out) {
  with_vectors_per_head(q.size(3) / W, [&](auto nd) { attention_impl<nd.value, T>(q, k, v, out); });
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, bool bf16_dot) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be (B, H, N, d)");
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "attention: q, k, v must all be float32 or all bfloat16");
  const int64_t d = q.size(3);
  TORCH_CHECK(d % W == 0 && d > 0 && d <= 8 * W, "attention: head width must be a multiple of ", W, " up to ", 8 * W,
              " in this build, got ", d);
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0) && k.size(1) == q.size(1) && v.size(1) == q.size(1) &&
                  k.size(3) == d && v.size(3) == d && v.size(2) == k.size(2) && k.size(2) > 0,
              "attention: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "attention: the last dimension must be contiguous");
  auto out = at::empty({q.size(0), q.size(2), q.size(1), d}, q.options());
  if (q.scalar_type() == at::kFloat)
    dispatch<float>(q, k, v, out);
  else if (!(bf16_dot && dispatch_dp(q, k, v, out)))
    dispatch<c10::BFloat16>(q, k, v, out);
  return out;
}

}  // namespace

TORCH_LIBRARY(audioldm2, m) {
  m.def("attention(Tensor q, Tensor k, Tensor v, bool bf16_dot=True) -> Tensor");  // False: widen bf16 instead
  m.def("has_bf16_dot() -> bool", &has_bf16_dot);  // whether bfloat16 inputs take the vdpbf16ps path
}
TORCH_LIBRARY_IMPL(audioldm2, CPU, m) { m.impl("attention", &attention); }
