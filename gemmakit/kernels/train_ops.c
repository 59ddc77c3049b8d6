/* Fused float32 CPU kernels for the elementwise parts of a training step: RMSNorm and the
 * GELU-gated product of Gemma's MLP, forward and backward.
 *
 * In eager PyTorch each of these is 5 to 10 separate passes over the activations (pow, mean,
 * rsqrt, mul, ... and as many again in autograd's backward), each a full trip through memory
 * and an OpenMP fork/join. Here each is one pass per direction, with AVX2/FMA and OpenMP over
 * rows or blocks; the caller passes torch's thread count.
 *
 * Numerics: float32 throughout, as torch's float32 path; sums are taken in a different order,
 * and tanh comes from an exp with ~1 ulp error, so results agree with torch to float32
 * rounding (a few 1e-7 relative), not bit for bit.
 *
 * Build: cc -O3 -mavx2 -mfma -fopenmp -shared -fPIC train_ops.c
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

#include "vmath.h"

INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ---- RMSNorm: y = x * rstd * (1 + w), rstd = 1 / sqrt(mean(x^2) + eps), per row of d ----- */

int rmsnorm_fwd(const float *x, const float *w, float *y, float *rstd, int64_t n, int64_t d,
                float eps, int threads) {
    if (n < 0 || d <= 0) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        const float *xr = x + i * d;
        float *yr = y + i * d;
        __m256 acc = _mm256_setzero_ps();
        int64_t k = 0;
        for (; k + 8 <= d; k += 8) {
            __m256 v = _mm256_loadu_ps(xr + k);
            acc = _mm256_fmadd_ps(v, v, acc);
        }
        float ss = hsum8(acc);
        for (; k < d; k++) ss += xr[k] * xr[k];
        float r = 1.0f / sqrtf(ss / (float)d + eps);
        rstd[i] = r;
        __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(1.0f);
        for (k = 0; k + 8 <= d; k += 8) {
            __m256 s = _mm256_add_ps(one, _mm256_loadu_ps(w + k));
            _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), rv), s));
        }
        for (; k < d; k++) yr[k] = xr[k] * r * (1.0f + w[k]);
    }
    return 0;
}

/* With xh = x * rstd and gs = g * (1 + w):
 *   gx = rstd * (gs - xh * mean(gs * xh)),   gw = sum over rows of g * xh.
 * gw_parts holds `threads` rows of d partial sums (one per thread, no atomics); the caller
 * adds them up. */
int rmsnorm_bwd(const float *g, const float *x, const float *w, const float *rstd, float *gx,
                float *gw_parts, int64_t n, int64_t d, int threads) {
    if (n < 0 || d <= 0) return 1;
    memset(gw_parts, 0, sizeof(float) * (size_t)threads * (size_t)d);
#pragma omp parallel num_threads(threads)
    {
        float *gw = gw_parts + (int64_t)omp_get_thread_num() * d;
#pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i++) {
            const float *gr = g + i * d, *xr = x + i * d;
            float *out = gx + i * d;
            float r = rstd[i];
            __m256 rv = _mm256_set1_ps(r), one = _mm256_set1_ps(1.0f), acc = _mm256_setzero_ps();
            int64_t k = 0;
            for (; k + 8 <= d; k += 8) {
                __m256 xh = _mm256_mul_ps(_mm256_loadu_ps(xr + k), rv);
                __m256 gv = _mm256_loadu_ps(gr + k);
                __m256 gs = _mm256_mul_ps(gv, _mm256_add_ps(one, _mm256_loadu_ps(w + k)));
                acc = _mm256_fmadd_ps(gs, xh, acc);
                _mm256_storeu_ps(gw + k, _mm256_fmadd_ps(gv, xh, _mm256_loadu_ps(gw + k)));
            }
            float dot = hsum8(acc);
            for (; k < d; k++) {
                float xh = xr[k] * r;
                dot += gr[k] * (1.0f + w[k]) * xh;
                gw[k] += gr[k] * xh;
            }
            float m = dot / (float)d;
            __m256 mv = _mm256_set1_ps(m);
            for (k = 0; k + 8 <= d; k += 8) {
                __m256 xh = _mm256_mul_ps(_mm256_loadu_ps(xr + k), rv);
                __m256 gs = _mm256_mul_ps(_mm256_loadu_ps(gr + k),
                                          _mm256_add_ps(one, _mm256_loadu_ps(w + k)));
                _mm256_storeu_ps(out + k, _mm256_mul_ps(rv, _mm256_fnmadd_ps(xh, mv, gs)));
            }
            for (; k < d; k++) {
                float xh = xr[k] * r;
                out[k] = r * (gr[k] * (1.0f + w[k]) - xh * m);
            }
        }
    }
    return 0;
}

/* ---- GELU (tanh approximation) gated product: h = gelu(a) * b ------------------------------ */

/* Blocks of 4096 elements per OpenMP iteration: big enough to amortize scheduling, small
 * enough that 2 threads split a 1M-element activation evenly. */
#define BLOCK 4096

