/* One decode step of a whole Gemma stack in one call: M <= 16 sequences, one new token each,
 * against a preallocated KV cache. The same math as gemmakit/model/ (embedding scale, RMSNorm
 * with 1 + w, q/k norm, rotate-half RoPE from precomputed tables, multi-query / grouped /
 * multi-head attention with optional soft-capping and a sliding window, gelu_tanh gating,
 * sandwich norms, tied output projection), with activations in float32.
 *
 * Python would spend a fifth of a small model's step between torch ops; here the only
 * per-token Python is the call itself (and the embedding lookup before it). Every matrix
 * product goes through a GEMV function pointer: bf16_gemv / f32_gemv of bf16_gemv.c, or
 * quant_gemv of quant_gemv.c for a weight kept in its quantized blocks, each opening its own
 * OpenMP region; attention runs one (sequence, head) pair per work item.
 *
 * Build: cc -O3 -mavx2 -mfma -mf16c -fopenmp -shared -fPIC decode_step.c -lm
 */
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "vmath.h"

typedef int (*gemv_fn)(const float *x, const void *W, float *y, int64_t M, int64_t N, int64_t K,
                       int n_threads);
typedef int (*quant_fn)(int fmt, const float *x, const uint8_t *W, const void *scale,
                        float *y, int64_t M, int64_t N, int64_t K,
                        int64_t group, int64_t tile, int n_threads);

typedef int (*multi_fn)(int count, const int *fmts, const float *x, const uint8_t *const *Ws,
                        const void *const *scales, float *const *ys,
                        const int64_t *Ns, int64_t M, int64_t K, const int64_t *groups,
                        const int64_t *tiles, int n_threads);

/* One weight [N, K]: plain (float32 / bf16 through `plain`) or quantized (through `quant`;
 * tile: an int4 weight held in tiles of that many columns, else 0). */
typedef struct {
    const void *data, *scale;
    gemv_fn plain;
    quant_fn quant;
    int64_t fmt, group, tile;
} Weight;

enum { MAX_ROWS = 16, GEMV_ROWS = 8 }; /* sequences per step; the GEMV kernels' largest M */

enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN, N_WEIGHTS };
enum { N_ATTN, N_POST_ATTN, N_MLP, N_POST_MLP, N_QNORM, N_KNORM, N_NORMS };

/* The model, mirrored by gemmakit/kernels/decode_step.py (field order matters). */
typedef struct {
    int64_t n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_dim, vocab;
    int64_t window;    /* sliding window of local layers; 0: none */
    int64_t rope_rows; /* rows of each cos/sin table */
    float norm_eps, query_scale, attn_softcap, final_softcap; /* softcap 0: none */
    int32_t bf16; /* 1: the KV cache is bfloat16, else float32 */
    const uint8_t *is_local;     /* [L] */
    const Weight *weights;       /* [L * N_WEIGHTS] */
    const float *const *norms;   /* [L * N_NORMS]: 1 + w in float32; NULL where absent */
    const float *final_norm;     /* [D]: 1 + w */
    const Weight *embed;         /* [V, D], the tied output projection */
    const float *cos_global, *sin_global, *cos_local, *sin_local; /* [rope_rows, head_dim] */
    multi_fn quant_multi; /* quant_gemv_multi, or NULL: quantized weights one call each */
} Model;

/* y_i [M, N_i] = x [M, K] @ W_i^T for `count` (<= 8) weights sharing x (q/k/v, gate/up; one
 * for the others), M <= MAX_ROWS, in pieces of at most GEMV_ROWS rows of x (the GEMV kernels'
 * largest M): one quant_gemv_multi call per piece (x rounded once, one parallel region) when
 * every weight is quantized, else one GEMV per weight. */
