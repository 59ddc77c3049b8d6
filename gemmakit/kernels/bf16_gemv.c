/* y[M, N] = x[M, K] @ W[N, K]^T for bfloat16 W (raw uint16 bits), float32 x and y, small M;
 * f32_gemv: the same loops for float32 W (the float32 fused decode step, decode_step.c).
 *
 * Decoding reads every weight once per token, so the speed limit is memory bandwidth: the
 * loop reads several rows of W at once, widens 8 bf16 to float32 with a zero-extend and a
 * 16-bit shift (bf16 is the top half of a float32), and FMAs them against the M rows of x,
 * which stay in L1/L2. Accumulation is in float32, as in torch's float32 matmul of the
 * upcast weights. Threads take ~256 KiB slabs of W in turn (OpenMP, dynamic schedule, so a
 * thread that starts late on busy cores takes fewer slabs); the caller passes torch's
 * thread count.
 *
 * Build: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared -fPIC bf16_gemv.c
 */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE __m256 load_bf16x8(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

INLINE float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* 8 weights from element i of W (BF: bfloat16 bits, else float32), widened to float32.
 * BF is a literal at every call site, so the branch compiles away. */
INLINE __m256 load8(const void *w, ptrdiff_t i, const int BF) {
    return BF ? load_bf16x8((const uint16_t *)w + i) : _mm256_loadu_ps((const float *)w + i);
}

INLINE float load1(const void *w, ptrdiff_t i, const int BF) {
    return BF ? bf16_to_float(((const uint16_t *)w)[i]) : ((const float *)w)[i];
}

INLINE float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* R rows of W, `ldw` elements apart, against M rows of x (row stride K):
 * y[m * ldy + r * ldr] = dot(W row r, x row m). R and M are literals at every call site, so
 * the loops unroll and acc[][] lives in registers (R * M + R + 1 <= 16 ymm). */
INLINE void block(const void *w, ptrdiff_t ldw, const float *x, float *y, ptrdiff_t ldr,
                  ptrdiff_t K, ptrdiff_t ldy, const int R, const int M, const int BF) {
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) wv[r] = load8(w, r * ldw + k, BF);
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) acc[r][m] = _mm256_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 4
        for (int m = 0; m < M; m++) {
            float s = hsum(acc[r][m]);
            for (ptrdiff_t t = k; t < K; t++) s += load1(w, r * ldw + t, BF) * x[m * K + t];
            y[m * ldy + r * ldr] = s;
        }
    }
}

#if defined(__AVX512F__)
/* 16 weights from element i of W, widened to float32 (load8's 512-bit version) */
INLINE __m512 load16(const void *w, ptrdiff_t i, const int BF) {
    if (!BF) return _mm512_loadu_ps((const float *)w + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* block for 2 to 8 rows of x with AVX-512 (the avx512vnni build): 16 weights per vector, and
 * R * M <= 16 accumulators in the 32 zmm registers, so that up to 8 rows of x take each W row
 * in one pass (the 256-bit block takes them 4 at a time, reading W twice) */
INLINE void block_z(const void *w, ptrdiff_t ldw, const float *x, float *y, ptrdiff_t ldr,
                    ptrdiff_t K, ptrdiff_t ldy, const int R, const int M, const int BF) {
    __m512 acc[2][8];
#pragma GCC unroll 2
    for (int r = 0; r < R; r++)
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_ps();
    ptrdiff_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 wv[2];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) wv[r] = load16(w, r * ldw + k, BF);
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const __m512 xv = _mm512_loadu_ps(x + m * K + k);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) acc[r][m] = _mm512_fmadd_ps(wv[r], xv, acc[r][m]);
        }
    }
#pragma GCC unroll 2
    for (int r = 0; r < R; r++) {
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            float s = _mm512_reduce_add_ps(acc[r][m]);
            for (ptrdiff_t t = k; t < K; t++) s += load1(w, r * ldw + t, BF) * x[m * K + t];
            y[m * ldy + r * ldr] = s;
        }
    }
}

#endif

/* Rows [n0, n1) of W for M rows of x. The R rows read together come from R separate
 * stretches of the slab (row i of each quarter, for R = 4), so the loop runs R sequential
 * streams in different pages: the prefetchers keep R DRAM reads in flight, where R adjacent
 * short rows (K = 640) would look like one stream. For M > 4 the x rows go in two groups
 * over the same W rows, the second group reading them from L1/L2 (BLOCK: block, or block_z,
 * which takes up to 8 rows of x at once). */
