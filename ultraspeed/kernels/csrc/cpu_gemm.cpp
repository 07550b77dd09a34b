// Weight-only low-precision GEMV/GEMM for decode on AVX2 + FMA + F16C CPUs.
//
//   y[m, n] = sum_k x[m, k] * W[n, k]    (nn.Linear layout; fp32 x and y; M = 1..32 rows)
//
// Decoding a few tokens is bound by reading W, so W is stored in fewer bytes: fp16 (2 bytes per
// weight), int8 with an fp32 scale per 32 (1.125), 4-bit with an fp16 scale and minimum per 32
// (0.625, llama.cpp's Q4_1) or MXFP4 (0.53). All arithmetic is fp32, so the results match
// "dequantize, then F.linear" to fp32 rounding.
//
// A weight format decodes one group of 32 weights of one output row into four 8-lane fp32 vectors
// plus the group's scale. MXFP4 decodes in two steps: a tile of rows is first expanded to fp16 in an
// L1 buffer ("staged"), because vcvtph2ps from memory is about twice as fast as from a register
// on Zen 3, and that fp16 buffer is then read like an fp16 weight.
//
// Two drivers consume the formats:
//   * M <= 8: fused decode + FMA, one output row at a time; one pass over W.
//   * M > 8: decode a tile of rows into an L1-resident fp32 buffer once, then run an fp32
//     register-blocked micro-kernel over all M rows; FMA-bound, decoding amortised over M.
// OpenMP splits N; libgomp resolves to the copy torch already loaded, so the thread pool is shared.

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>

namespace {

constexpr int64_t kGroup = 32;  // weights per scale, along K
// The drivers walk several short rows at once, which the hardware prefetcher follows poorly, so
// they prefetch the row this many rows ahead while working on the current one. About doubles
// int8 throughput when the weights come from DRAM, as they do in decode.
constexpr int64_t kPrefetchRows = 8;

inline void prefetch_line(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void fp16x32_to_fp32(const uint16_t* p, __m256 w[4]) {
  for (int c = 0; c < 4; ++c)
    w[c] = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8 * c)));
}

// ---------------------------------------------------------------------------------------------
// Weight formats. row(n) is a cursor on output row n; decode(row, g, w) fills w[0..3] with the
// 32 weights of group g, unscaled; scale(row, g) is the group's scale (when kScaled);
// prefetch(row, g) starts loading what decode(row, g) will read.

// int8 with one fp32 scale per group (llama.cpp Q8_0 style).
struct Int8Weights {
  static constexpr bool kScaled = true, kStaged = false, kDeinterleaveX = false, kMin = false;
  const int8_t* q;  // [N, K]
  const float* s;   // [N, K/32]
  int64_t K;

  struct Row {
    const int8_t* q;
    const float* s;
  };
  Row row(int64_t n) const { return {q + n * K, s + n * (K / kGroup)}; }
  static void decode(const Row& r, int64_t g, __m256 w[4]) {
    const int8_t* p = r.q + g * kGroup;
    for (int c = 0; c < 4; ++c) {
      const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * c));
      w[c] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    }
  }
  static float scale(const Row& r, int64_t g) { return r.s[g]; }
  static void prefetch(const Row& r, int64_t g) {
    prefetch_line(r.q + g * kGroup);
    if (g % 16 == 0) prefetch_line(r.s + g);  // 16 scales per cache line
  }
};

// IEEE fp16, widened with F16C. No scale.
struct Fp16Weights {
  static constexpr bool kScaled = false, kStaged = false, kDeinterleaveX = false, kMin = false;
  const uint16_t* h;  // [N, K]
  int64_t K;

  struct Row {
    const uint16_t* h;
  };
  Row row(int64_t n) const { return {h + n * K}; }
  static void decode(const Row& r, int64_t g, __m256 w[4]) { fp16x32_to_fp32(r.h + g * kGroup, w); }
  static float scale(const Row&, int64_t) { return 1.f; }
  static void prefetch(const Row& r, int64_t g) { prefetch_line(r.h + g * kGroup); }
};

