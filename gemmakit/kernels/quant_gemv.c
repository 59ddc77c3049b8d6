/* y[M, N] = x[M, K] @ W[N, K]^T for a quantized W, float32 x and y, 1 <= M <= 8.
 *
 * W is kept as its blocks (gemmakit/quant/formats.py): the GGUF formats Q8_0, Q4_0, Q5_0,
 * Q4_K, Q6_K as llama.cpp stores them, gemmakit's int8 (a float32 scale per row) and int4
 * (blocks of 32 nibbles, a float16 scale and minimum per group of 32 or 128). Each block of
 * 32 weights is dequantized in registers to four vectors of 8 float32 (the same value the
 * torch reference computes), then FMAd against the M rows of x, which stay in L1/L2: one
 * read of W per call whatever M is, and no dequantized copy of W in memory. Activations stay
 * float32 (no int8 rounding of x, unlike llama.cpp), so a kept GGUF weight gives the logits of
 * its float32 dequantization up to summation order.
 *
 * Threads take slabs of ~256 KiB of W in turn (OpenMP, dynamic schedule).
 * Build: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared -fPIC quant_gemv.c
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

enum { Q8_0 = 0, Q4_0 = 1, Q5_0 = 2, Q4_K = 3, Q6_K = 4, INT8 = 5, INT4 = 6 };
static const ptrdiff_t BLOCK_BYTES[7] = {34, 18, 22, 144, 210, 1, 16};
static const ptrdiff_t BLOCK_WEIGHTS[7] = {32, 32, 32, 256, 256, 1, 32};

INLINE float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 bytes -> 4 x 8 float32, as unsigned or signed bytes */
INLINE void widen_u8(__m256i q, __m256 w[4]) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}

INLINE void widen_i8(__m256i q, __m256 w[4]) {
    __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

/* 16 bytes of nibbles -> 32 bytes: the low nibbles (values 0..15), then the high ones */
INLINE __m256i nibbles32(const uint8_t *qs) {
    __m128i v = _mm_loadu_si128((const __m128i *)qs);
    __m256i b = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
    return _mm256_and_si256(b, _mm256_set1_epi8(0x0F));
}

/* 32 bits -> 32 bytes, 0xFF where the bit is set (llama.cpp's bytes_from_bits_32, MIT) */
INLINE __m256i bytes_from_bits_32(const uint8_t *p) {
    uint32_t x32;
    memcpy(&x32, p, 4);
    const __m256i shuf = _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                           0x0101010101010101, 0x0000000000000000);
    __m256i bytes = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x32), shuf);
    bytes = _mm256_or_si256(bytes, _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe));
    return _mm256_cmpeq_epi8(bytes, _mm256_set1_epi64x(-1));
}

INLINE void scale4(__m256 w[4], float d) {
    __m256 v = _mm256_set1_ps(d);
    for (int i = 0; i < 4; i++) w[i] = _mm256_mul_ps(w[i], v);
}

/* Weights 32j .. 32j+31 of one row, dequantized into w[4]. int8 comes out unscaled (its
 * row scale is applied to the sum). sc/mn: the row's int4 scales and minimums. */
INLINE void deq32(const int fmt, const uint8_t *row, ptrdiff_t j, const uint8_t *sc,
                  const uint8_t *mn, ptrdiff_t group, __m256 w[4]) {
    switch (fmt) {
    case Q8_0: {
        const uint8_t *b = row + 34 * j;
        widen_i8(_mm256_loadu_si256((const __m256i *)(b + 2)), w);
        scale4(w, f16(b));
        break;
    }
    case Q4_0: {
        const uint8_t *b = row + 18 * j;
        widen_i8(_mm256_sub_epi8(nibbles32(b + 2), _mm256_set1_epi8(8)), w);
        scale4(w, f16(b));
        break;
    }
    case Q5_0: {
        const uint8_t *b = row + 22 * j;
        __m256i hi = _mm256_and_si256(bytes_from_bits_32(b + 2), _mm256_set1_epi8(0x10));
        __m256i q = _mm256_or_si256(nibbles32(b + 6), hi);
        widen_i8(_mm256_sub_epi8(q, _mm256_set1_epi8(16)), w);
        scale4(w, f16(b));
        break;
    }
    case Q4_K: {
        const uint8_t *b = row + 144 * (j >> 3), *s = b + 4;
        int i = (int)(j & 7);
        int scale, min;
        if (i < 4) {
            scale = s[i] & 63;
            min = s[i + 4] & 63;
        } else {
            scale = (s[i + 4] & 0xF) | ((s[i - 4] >> 6) << 4);
            min = (s[i + 4] >> 4) | ((s[i] >> 6) << 4);
        }
        __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * (i >> 1)));
        q = _mm256_and_si256(_mm256_srli_epi16(q, 4 * (i & 1)), _mm256_set1_epi8(0x0F));
        widen_u8(q, w);
        __m256 a = _mm256_set1_ps(f16(b) * (float)scale);
        __m256 c = _mm256_set1_ps(-(f16(b + 2) * (float)min));
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(w[k], a, c);
        break;
    }
    case Q6_K: {
        const uint8_t *b = row + 210 * (j >> 3);
        int i = (int)(j & 7), h = i >> 2, q4 = i & 3;
        __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (q4 & 1)));
        ql = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (q4 >> 1)), _mm256_set1_epi8(0x0F));
        __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
        qh = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * q4), _mm256_set1_epi8(3));
        __m256i q = _mm256_or_si256(ql, _mm256_slli_epi16(qh, 4));
        widen_i8(_mm256_sub_epi8(q, _mm256_set1_epi8(32)), w);
        const int8_t *scales = (const int8_t *)(b + 192 + 8 * h + 2 * q4);
        float d = f16(b + 208);
        __m256 lo = _mm256_set1_ps(d * (float)scales[0]), hi = _mm256_set1_ps(d * (float)scales[1]);
        w[0] = _mm256_mul_ps(w[0], lo);
        w[1] = _mm256_mul_ps(w[1], lo);
        w[2] = _mm256_mul_ps(w[2], hi);
        w[3] = _mm256_mul_ps(w[3], hi);
        break;
    }
    case INT8:
        widen_i8(_mm256_loadu_si256((const __m256i *)(row + 32 * j)), w);
        break;
    case INT4: {
        widen_u8(nibbles32(row + 16 * j), w);
        ptrdiff_t g = 32 * j / group;
        __m256 d = _mm256_set1_ps(f16(sc + 2 * g)), m = _mm256_set1_ps(f16(mn + 2 * g));
        for (int k = 0; k < 4; k++) w[k] = _mm256_fmadd_ps(w[k], d, m);
        break;
    }
    }
}