static int matvecs(const Model *md, const Weight *w, int count, const float *x, float *const *ys,
                   const int64_t *Ns, int64_t M, int64_t K, int n_threads) {
    int all_quant = md->quant_multi != NULL;
    int fmts[8];
    const uint8_t *Ws[8];
    const void *scales[8];
    int64_t groups[8], tiles[8];
    for (int i = 0; i < count; i++) {
        all_quant = all_quant && w[i].quant != NULL;
        fmts[i] = (int)w[i].fmt, Ws[i] = (const uint8_t *)w[i].data;
        scales[i] = w[i].scale, groups[i] = w[i].group;
        tiles[i] = w[i].tile;
    }
    for (int64_t m0 = 0; m0 < M; m0 += GEMV_ROWS) {
        const int64_t m = M - m0 < GEMV_ROWS ? M - m0 : GEMV_ROWS;
        const float *xm = x + m0 * K;
        float *yc[8];
        for (int i = 0; i < count; i++) yc[i] = ys[i] + m0 * Ns[i];
        if (all_quant) {
            int rc = md->quant_multi(count, fmts, xm, Ws, scales, yc, Ns, m, K, groups,
                                     tiles, n_threads);
            if (rc != 0) return rc;
            continue;
        }
        for (int i = 0; i < count; i++) {
            int rc = w[i].quant ? w[i].quant(fmts[i], xm, Ws[i], scales[i], yc[i], m,
                                             Ns[i], K, groups[i], tiles[i], n_threads)
                                : w[i].plain(xm, w[i].data, yc[i], m, Ns[i], K, n_threads);
            if (rc != 0) return rc;
        }
    }
    return 0;
}

/* y [M, N] = x [M, K] @ W^T: matvecs of one weight */
static int matvec(const Model *md, const Weight *w, const float *x, float *y, int64_t M,
                  int64_t N, int64_t K, int n_threads) {
    return matvecs(md, w, 1, x, &y, &N, M, K, n_threads);
}

static float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float32 -> bfloat16 conversion (no NaNs here). */
static uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

/* y = x * rsqrt(mean(x^2) + eps) * scale, over n values (y may be x). */
static void rms_norm(const float *x, const float *scale, float *y, int64_t n, float eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float r = 1.0f / sqrtf((float)(ss / n) + eps);
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * r * scale[i];
}

/* Rotate-half RoPE of one head x [H] by the table rows cos, sin [H]. */
static void rope(float *x, const float *c, const float *s, int64_t H) {
    int64_t h = H / 2;
    for (int64_t i = 0; i < h; i++) {
        float a = x[i], b = x[i + h];
        x[i] = a * c[i] - b * s[i];
        x[i + h] = b * c[i + h] + a * s[i + h];
    }
}

/* gate[i] = gelu(gate[i]) * up[i] for i < n (vmath.h's gelu8, the tail one by one) */
static void gelu_mul(float *gate, const float *up, int64_t n, int n_threads) {
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n >= 16384)
    for (int64_t i = 0; i < n8; i += 8) {
        __m256 t;
        const __m256 g = gelu8(_mm256_loadu_ps(gate + i), &t);
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(g, _mm256_loadu_ps(up + i)));
    }
    for (int64_t i = n8; i < n; i++) {
        float t;
        gate[i] = gelu1(gate[i], &t) * up[i];
    }
}

/* x[i] = tanh(x[i] / c) * c for i < n (vmath.h's softcap8, the tail one by one) */
static void softcap(float *x, int64_t n, float c, int n_threads) {
    const int64_t n8 = n / 8 * 8;
#pragma omp parallel for schedule(static) num_threads(n_threads) if (n >= 16384)
    for (int64_t i = 0; i < n8; i += 8) _mm256_storeu_ps(x + i, softcap8(_mm256_loadu_ps(x + i), c));
    for (int64_t i = n8; i < n; i++) x[i] = tanhf(x[i] / c) * c;
}

/* 8 cache values from element i (bf16 bits or float32), widened to float32. */
static inline __attribute__((always_inline)) __m256 load8(const void *p, int64_t i, int bf16) {
    if (bf16) {
        __m128i raw = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    }
    return _mm256_loadu_ps((const float *)p + i);
}

static inline __attribute__((always_inline)) float load1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* dot(q [n], k [n]) for a cache row k (bf16 or float32). */
static inline __attribute__((always_inline)) float dot(const float *q, const void *k, int64_t n,
                                                       int bf16) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k, i, bf16), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k, i + 8, bf16), a1);
    }
    float d = hsum(_mm256_add_ps(a0, a1));
    for (; i < n; i++) d += q[i] * load1(k, i, bf16);
    return d;
}

/* out [n] += p * v [n] for a cache row v (bf16 or float32). */
static inline __attribute__((always_inline)) void axpy(float *out, float p, const void *v,
                                                       int64_t n, int bf16) {
    __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v, i, bf16), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += p * load1(v, i, bf16);
}

