/* Vector math shared by the kernels that include it (train_ops.c, decode_step.c): exp of
 * non-positive arguments, tanh and the tanh-approximated GELU, 8 float32 lanes at a time with
 * AVX2/FMA, and the one-element versions for tails. tanh comes from an exp with ~1 ulp error,
 * so results agree with torch's float32 to rounding (a few 1e-7 relative), not bit for bit.
 * build.py hashes every header beside a source into its cache key. */
#ifndef GEMMAKIT_VMATH_H
#define GEMMAKIT_VMATH_H

#include <immintrin.h>
#include <math.h>

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

#endif