int gelu_mul_fwd(const float *a, const float *b, float *h, int64_t n, int threads) {
    if (n < 0) return 1;
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t i = blk * BLOCK, end = i + BLOCK < n ? i + BLOCK : n;
        __m256 t;
        float t1;
        for (; i + 8 <= end; i += 8)
            _mm256_storeu_ps(h + i, _mm256_mul_ps(gelu8(_mm256_loadu_ps(a + i), &t),
                                                  _mm256_loadu_ps(b + i)));
        for (; i < end; i++) h[i] = gelu1(a[i], &t1) * b[i];
    }
    return 0;
}

/* ga = gh * b * gelu'(a), gb = gh * gelu(a), with
 * gelu'(x) = 0.5 (1 + t) + 0.5 x (1 - t^2) s (1 + 3 c x^2),  t = tanh(s (x + c x^3)). */
int gelu_mul_bwd(const float *a, const float *b, const float *gh, float *ga, float *gb, int64_t n,
                 int threads) {
    if (n < 0) return 1;
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t blk = 0; blk < blocks; blk++) {
        int64_t i = blk * BLOCK, end = i + BLOCK < n ? i + BLOCK : n;
        const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
        const __m256 c3 = _mm256_set1_ps(3.0f * GELU_C);
        for (; i + 8 <= end; i += 8) {
            __m256 x = _mm256_loadu_ps(a + i), t;
            __m256 gelu = gelu8(x, &t);
            __m256 x2 = _mm256_mul_ps(x, x);
            __m256 sx = _mm256_mul_ps(_mm256_set1_ps(GELU_S), x);
            __m256 onept = _mm256_add_ps(one, t);
            __m256 sech2 = _mm256_fnmadd_ps(t, t, one);
            __m256 dinner = _mm256_mul_ps(sx, _mm256_mul_ps(sech2, _mm256_fmadd_ps(c3, x2, one)));
            __m256 dgelu = _mm256_mul_ps(half, _mm256_add_ps(onept, dinner));
            __m256 g = _mm256_loadu_ps(gh + i);
            _mm256_storeu_ps(ga + i, _mm256_mul_ps(_mm256_mul_ps(g, _mm256_loadu_ps(b + i)), dgelu));
            _mm256_storeu_ps(gb + i, _mm256_mul_ps(g, gelu));
        }
        for (; i < end; i++) {
            float x = a[i], t, gelu = gelu1(x, &t);
            float d = 0.5f * (1.0f + t) + 0.5f * GELU_S * x * (1.0f - t * t) *
                                              (1.0f + 3.0f * GELU_C * x * x);
            ga[i] = gh[i] * b[i] * d;
            gb[i] = gh[i] * gelu;
        }
    }
    return 0;
}

/* ---- Cross-entropy rows: loss and softmax - one_hot in place ------------------------------ */

/* max of row [v] (v >= 1) */
INLINE float row_max(const float *row, int64_t v) {
    __m256 mv = _mm256_set1_ps(-INFINITY);
    int64_t k = 0;
    for (; k + 8 <= v; k += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + k));
    float m = hmax8(mv);
    for (; k < v; k++) m = row[k] > m ? row[k] : m;
    return m;
}

/* For each row i of z [n, v] (logits) with target t = targets[i]:
 *   loss[i] = logsumexp(z[i]) - z[i, t]   (0 where t < 0: an ignored position)
 * and with want_grad, z[i] is overwritten with softmax(z[i]) - one_hot(t) (zeros where t < 0).
 * A row is read once from memory: its max, its exps and their scaling stay in L1/L2 (a row
 * of 256k float32 is 1 MiB). Returns 2 if a target is >= v. */
int xent_rows(float *z, const int64_t *targets, float *loss, int64_t n, int64_t v, int want_grad,
              int threads) {
    if (n < 0 || v <= 0) return 1;
    int bad = 0;
#pragma omp parallel for schedule(static) num_threads(threads) reduction(| : bad)
    for (int64_t i = 0; i < n; i++) {
        float *row = z + i * v;
        int64_t t = targets[i];
        if (t >= v) {
            bad = 1;
            continue;
        }
        if (t < 0) {
            loss[i] = 0.0f;
            if (want_grad) memset(row, 0, sizeof(float) * (size_t)v);
            continue;
        }
        const float m = row_max(row, v);
        int64_t k;
        float target_logit = row[t];
        __m256 mb = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
        for (k = 0; k + 8 <= v; k += 8) {
            __m256 e = exp_neg(_mm256_sub_ps(_mm256_loadu_ps(row + k), mb));
            acc = _mm256_add_ps(acc, e);
            if (want_grad) _mm256_storeu_ps(row + k, e);
        }
        float sum = hsum8(acc);
        for (; k < v; k++) {
            float e = expf(row[k] - m);
            sum += e;
            if (want_grad) row[k] = e;
        }
        loss[i] = logf(sum) + m - target_logit;
        if (!want_grad) continue;
        __m256 inv = _mm256_set1_ps(1.0f / sum);
        for (k = 0; k + 8 <= v; k += 8) _mm256_storeu_ps(row + k, _mm256_mul_ps(_mm256_loadu_ps(row + k), inv));
        for (; k < v; k++) row[k] *= 1.0f / sum;
        row[t] -= 1.0f;
    }
    return bad ? 2 : 0;
}