/* Attention of query head n of sequence m over cache positions [0, S), written to out [H]. */
static void attend(const Model *md, const float *q, const void *kc, const void *vc,
                   const uint8_t *valid, int64_t max_len, int64_t S, int local, float *scores,
                   float *out) {
    const int64_t H = md->head_dim;
    int64_t first = 0;
    if (local && md->window > 0 && S > md->window) first = S - md->window;
    float mx = -INFINITY;
    for (int64_t s = first; s < S; s++) {
        /* left padding is masked; the new token always sees itself */
        if (!valid[s] && s != S - 1) {
            scores[s] = -INFINITY;
            continue;
        }
        const size_t row = (size_t)s * H * (md->bf16 ? 2 : 4);
        float d = md->bf16 ? dot(q, (const char *)kc + row, H, 1) : dot(q, (const char *)kc + row, H, 0);
        d *= md->query_scale;
        if (md->attn_softcap > 0.0f) d = tanhf(d / md->attn_softcap) * md->attn_softcap;
        scores[s] = d;
        if (d > mx) mx = d;
    }
    float total = 0.0f;
    for (int64_t s = first; s < S; s++) {
        float p = scores[s] == -INFINITY ? 0.0f : expf(scores[s] - mx);
        scores[s] = p;
        total += p;
    }
    for (int64_t i = 0; i < H; i++) out[i] = 0.0f;
    for (int64_t s = first; s < S; s++) {
        float p = scores[s] / total;
        if (p == 0.0f) continue;
        const void *vr = (const char *)vc + (size_t)s * H * (md->bf16 ? 2 : 4);
        if (md->bf16)
            axpy(out, p, vr, H, 1);
        else
            axpy(out, p, vr, H, 0);
    }
    (void)max_len;
}

/* Floats of scratch memory a step of M sequences needs with a cache of max_len positions
 * (decode_step.py computes the same). */
static int64_t decode_scratch_floats(const Model *md, int64_t M, int64_t max_len) {
    int64_t D = md->d_model, NH = md->n_heads * md->head_dim, KH = md->n_kv_heads * md->head_dim;
    return M * (3 * D + 2 * NH + 2 * KH + 2 * md->ffn_dim + md->n_heads * max_len);
}

/* One step: the scaled embeddings x_in [M, D] float32 of M new tokens at RoPE positions [M], written at cache index `length` of every row
 * of the caches k_cache[l], v_cache[l] ([B, Nkv, max_len, H], M == B, bf16 or float32 as
 * md->bf16), key_valid [M, max_len] (0: left padding). logits [M, V] float32.
 * Returns 0, or a negative code for bad arguments (-1 sizes, -2 a position past the RoPE
 * tables, -3 too little scratch, -4 a GEMV refused its shapes). */
