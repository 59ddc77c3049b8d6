/* Vector math shared by the kernels that include it (train_ops.c, decode_step.c,
 * quant_gemv.c): exp of non-positive arguments, tanh and the tanh-approximated GELU, 8 float32
 * lanes at a time with AVX2/FMA, and the one-element versions for tails; a vector's horizontal
 * max and a row's argmax. tanh comes from an exp with ~1 ulp error, so results agree with
 * torch's float32 to rounding (a few 1e-7 relative), not bit for bit.
 * build.py hashes every header beside a source into its cache key. */
#ifndef GEMMAKIT_VMATH_H
#define GEMMAKIT_VMATH_H

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#ifndef INLINE
#define INLINE static inline __attribute__((always_inline))
#endif

/* exp(x) for x <= 0 (the only range tanh needs below): x = n ln2 + r, |r| <= ln2 / 2,
 * exp(r) by a degree-6 polynomial (Cephes expf coefficients), 2^n through the exponent bits.
 * Below -87 the result is exp(-87) ~ 1.6e-38, not 0; NaN stays NaN. */
INLINE __m256 exp_neg(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    x = _mm256_max_ps(lo, x); /* NaN in x stays NaN: maxps returns its second operand */
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* tanh(y) = sign(y) * (1 - e) / (1 + e), e = exp(-2|y|) in (0, 1]: no overflow, and for
 * small |y| the quotient keeps its relative accuracy (1 - e is exact near e = 1). */
INLINE __m256 tanh8(__m256 y) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 ay = _mm256_andnot_ps(sign, y);
    __m256 e = exp_neg(_mm256_mul_ps(ay, _mm256_set1_ps(-2.0f)));
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    return _mm256_or_ps(t, _mm256_and_ps(y, sign));
}

#define GELU_S 0.7978845608028654f /* sqrt(2 / pi) */
#define GELU_C 0.044715f

/* t = tanh(s (x + c x^3)) of 8 lanes into *t; returns gelu(x) = 0.5 x (1 + t). */
INLINE __m256 gelu8(__m256 x, __m256 *t) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 inner = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_S), x),
                                 _mm256_fmadd_ps(_mm256_set1_ps(GELU_C), _mm256_mul_ps(x, x), one));
    *t = tanh8(inner);
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, *t));
}

/* The same for one element (the tails). */
INLINE float gelu1(float x, float *t) {
    *t = tanhf(GELU_S * x * (1.0f + GELU_C * x * x));
    return 0.5f * x * (1.0f + *t);
}

/* tanh(x / c) * c of 8 lanes (a soft cap at c > 0) */
INLINE __m256 softcap8(__m256 x, float c) {
    return _mm256_mul_ps(tanh8(_mm256_div_ps(x, _mm256_set1_ps(c))), _mm256_set1_ps(c));
}

/* max over the 8 lanes of v */
INLINE float hmax8(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}

/* The index of the largest of row[0 .. v) (v >= 1) as torch.argmax picks it: the first on
 * ties, and a NaN counts as the largest (the first NaN). Two vector passes, the second
 * stopping at the first lane equal to the maximum; torch's argmax of a 256k vocabulary's
 * logits takes ~5x longer on 2 cores here, a tenth of a Gemma 3 270M decode step. */
INLINE int64_t row_argmax(const float *row, int64_t v) {
    __m256 mv = _mm256_set1_ps(-INFINITY), un = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= v; k += 8) {
        const __m256 x = _mm256_loadu_ps(row + k);
        mv = _mm256_max_ps(mv, x);
        un = _mm256_or_ps(un, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    }
    float m = hmax8(mv);
    int nan = _mm256_movemask_ps(un) != 0;
    for (int64_t t = k; t < v; t++) {
        nan |= isnan(row[t]);
        m = row[t] > m ? row[t] : m;
    }
    if (nan) {
        for (k = 0; k < v; k++)
            if (isnan(row[k])) return k;
    }
    const __m256 mb = _mm256_set1_ps(m);
    for (k = 0; k + 8 <= v; k += 8) {
        const int hit = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(row + k), mb, _CMP_EQ_OQ));
        if (hit) return k + __builtin_ctz(hit);
    }
    for (; k < v; k++)
        if (row[k] == m) return k;
    return 0; /* not reached: m is one of the row's values */
}

#endif
