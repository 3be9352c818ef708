/* fastmath.cl — exp and erf in plain arithmetic (included by other kernels).
 *
 * In PoCL 3 (pocl-binary-distribution) the built-in exp, erf, fabs, floor and
 * fmax compile to function calls, which blocks vectorisation across work-items:
 * GELU with erf() ran at 37 ms for 4096×384 values, 2.1 ms with these.
 *   exp_fast(x): 2^(x·log2 e): the nearest integer into the exponent bits, the
 *                fraction f ∈ [-0.5, 0.5] by the degree-6 Taylor polynomial of 2^f
 *                (truncation < 1e-7 relative); rounding x·log2 e in float32 adds
 *                about |x|·6e-8 relative (1e-6 at x = -20).
 *   erf_fast(x): Numerical Recipes' erfc rational approximation (erfcc),
 *                absolute error about 3e-7 here, built on exp_fast.
 *   gelu_parts(x): Φ(x) and φ(x) sharing one exp (A&S 7.1.26), for GELU and GELU'.
 * Reference: math.erf / numpy.exp (tests/test_kernels.py gives the tolerances).
 */
#ifndef FASTMATH_CL
#define FASTMATH_CL

static inline __attribute__((always_inline)) float abs_f(float x) { return x < 0.0f ? -x : x; }

static inline __attribute__((always_inline)) float exp2_fast(float x)
{
    x = x < -126.0f ? -126.0f : (x > 126.0f ? 126.0f : x);
    const float fl = (float)(int)(x + (x < 0.0f ? -0.5f : 0.5f));  /* nearest: f in [-0.5, 0.5] */
    const float f = x - fl;
    const float p = 1.0f + f * (0.69314718f + f * (0.24022652f + f * (0.05550411f
                  + f * (0.00961813f + f * (0.00133336f + f * 0.00015404f)))));
    return p * as_float(((int)fl + 127) << 23);
}

static inline __attribute__((always_inline)) float exp_fast(float x) { return exp2_fast(x * 1.4426950408889634f); }

/* exp_fast on eight lanes: the same steps lane by lane (so the same results as exp_fast). */
static inline __attribute__((always_inline)) float8 exp_fast8(float8 x)
{
    x = x * 1.4426950408889634f;
    x = x < -126.0f ? (float8)(-126.0f) : (x > 126.0f ? (float8)(126.0f) : x);
    const int8 fi = convert_int8(x + (x < 0.0f ? (float8)(-0.5f) : (float8)(0.5f)));
    const float8 f = x - convert_float8(fi);
    const float8 p = 1.0f + f * (0.69314718f + f * (0.24022652f + f * (0.05550411f
                   + f * (0.00961813f + f * (0.00133336f + f * 0.00015404f)))));
    return p * as_float8((fi + 127) << 23);
}

static inline __attribute__((always_inline)) float erf_fast(float x)
{
    const float z = abs_f(x);
    const float t = 1.0f / (1.0f + 0.5f * z);
    const float r = t * exp_fast(-z * z - 1.26551223f + t * (1.00002368f + t * (0.37409196f
                  + t * (0.09678418f + t * (-0.18628806f + t * (0.27886807f + t * (-1.13520398f
                  + t * (1.48851587f + t * (-0.82215223f + t * 0.17087277f)))))))));
    return x >= 0.0f ? 1.0f - r : r - 1.0f;
}

/* Φ(x) and φ(x) from ONE exp: Abramowitz & Stegun 7.1.26,
 * erfc(z) = (a1 t + … + a5 t⁵)·exp(−z²), t = 1/(1 + p z), |error| ≤ 1.5e-7, with
 * z = |x|/√2 so exp(−z²) = exp(−x²/2) also gives φ. (Two exps in one kernel made
 * PoCL's vectoriser give up: GELU' took 37 ms instead of 3 for 4096×384.) */
static inline __attribute__((always_inline)) void gelu_parts(float x, float* cdf, float* pdf)
{
    const float z = abs_f(x) * 0.70710678118654752f;
    const float t = 1.0f / (1.0f + 0.3275911f * z);
    const float e = exp_fast(-0.5f * x * x);
    const float erfc = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                     + t * (-1.453152027f + t * 1.061405429f)))) * e;
    *cdf = x >= 0.0f ? 1.0f - 0.5f * erfc : 0.5f * erfc;
    *pdf = 0.39894228040143268f * e;
}

/* gelu_parts on eight lanes: the same steps lane by lane (exp_fast8), so the same Φ and φ. */
static inline __attribute__((always_inline)) void gelu_parts8(float8 x, float8* cdf, float8* pdf)
{
    const float8 z = (x < 0.0f ? -x : x) * 0.70710678118654752f;
    const float8 t = 1.0f / (1.0f + 0.3275911f * z);
    const float8 e = exp_fast8(-0.5f * x * x);
    const float8 erfc = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f
                      + t * (-1.453152027f + t * 1.061405429f)))) * e;
    *cdf = x >= 0.0f ? 1.0f - 0.5f * erfc : 0.5f * erfc;
    *pdf = 0.39894228040143268f * e;
}
#endif
