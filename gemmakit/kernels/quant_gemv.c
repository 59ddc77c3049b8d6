/* y[M, N] = x[M, K] @ W[N, K]^T for a quantized W, float32 x and y, 1 <= M <= 8.
 *
 * W is kept as its blocks (gemmakit/quant/formats.py): the GGUF formats Q8_0, Q4_0 and
 * Q6_K as llama.cpp stores them (Q5_0 is held as Q8_0 blocks of the same values,
 * formats.HELD_AS: its format number 2 is refused here), gemmakit's int8 (a float32 scale per row) and int4
 * (blocks of 32 nibbles, a float16 scale and minimum per group of 32, 64, 128 or 256), which is
 * held packed: each row in chunks of 8 blocks, the chunk's 128 bytes of nibbles (in lane order:
 * nibbles4) followed by its groups' scales and then their minimums (quant/formats.py's
 * pack_int4), so that a row is one stream of memory, not three (rows 2p and 2p + 1 chunk by
 * chunk: int4_tiled). Q4_K is held as int4 is, a super-block of 256 weights being a chunk: its
 * nibbles in int4's blocks, then its 16 bytes of scales as the file has them
 * (formats.q4_k_memory), so that one inner loop serves both. x is rounded once per call to
 * int16 per block of 32 (scale max|x| / 32767, plus the rounded block's sum for the formats
 * with a minimum: see Xq), where llama.cpp rounds it to int8: 258 times finer steps at about
 * the same instruction count (madd of int16 pairs where llama.cpp does maddubs of int8 ones),
 * so that greedy decoding near ties follows the dequantized weights.
 * Every block of 32 weights is widened to int16 in registers and is an integer dot product
 * (a few instructions where dequantizing to float needs a dozen), scaled in float once per
 * block (Q6_K's per-16 scales multiply the widened weights first). So the result is the
 * float32 dequantization's product with x rounded to int16 (up to float32 summation order),
 * which differs from its product with x by at most sum over k of |w_k| * step_k / 2,
 * step_k = max|x| / 32767 of k's block (gemmakit/quant/selftest.py's round_activations and
 * error_bound).
 * The weights are read once per call whatever M is; x stays in L1.
 *
 * Threads take slabs of at most 256 KiB of W in turn (OpenMP, dynamic schedule);
 * quant_gemv_multi does several weights sharing x in one parallel region.
 * Build: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared -fPIC quant_gemv.c
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

#include "vmath.h" /* hmax8 */

/* Integer dot products of 2 int16 pairs per int32 lane, added to acc: with AVX-512 VNNI (+VL)
 * or AVX-VNNI one instruction (the build picks the flags from the CPU: build.py); with AVX2
 * madd and an add. The same integers either way. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPWSSD(acc, a, b) _mm256_dpwssd_epi32((acc), (a), (b))
#elif defined(__AVXVNNI__)
#define DPWSSD(acc, a, b) _mm256_dpwssd_avx_epi32((acc), (a), (b))
#else
#define DPWSSD(acc, a, b) _mm256_add_epi32((acc), _mm256_madd_epi16((a), (b)))
#endif

/* With AVX-512 (BW and VNNI: the avx512vnni build) int4's chunk_dot takes two of a chunk's
 * four 32-byte loads at a time in one 512-bit vector: half the multiply-adds and loads of x
 * per weight, which is what bounds several rows of x (a batch decoding, a short prefill) */
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define ZMM 1
#else
#define ZMM 0
#endif

#define PF_DIST 2048 /* bytes ahead that int8 and int4 rows prefetch */

enum { Q8_0 = 0, Q4_0 = 1, Q5_0 = 2, Q4_K = 3, Q6_K = 4, INT8 = 5, INT4 = 6 }; /* Q5_0: none */
/* bytes per block; int4 rows are packed with their scales: int4_row_bytes (Q4_K's as many as
 * the file's) */
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

/* 16 bytes widened to int16, each split into its low nibble (lo) and its high one (hi) */
INLINE void nibbles16(const uint8_t *p, __m256i *lo, __m256i *hi) {
    const __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    *lo = _mm256_and_si256(v, _mm256_set1_epi16(0x0F));
    *hi = _mm256_srli_epi16(v, 4);
}

/* The 32 weights of block j of a symmetric 32-block format (Q8_0, Q4_0, int8) widened
 * to int16 (w0: the first 16, w1: the last 16), and the block's scale (int8's row scale is
 * applied to the row's sum instead). The 4-bit formats keep weight i in the low nibble of
 * byte i and weight 16 + i in its high one: widened to int16 first, the nibbles split there. */
INLINE void wide32(const int fmt, const uint8_t *row, ptrdiff_t j, __m256i *w0, __m256i *w1,
                   float *d) {
    switch (fmt) {
    case Q8_0: {
        const uint8_t *b = row + 34 * j;
        *d = f16(b);
        *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 2)));
        *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + 18)));
        return;
    }
    case Q4_0: {
        const uint8_t *b = row + 18 * j;
        nibbles16(b + 2, w0, w1);
        *d = f16(b);
        *w0 = _mm256_sub_epi16(*w0, _mm256_set1_epi16(8));
        *w1 = _mm256_sub_epi16(*w1, _mm256_set1_epi16(8));
        return;
    }
    default: /* INT8 */
        *d = 1.0f;
        *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + 32 * j)));
        *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + 32 * j + 16)));
    }
}

/* The integer dot product of 32 int16 weights (w0, w1) with 32 int16 activations at xv */
INLINE __m256i dot32(__m256i w0, __m256i w1, const int16_t *xv) {
    return DPWSSD(_mm256_madd_epi16(w0, _mm256_loadu_si256((const __m256i *)xv)), w1,
                  _mm256_loadu_si256((const __m256i *)(xv + 16)));
}

/* int8 rows need not be whole blocks: the row's weights past its last block times x, in float */
INLINE float int8_tail(const uint8_t *row, const float *x, ptrdiff_t nb, ptrdiff_t K) {
    float s = 0.0f;
    for (ptrdiff_t t = nb * 32; t < K; t++) s += (float)(int8_t)row[t] * x[t];
    return s;
}

/* The M rows' accumulators: acc[2 * m + parity] (two chains per row so consecutive blocks'
 * FMAs do not wait on each other's latency; int4_rows: the integer sums' in one, the minimums'
 * terms in the other). */
typedef struct {
    __m256 acc[16];
} Acc;

/* x [M, K] rounded per block of 32 to int16: q [M, K], the scales d = max|x| / 32767 and
 * the rounded blocks' sums s (d * sum of q) [M, K / 32] (quantize_x) */
typedef struct {
    const int16_t *q, *l; /* l: q in lane order (lane_x) when the call has an int4 weight */
    const float *d, *s;
} Xq;

/* Symmetric 32-block j (Q8_0, Q4_0, int8) against the M rows of x rounded to int16:
 * acc[2 m + par] += (w . xq) * d * xd */
INLINE void sym_block(const int fmt, const int M, const uint8_t *row, ptrdiff_t j, int par,
                      const int16_t *xq, const float *xd, ptrdiff_t K, ptrdiff_t nb, Acc *a) {
    __m256i w0, w1;
    float d;
    wide32(fmt, row, j, &w0, &w1, &d);
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        const __m256i p = dot32(w0, w1, xq + m * K + 32 * j);
        const __m256 s = fmt == INT8 ? _mm256_broadcast_ss(xd + m * nb + j) : _mm256_set1_ps(d * xd[m * nb + j]);
        a->acc[2 * m + par] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), s, a->acc[2 * m + par]);
    }
}

/* gemmakit's int4 (and Q4_K, held as int4) is read a chunk of 8 blocks at a time, in four
 * loads of 32 bytes whose int32 lane l belongs to block l: load k's lane l holds bytes 4k to
 * 4k + 3 of block l's 16 (formats.lane_order), so each of its two int16 halves h holds four
 * nibbles, each one AND or shift away, that are the block's weights 4k + 2h, 4k + 2h + 16,
 * 4k + 2h + 1 and 4k + 2h + 17. x is laid out to match once per call (lane_x: per chunk and
 * load, the four int16 vectors of those weights' activations), so that the chunk's 16 integer
 * multiply-adds sum each block in its own int32 lane, and one convert and one FMA with the 8
 * blocks' scales (d_l * xd_l, in block order) apply them: per 64 weights, the nibbles' 6
 * instructions, 4 multiply-adds and 4 adds, where a vector holding two blocks (four lanes each)
 * needed a convert, a shuffle of the scales and an FMA more (5.2 -> 4.8 cycles per 64 weights
 * on Zen 3 in L1). Per lane, a chunk's sum is at most 32 * 15 * 32767: no overflow. */