int decode_step(const Model *md, const float *x_in, const int64_t *positions, int64_t M,
                void *const *k_cache, void *const *v_cache, int64_t max_len, int64_t length,
                const uint8_t *key_valid, float *logits, float *scratch, int64_t scratch_floats,
                int n_threads) {
    const int64_t D = md->d_model, N = md->n_heads, K = md->n_kv_heads, H = md->head_dim;
    const int64_t F = md->ffn_dim, G = N / K, S = length + 1;
    if (M < 1 || M > MAX_ROWS || length < 0 || S > max_len || N % K != 0 || n_threads < 1) return -1;
    if (scratch_floats < decode_scratch_floats(md, M, max_len)) return -3;
    for (int64_t m = 0; m < M; m++) {
        if (positions[m] < 0 || positions[m] >= md->rope_rows) return -2;
    }
    const size_t kv_size = md->bf16 ? 2 : 4;
    float *x = scratch, *xn = x + M * D, *h = xn + M * D;
    float *q = h + M * D, *att = q + M * N * H, *k = att + M * N * H, *v = k + M * K * H;
    float *gate = v + M * K * H, *up = gate + M * F, *scores = up + M * F;

    memcpy(x, x_in, (size_t)(M * D) * sizeof(float));
#define GEMV(j, in, out, rows, cols)                                                             \
    do {                                                                                     \
        if (matvec(md, md->weights + l * N_WEIGHTS + (j), in, out, M, rows, cols, n_threads) != 0) \
            return -4;                                                                       \
    } while (0)

    for (int64_t l = 0; l < md->n_layers; l++) {
        const float *const *nw = md->norms + l * N_NORMS;
        const int local = md->is_local[l];
        const float *ct = local ? md->cos_local : md->cos_global;
        const float *st = local ? md->sin_local : md->sin_global;

        for (int64_t m = 0; m < M; m++) rms_norm(x + m * D, nw[N_ATTN], xn + m * D, D, md->norm_eps);
        {
            float *ys[3] = {q, k, v};
            const int64_t ns[3] = {N * H, K * H, K * H};
            if (matvecs(md, md->weights + l * N_WEIGHTS + W_Q, 3, xn, ys, ns, M, D, n_threads))
                return -4;
        }
        for (int64_t m = 0; m < M; m++) {
            const float *c = ct + positions[m] * H, *s = st + positions[m] * H;
            for (int64_t n = 0; n < N; n++) {
                float *qh = q + (m * N + n) * H;
                if (nw[N_QNORM]) rms_norm(qh, nw[N_QNORM], qh, H, md->norm_eps);
                rope(qh, c, s, H);
            }
            for (int64_t n = 0; n < K; n++) {
                float *kh = k + (m * K + n) * H, *vh = v + (m * K + n) * H;
                if (nw[N_KNORM]) rms_norm(kh, nw[N_KNORM], kh, H, md->norm_eps);
                rope(kh, c, s, H);
                size_t at = ((size_t)(m * K + n) * max_len + length) * H;
                if (md->bf16) {
                    uint16_t *kd = (uint16_t *)k_cache[l] + at, *vd = (uint16_t *)v_cache[l] + at;
                    for (int64_t i = 0; i < H; i++) kd[i] = float_to_bf16(kh[i]);
                    for (int64_t i = 0; i < H; i++) vd[i] = float_to_bf16(vh[i]);
                } else {
                    memcpy((float *)k_cache[l] + at, kh, H * sizeof(float));
                    memcpy((float *)v_cache[l] + at, vh, H * sizeof(float));
                }
            }
        }
        /* a parallel region costs a wake-up of every thread: only when there is real work
         * (long contexts), not for a small model's few heads over a short cache */
        const int big = M * N > 1 && M * N * S * H >= (1 << 18);
#pragma omp parallel for schedule(dynamic, 1) num_threads(n_threads) if (big)
        for (int64_t mn = 0; mn < M * N; mn++) {
            int64_t m = mn / N, n = mn % N, kvh = n / G;
            size_t base = (size_t)(m * K + kvh) * max_len * H * kv_size;
            attend(md, q + mn * H, (const char *)k_cache[l] + base,
                   (const char *)v_cache[l] + base, key_valid + m * max_len, max_len, S, local,
                   scores + mn * max_len, att + mn * H);
        }
        GEMV(W_O, att, h, D, N * H);
        for (int64_t m = 0; m < M; m++) {
            if (nw[N_POST_ATTN]) rms_norm(h + m * D, nw[N_POST_ATTN], h + m * D, D, md->norm_eps);
            for (int64_t i = 0; i < D; i++) x[m * D + i] += h[m * D + i];
            rms_norm(x + m * D, nw[N_MLP], xn + m * D, D, md->norm_eps);
        }
        {
            float *ys[2] = {gate, up};
            const int64_t ns[2] = {F, F};
            if (matvecs(md, md->weights + l * N_WEIGHTS + W_GATE, 2, xn, ys, ns, M, D, n_threads))
                return -4;
        }
        gelu_mul(gate, up, M * F, n_threads);
        GEMV(W_DOWN, gate, h, D, F);
        for (int64_t m = 0; m < M; m++) {
            if (nw[N_POST_MLP]) rms_norm(h + m * D, nw[N_POST_MLP], h + m * D, D, md->norm_eps);
            for (int64_t i = 0; i < D; i++) x[m * D + i] += h[m * D + i];
        }
    }
#undef GEMV
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * D, md->final_norm, xn + m * D, D, md->norm_eps);
    if (matvec(md, md->embed, xn, logits, M, md->vocab, D, n_threads) != 0) return -4;
    if (md->final_softcap > 0.0f) softcap(logits, M * md->vocab, md->final_softcap, n_threads);
    return 0;
}