// 4-bit unsigned codes q with an fp16 scale d and minimum m per group: w = d * q + m (llama.cpp Q4_1, which GGUF
// checkpoints ship, so serving them in it is exact). Byte j of a group holds element j in its low nibble and
// element j + 16 in its high nibble, as in GGML, so the weights decode in order. decode() returns the bare
// codes and d is applied like any scale; the minimum's share of a dot product, sum over groups of
// m * sum(x_group), is added after the main loop from x's group sums computed once per call (kMin), so the
// inner loop does no more arithmetic than int8's.
struct Q4Weights {
  static constexpr bool kScaled = true, kStaged = false, kDeinterleaveX = false, kMin = true;
  const uint8_t* q;    // [N, K/2]
  const uint16_t* dm;  // [N, 2, K/32] fp16: each row's scales, then its minimums
  int64_t K;

  struct Row {
    const uint8_t* q;
    const uint16_t* d;
  };
  Row row(int64_t n) const { return {q + n * (K / 2), dm + n * (K / kGroup) * 2}; }
  static void decode(const Row& r, int64_t g, __m256 w[4]) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(r.q + g * (kGroup / 2)));
    const __m128i lo = _mm_and_si128(b, _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(0x0F));
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int c = 0; c < 4; ++c) w[c] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[c]));
  }
  static float scale(const Row& r, int64_t g) { return _cvtsh_ss(r.d[g]); }
  static float min(const Row& r, int64_t g, int64_t groups) { return _cvtsh_ss(r.d[groups + g]); }
  // sum_g min_g * xsum[g]: the minimums' share of one row's dot product with one x row.
  static float min_dot(const Row& r, const float* xsum, int64_t groups) {
    const uint16_t* mins = r.d + groups;
    __m256 acc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= groups; g += 8)
      acc = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g))),
                            _mm256_loadu_ps(xsum + g), acc);
    float sum = hsum(acc);
    for (; g < groups; ++g) sum += _cvtsh_ss(mins[g]) * xsum[g];
    return sum;
  }
  static void prefetch(const Row& r, int64_t g) {
    if (g % 4 == 0) prefetch_line(r.q + g * (kGroup / 2));  // 4 groups per cache line
    if (g % 32 == 0) prefetch_line(r.d + g);                // 32 scales per cache line
  }
};

// E8M0 scale byte s -> 2^(s-127), exactly (s = 0 is the subnormal 2^-127); 255 is NaN (OCP MX).
struct E8M0Table {
  float v[256];
  E8M0Table() {
    for (int i = 0; i < 255; ++i) v[i] = std::ldexp(1.f, i - 127);
    v[255] = std::nanf("");
  }
};
const E8M0Table kE8M0;

// Rows [n0, n0 + kRows) of an MXFP4 matrix after staging: fp16 E2M1 values in an L1 buffer with
// the original E8M0 scales.
struct StagedMxfp4 {
  static constexpr bool kScaled = true, kStaged = false, kDeinterleaveX = true, kMin = false;
  const uint16_t* buf;    // [rows, K]
  int64_t n0, rows;       // buf holds rows [n0, n0 + rows)
  const uint8_t* scales;  // [N, K/32]
  int64_t K;

  struct Row {
    const uint16_t* h;
    const uint8_t* e;
  };
  // Rows outside the buffer (asked for only as prefetch targets, a no-op here) map into it.
  Row row(int64_t n) const {
    return {buf + std::clamp<int64_t>(n - n0, 0, rows - 1) * K, scales + n * (K / kGroup)};
  }
  static void decode(const Row& r, int64_t g, __m256 w[4]) { fp16x32_to_fp32(r.h + g * kGroup, w); }
  static float scale(const Row& r, int64_t g) { return kE8M0.v[r.e[g]]; }
  static void prefetch(const Row&, int64_t) {}  // the L1 buffer is already there
};

// MXFP4 in the gpt-oss layout: 16 bytes per group of 32 E2M1 values, byte j holding element 2j in
// its low nibble and element 2j+1 in its high nibble, plus one E8M0 scale byte per group.
//
// Every E2M1 value is an fp16 number with a zero low byte, so a byte-table lookup (vpshufb) on the
// nibble gives its fp16 encoding. Low nibbles come out first, then high nibbles: each group's even
// elements, then its odd ones. Rather than re-interleave the weights, run() de-interleaves x once
// per call (kDeinterleaveX), which costs M*K float moves instead of work per weight.
struct Mxfp4Weights {
  static constexpr bool kScaled = true, kStaged = true, kDeinterleaveX = true, kMin = false;
  const uint8_t* blocks;  // [N, K/32, 16]
  const uint8_t* scales;  // [N, K/32]
  int64_t K;