/* ---- Softmax statistics of logits tiles: log-likelihood scoring -------------------------- */

/* Folds one tile z [n, v] (row stride ld) of a row's logits, whose first column is vocabulary
 * id `offset`, into running per-row statistics: mx[i] (max so far), arg[i] (its id, the first
 * on ties, as torch.argmax) and sum[i] (sum of exp(logit - mx[i]) so far); picked[i] is set
 * to the logit of id targets[i] when the tile holds it (the same float as the sum saw, so the
 * rounding of a dominant logit cancels in logit - logsumexp). Start from mx = -inf, sum = 0;
 * then logsumexp = mx + log(sum). A tile is read twice while in cache. */
int softmax_stats(const float *z, int64_t n, int64_t v, int64_t ld, int64_t offset,
                  const int64_t *targets, float *picked, float *mx, int64_t *arg, float *sum,
                  int threads) {
    if (n < 0 || v <= 0 || ld < v) return 1;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < n; i++) {
        const float *row = z + i * ld;
        if (targets[i] >= offset && targets[i] < offset + v) picked[i] = row[targets[i] - offset];
        const int64_t at = row_argmax(row, v);
        const float m = row[at];
        int64_t k;
        __m256 mb = _mm256_set1_ps(m), acc = _mm256_setzero_ps();
        for (k = 0; k + 8 <= v; k += 8) acc = _mm256_add_ps(acc, exp_neg(_mm256_sub_ps(_mm256_loadu_ps(row + k), mb)));
        float s = hsum8(acc);
        for (; k < v; k++) s += expf(row[k] - m);
        if (m > mx[i]) {
            sum[i] = sum[i] * expf(mx[i] - m) + s; /* exp(-inf) = 0 on the first tile */
            mx[i] = m;
            arg[i] = offset + at;
        } else {
            sum[i] += s * expf(m - mx[i]);
        }
    }
    return 0;
}

/* arg[i] = the argmax of row i of z [n, v] (row stride ld) as torch.argmax picks it
 * (row_argmax): greedy decoding's pick. Returns 1 for bad sizes. */
int argmax_rows(const float *z, int64_t n, int64_t v, int64_t ld, int64_t *arg, int threads) {
    if (n < 0 || v < 1 || ld < v) return 1;
#pragma omp parallel for schedule(static) num_threads(threads) if (n > 1)
    for (int64_t i = 0; i < n; i++) arg[i] = row_argmax(z + i * ld, v);
    return 0;
}

/* ---- Rotary embedding, rotate-half layout -------------------------------------------------- */

/* y = x * cos + rotate_half(x) * sin over x [B, N, T, H] with any strides for b, n, t (h
 * contiguous); cos/sin [B, T, H] contiguous, both halves equal (only the first is read).
 * With x = (x1, x2) halves and c, s the first halves of cos, sin:
 *   forward:  y1 = x1 c - x2 s,  y2 = x2 c + x1 s
 *   inverse:  y1 = x1 c + x2 s,  y2 = x2 c - x1 s   (the transpose: rope's backward)
 * y may have its own strides. */
int rope_apply(const float *x, const float *cos, const float *sin, float *y, int64_t B, int64_t N,
               int64_t T, int64_t H, int64_t sxb, int64_t sxn, int64_t sxt, int64_t syb,
               int64_t syn, int64_t syt, int inverse, int threads) {
    if (B < 0 || N < 0 || T < 0 || H <= 0 || H % 2) return 1;
    const int64_t half = H / 2;
    const float sgn = inverse ? -1.0f : 1.0f;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t bt = 0; bt < B * T; bt++) {
        int64_t b = bt / T, t = bt % T;
        const float *c = cos + bt * H, *s = sin + bt * H;
        for (int64_t n = 0; n < N; n++) {
            const float *xr = x + b * sxb + n * sxn + t * sxt;
            float *yr = y + b * syb + n * syn + t * syt;
            int64_t i = 0;
            const __m256 sg = _mm256_set1_ps(sgn);
            for (; i + 8 <= half; i += 8) {
                __m256 x1 = _mm256_loadu_ps(xr + i), x2 = _mm256_loadu_ps(xr + half + i);
                __m256 cv = _mm256_loadu_ps(c + i);
                __m256 sv = _mm256_mul_ps(sg, _mm256_loadu_ps(s + i));
                __m256 y1 = _mm256_fnmadd_ps(x2, sv, _mm256_mul_ps(x1, cv));
                __m256 y2 = _mm256_fmadd_ps(x1, sv, _mm256_mul_ps(x2, cv));
                _mm256_storeu_ps(yr + i, y1);
                _mm256_storeu_ps(yr + half + i, y2);
            }
            for (; i < half; i++) {
                float x1 = xr[i], x2 = xr[half + i], cv = c[i], sv = sgn * s[i];
                yr[i] = x1 * cv - x2 * sv;
                yr[half + i] = x2 * cv + x1 * sv;
            }
        }
    }
    return 0;
}