INLINE void nibbles4(__m256i v, __m256i w[4]) {
    const __m256i f = _mm256_set1_epi16(0x0F);
    w[0] = _mm256_and_si256(v, f);
    w[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), f);
    w[2] = _mm256_and_si256(_mm256_srli_epi16(v, 8), f);
    w[3] = _mm256_srli_epi16(v, 12);
}

/* The length of a row of x in lane order: 256 per chunk of 8 blocks, a short last one padded */
INLINE ptrdiff_t lane_len(ptrdiff_t K) { return 256 * ((K / 32 + 7) / 8); }

/* x rounded to int16 (xq [M, K]) in lane order: xl [M, lane_len(K)]. Per chunk c and load k,
 * four vectors of 16 (p = 0..3) whose int16 2l + h is the activation of block 8c + l's weight
 * 4k + 2h (p 0), + 16 (p 1), + 1 (p 2), + 17 (p 3): nibble p of load k's int16 2l + h
 * (nibbles4). Blocks past the row's last are zeros. */
static void lane_x(const int16_t *xq, int M, ptrdiff_t K, int16_t *xl) {
    const ptrdiff_t nb = K / 32, L = lane_len(K);
    for (int m = 0; m < M; m++)
        for (ptrdiff_t c = 0; c < L / 256; c++) {
            int16_t *o = xl + m * L + 256 * c; /* [k][p][l][h] */
            for (int l = 0; l < 8; l++) {
                const ptrdiff_t j = 8 * c + l;
                for (int k = 0; k < 4; k++) {
                    uint64_t a = 0, b = 0; /* weights 4k..4k+3 and 16+4k..16+4k+3 */
                    if (j < nb) {
                        memcpy(&a, xq + m * K + 32 * j + 4 * k, 8);
                        memcpy(&b, xq + m * K + 32 * j + 16 + 4 * k, 8);
                    }
                    /* int16 h of lane l: a's (or b's) int16 2h for p 0 (1), 2h + 1 for p 2 (3) */
                    const uint32_t v[4] = {(uint32_t)((a & 0xFFFF) | (a >> 16 & 0xFFFF0000)),
                                           (uint32_t)((b & 0xFFFF) | (b >> 16 & 0xFFFF0000)),
                                           (uint32_t)((a >> 16 & 0xFFFF) | (a >> 32 & 0xFFFF0000)),
                                           (uint32_t)((b >> 16 & 0xFFFF) | (b >> 32 & 0xFFFF0000))};
                    /* ZMM: loads 2i and 2i + 1's vectors p side by side (chunk_dot) */
                    for (int p = 0; p < 4; p++)
                        memcpy(o + (ZMM ? 128 * (k / 2) + 32 * p + 16 * (k % 2) : 64 * k + 16 * p) + 2 * l,
                               v + p, 4);
                }
            }
        }
}

/* A chunk's 8 blocks' scales (d) and minimums (mv) as floats in block order, from its 16 / per
 * float16 scales and then as many minimums (per, the blocks per group, divides 8): the larger
 * groups' 4, 2 or 1 values broadcast to their blocks, from one load of the 32 / per bytes there
 * are (one per chunk: separate loads and conversions of the scales and minimums cost a group
 * of 128 a tenth of its chunk's work). */
INLINE void chunk_scales(const uint8_t *v, ptrdiff_t per, __m256 *d, __m256 *mv) {
    if (per == 1) {
        *d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v));
        *mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + 16)));
    } else if (per == 2) { /* [d0 d1 d2 d3 | m0 m1 m2 m3] -> [d0 d0 d1 d1 | d2 d2 d3 d3], ... */
        const __m256 t = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)v));
        const __m256 lo = _mm256_unpacklo_ps(t, t), hi = _mm256_unpackhi_ps(t, t);
        *d = _mm256_permute2f128_ps(lo, hi, 0x20), *mv = _mm256_permute2f128_ps(lo, hi, 0x31);
    } else if (per == 4) { /* [d0 d1 m0 m1] in each half -> [d0 x 4 | d1 x 4], [m0 x 4 | m1 x 4] */
        const __m128 t = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)v));
        const __m256 b = _mm256_set_m128(t, t);
        *d = _mm256_permutevar_ps(b, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1));
        *mv = _mm256_permutevar_ps(b, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3));
    } else {
        int32_t bits;
        memcpy(&bits, v, 4);
        const __m128 t = _mm_cvtph_ps(_mm_cvtsi32_si128(bits)); /* [d m 0 0] */
        *d = _mm256_broadcastss_ps(t), *mv = _mm256_broadcastss_ps(_mm_movehdup_ps(t));
    }
}

/* A Q4_K super-block's 16 bytes of scales (float16 d and dmin, then 12 bytes of six-bit
 * scales sc and minimums mn in 32-bit words u0, u1, u2, packed as llama.cpp packs them:
 * formats._q4_k_scales) -> its 8 sub-blocks' d * sc and, negated, dmin * mn (w = d sc q -
 * dmin mn), in block order as chunk_scales gives int4's. All in vector registers: the words
 * [sc 0-3 | sc 4-7 | mn 0-3 | mn 4-7] are [u0 & 3F | u2 & 0F | u1 & 3F | u2 >> 4 & 0F] or'ed
 * with [0 | u0 >> 2 & 30 | 0 | u1 >> 2 & 30] (per byte), then widened to floats. */
INLINE void q4_k_values(const uint8_t *p, __m256 *d, __m256 *mv) {
    const __m128i v = _mm_loadu_si128((const __m128i *)p); /* [d dmin | u0 | u1 | u2] */
    const __m128i a = _mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(3, 2, 3, 1)), _mm_setr_epi32(0, 0, 0, 4));
    const __m128i b = _mm_srli_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 2, 1, 1)), 2);
    const __m128i lo = _mm_and_si128(a, _mm_setr_epi32(0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F));
    const __m128i hi = _mm_and_si128(b, _mm_setr_epi32(0, 0x30303030, 0, 0x30303030));
    const __m128i q = _mm_or_si128(lo, hi);
    const __m128 dm = _mm_xor_ps(_mm_cvtph_ps(v), _mm_setr_ps(0.0f, -0.0f, 0.0f, 0.0f)); /* d, -dmin */
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    const __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpackhi_epi64(q, q)));
    *d = _mm256_mul_ps(_mm256_broadcastss_ps(dm), sc);
    *mv = _mm256_mul_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)), mn);
}

/* Bytes of a packed int4 row of nb blocks with groups of `per` blocks: 16 per block, and a
 * float16 scale and minimum per group. */
INLINE ptrdiff_t int4_row_bytes(ptrdiff_t nb, ptrdiff_t per) { return 16 * nb + 4 * (nb / per); }

/* Bytes of nb blocks of a held row: int4's packed ones, or (q4k) Q4_K's super-blocks, whose
 * held bytes are the file's (nb a multiple of 8) */
INLINE ptrdiff_t held_row_bytes(int q4k, ptrdiff_t nb, ptrdiff_t per) {
    return q4k ? nb / 8 * BLOCK_BYTES[Q4_K] : int4_row_bytes(nb, per);
}

/* The integer sums of one chunk of R rows (at c + r * ro, load k's 32 bytes at k * ks) against
 * M rows of x in lane order (xl, rows L apart): acc[2 i] += (sums) * s[i], i = r M + m (see
 * nibbles4). masked (a literal): the row's last short chunk, whose loads hold only the lanes
 * of `lanes` (ks = 4 * its blocks), the rest zeros. */
#if ZMM
INLINE void nibbles4z(__m512i v, __m512i w[4]) {
    const __m512i f = _mm512_set1_epi16(0x0F);
    w[0] = _mm512_and_si512(v, f);
    w[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), f);
    w[2] = _mm512_and_si512(_mm512_srli_epi16(v, 8), f);
    w[3] = _mm512_srli_epi16(v, 12);
}

/* chunk_dot's loads 2i and 2i + 1 in one 512-bit vector (x laid out to match by lane_x): each
 * block's sum is in int32 lanes l and 8 + l, added at the end */