  // Expands rows [n0, n0 + kRows) (clamped to N - 1, like the drivers) into buf [kRows, K].
  template <int kRows>
  StagedMxfp4 stage(int64_t n0, int64_t N, uint16_t* buf) const {
    // High byte of the fp16 encoding of E2M1 code i: +0 .5 1 1.5 2 3 4 6, then the negatives.
    // Entry 0 must be 0: the zeroed low byte of every 16-bit lane looks it up.
    const __m256i lut = _mm256_broadcastsi128_si256(_mm_setr_epi8(
        0x00, 0x38, 0x3C, 0x3E, 0x40, 0x42, 0x44, 0x46, char(0x80), char(0xB8), char(0xBC),
        char(0xBE), char(0xC0), char(0xC2), char(0xC4), char(0xC6)));
    const __m256i high_byte_nibble = _mm256_set1_epi16(0x0F00);
    for (int r = 0; r < kRows; ++r) {
      const uint8_t* b = blocks + std::min(n0 + r, N - 1) * (K / 2);
      uint16_t* out = buf + r * K;
      // A plain sequential read: the hardware prefetcher keeps up, software prefetch only costs.
      for (int64_t g = 0; g < K / kGroup; ++g) {
        // One 16-bit lane per byte; shift each nibble into the lane's high byte and look it up.
        const __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + g * 16)));
        const __m256i lo = _mm256_and_si256(_mm256_slli_epi16(t, 8), high_byte_nibble);
        const __m256i hi = _mm256_and_si256(_mm256_slli_epi16(t, 4), high_byte_nibble);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * kGroup), _mm256_shuffle_epi8(lut, lo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + g * kGroup + 16), _mm256_shuffle_epi8(lut, hi));
      }
    }
    return {buf, n0, kRows, scales, K};
  }
};