#define STRIDED(BLOCK, R_, M_LO, M_HI)                                                         \
    do {                                                                                       \
        ptrdiff_t q = (n1 - n0) / (R_), n = n0;                                                \
        for (ptrdiff_t i = 0; i < q; i++) {                                                    \
            const void *wr = ROW(W, n0 + i);                                                   \
            BLOCK(wr, q * K, x, y + n0 + i, q, K, N, (R_), (M_LO), BF);                        \
            if ((M_HI) > 0)                                                                    \
                BLOCK(wr, q * K, x + 4 * K, y + 4 * N + n0 + i, q, K, N, (R_), (M_HI), BF);    \
        }                                                                                      \
        for (n = n0 + q * (R_); n < n1; n++) {                                                 \
            BLOCK(ROW(W, n), 0, x, y + n, 0, K, N, 1, (M_LO), BF);                             \
            if ((M_HI) > 0) BLOCK(ROW(W, n), 0, x + 4 * K, y + 4 * N + n, 0, K, N, 1, (M_HI), BF); \
        }                                                                                      \
    } while (0)
#define ROW(W, n) ((const char *)(W) + (n) * K * (BF ? 2 : 4))

INLINE void slab(const void *W, const float *x, float *y, ptrdiff_t n0, ptrdiff_t n1,
                 ptrdiff_t K, ptrdiff_t N, int M, const int BF) {
#if defined(__AVX512F__)
    switch (M) {
    /* bound by memory: the 256-bit block's four streams (2 rows in 512 bits, two streams: 0.94x) */
    case 1: STRIDED(block, 4, 1, 0); break;
    case 2: STRIDED(block, 4, 2, 0); break;
    case 3: STRIDED(block_z, 2, 3, 0); break;
    case 4: STRIDED(block_z, 2, 4, 0); break;
    case 5: STRIDED(block_z, 2, 5, 0); break;
    case 6: STRIDED(block_z, 2, 6, 0); break;
    case 7: STRIDED(block_z, 2, 7, 0); break;
    case 8: STRIDED(block_z, 2, 8, 0); break;
    }
    return;
#endif
    switch (M) {
    case 1: STRIDED(block, 4, 1, 0); break;
    case 2: STRIDED(block, 4, 2, 0); break;
    case 3: STRIDED(block, 3, 3, 0); break;
    case 4: STRIDED(block, 2, 4, 0); break;
    case 5: STRIDED(block, 2, 4, 1); break;
    case 6: STRIDED(block, 2, 4, 2); break;
    case 7: STRIDED(block, 2, 4, 3); break;
    case 8: STRIDED(block, 2, 4, 4); break;
    }
}

/* Rows per work unit: about 256 KiB of W (long enough streams for the prefetchers, small
 * enough that the threads share out the work evenly), at least 4 rows. */
static ptrdiff_t chunk_rows(ptrdiff_t K) {
    ptrdiff_t rows = 131072 / (K > 0 ? K : 1);
    return rows < 4 ? 4 : rows;
}

static int gemv(const float *x, const void *W, float *y, int64_t M, int64_t N, int64_t K,
                int n_threads, const int BF) {
    if (M < 1 || M > 8 || N < 0 || K < 0 || n_threads < 1) return -1;
    /* about 256 KiB of W per work unit, whatever the element size */
    ptrdiff_t chunk = chunk_rows(BF ? K : 2 * K);
    ptrdiff_t n_chunks = (N + chunk - 1) / chunk;
    if (n_chunks < n_threads) n_threads = (int)(n_chunks > 0 ? n_chunks : 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (ptrdiff_t c = 0; c < n_chunks; c++) {
        ptrdiff_t n0 = c * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
        if (BF)
            slab(W, x, y, n0, n1, K, N, (int)M, 1);
        else
            slab(W, x, y, n0, n1, K, N, (int)M, 0);
    }
    return 0;
}

/* x [M, K] float32, W [N, K] bf16 bits, y [M, N] float32 (all row-major, contiguous),
 * 1 <= M <= 8. Returns 0, or -1 for bad arguments (nothing written). */
int bf16_gemv(const float *x, const uint16_t *W, float *y, int64_t M, int64_t N, int64_t K,
              int n_threads) {
    return gemv(x, W, y, M, N, K, n_threads, 1);
}

/* The same for float32 W [N, K]. */
int f32_gemv(const float *x, const float *W, float *y, int64_t M, int64_t N, int64_t K,
             int n_threads) {
    return gemv(x, W, y, M, N, K, n_threads, 0);
}