INLINE void chunk_dot(const int M, const int R, const int masked, const uint8_t *c, ptrdiff_t ro,
                      ptrdiff_t ks, __m256i lanes, const int16_t *xl, ptrdiff_t L, const __m256 *s,
                      Acc *a) {
    __m512i sum[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * M; i++) sum[i] = _mm512_setzero_si512();
#pragma GCC unroll 1
    for (int k = 0; k < 2; k++) {
        __m512i w[2][4];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            const uint8_t *at = c + r * ro + 2 * k * ks;
            nibbles4z(masked ? _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_maskload_epi32((const int *)at, lanes)),
                                                  _mm256_maskload_epi32((const int *)(at + ks), lanes), 1)
                             : _mm512_loadu_si512((const void *)at),
                      w[r]);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const __m512i *x = (const __m512i *)(xl + m * L + 128 * k);
            const __m512i x0 = _mm512_loadu_si512(x), x1 = _mm512_loadu_si512(x + 1);
            const __m512i x2 = _mm512_loadu_si512(x + 2), x3 = _mm512_loadu_si512(x + 3);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                const int i = r * M + m;
                const __m512i p = _mm512_dpwssd_epi32(_mm512_madd_epi16(w[r][0], x0), w[r][1], x1);
                sum[i] = _mm512_add_epi32(sum[i], _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(p, w[r][2], x2), w[r][3], x3));
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R * M; i++) {
        const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(sum[i]), _mm512_extracti64x4_epi64(sum[i], 1));
        a->acc[2 * i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(h), s[i], a->acc[2 * i]);
    }
}
#else
INLINE void chunk_dot(const int M, const int R, const int masked, const uint8_t *c, ptrdiff_t ro,
                      ptrdiff_t ks, __m256i lanes, const int16_t *xl, ptrdiff_t L, const __m256 *s,
                      Acc *a) {
    __m256i sum[8];
#pragma GCC unroll 8
    for (int i = 0; i < R * M; i++) sum[i] = _mm256_setzero_si256();
    /* not unrolled: gcc hoists an unrolled chunk's loads and multiply-adds and spills them */
#pragma GCC unroll 1
    for (int k = 0; k < 4; k++) {
        __m256i w[2][4];
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) {
            const uint8_t *at = c + r * ro + k * ks;
            nibbles4(masked ? _mm256_maskload_epi32((const int *)at, lanes)
                            : _mm256_loadu_si256((const __m256i *)at),
                     w[r]);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; m++) {
            const __m256i *x = (const __m256i *)(xl + m * L + 64 * k);
            const __m256i x0 = _mm256_loadu_si256(x), x1 = _mm256_loadu_si256(x + 1);
            const __m256i x2 = _mm256_loadu_si256(x + 2), x3 = _mm256_loadu_si256(x + 3);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                const int i = r * M + m;
                const __m256i p = DPWSSD(_mm256_madd_epi16(w[r][0], x0), w[r][1], x1);
                sum[i] = _mm256_add_epi32(sum[i], DPWSSD(DPWSSD(p, w[r][2], x2), w[r][3], x3));
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R * M; i++)
        a->acc[2 * i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[i]), s[i], a->acc[2 * i]);
}
#endif

/* A chunk's scales d and minimums mv (in block order) of row r against the M rows of x: its
 * scales times x's, s[i] = d * xd, and the minimums' terms mv * xs added to acc[2 i + 1],
 * i = r M + m (xd, xs at the chunk's first block, rows xb apart). masked (a literal): only the
 * lanes of `lanes` are read (the row's last short chunk), the rest are zeros. */
INLINE void chunk_terms(const int M, const int r, const int masked, __m256i lanes, __m256 d,
                        __m256 mv, const float *xd, const float *xs, ptrdiff_t xb, __m256 *s,
                        Acc *a) {
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        const int i = r * M + m;
        const float *pd = xd + m * xb, *ps = xs + m * xb;
        s[i] = _mm256_mul_ps(d, masked ? _mm256_maskload_ps(pd, lanes) : _mm256_loadu_ps(pd));
        const __m256 t = masked ? _mm256_maskload_ps(ps, lanes) : _mm256_loadu_ps(ps);
        a->acc[2 * i + 1] = _mm256_fmadd_ps(mv, t, a->acc[2 * i + 1]);
    }
}

/* R (1 or 2) packed int4 rows of nb blocks (w = d q + m per group of `group` weights) in each
 * of S streams, against M rows of x (R * M <= 8; S > 1 only for M = 1): stream s's row r has
 * its whole chunk c at rows[s] + c * cs + r * ro and its last short chunk at rows[s] + to +
 * r * tr (int4_tiled: rows held in pairs, chunk by chunk). xl: x in lane order (rows L apart),
 * xd its block scales, xs the rounded blocks' sums (rows xb blocks apart). Stream s's row r
 * against x's row m sums into a[s].acc[2 i] (the weights' integers) and a[s].acc[2 i + 1] (the
 * minimums' terms), i = r M + m. A chunk of 8 blocks at a time, the streams' in turn:
 * chunk_terms, then chunk_dot, which loads x once for the R rows (decoding's M = 1 takes R = 2:
 * half the loads of x per weight, and two rows' independent work to interleave). The last
 * chunk of nb mod 8 blocks the same way, its lanes past them zeros. q4k (a literal at every
 * call site): the rows are held Q4_K rows, whose chunks are their super-blocks (144 bytes, their
 * scales decoded by q4_k_values; nb a multiple of 8). Each row prefetches PF_DIST ahead: with
 * S = 2 streams of pairs from two places in memory, that keeps more reads in flight than one
 * (1.13-1.18x from memory on Zen 3, where neither alone helped: the hardware prefetcher follows
 * one stream, and two without the software prefetches read slower than one). */
INLINE void int4_rows(const int M, const int R, const int S, const int q4k,
                      const uint8_t *const *rows, ptrdiff_t cs, ptrdiff_t ro, ptrdiff_t to,
                      ptrdiff_t tr, ptrdiff_t group, const int16_t *xl, const float *xd,
                      const float *xs, ptrdiff_t L, ptrdiff_t nb, ptrdiff_t xb, Acc *a) {
    const ptrdiff_t per = group / 32; /* 1, 2, 4 or 8 */
    const __m256i all = _mm256_set1_epi32(-1);
    __m256 s[8]; /* [r M + m] */
    ptrdiff_t b = 0;
    for (; b + 8 <= nb; b += 8)
#pragma GCC unroll 2
        for (int st = 0; st < S; st++) {
            const uint8_t *ch = rows[st] + cs * (b / 8);
#pragma GCC unroll 2
            for (int r = 0; r < R; r++) {
                const uint8_t *c = ch + r * ro;
                __m256 d, mv;
                if (q4k)
                    q4_k_values(c + 128, &d, &mv);
                else
                    chunk_scales(c + 128, per, &d, &mv);
                chunk_terms(M, r, 0, all, d, mv, xd + b, xs + b, xb, s, a + st);
                _mm_prefetch((const char *)c + PF_DIST, _MM_HINT_T0);
                _mm_prefetch((const char *)c + PF_DIST + 64, _MM_HINT_T0);
                _mm_prefetch((const char *)c + PF_DIST + 128, _MM_HINT_T0);
            }
            chunk_dot(M, R, 0, ch, ro, 32, all, xl + 32 * b, L, s, a + st);
        }
    const ptrdiff_t nr = nb - b; /* the last chunk: nr blocks, then nr / per scales and minimums */
    if (q4k || !nr) return; /* Q4_K: whole super-blocks only */
    const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)nr), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const ptrdiff_t g = 2 * (nr / per); /* bytes of its scales, and of its minimums */
#pragma GCC unroll 2
    for (int st = 0; st < S; st++) {
        const uint8_t *tail = rows[st] + to;
#pragma GCC unroll 2
        for (int r = 0; r < R; r++) { /* its values where a whole chunk's are, the rest zeros */
            uint8_t v[32] = {0};
            memcpy(v, tail + r * tr + 16 * nr, g);
            memcpy(v + 16 / per, tail + r * tr + 16 * nr + g, g);
            __m256 d, mv;
            chunk_scales(v, per, &d, &mv);
            chunk_terms(M, r, 1, lanes, d, mv, xd + b, xs + b, xb, s, a + st);
        }
        chunk_dot(M, R, 1, tail, tr, 4 * nr, lanes, xl + 32 * b, L, s, a + st);
    }
}