// Reorders each group of 32 floats as [even elements, odd elements], matching StagedMxfp4.
void deinterleave_groups(const float* x, float* out, int64_t n) {
  for (int64_t i = 0; i < n; i += kGroup) {
    for (int h = 0; h < 2; ++h) {
      const __m256 a = _mm256_loadu_ps(x + i + 16 * h), b = _mm256_loadu_ps(x + i + 16 * h + 8);
      // shuffle_ps picks within 128-bit lanes; permute4x64 then puts the 64-bit pairs in order.
      const __m256 ev = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 od = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      constexpr int kOrder = _MM_SHUFFLE(3, 1, 2, 0);
      _mm256_storeu_ps(out + i + 8 * h, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(ev), kOrder)));
      _mm256_storeu_ps(out + i + 16 + 8 * h, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(od), kOrder)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// M <= 8: fused decode + FMA on kRows output rows by kM input rows. Rows past N are clamped to
// N - 1 (computed again, results dropped), which keeps the loops branch-free.

// xsum (formats with a minimum): each x row's group sums, [kM, K/32].
template <int kM, int kRows, class W>
inline void fused_tile(const W& w, const float* x, const float* xsum, int64_t n0, int64_t N, float* y) {
  const int64_t K = w.K;
  typename W::Row rows[kRows], ahead[kRows];
  for (int r = 0; r < kRows; ++r) {
    rows[r] = w.row(std::min(n0 + r, N - 1));
    ahead[r] = w.row(std::min(n0 + r + kPrefetchRows, N - 1));
  }
  __m256 acc[kM][kRows];
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / kGroup; ++g) {
    const float* xg = x + g * kGroup;
    for (int r = 0; r < kRows; ++r) {
      __m256 v[4];
      W::prefetch(ahead[r], g);
      W::decode(rows[r], g, v);
      // Sum each group unscaled, then apply its scale once: one FMA instead of four multiplies.
      const __m256 s = _mm256_set1_ps(W::scale(rows[r], g));
      for (int m = 0; m < kM; ++m) {
        const float* xm = xg + m * K;
        __m256 d = _mm256_mul_ps(v[0], _mm256_loadu_ps(xm));
        for (int c = 1; c < 4; ++c) d = _mm256_fmadd_ps(v[c], _mm256_loadu_ps(xm + 8 * c), d);
        acc[m][r] = W::kScaled ? _mm256_fmadd_ps(d, s, acc[m][r]) : _mm256_add_ps(d, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < kRows && n0 + r < N; ++r) {
      float v = hsum(acc[m][r]);
      if constexpr (W::kMin) v += W::min_dot(rows[r], xsum + m * (K / kGroup), K / kGroup);
      y[m * N + n0 + r] = v;
    }
}

// ---------------------------------------------------------------------------------------------
// M > 8: decode kRows rows into an fp32 tile (row stride K), then dot every x row with them.

template <int kRows, class W>
inline void decode_tile(const W& w, int64_t n0, int64_t N, float* tile) {
  const int64_t K = w.K;
  for (int r = 0; r < kRows; ++r) {
    const typename W::Row row = w.row(std::min(n0 + r, N - 1));
    const typename W::Row ahead = w.row(std::min(n0 + r + kPrefetchRows, N - 1));
    float* t = tile + r * K;
    for (int64_t g = 0; g < K / kGroup; ++g) {
      __m256 v[4];
      W::prefetch(ahead, g);
      W::decode(row, g, v);
      if constexpr (W::kMin) {
        const __m256 s = _mm256_set1_ps(W::scale(row, g)), mn = _mm256_set1_ps(W::min(row, g, K / kGroup));
        for (int c = 0; c < 4; ++c) v[c] = _mm256_fmadd_ps(v[c], s, mn);
      } else if constexpr (W::kScaled) {
        const __m256 s = _mm256_set1_ps(W::scale(row, g));
        for (int c = 0; c < 4; ++c) v[c] = _mm256_mul_ps(v[c], s);
      }
      for (int c = 0; c < 4; ++c) _mm256_storeu_ps(t + g * kGroup + 8 * c, v[c]);
    }
  }
}

// kM x kRows register block: kM*kRows accumulators + kRows weight vectors + 1 x vector <= 16 ymm.
template <int kM, int kRows>
inline void dot_block(const float* x, const float* tile, int64_t K, float* y, int64_t n0, int64_t N) {
  __m256 acc[kM][kRows];
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    __m256 wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = _mm256_loadu_ps(tile + r * K + k);
    for (int m = 0; m < kM; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int r = 0; r < kRows && n0 + r < N; ++r) y[m * N + n0 + r] = hsum(acc[m][r]);
}

template <int kRows>
inline void dot_tile(const float* x, int64_t M, const float* tile, int64_t K, float* y, int64_t n0, int64_t N) {
  constexpr int kM = 4;
  int64_t m = 0;
  for (; m + kM <= M; m += kM) dot_block<kM, kRows>(x + m * K, tile, K, y + m * N, n0, N);
  switch (M - m) {
    case 3: dot_block<3, kRows>(x + m * K, tile, K, y + m * N, n0, N); break;
    case 2: dot_block<2, kRows>(x + m * K, tile, K, y + m * N, n0, N); break;
    case 1: dot_block<1, kRows>(x + m * K, tile, K, y + m * N, n0, N); break;
    default: break;
  }
}

// ---------------------------------------------------------------------------------------------
// Drivers

// Runs body(tile_begin, tile_end) over [0, tiles), split into contiguous ranges across threads when
// the work is worth it; below ~1e5 multiply-adds waking a second thread costs more than it saves,
// and even a disabled OpenMP region costs about a microsecond, so that case skips OpenMP entirely.
template <class Body>
void parallel_tiles(int64_t tiles, int64_t work, const Body& body) {
  if (work < (int64_t(1) << 17) || omp_get_max_threads() == 1) return body(int64_t(0), tiles);
#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    body(tiles * id / nt, tiles * (id + 1) / nt);
  }
}

// Calls f(view), where view decodes rows [n0, n0 + kRows) in registers: the format itself, or for
// staged formats the tile expanded into buf.
template <int kRows, class W, class F>
inline void with_tile(const W& w, int64_t n0, int64_t N, uint16_t* buf, const F& f) {
  if constexpr (W::kStaged)
    f(w.template stage<kRows>(n0, N, buf));
  else
    f(w);
}

template <int kRows, class W>
std::unique_ptr<uint16_t[]> stage_buffer(const W& w) {
  return std::unique_ptr<uint16_t[]>(W::kStaged ? new uint16_t[kRows * w.K] : nullptr);
}

template <int kM, int kRows, class W>
void run_fused(const W& w, const float* x, float* y, int64_t N) {
  const int64_t groups = w.K / kGroup;
  std::unique_ptr<float[]> xsum(W::kMin ? new float[kM * groups] : nullptr);
  if constexpr (W::kMin)
    for (int64_t i = 0; i < kM * groups; ++i) {
      float t = 0.f;
      for (int64_t k = 0; k < kGroup; ++k) t += x[i * kGroup + k];
      xsum[i] = t;
    }
  parallel_tiles((N + kRows - 1) / kRows, kM * N * w.K, [&](int64_t begin, int64_t end) {
    auto buf = stage_buffer<kRows>(w);
    for (int64_t t = begin; t < end; ++t)
      with_tile<kRows>(w, t * kRows, N, buf.get(),
                       [&](const auto& v) { fused_tile<kM, kRows>(v, x, xsum.get(), t * kRows, N, y); });
  });
}

template <class W>
void run_tiled(const W& w, const float* x, float* y, int64_t M, int64_t N) {
  constexpr int kRows = 3;
  const int64_t K = w.K;
  parallel_tiles((N + kRows - 1) / kRows, M * N * K, [&](int64_t begin, int64_t end) {
    auto buf = stage_buffer<kRows>(w);
    std::unique_ptr<float[]> tile(new float[kRows * K]);
    for (int64_t t = begin; t < end; ++t) {
      with_tile<kRows>(w, t * kRows, N, buf.get(),
                       [&](const auto& v) { decode_tile<kRows>(v, t * kRows, N, tile.get()); });
      dot_tile<kRows>(x, M, tile.get(), K, y, t * kRows, N);
    }
  });
}

// y[M, N] = x[M, K] @ W[N, K].T
template <class W>
void run(const W& w, const float* x, float* y, int64_t M, int64_t N) {
  std::unique_ptr<float[]> xd;
  if constexpr (W::kDeinterleaveX) {
    xd.reset(new float[M * w.K]);
    deinterleave_groups(x, xd.get(), M * w.K);
    x = xd.get();
  }
  // One output row at a time for M <= 8: each row's weights then stream sequentially. The default model's layer
  // matmuls (medians of 30-60 side by side) ran 1.2-1.5x faster in int8 than with 2 or 4 rows interleaved per
  // tile (M = 1: 7.0 -> 4.7 ms), and 1.35x faster than the tiled driver at M = 5-6 (11.6 -> 8.7 ms at 5), equal
  // at 8; 4-bit likewise or no slower (its decode needs the registers that more rows would take).
  switch (M) {
    case 1: return run_fused<1, 1>(w, x, y, N);
    case 2: return run_fused<2, 1>(w, x, y, N);
    case 3: return run_fused<3, 1>(w, x, y, N);
    case 4: return run_fused<4, 1>(w, x, y, N);
    case 5: return run_fused<5, 1>(w, x, y, N);
    case 6: return run_fused<6, 1>(w, x, y, N);
    case 7: return run_fused<7, 1>(w, x, y, N);
    case 8: return run_fused<8, 1>(w, x, y, N);
    default: return run_tiled(w, x, y, M, N);
  }
}

// ---------------------------------------------------------------------------------------------
// One dense decoder layer (Llama / Mistral / Qwen2 / Qwen3 shape: RMSNorm, GQA attention with rotate-half rope
// and optional QK-norm, SwiGLU MLP, int8 or 4-bit weights or an MXFP4 MLP, fp32 activations and KV cache) for
// B rows x T new tokens, in one call: a decode step of a small model otherwise spends more time dispatching the
// ~140 small PyTorch ops between its four matmuls than in the matmuls. Same formulas, in the same order, as
// models/decoder.py.

template <class WA, class WM>  // weight formats of the attention and the MLP matrices
struct DenseLayer {
  int64_t H, n_heads, n_kv, D, inter, S, window;  // window 0: none
  bool causal;                                    // false: a step's tokens all see each other (a draft block)
  float eps, scale;
  const float *norm1, *norm2, *q_norm, *k_norm;   // q_norm / k_norm null: no QK-norm
  const float *cos, *sin;                         // [max_position, D]
  WA qkv, o;
  WM gate_up, down;
  float *keys, *values;                           // [B, n_kv, S, D], row 0 = the step's first row
};

// sum_i a[i] * b[i] with 8-lane FMAs (the compiler keeps a float reduction scalar without -ffast-math).
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float sum = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// exp of 8 floats: Cephes' expf (range reduction by ln 2, degree-5 polynomial), within ~2 ulp of std::exp.
inline __m256 exp256(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3763f));
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2n));
}