/* One row n of W against M rows of x: y[m * N + n] */
INLINE void row_dot(const int fmt, const int M, const uint8_t *row, const uint8_t *sc,
                    const uint8_t *mn, ptrdiff_t group, float row_scale, const float *x,
                    ptrdiff_t K, float *y, ptrdiff_t N) {
    __m256 acc[8];
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) acc[m] = _mm256_setzero_ps();
    ptrdiff_t nb = K / 32;
    for (ptrdiff_t j = 0; j < nb; j++) {
        __m256 w[4];
        deq32(fmt, row, j, sc, mn, group, w);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const float *xm = x + m * K + 32 * j;
            __m256 t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xm));
            t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xm + 8), t);
            t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xm + 16), t);
            t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xm + 24), t);
            acc[m] = _mm256_add_ps(acc[m], t);
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        float s = hsum(acc[m]);
        for (ptrdiff_t t = nb * 32; t < K; t++) s += (float)(int8_t)row[t] * x[m * K + t];
        y[m * N] = s * row_scale;
    }
}

/* rows [n0, n1) of W; fmt and M literal at every call site so each pair compiles on its own */
#define ROWS(FMT, M_)                                                                        \
    for (ptrdiff_t n = n0; n < n1; n++) {                                                    \
        const uint8_t *s_ = scale ? (const uint8_t *)scale + n * groups * 2 : NULL;          \
        const uint8_t *m_ = minimum ? (const uint8_t *)minimum + n * groups * 2 : NULL;      \
        float rs = (FMT) == INT8 ? ((const float *)scale)[n] : 1.0f;                         \
        row_dot((FMT), (M_), W + n * rb, s_, m_, group, rs, x, K, y + n, N);                 \
    }

#define BY_M(FMT)                                                                            \
    switch (M) {                                                                             \
    case 1: ROWS(FMT, 1) break;                                                              \
    case 2: ROWS(FMT, 2) break;                                                              \
    case 3: ROWS(FMT, 3) break;                                                              \
    case 4: ROWS(FMT, 4) break;                                                              \
    case 5: ROWS(FMT, 5) break;                                                              \
    case 6: ROWS(FMT, 6) break;                                                              \
    case 7: ROWS(FMT, 7) break;                                                              \
    case 8: ROWS(FMT, 8) break;                                                              \
    }

static void slab(int fmt, const float *x, const uint8_t *W, const void *scale,
                 const void *minimum, float *y, ptrdiff_t n0, ptrdiff_t n1, int M, ptrdiff_t N,
                 ptrdiff_t K, ptrdiff_t rb, ptrdiff_t group) {
    ptrdiff_t groups = fmt == INT4 ? K / group : 0;
    if (fmt != INT4) scale = fmt == INT8 ? scale : NULL, minimum = NULL;
    if (fmt == INT8) groups = 0;
    switch (fmt) {
    case Q8_0: BY_M(Q8_0) break;
    case Q4_0: BY_M(Q4_0) break;
    case Q5_0: BY_M(Q5_0) break;
    case Q4_K: BY_M(Q4_K) break;
    case Q6_K: BY_M(Q6_K) break;
    case INT8: BY_M(INT8) break;
    case INT4: BY_M(INT4) break;
    }
}

/* fmt: the format number; x [M, K] float32; W [N, row bytes] blocks; scale: int8's float32
 * [N] or int4's float16 [N, K / group]; minimum: int4's float16 [N, K / group]; y [M, N].
 * Returns 0, or -1 for bad arguments (nothing written). */
int quant_gemv(int fmt, const float *x, const uint8_t *W, const void *scale, const void *minimum,
               float *y, int64_t M, int64_t N, int64_t K, int64_t group, int n_threads) {
    if (fmt < 0 || fmt > 6 || M < 1 || M > 8 || N < 0 || K < 0 || n_threads < 1) return -1;
    if (fmt != INT8 && K % BLOCK_WEIGHTS[fmt]) return -1;
    if (fmt == INT4 && (group < 32 || group % 32 || K % group || !scale || !minimum)) return -1;
    if (fmt == INT8 && !scale) return -1;
    ptrdiff_t rb = K / BLOCK_WEIGHTS[fmt] * BLOCK_BYTES[fmt];
    ptrdiff_t chunk = 262144 / (rb > 0 ? rb : 1);
    if (chunk < 4) chunk = 4;
    ptrdiff_t n_chunks = (N + chunk - 1) / chunk;
    if (n_chunks < n_threads) n_threads = (int)(n_chunks > 0 ? n_chunks : 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (ptrdiff_t c = 0; c < n_chunks; c++) {
        ptrdiff_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        slab(fmt, x, W, scale, minimum, y, n0, n1, (int)M, N, K, rb, group);
    }
    return 0;
}