/* One row n of W in a format without minimums (the symmetric ones and Q6_K) against M rows
 * of x quantized per block of 32 (xq, xd as quantize_x writes them): y[m * N]. Every block's
 * integer dot product is exact; its float scale (the weight block's scale times x's block
 * scale) is applied once per block of 32: the dequantized row's dot product with the rounded
 * x, up to float32 rounding. */
INLINE void row_dot(const int fmt, const int M, const uint8_t *row, float row_scale, const Xq *X,
                    const float *x, ptrdiff_t K, float *y, ptrdiff_t N) {
    const int16_t *xq = X->q;
    const float *xd = X->d;
    Acc a;
#pragma GCC unroll 16
    for (int i = 0; i < 2 * M; i++) a.acc[i] = _mm256_setzero_ps();
    const ptrdiff_t nb = K / 32;
    if (fmt == Q8_0 || fmt == Q4_0 || fmt == INT8) {
        ptrdiff_t j = 0; /* consecutive blocks alternate chains */
        for (; j + 1 < nb; j += 2) {
            if (fmt == INT8) _mm_prefetch((const char *)(row + 32 * j) + PF_DIST, _MM_HINT_T0);
            sym_block(fmt, M, row, j, 0, xq, xd, K, nb, &a);
            sym_block(fmt, M, row, j + 1, 1, xq, xd, K, nb, &a);
        }
        if (j < nb) sym_block(fmt, M, row, j, 0, xq, xd, K, nb, &a);
    } else if (fmt == Q6_K) {
        for (ptrdiff_t sb = 0; sb < nb / 8; sb++) {
            const uint8_t *b = row + 210 * sb;
            const float d = f16(b + 208);
            for (int i = 0; i < 8; i++) {
                const int h = i >> 2, q4 = i & 3;
                __m256i ql = _mm256_loadu_si256((const __m256i *)(b + 64 * h + 32 * (q4 & 1)));
                ql = _mm256_and_si256(_mm256_srli_epi16(ql, 4 * (q4 >> 1)), _mm256_set1_epi8(0x0F));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * h));
                qh = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * q4), _mm256_set1_epi8(3));
                const __m256i w = _mm256_sub_epi8(_mm256_or_si256(ql, _mm256_slli_epi16(qh, 4)),
                                                  _mm256_set1_epi8(32));
                /* the 16-weight halves' int8 scales multiply the widened weights (|w sc| <= 4096) */
                const int8_t *scl = (const int8_t *)(b + 192 + 8 * h + 2 * q4);
                const __m256i w0 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(w)),
                                                      _mm256_set1_epi16(scl[0]));
                const __m256i w1 = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(w, 1)),
                                                      _mm256_set1_epi16(scl[1]));
                const ptrdiff_t j = 8 * sb + i;
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    const __m256i p = dot32(w0, w1, xq + m * K + 32 * j);
                    a.acc[2 * m + (i & 1)] = _mm256_fmadd_ps(
                        _mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd[m * nb + j]),
                        a.acc[2 * m + (i & 1)]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
        const float s = hsum(_mm256_add_ps(a.acc[2 * m], a.acc[2 * m + 1])) + int8_tail(row, x + m * K, nb, K);
        y[m * N] = s * row_scale;
    }
}

#define X_LEVELS 32767.0f /* x's block rounds to integers in [-X_LEVELS, X_LEVELS] (int16) */

/* max |x| over the block of 32 at b, its 4 vectors loaded into v */
INLINE float block_absmax(const float *b, __m256 v[4]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(b + 8 * i);
    return hmax8(_mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                              _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3]))));
}

/* x [M, K] -> per block of 32: the scale d = max|x| / 32767, the block rounded to int16
 * xq = round(x * (1 / d)) (ties to even; int16_t xq [M, K]), and d * sum(xq), the rounded
 * block's sum, so that a minimum multiplies the same x as the scale (xd, xs [M, K / 32];
 * selftest.py's round_activations computes the same in torch). Whole blocks only. */
static void quantize_x(const float *x, int M, ptrdiff_t K, int16_t *xq, float *xd, float *xs) {
    const ptrdiff_t nb = K / 32;
    for (int m = 0; m < M; m++)
        for (ptrdiff_t j = 0; j < nb; j++) {
            __m256 v[4];
            const float d = block_absmax(x + m * K + 32 * j, v) / X_LEVELS, id = d > 0 ? 1.0f / d : 0.0f;
            xd[m * nb + j] = d;
            __m256i r[4];
            for (int i = 0; i < 4; i++)
                r[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[i], _mm256_set1_ps(id)),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            __m256i t = _mm256_add_epi32(_mm256_add_epi32(r[0], r[1]), _mm256_add_epi32(r[2], r[3]));
            xs[m * nb + j] = d * hsum(_mm256_cvtepi32_ps(t));
            /* packs interleave the 128-bit lanes: put the values back in order */
            int16_t *out = xq + m * K + 32 * j;
            for (int i = 0; i < 2; i++) {
                __m256i p = _mm256_packs_epi32(r[2 * i], r[2 * i + 1]);
                _mm256_storeu_si256((__m256i *)(out + 16 * i), _mm256_permute4x64_epi64(p, 0xD8));
            }
        }
}

/* Block j of four rows r[0..3] of a symmetric format against one row of x:
 * acc[2 k + par] += (w_k . xq) * d_k * xd (x's block loaded once for the four) */
INLINE void sym4_block(const int fmt, const uint8_t *const *r, ptrdiff_t j, int par, const Xq *X,
                       __m256 *acc) {
    const float xd = X->d[j];
    for (int k = 0; k < 4; k++) {
        __m256i w0, w1;
        float d;
        wide32(fmt, r[k], j, &w0, &w1, &d);
        const __m256i p = dot32(w0, w1, X->q + 32 * j);
        acc[2 * k + par] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * xd), acc[2 * k + par]);
    }
}

/* Rows [n0, n1) of W in a format of 32-weight blocks with one scale each (Q8_0, Q4_0,
 * int8) against one row of x (decoding's M = 1), four rows at a time from the four quarters
 * of the slab (as bf16_gemv.c's STRIDED): four sequential streams in different pages, which
 * the prefetchers serve with four times the reads in flight of one (one stream reads at about
 * half the bf16 kernel's rate: these formats are memory-bound, as is the Q8_0 output head of
 * Gemma 3 270M), and each block of x loaded once for the four. */
INLINE void sym_m1(const int fmt, const uint8_t *W, const float *rs, const Xq *X, const float *x,
                   float *y, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t K, ptrdiff_t rb) {
    const ptrdiff_t nb = K / 32, q = (n1 - n0) / 4;
    for (ptrdiff_t i = 0; i < q; i++) {
        const uint8_t *r[4];
        __m256 acc[8];
        for (int k = 0; k < 4; k++) r[k] = W + (n0 + i + k * q) * rb;
        for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();
        ptrdiff_t j = 0; /* consecutive blocks alternate chains */
        for (; j + 1 < nb; j += 2) {
            sym4_block(fmt, r, j, 0, X, acc);
            sym4_block(fmt, r, j + 1, 1, X, acc);
        }
        if (j < nb) sym4_block(fmt, r, j, 0, X, acc);
        for (int k = 0; k < 4; k++) {
            const ptrdiff_t n = n0 + i + k * q;
            const float s = hsum(_mm256_add_ps(acc[2 * k], acc[2 * k + 1])) + int8_tail(r[k], x, nb, K);
            y[n] = fmt == INT8 ? s * rs[n] : s;
        }
    }
    for (ptrdiff_t n = n0 + 4 * q; n < n1; n++)
        row_dot(fmt, 1, W + n * rb, fmt == INT8 ? rs[n] : 1.0f, X, x, K, y + n, 1);
}