// v[i] = exp(v[i] - top) in place; returns their sum (the softmax denominator).
inline float exp_shifted(float* v, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(v + i), t));
    _mm256_storeu_ps(v + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; i < n; ++i) sum += (v[i] = std::exp(v[i] - top));
  return sum;
}

// y[i] += w * x[i]
inline void axpy(float w, const float* x, float* y, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += w * x[i];
}

void rms_norm_rows(const float* x, const float* w, float* y, int64_t rows, int64_t n, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    const float ss = dot(xr, xr, n);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) y[r * n + i] = xr[i] * inv * w[i];
  }
}

// In place on one head vector v[D] at `pos`: optional RMSNorm, then v*cos + rotate_half(v)*sin.
template <class L_>
void norm_and_rope(float* v, const L_& L, const float* norm, int64_t pos) {
  const int64_t D = L.D, half = D / 2;
  if (norm != nullptr) rms_norm_rows(v, norm, v, 1, D, L.eps);
  const float* c = L.cos + pos * D;
  const float* s = L.sin + pos * D;
  float tmp[512];
  for (int64_t i = 0; i < D; ++i) tmp[i] = v[i];
  for (int64_t i = 0; i < half; ++i) v[i] = tmp[i] * c[i] - tmp[i + half] * s[i];
  for (int64_t i = half; i < D; ++i) v[i] = tmp[i] * c[i] + tmp[i - half] * s[i];
}

template <class WA, class WM>
void dense_layer(const DenseLayer<WA, WM>& L, float* x, const int64_t* starts, int64_t B, int64_t T) {
  const int64_t M = B * T, H = L.H, D = L.D, q_size = L.n_heads * D, kv_size = L.n_kv * D;
  const int64_t qkv_n = q_size + 2 * kv_size, group = L.n_heads / L.n_kv;
  std::unique_ptr<float[]> h(new float[M * std::max(H, L.inter)]), qkv(new float[M * qkv_n]),
      attn(new float[M * q_size]), out(new float[M * std::max(H, 2 * L.inter)]);
  rms_norm_rows(x, L.norm1, h.get(), M, H, L.eps);
  run(L.qkv, h.get(), qkv.get(), M, qkv_n);
  // Rope, then the new keys/values into the cache at each row's positions.
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = starts[b] + t;
      float* row = qkv.get() + (b * T + t) * qkv_n;
      for (int64_t hd = 0; hd < L.n_heads; ++hd) norm_and_rope(row + hd * D, L, L.q_norm, pos);
      for (int64_t g = 0; g < L.n_kv; ++g) {
        float* k = row + q_size + g * D;
        norm_and_rope(k, L, L.k_norm, pos);
        std::copy(k, k + D, L.keys + ((b * L.n_kv + g) * L.S + pos) * D);
        const float* v = row + q_size + kv_size + g * D;
        std::copy(v, v + D, L.values + ((b * L.n_kv + g) * L.S + pos) * D);
      }
    }
  }
  // Attention of each new token over keys [lo, hi], softmax in fp32: hi is the token itself (causal) or the
  // step's last token (bidirectional); lo starts the last `window` positions up to the token, if set.