/* rows [n0, n1) of W; fmt and M literal at every call site so each pair compiles on its own */
#define ROWS(FMT, M_)                                                                        \
    for (ptrdiff_t n = n0; n < n1; n++) {                                                    \
        float rs = (FMT) == INT8 ? ((const float *)scale)[n] : 1.0f;                         \
        row_dot((FMT), (M_), W + n * rb, rs, X, x, K, y + n, N);                             \
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

/* A tile's sum v into y: the first tile (t = 0) sets it, the others add */
INLINE void put(float *out, ptrdiff_t t, float v) { *out = t ? *out + v : v; }

/* Rows [n0, n1) (n0 even) of a packed int4 weight (or a held Q4_K one: q4k) held in tiles of
 * `tile` columns: W [K / tile][N][the packed bytes of `tile` columns] (QuantWeight holds rows
 * longer than 4096 so), and within a tile, rows 2p and 2p + 1 chunk by chunk (formats.pair_rows:
 * their first whole chunks, their second ones, ..., then their last short chunks; an odd last
 * row as it is), so that decoding reads the two rows it takes at a time (int4_rows' R = 2) as
 * one sequential stream (two rows' streams side by side defeated the hardware prefetcher: 10-30%
 * slower from memory), and M = 1 takes the slab's pairs i and h + i together (two such streams,
 * int4_rows' S = 2). Tile by tile, the slab's rows of a tile are read in turn, and x's
 * tile (8 KiB in lane order at 4096 columns) stays in L1 across them; a whole long row's x (32
 * KiB for the 16384 columns of Gemma-2B's down projection) does not, and was re-read from L2
 * for every row. Each row's sums over the tiles add up in y. tile = K: one tile, the rows as
 * they are. */
INLINE void int4_tiled(const int M, const int q4k, const uint8_t *W, ptrdiff_t group, const Xq *X,
                       float *y, ptrdiff_t n0, ptrdiff_t n1, ptrdiff_t N, ptrdiff_t K,
                       ptrdiff_t tile) {
    const ptrdiff_t nbt = tile / 32, L = lane_len(K);
    const ptrdiff_t tb = held_row_bytes(q4k, nbt, group / 32), cb = held_row_bytes(q4k, 8, group / 32);
    const ptrdiff_t whole = cb * (nbt / 8), tl = tb - whole; /* a row's whole chunks, its tail */
    for (ptrdiff_t t = 0; t < K / tile; t++) {
        const int16_t *xl = X->l + t * tile; /* tiles are whole chunks */
        const float *xd = X->d + t * nbt, *xs = X->s + t * nbt;
        /* M = 1: the slab's pairs i and h + i together (two streams), then any last pair and
         * odd row alone; both rows' sums of stream s in a[s] (R = 2) */
        const ptrdiff_t h = M == 1 ? (n1 - n0) / 4 : 0;
        for (ptrdiff_t i = 0; i < h; i++) {
            const ptrdiff_t n[2] = {n0 + 2 * i, n0 + 2 * (h + i)};
            const uint8_t *rows[2] = {W + (t * N + n[0]) * tb, W + (t * N + n[1]) * tb};
            Acc a[2];
#pragma GCC unroll 2
            for (int st = 0; st < 2; st++)
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) a[st].acc[j] = _mm256_setzero_ps();
            int4_rows(1, 2, 2, q4k, rows, 2 * cb, cb, 2 * whole, tl, group, xl, xd, xs, L, nbt, K / 32, a);
#pragma GCC unroll 2
            for (int st = 0; st < 2; st++)
#pragma GCC unroll 2
                for (int r = 0; r < 2; r++)
                    put(y + n[st] + r, t, hsum(_mm256_add_ps(a[st].acc[2 * r], a[st].acc[2 * r + 1])));
        }
        for (ptrdiff_t n = n0 + 4 * h; n < n1; n += 2) {
            const uint8_t *base = W + (t * N + n) * tb;
            const int paired = n + 1 < N; /* < n1 too: slabs hold whole pairs */
            /* M = 1: both rows' sums in a[0] (R = 2); else row r's in a[r] */
            Acc a[2];
            /* both rows against x at once (R = 2, their sums in a[0]): M = 1, and with
             * AVX-512's 32 registers up to 4 rows of x */
            const int both = paired && (M == 1 || (ZMM && M <= 4));
            const int used = both ? 4 * M : 2 * M; /* accumulators of each Acc in use */
#pragma GCC unroll 2
            for (int r = 0; r < 2; r++)
#pragma GCC unroll 16
                for (int i = 0; i < used; i++) a[r].acc[i] = _mm256_setzero_ps();
            if (!paired)
                int4_rows(M, 1, 1, q4k, &base, cb, 0, whole, 0, group, xl, xd, xs, L, nbt, K / 32, a);
            else if (both)
                int4_rows(M, 2, 1, q4k, &base, 2 * cb, cb, 2 * whole, tl, group, xl, xd, xs, L, nbt, K / 32, a);
            else /* a row at a time: R = 2's accumulators for M rows of x would not fit */
#pragma GCC unroll 2
                for (int r = 0; r < 2; r++) {
                    const uint8_t *row = base + r * cb;
                    int4_rows(M, 1, 1, q4k, &row, 2 * cb, 0, 2 * whole + r * (tl - cb), 0, group, xl, xd,
                              xs, L, nbt, K / 32, a + r);
                }
#pragma GCC unroll 2
            for (int r = 0; r < 1 + paired; r++)
#pragma GCC unroll 8
                for (int m = 0; m < M; m++) {
                    const Acc *ar = both || !paired ? a : a + r;
                    const int i = both ? r * M + m : m;
                    put(y + m * N + n + r, t, hsum(_mm256_add_ps(ar->acc[2 * i], ar->acc[2 * i + 1])));
                }
        }
    }
}