#pragma omp parallel for collapse(2) if (M * L.n_heads >= 8)
  for (int64_t bt = 0; bt < M; ++bt) {
    for (int64_t hd = 0; hd < L.n_heads; ++hd) {
      const int64_t b = bt / T, pos = starts[b] + bt % T, hi = L.causal ? pos : starts[b] + T - 1;
      const int64_t lo = L.window > 0 ? std::max<int64_t>(0, pos - L.window + 1) : 0;
      const float* q = qkv.get() + bt * qkv_n + hd * D;
      const float* keys = L.keys + (b * L.n_kv + hd / group) * L.S * D;
      const float* values = L.values + (b * L.n_kv + hd / group) * L.S * D;
      std::unique_ptr<float[]> scores(new float[hi - lo + 1]);
      float top = -INFINITY;
      for (int64_t j = lo; j <= hi; ++j) {
        scores[j - lo] = dot(q, keys + j * D, D) * L.scale;
        top = std::max(top, scores[j - lo]);
      }
      const float total = exp_shifted(scores.get(), hi - lo + 1, top);
      float* o = attn.get() + bt * q_size + hd * D;
      for (int64_t i = 0; i < D; ++i) o[i] = 0.f;
      for (int64_t j = lo; j <= hi; ++j) axpy(scores[j - lo] / total, values + j * D, o, D);
    }
  }
  run(L.o, attn.get(), out.get(), M, H);
  for (int64_t i = 0; i < M * H; ++i) x[i] += out[i];
  rms_norm_rows(x, L.norm2, h.get(), M, H, L.eps);
  run(L.gate_up, h.get(), out.get(), M, 2 * L.inter);
  for (int64_t r = 0; r < M; ++r) {
    const float* g = out.get() + r * 2 * L.inter;
    const float* u = g + L.inter;
    for (int64_t i = 0; i < L.inter; ++i) h[r * L.inter + i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
  run(L.down, h.get(), out.get(), M, H);
  for (int64_t i = 0; i < M * H; ++i) x[i] += out[i];
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Python entry points. Deliberately plain CPython (no torch / pybind11 headers): those headers take
// 20-70 s to compile on a small machine, while this file builds in a few seconds. The Python
// wrapper (ultraspeed/kernels/cpu_gemm.py) validates dtypes, shapes, devices and contiguity and
// passes raw data pointers and sizes as integers.

namespace {

bool parse_i64(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, int64_t* v) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", want, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return false;
  }
  return true;
}

template <class T>
T* ptr(int64_t p) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(p));
}

// A weight format from its two pointers (as integers) and K: the matmul entry points and dense_layer build theirs
// with it.
template <class W>
W weights_at(int64_t a, int64_t b, int64_t K);
template <>
Int8Weights weights_at<Int8Weights>(int64_t a, int64_t b, int64_t K) {
  return {ptr<const int8_t>(a), ptr<const float>(b), K};
}
template <>
Q4Weights weights_at<Q4Weights>(int64_t a, int64_t b, int64_t K) {
  return {ptr<const uint8_t>(a), ptr<const uint16_t>(b), K};
}
template <>
Mxfp4Weights weights_at<Mxfp4Weights>(int64_t a, int64_t b, int64_t K) {
  return {ptr<const uint8_t>(a), ptr<const uint8_t>(b), K};
}

// int8_linear(x, qweight, scales, out, M, N, K), q4_linear(x, q, dm, out, M, N, K),
// mxfp4_linear(x, blocks, scales, out, M, N, K)
template <class W>
PyObject* py_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[7];
  if (!parse_i64(args, nargs, 7, a)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  run(weights_at<W>(a[1], a[2], a[6]), ptr<const float>(a[0]), ptr<float>(a[3]), a[4], a[5]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// fp16_linear(x, weight, out, M, N, K)
PyObject* py_fp16_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[6];
  if (!parse_i64(args, nargs, 6, a)) return nullptr;
  Py_BEGIN_ALLOW_THREADS
  run(Fp16Weights{ptr<const uint16_t>(a[1]), a[5]}, ptr<const float>(a[0]), ptr<float>(a[2]), a[3], a[4]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// dense_layer(x, starts, B, T, H, n_heads, n_kv, D, inter, S, window, causal, format, norm1, norm2, q_norm, k_norm,
//             cos, sin, qkv_a, qkv_b, o_a, o_b, gate_up_a, gate_up_b, down_a, down_b, keys, values, eps, scale)
// (pointers as integers, 0 for no QK-norm; format 0: int8 (a = qweight, b = scales), 1: q4 (a = q, b = dm),
// 2: int8 attention and MXFP4 MLP (a = blocks, b = scales); eps and scale as floats)
template <class WA, class WM>
void run_dense_layer(const int64_t* a, float eps, float scale) {
  const int64_t H = a[4], n_heads = a[5], D = a[7], inter = a[8];
  const DenseLayer<WA, WM> L{H, n_heads, a[6], D, inter, a[9], a[10], a[11] != 0, eps, scale,
                             ptr<const float>(a[13]), ptr<const float>(a[14]), ptr<const float>(a[15]),
                             ptr<const float>(a[16]), ptr<const float>(a[17]), ptr<const float>(a[18]),
                             weights_at<WA>(a[19], a[20], H), weights_at<WA>(a[21], a[22], n_heads * D),
                             weights_at<WM>(a[23], a[24], H), weights_at<WM>(a[25], a[26], inter),
                             ptr<float>(a[27]), ptr<float>(a[28])};
  dense_layer(L, ptr<float>(a[0]), ptr<const int64_t>(a[1]), a[2], a[3]);
}

PyObject* py_dense_layer(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  int64_t a[29];
  if (nargs != 31) {
    PyErr_Format(PyExc_TypeError, "dense_layer expects 31 arguments, got %zd", nargs);
    return nullptr;
  }
  if (!parse_i64(args, 29, 29, a)) return nullptr;
  const double eps = PyFloat_AsDouble(args[29]), scale = PyFloat_AsDouble(args[30]);
  if (PyErr_Occurred()) return nullptr;
  const int64_t n_heads = a[5], n_kv = a[6], D = a[7];
  if (D > 512 || D % 2 || n_kv <= 0 || n_heads % n_kv || a[12] < 0 || a[12] > 2) {
    PyErr_SetString(PyExc_ValueError, "dense_layer: unsupported head layout or weight format");
    return nullptr;
  }
  Py_BEGIN_ALLOW_THREADS
  const float e = static_cast<float>(eps), sc = static_cast<float>(scale);
  switch (a[12]) {
    case 0: run_dense_layer<Int8Weights, Int8Weights>(a, e, sc); break;
    case 1: run_dense_layer<Q4Weights, Q4Weights>(a, e, sc); break;
    default: run_dense_layer<Int8Weights, Mxfp4Weights>(a, e, sc); break;
  }
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

template <PyObject* (*F)(PyObject*, PyObject* const*, Py_ssize_t)>
PyCFunction fastcall() {
  return reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(F));
}

PyMethodDef kMethods[] = {
    {"int8_linear", fastcall<py_linear<Int8Weights>>(), METH_FASTCALL,
     "int8_linear(x, qweight, scales, out, M, N, K)"},
    {"fp16_linear", fastcall<py_fp16_linear>(), METH_FASTCALL, "fp16_linear(x, weight, out, M, N, K)"},
    {"q4_linear", fastcall<py_linear<Q4Weights>>(), METH_FASTCALL, "q4_linear(x, q, dm, out, M, N, K)"},
    {"mxfp4_linear", fastcall<py_linear<Mxfp4Weights>>(), METH_FASTCALL,
     "mxfp4_linear(x, blocks, scales, out, M, N, K)"},
    {"dense_layer", fastcall<py_dense_layer>(), METH_FASTCALL, "one dense decoder layer (see kernels/cpu_layer.py)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "cpu_gemm", "Raw-pointer CPU decode kernels", -1, kMethods};

}  // namespace

#define US_CONCAT2(a, b) a##b
#define US_CONCAT(a, b) US_CONCAT2(a, b)
// torch.utils.cpp_extension.load imports the module as TORCH_EXTENSION_NAME.
PyMODINIT_FUNC US_CONCAT(PyInit_, TORCH_EXTENSION_NAME)() { return PyModule_Create(&kModule); }