#define INT4_TILED_BY_M(Q4K)                                                                 \
    switch (M) {                                                                             \
    case 1: int4_tiled(1, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 2: int4_tiled(2, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 3: int4_tiled(3, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 4: int4_tiled(4, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 5: int4_tiled(5, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 6: int4_tiled(6, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 7: int4_tiled(7, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    case 8: int4_tiled(8, (Q4K), W, group, X, y, n0, n1, N, K, tile); break;                 \
    }

/* a symmetric 32-block format: one row of x four weight rows at a time (sym_m1), else BY_M */
#define SYM_BY_M(FMT)                                                                        \
    if (M == 1) sym_m1((FMT), W, (const float *)scale, X, x, y, n0, n1, K, rb);               \
    else BY_M(FMT)

static void slab(int fmt, const float *x, const Xq *X, const uint8_t *W, const void *scale,
                 float *y, ptrdiff_t n0, ptrdiff_t n1, int M, ptrdiff_t N,
                 ptrdiff_t K, ptrdiff_t rb, ptrdiff_t group, ptrdiff_t tile) {
    if (fmt == INT4 || fmt == Q4_K) {
        tile = tile ? tile : K;
        if (fmt == Q4_K)
            INT4_TILED_BY_M(1)
        else
            INT4_TILED_BY_M(0)
        return;
    }
    switch (fmt) {
    case Q8_0: SYM_BY_M(Q8_0) break;
    case Q4_0: SYM_BY_M(Q4_0) break;
    case Q6_K: BY_M(Q6_K) break;
    case INT8: SYM_BY_M(INT8) break;
    }
}

/* Rows per slab of a weight of N rows of rb bytes, an even number (int4_tiled takes rows in
 * pairs): ~256 KiB of W, and at least 8 slabs per thread where the weight has the rows (a
 * 640-row weight is 2-3 slabs of 256 KiB: with one thread descheduled by other work on the
 * machine, or a last odd slab, the other would wait for it; small slabs taken in turn let the
 * running thread do the rest). */
static ptrdiff_t slab_rows(ptrdiff_t N, ptrdiff_t rb, int n_threads) {
    ptrdiff_t rows = 262144 / (rb > 0 ? rb : 1), balanced = (N + 8 * n_threads - 1) / (8 * n_threads);
    if (rows > balanced) rows = balanced;
    return rows < 8 ? 8 : rows + (rows & 1); /* even: int4_tiled's pairs of rows stay whole */
}

/* Whether fmt, scale, N, K, group and tile describe a weight quant_gemv takes (see there) */
static int weight_ok(int fmt, const void *scale, int64_t N, int64_t K, int64_t group, int64_t tile) {
    if (fmt < 0 || fmt > 6 || fmt == Q5_0 || N < 0 || K < 0) return 0;
    if (fmt != INT8 && K % BLOCK_WEIGHTS[fmt]) return 0;
    const int64_t per = fmt == INT4 ? group / 32 : 1;
    if (fmt == INT4 && (group < 32 || group % 32 || 8 % per || K % group)) return 0;
    if (tile && ((fmt != INT4 && fmt != Q4_K) || tile < 0 || tile % 256 || group < 1 ||
                 tile % group || K % tile))
        return 0;
    return fmt != INT8 || scale;
}

/* quant_gemv for `count` (<= 8) weights that share x [M, K]: y_i = x @ W_i^T. x is rounded
 * once and every weight's slabs go to the threads in one parallel region (q/k/v, gate/up of a
 * decode step: one wake-up of the threads instead of three). fmts, Ws, scales, ys,
 * Ns, groups, tiles: one entry per weight, as quant_gemv's arguments (tiles may be NULL: none
 * tiled). Returns 0, -1 for bad arguments (nothing written), -2 out of memory. */
int quant_gemv_multi(int count, const int *fmts, const float *x, const uint8_t *const *Ws,
                     const void *const *scales, float *const *ys,
                     const int64_t *Ns, int64_t M, int64_t K, const int64_t *groups,
                     const int64_t *tiles, int n_threads) {
    if (count < 1 || count > 8 || M < 1 || M > 8 || K < 0 || n_threads < 1) return -1;
    ptrdiff_t rb[8], rows[8], first[9];
    first[0] = 0;
    for (int i = 0; i < count; i++) {
        const int fmt = fmts[i];
        if (!weight_ok(fmt, scales[i], Ns[i], K, groups[i], tiles ? tiles[i] : 0)) return -1;
        const ptrdiff_t per = fmt == INT4 ? groups[i] / 32 : 1; /* int4 blocks per group */
        rb[i] = fmt == INT4 ? int4_row_bytes(K / 32, per) : K / BLOCK_WEIGHTS[fmt] * BLOCK_BYTES[fmt];
        /* a tiled weight's slab reads its rows' bytes of each tile in turn */
        const ptrdiff_t tb = tiles && tiles[i] ? held_row_bytes(fmt == Q4_K, tiles[i] / 32, per) : rb[i];
        rows[i] = slab_rows(Ns[i], tb, n_threads);
        first[i + 1] = first[i] + (Ns[i] + rows[i] - 1) / rows[i]; /* slabs before weight i+1 */
    }
    const ptrdiff_t n_slabs = first[count];
    if (n_slabs < n_threads) n_threads = (int)(n_slabs > 0 ? n_slabs : 1);
    const size_t nd = (size_t)(M * (K / 32) + 1);
    int16_t *xq = malloc(2 * (size_t)(M * K) + 64);
    float *xd = malloc(sizeof(float) * 2 * nd);
    if (!xq || !xd) {
        free(xq), free(xd);
        return -2;
    }
    float *xs = xd + nd;
    quantize_x(x, (int)M, K, xq, xd, xs);
    int any_int4 = 0;
    for (int i = 0; i < count; i++) any_int4 |= fmts[i] == INT4 || fmts[i] == Q4_K;
    int16_t *xl = any_int4 ? malloc(2 * (size_t)(M * lane_len(K)) + 64) : NULL;
    if (any_int4 && !xl) {
        free(xq), free(xd);
        return -2;
    }
    if (xl) lane_x(xq, (int)M, K, xl);
    const Xq X = {xq, xl, xd, xs};
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads)
    for (ptrdiff_t c = 0; c < n_slabs; c++) {
        int i = 0;
        while (c >= first[i + 1]) i++;
        const ptrdiff_t n0 = (c - first[i]) * rows[i];
        const ptrdiff_t n1 = n0 + rows[i] < Ns[i] ? n0 + rows[i] : Ns[i];
        slab(fmts[i], x, &X, Ws[i], scales[i], ys[i], n0, n1, (int)M,
             Ns[i], K, rb[i], groups[i], tiles && tiles[i] < K ? tiles[i] : 0);
    }
    free(xq), free(xd), free(xl);
    return 0;
}

/* fmt: the format number; x [M, K] float32; W [N, row bytes] blocks (int4: packed rows,
 * int4_row); scale: int8's float32 [N] (unused by the other formats: NULL);
 * y [M, N]. group: int4's weights per scale (32, 64, 128 or 256). tile: 0, or for int4 the
 * columns per tile (a multiple of 256 and of group dividing K) of a weight held tile by tile
 * (int4_tiled). Returns 0, or -1 for bad arguments (nothing written). */
int quant_gemv(int fmt, const float *x, const uint8_t *W, const void *scale,
               float *y, int64_t M, int64_t N, int64_t K, int64_t group, int64_t tile,
               int n_threads) {
    const uint8_t *Ws[1] = {W};
    const void *scales[1] = {scale};
    float *ys[1] = {y};
    return quant_gemv_multi(1, &fmt, x, Ws, scales, ys, &N, M, K, &group, &tile,
                            n_threads);
}

static int cmp_i64(const void *a, const void *b) {
    const int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

enum { CAND_SPAN = 8192 }; /* entries of y per work item of row_candidates' passes */

/* The entries of row [N] of y that can be its maximum when entry n may be off by at most
 * e[n] = sum_b half[b] l1b[n, b] + slop l1[n] (QuantWeight.exact_top's bound: half a rounding
 * step of x's block b times the L1 norm of W's row n over that block, plus float32 summation
 * slop): those with y + e >= max over n' of (y - e). With the coarse bound c l1[n] >= e[n]
 * (c = max_b half + slop), one pass finds the floor max(y - c l1) <= max(y - e) and a second
 * keeps the superset y + c l1 >= floor (it holds the maximum of y - e); the per-block bound is
 * computed for those alone. Both passes read y and l1 (2 MiB each for a 256k vocabulary, out of
 * cache after a decode step) on nt threads. l1b: float16 [N, nb]. Writes the indices, in
 * order, to out[0 ..) and returns their number, or -1 when there are more than cap coarse
 * candidates (nothing usable written). */
static int64_t row_candidates(const float *row, int64_t N, const float *l1, const uint16_t *l1b,
                              int64_t nb, const float *hm, float slop, int64_t *out, int64_t cap,
                              int nt) {
    float cm = slop;
    for (int64_t b = 0; b < nb; b++) cm = hm[b] + slop > cm ? hm[b] + slop : cm;
    const int64_t spans = (N + CAND_SPAN - 1) / CAND_SPAN;
    const __m256 cv = _mm256_set1_ps(cm);
    float floor = -INFINITY;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(max : floor) if (nt > 1)
    for (int64_t c = 0; c < spans; c++) {
        const int64_t end = (c + 1) * CAND_SPAN < N ? (c + 1) * CAND_SPAN : N;
        __m256 mv = _mm256_set1_ps(-INFINITY);
        int64_t n = c * CAND_SPAN;
        for (; n + 8 <= end; n += 8)
            mv = _mm256_max_ps(mv, _mm256_fnmadd_ps(cv, _mm256_loadu_ps(l1 + n), _mm256_loadu_ps(row + n)));
        float f = hmax8(mv);
        for (; n < end; n++) f = row[n] - cm * l1[n] > f ? row[n] - cm * l1[n] : f;
        floor = f > floor ? f : floor;
    }
    int64_t k = 0;
    const __m256 fv = _mm256_set1_ps(floor);
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t c = 0; c < spans; c++) {
        const int64_t end = (c + 1) * CAND_SPAN < N ? (c + 1) * CAND_SPAN : N;
        int64_t got[64], g = 0, n = c * CAND_SPAN; /* this span's, flushed to out 64 at a time */
        for (;;) {
            int full = 0;
            for (; n + 8 <= end && !full; n += 8) {
                __m256 hi = _mm256_fmadd_ps(cv, _mm256_loadu_ps(l1 + n), _mm256_loadu_ps(row + n));
                for (int mask = _mm256_movemask_ps(_mm256_cmp_ps(hi, fv, _CMP_GE_OQ)); mask; mask &= mask - 1)
                    got[g++] = n + __builtin_ctz(mask);
                full = g > 56;
            }
            for (; n < end && !full && n + 8 > end; n++)
                if (row[n] + cm * l1[n] >= floor) got[g++] = n;
            int64_t at;
#pragma omp atomic capture
            {
                at = k;
                k += g;
            }
            for (int64_t i = 0; i < g && at + i < cap; i++) out[at + i] = got[i];
            g = 0;
            if (n >= end) break;
        }
    }
    if (k > cap) return -1;
    qsort(out, (size_t)k, sizeof(int64_t), cmp_i64);
    /* the per-block bound of the coarse candidates, then those that can still be the max */
    float best = -INFINITY;
    for (int64_t i = 0; i < k; i++) {
        const uint16_t *lb = l1b + out[i] * nb;
        float e = slop * l1[out[i]];
        for (int64_t b = 0; b < nb; b++) e += hm[b] * _cvtsh_ss(lb[b]);
        const float lo = row[out[i]] - e;
        best = lo > best ? lo : best;
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < k; i++) {
        const uint16_t *lb = l1b + out[i] * nb;
        float e = slop * l1[out[i]];
        for (int64_t b = 0; b < nb; b++) e += hm[b] * _cvtsh_ss(lb[b]);
        if (row[out[i]] + e >= best) out[kept++] = out[i];
    }
    return kept;
}

/* row_candidates of each row m of y [M, N] (half [M, nb], slop [M]): the indices to
 * idx[m * cap ...], their number to count[m]. Returns 0, -1 for bad arguments, -3 when a row
 * has more than cap coarse candidates (nothing usable written). */
int quant_candidates(const float *y, int64_t M, int64_t N, const float *l1, const uint16_t *l1b,
                     int64_t nb, const float *half, const float *slop, int64_t *idx,
                     int64_t *count, int64_t cap, int n_threads) {
    if (M < 0 || N < 1 || nb < 0 || cap < 1 || n_threads < 1) return -1;
    int over = 0;
    if (M == 1) { /* one row: its passes on the threads (no enclosing region: not nested) */
        const int64_t k = row_candidates(y, N, l1, l1b, nb, half, slop[0], idx, cap, n_threads);
        count[0] = k < 0 ? 0 : k;
        return k < 0 ? -3 : 0;
    }
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(| : over)
    for (int64_t m = 0; m < M; m++) {
        const int64_t k = row_candidates(y + m * N, N, l1, l1b, nb, half + m * nb, slop[m], idx + m * cap, cap, 1);
        over |= k < 0;
        count[m] = k < 0 ? 0 : k;
    }
    return over ? -3 : 0;
}

/* One int4 or Q4_K chunk of nblk blocks (its nibbles in lane order, formats.lane_order, then
 * its values) dequantized to out[32 * nblk] in row order: int4 w = d q + m per group of per
 * blocks (scales and minimums float16), Q4_K w = (d sc) q - dmin mn per sub-block (its 16
 * bytes as the file has them: formats._q4_k_scales). Products of a float16 and a small
 * integer are exact in float32, so the one rounding is formats.dequantize's. */
static void held_chunk(int q4k, const uint8_t *c, int nblk, int per, float *out) {
    float d[8], m[8];
    const uint8_t *v = c + 16 * nblk;
    if (q4k) {
        const float sd = f16(v), sm = f16(v + 2);
        const uint8_t *s = v + 4; /* d bytes 0-3, m bytes 4-7, md bytes 8-11 */
        for (int j = 0; j < 8; j++) {
            const int sc = j < 4 ? s[j] & 0x3F : (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
            const int mn = j < 4 ? s[j + 4] & 0x3F : (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
            d[j] = sd * (float)sc, m[j] = -(sm * (float)mn);
        }
    } else {
        const int g = nblk / per; /* the chunk's groups: scales, then as many minimums */
        for (int j = 0; j < nblk; j++) d[j] = f16(v + 2 * (j / per)), m[j] = f16(v + 2 * g + 2 * (j / per));
    }
    for (int l = 0; l < nblk; l++)
        for (int b = 0; b < 16; b++) {
            const uint8_t q = c[4 * nblk * (b / 4) + 4 * l + b % 4]; /* byte b of block l */
            out[32 * l + b] = (float)(q & 0x0F) * d[l] + m[l];
            out[32 * l + b + 16] = (float)(q >> 4) * d[l] + m[l];
        }
}

/* One block of 32 (Q8_0, Q4_0) or 256 (Q6_K) weights of a row-layout format,
 * dequantized to out as formats.dequantize computes it (the same float32 operations). */
static void row_block(int fmt, const uint8_t *b, float *out) {
    if (fmt == Q6_K) { /* 128 bytes of low 4 bits, 64 of high 2 bits, 16 int8 scales, d */
        const float d = f16(b + 208);
        for (int h = 0; h < 2; h++)
            for (int g = 0; g < 4; g++)
                for (int e = 0; e < 32; e++) {
                    const uint8_t ql = b[64 * h + 32 * (g & 1) + e];
                    const int lo = g < 2 ? ql & 0x0F : ql >> 4;
                    const int q = lo | ((b[128 + 32 * h + e] >> (2 * g)) & 3) << 4;
                    const int w = 128 * h + 32 * g + e;
                    out[w] = d * (float)(int8_t)b[192 + w / 16] * (float)(q - 32);
                }
        return;
    }
    const float d = f16(b);
    for (int i = 0; i < 32; i++) {
        int q;
        if (fmt == Q8_0)
            q = (int8_t)b[2 + i];
        else /* Q4_0 */
            q = (i < 16 ? b[2 + i] & 0x0F : b[2 + i - 16] >> 4) - 8;
        out[i] = (float)q * d;
    }
}

/* Row n of a quantized W [N, K] as quant_gemv takes it (held int4 and Q4_K: int4_tiled's
 * layout), dequantized to o[K] as formats.dequantize computes it */
static void dequant_row(int fmt, const uint8_t *W, const float *scale, int64_t N, int64_t K,
                        int64_t group, int64_t tile, int64_t n, float *o) {
    if (fmt == INT8) {
        for (int64_t k = 0; k < K; k++) o[k] = (float)(int8_t)W[n * K + k] * scale[n];
        return;
    }
    if (fmt != INT4 && fmt != Q4_K) {
        const int64_t bw = BLOCK_WEIGHTS[fmt], bb = BLOCK_BYTES[fmt];
        for (int64_t j = 0; j < K / bw; j++) row_block(fmt, W + (n * (K / bw) + j) * bb, o + j * bw);
        return;
    }
    const int q4k = fmt == Q4_K, per = fmt == INT4 ? (int)(group / 32) : 1;
    const ptrdiff_t tk = tile ? tile : K, nbt = tk / 32, whole = nbt / 8;
    const ptrdiff_t tb = held_row_bytes(q4k, nbt, per), cb = held_row_bytes(q4k, 8, per);
    const int paired = n < N - N % 2, r = (int)(n % 2);
    for (int64_t t = 0; t < K / tk; t++) {
        const uint8_t *base = W + t * N * tb;
        /* rows 2p and 2p + 1 chunk by chunk, then their tails; an odd last row as it is */
        const uint8_t *row = paired ? base + (n - r) * tb + r * cb : base + n * tb;
        const ptrdiff_t cs = paired ? 2 * cb : cb;
        const uint8_t *tail = paired ? base + (n - r) * tb + 2 * cb * whole + r * (tb - cb * whole)
                                     : base + n * tb + cb * whole;
        for (ptrdiff_t c = 0; c < whole; c++) held_chunk(q4k, row + c * cs, 8, per, o + t * tk + 256 * c);
        if (nbt % 8) held_chunk(0, tail, (int)(nbt % 8), per, o + t * tk + 256 * whole);
    }
}

/* Rows idx[0 .. count) of a quantized W [N, K] (as quant_gemv takes it; scale: int8's float32
 * [N]) dequantized to out [count, K] float32, equal to formats.dequantize of those rows: an
 * embedding lookup in one call where the torch way (gathers and reshapes of the held layout)
 * takes ~0.5 ms a row. A negative index counts from the end. Returns 0, -1 for bad arguments,
 * -2 for an index out of range (nothing written). */
int quant_rows(int fmt, const uint8_t *W, const float *scale, int64_t N, int64_t K,
               int64_t group, int64_t tile, const int64_t *idx, int64_t count, float *out) {
    if (!weight_ok(fmt, scale, N, K, group, tile) || count < 0) return -1;
    for (int64_t i = 0; i < count; i++)
        if (idx[i] < -N || idx[i] >= N) return -2;
    for (int64_t i = 0; i < count; i++)
        dequant_row(fmt, W, scale, N, K, group, tile, idx[i] < 0 ? idx[i] + N : idx[i], out + i * K);
    return 0;
}

/* Half the int16 rounding step of each whole block b of 32 in x [K] (quantize_x's step:
 * selftest.activation_steps), to half[b] unless half is NULL; returns the largest of them, and
 * max |x| over all of x to *amax */
static float x_half_steps(const float *xm, int64_t K, float *half, float *amax) {
    float hmax = 0.0f, m = 0.0f;
    for (int64_t b = 0; b < K / 32; b++) {
        __m256 v[4];
        const float a = block_absmax(xm + 32 * b, v), h = a / X_LEVELS / 2.0f;
        if (half) half[b] = h;
        hmax = h > hmax ? h : hmax;
        m = a > m ? a : m;
    }
    for (int64_t k = 32 * (K / 32); k < K; k++) m = fabsf(xm[k]) > m ? fabsf(xm[k]) : m;
    *amax = m;
    return hmax;
}

/* quant_exact_top of one row: x [K], y [N] (row_candidates on nt threads). Returns 0, or -2
 * out of memory (nothing written). */
static int exact_row(int fmt, const uint8_t *W, const float *scale, int64_t N, int64_t K,
                     int64_t group, int64_t tile, const float *xm, float *row, const float *l1,
                     const uint16_t *l1b, float softcap, int nt) {
    const int64_t nb = K / 32;
    float *half = malloc(sizeof(float) * (size_t)(nb + K + 1));
    int64_t *cand = malloc(sizeof(int64_t) * (size_t)N);
    if (!half || !cand) {
        free(half), free(cand);
        return -2;
    }
    float *w = half + nb, amax;
    x_half_steps(xm, K, half, &amax);
    const int64_t kept = row_candidates(row, N, l1, l1b, nb, half, 1e-5f * amax + 1e-6f, cand, N, nt);
    for (int64_t i = 0; i < kept; i++) {
        dequant_row(fmt, W, scale, N, K, group, tile, cand[i], w);
        double dot = 0.0;
        for (int64_t k = 0; k < K; k++) dot += (double)w[k] * (double)xm[k];
        const float e = (float)dot;
        row[cand[i]] = softcap > 0.0f ? tanhf(e / softcap) * softcap : e;
    }
    free(half), free(cand);
    return 0;
}

/* QuantWeight.exact_top in one call: for each row m of y [M, N] = the kernel's x [M, K] @ W^T
 * (soft-capped at softcap > 0, else 0), the entries that could be the row's maximum under the
 * kernel's error bound (row_candidates, with half a rounding step of each block of x and
 * slop = 1e-5 max|x| + 1e-6: selftest.error_bound) are recomputed from the unrounded x and
 * the dequantized rows (dequant_row, summed in double), in place. l1 [N], l1b float16 [N, nb]:
 * QuantWeight.block_l1. Returns 0, -1 for bad arguments, -2 out of memory (nothing
 * written). */
int quant_exact_top(int fmt, const uint8_t *W, const float *scale, int64_t N, int64_t K,
                    int64_t group, int64_t tile, const float *x, float *y, int64_t M,
                    const float *l1, const uint16_t *l1b, float softcap, int n_threads) {
    if (!weight_ok(fmt, scale, N, K, group, tile) || M < 0 || N < 1 || n_threads < 1) return -1;
    if (M == 1) return exact_row(fmt, W, scale, N, K, group, tile, x, y, l1, l1b, softcap, n_threads);
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(| : failed)
    for (int64_t m = 0; m < M; m++)
        failed |= exact_row(fmt, W, scale, N, K, group, tile, x + m * K, y + m * N, l1, l1b, softcap, 1);
    return failed ? -2 : 0;
}

/* plain_exact_top of one row: x [K], y [N] (row_candidates on nt threads). Returns 0, or -2
 * out of memory (nothing written). */
static int plain_row(const void *table, int bf16, int64_t N, int64_t K, const float *xm,
                     float *row, const float *l1, const float *d2, float softcap, int nt) {
    float *e = malloc(sizeof(float) * (size_t)N);
    int64_t *cand = malloc(sizeof(int64_t) * (size_t)N);
    if (!e || !cand) {
        free(e), free(cand);
        return -2;
    }
    float amax;
    const float hmax = x_half_steps(xm, K, NULL, &amax);
    double ss = 0.0;
    for (int64_t k = 0; k < K; k++) ss += (double)xm[k] * (double)xm[k];
    /* e[n] = a l1[n] + b d2[n]: the coarse kernel's rounding of x and its float32 slop
     * (exact_row's bound, with the largest half-step of any block), plus |x . (W - Wq)| <=
     * |x|_2 |W[n] - Wq[n]|_2 (Cauchy-Schwarz), each rounded up */
    const float a = (hmax + 1e-5f * amax + 1e-6f) * (1.0f + 1e-6f);
    const float b = (float)(sqrt(ss) * (1.0 + 1e-6));
#pragma omp parallel for schedule(static) num_threads(nt) if (nt > 1)
    for (int64_t n = 0; n < N; n++) e[n] = (a * l1[n] + b * d2[n]) * (1.0f + 1e-6f);
    const int64_t kept = row_candidates(row, N, e, NULL, 0, NULL, 1.0f, cand, N, nt);
    for (int64_t i = 0; i < kept; i++) {
        double dot = 0.0;
        if (bf16) {
            const uint16_t *w = (const uint16_t *)table + cand[i] * K;
            for (int64_t k = 0; k < K; k++) {
                uint32_t bits = (uint32_t)w[k] << 16;
                float f;
                memcpy(&f, &bits, sizeof f);
                dot += (double)f * (double)xm[k];
            }
        } else {
            const float *w = (const float *)table + cand[i] * K;
            for (int64_t k = 0; k < K; k++) dot += (double)w[k] * (double)xm[k];
        }
        const float v = (float)dot;
        row[cand[i]] = softcap > 0.0f ? tanhf(v / softcap) * softcap : v;
    }
    free(e), free(cand);
    return 0;
}

/* The coarse greedy head (gemmakit/model/coarse_head.py): y [M, N] holds the int8 kernel's
 * x [M, K] @ Wq^T for an int8 copy Wq of a plain float32 (bf16 = 0) or bfloat16 (bf16 = 1)
 * table W [N, K] (soft-capped at softcap > 0); every entry that could be its row's maximum of
 * x @ W^T, given l1 [N] (Wq's row L1 norms, QuantWeight.block_l1) and d2 [N] (|W[n] - Wq[n]|_2),
 * is recomputed from W's row in double, in place: the row's argmax is that of x @ W^T. Returns
 * 0, -1 for bad arguments, -2 out of memory (nothing written). */
int plain_exact_top(const void *table, int bf16, int64_t N, int64_t K, const float *x, float *y,
                    int64_t M, const float *l1, const float *d2, float softcap, int n_threads) {
    if (!table || N < 1 || K < 1 || M < 0 || n_threads < 1 || (bf16 != 0 && bf16 != 1)) return -1;
    if (M == 1) return plain_row(table, bf16, N, K, x, y, l1, d2, softcap, n_threads);
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(n_threads) reduction(| : failed)
    for (int64_t m = 0; m < M; m++)
        failed |= plain_row(table, bf16, N, K, x + m * K, y + m * N, l1, d2, softcap, 1);
    return failed ? -2 : 0;
}

/* The coarse head's int8 copy of a plain float32 (bf16 = 0) or bfloat16 (bf16 = 1) table
 * W [N, K], in one pass: per row n, scale[n] = max|W[n]| / 127 (1 for a zero row), q[n, k] =
 * round(W[n, k] / scale[n]) (to nearest even, in [-127, 127]: formats.quantize_int8), and its
 * bounds, rounded up by x (1 + 2^-10): l1[n] = sum_k |q scale|, d2[n] = |W[n] - q scale|_2.
 * Returns 0, or -1 for bad arguments. */
int int8_copy(const void *table, int bf16, int64_t N, int64_t K, int8_t *q, float *scale,
              float *l1, float *d2, int n_threads) {
    if (!table || N < 1 || K < 1 || n_threads < 1 || (bf16 != 0 && bf16 != 1)) return -1;
#pragma omp parallel num_threads(n_threads)
    {
        float *w = malloc(sizeof(float) * (size_t)K);
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            float amax = 0.0f;
            for (int64_t k = 0; k < K; k++) {
                if (bf16) {
                    const uint32_t bits = (uint32_t)((const uint16_t *)table)[n * K + k] << 16;
                    memcpy(w + k, &bits, sizeof(float));
                } else {
                    w[k] = ((const float *)table)[n * K + k];
                }
                amax = fabsf(w[k]) > amax ? fabsf(w[k]) : amax;
            }
            float s = amax / 127.0f;
            s = s > 0.0f ? s : 1.0f;
            double a = 0.0, e = 0.0;
            for (int64_t k = 0; k < K; k++) {
                float r = nearbyintf(w[k] / s);
                r = r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r;
                q[n * K + k] = (int8_t)r;
                const float v = r * s;
                a += fabs((double)v);
                e += ((double)w[k] - v) * ((double)w[k] - v);
            }
            scale[n] = s;
            l1[n] = (float)a * (1.0f + 0x1p-10f);
            d2[n] = (float)sqrt(e) * (1.0f + 0x1p-10f);
        }
        free(w);
    }
    return 0;
}
