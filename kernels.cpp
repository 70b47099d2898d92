// Llama blocks on the CPU for T tokens at once -- one for a decode step, a few for verifying drafted tokens, a prompt
// for prefill: bf16 and low-bit weight products, attention over the shared bf16 KV cache, norms, RoPE, SwiGLU, all in
// one thread team. Built twice by kernels.py, once per instruction set (RIVER_AVX512: AVX-512 with VNNI and BF16;
// otherwise AVX2 + FMA + F16C) and picked by the CPU's flags.
//
// Arithmetic: the residual stream stays fp32. A bf16 product takes its activations rounded to bf16 and multiplies
// pairs exactly, accumulating in fp32 (vdpbf16ps, or its FMA twin on AVX2); a low-bit product takes int16
// activations per group and sums exact integer dot products. K/V are stored as bf16.
//
// A token's arithmetic does not depend on the other tokens of its call: each product row is computed by one thread,
// over the inputs in a fixed order, whatever the rows and tokens around it; attention over the cache for up to
// SHORT_PASS tokens is cut into fixed tiles of positions, merged in order. So k one-token steps equal one k-token pass
// bit for bit. A longer pass (a prefill) sums its bf16 products on AVX-512 in another order (packed rows), and runs
// its attention tile by tile over queries and keys.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

enum { KIND_BF16 = 0, KIND_Q4 = 1, KIND_Q8 = 2 };
static const int CHUNK = 128;      // tokens of a pass processed together through a block (a prompt's are chunked)
static const int SHORT_PASS = 16;  // up to this many tokens, attention runs token by token as a decode step does
static const int TILE = 64;        // positions per unit of a token's attention over the cache
// A long pass's attention: queries per unit (each key block read once for them all, made fp32 once on AVX2: 64
// queries there ran a unit's 4096 keys about 5% faster than 32, Zen 3, 2026-12-03).
#ifdef RIVER_AVX512
static const int QUERY_BLOCK = 32;
#else
static const int QUERY_BLOCK = 64;
#endif
static const int KEY_BLOCK = 64;   // ... and keys per step of its online softmax
static const int MAX_HEAD_DIM = 128;

// A weight matrix (n rows, k inputs). bf16: row-major. Q4 / Q8: for each block of 16 rows and each group of
// `group` inputs, 64-byte chunks of codes (see rows_lowbit), then the 16 rows' fp16 scales and fp16 lows:
// w = low + scale * code, code in 0..15 or 0..255.
struct Mat {
    const uint8_t* w;
    int32_t kind, n, k, group;
};

struct Layer {
    const float* attn_norm;  // (d,) fp32
    const float* mlp_norm;   // (d,) fp32
    Mat qkv, o, gate_up, down;
};

struct Dims {
    int32_t d, n_heads, n_kv_heads, head_dim, ffn;
    float eps;
};

// The whole cache (layers, 1, n_kv_heads, capacity, head_dim) bf16.
struct Cache {
    uint16_t *k, *v;
    int64_t layer_stride, head_stride;
};

// ------------------------------------------------------------------------------------------------ helpers

static inline f32x16 load16(const float* p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline void store16(float* p, f32x16 v) { memcpy(p, &v, 64); }
static const f32x16 lanes = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
typedef float f32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
template <typename V> static inline V load_as(const void* p) { V v; memcpy(&v, p, sizeof(V)); return v; }
template <typename V> static inline void store_as(void* p, V v) { memcpy(p, &v, sizeof(V)); }
// The sum of 16 lanes as a tree (halves added, then quarters, then pairs): a few shuffles rather than 15 lane
// extractions in a chain, which made each attention score cost tens of cycles.
static inline float hsum16(f32x16 v) {
    f32x8 a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (const char*)&v + 32, 32);
    a += b;
    f32x4 c, d;
    memcpy(&c, &a, 16);
    memcpy(&d, (const char*)&a + 16, 16);
    c += d;
    return (c[0] + c[2]) + (c[1] + c[3]);
}
// The larger of two floats by a compare and a select: fmaxf compiles to a call (GCC keeps its NaN rule), eight or
// sixteen of them per head in a step's attention tile. A NaN never wins here, as with fmaxf, unless both are NaN.
static inline float larger(float a, float b) { return b > a ? b : a == a ? a : b; }
// The largest lane, as a tree like hsum16's, of lanes that are never NaN (running maxima kept by compare and select).
static inline float max_lanes(f32x8 v) {
    f32x4 c, d;
    memcpy(&c, &v, 16);
    memcpy(&d, (const char*)&v + 16, 16);
    c = c > d ? c : d;
    return larger(larger(c[0], c[2]), larger(c[1], c[3]));
}
static inline float max_lanes(f32x16 v) {
    f32x8 a, b;
    memcpy(&a, &v, 32);
    memcpy(&b, (const char*)&v + 32, 32);
    return max_lanes(a > b ? a : b);
}

// 16 uint16 at p widened to 32 bits (one vpmovzxwd on AVX-512: GCC splits the generic conversion in halves).
static inline u32x16 widen16(const uint16_t* p) {
#ifdef RIVER_AVX512
    return (u32x16)_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p));
#else
    u16x16 h;
    memcpy(&h, p, 32);
    return __builtin_convertvector(h, u32x16);
#endif
}

// 16 bf16 -> 16 fp32 (a bf16 is the top half of an fp32).
static inline f32x16 bf16x16(const uint16_t* p) { return (f32x16)(widen16(p) << 16); }
#ifndef RIVER_AVX512
// AVX2 has no bf16 products: 8 lanes of bf16 pairs split into fp32, the low (even) halves by a shift, the high (odd)
// ones by a mask.
static inline __m256 low_halves(__m256i v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 high_halves(__m256i v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000))); }
#endif

static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's conversion does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// 16 sums at once (AVX-512): lane i of the result is the sum of a[i]'s lanes (a tree of halves, then quarters, eighths
// and pairs, each step folding two vectors into one), the order the same whatever the inputs: the tree
// of _mm512_reduce_add_ps, so each lane equals that reduction of its vector bit for bit.
#ifdef RIVER_AVX512
static inline f32x16 sums16(f32x16* a) {
    const i32x16 h0 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                 h1 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31},
                 q0 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27},
                 q1 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31},
                 e0 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29},
                 e1 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31},
                 p0 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30},
                 p1 = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++) a[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], h0) + __builtin_shuffle(a[2 * i], a[2 * i + 1], h1);
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++) a[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], q0) + __builtin_shuffle(a[2 * i], a[2 * i + 1], q1);
#pragma GCC unroll 2
    for (int i = 0; i < 2; i++) a[i] = __builtin_shuffle(a[2 * i], a[2 * i + 1], e0) + __builtin_shuffle(a[2 * i], a[2 * i + 1], e1);
    return __builtin_shuffle(a[0], a[1], p0) + __builtin_shuffle(a[0], a[1], p1);
}
#endif

// exp for 16 lanes: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2]; relative error about 2e-7; -inf gives 0.
template <typename F, typename I>  // F: a vector of floats, I: of int32 as wide
static inline F exp_lanes(F x) {
    x = x < -87.0f ? F{} - 87.0f : x;
    x = x > 88.0f ? F{} + 88.0f : x;
    F n = x * 1.44269504f + 12582912.0f;  // round to nearest through the float mantissa
    n = n - 12582912.0f;
    F r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, the first exact in n * part
    F p = 1.98756912e-4f + r * 1.39819994e-3f;
    p = 8.33345205e-3f + r * p;
    p = 4.16657962e-2f + r * p;
    p = 1.66666657e-1f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r + r * r * p;
    I e = (__builtin_convertvector(n, I) + 127) << 23;
    F scale;
    memcpy(&scale, &e, sizeof(F));
    return p * scale;
}

// 2^x for x <= 0, 8 or 16 lanes: 2^n * p(f), n = round(x), f = x - n in [-1/2, 1/2], p a degree-5 fit with p(0) = 1;
// relative error under 2e-7; below 2^-125 (-inf too) it gives 2^-125 times about 1, where a softmax weight adds
// nothing. Softmax scores carry log2(e) in their scale, so their weights are 2^(s - max): 7 operations fewer per
// vector than exp_lanes (no upper clamp, no reduction by ln 2), and the decode tile's and long pass's softmax are
// mostly these.
template <typename F, typename I>
static inline F exp2_lanes(F x) {
    x = x < -125.0f ? F{} - 125.0f : x;
    const F t = x + 12583039.0f;  // 1.5 * 2^23 + 127: x rounded to an integer n, t's low mantissa bits n + 127
    const F f = x - (t - 12583039.0f);
    F p = 9.67151299e-3f + f * 1.32647261e-3f;  // 2^f = 1 + f (c1 + f (c2 + ...))
    p = 5.55073358e-2f + f * p;
    p = 2.40222424e-1f + f * p;
    p = 6.93147004e-1f + f * p;
    p = 1.0f + f * p;
    I bits;
    memcpy(&bits, &t, sizeof(F));
    const I e = bits << 23;  // t's bits are 0x4b400000 + n + 127: shifted, only n + 127 stays, as the exponent
    F scale;
    memcpy(&scale, &e, sizeof(F));
    return p * scale;
}
static const float LOG2E = 1.44269504f;

// The lanes of the element-wise work (softmax, SiLU): 16 on AVX-512, 8 on AVX2, whose 16-lane vector-extension code
// GCC compiles through the stack.
#ifdef RIVER_AVX512
typedef f32x16 SoftF;
typedef u32x16 SoftU;
typedef i32x16 SoftI;
#else
typedef f32x8 SoftF;
typedef u32x8 SoftU;
typedef i32x8 SoftI;
#endif
static const int SOFT_LANES = sizeof(SoftF) / sizeof(float);

// out[i0..i1) of the RMS norm of x (d,) with weights w: the mean square over all of x, whatever the range.
static void rms_norm(const float* x, const float* w, float* out, int d, float eps, int i0, int i1) {
    float ss = 0;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / d + eps);
    for (int i = i0; i < i1; i++) out[i] = x[i] * r * w[i];
}

// This thread's share [*i0, *i1) of `count` items, cut at multiples of `unit` (the last thread takes the rest).
static inline void my_share(int count, int unit, int* i0, int* i1) {
    int t = omp_get_thread_num(), n = omp_get_num_threads(), units = count / unit;
    *i0 = (int)((int64_t)units * t / n) * unit;
    *i1 = t == n - 1 ? count : (int)((int64_t)units * (t + 1) / n) * unit;
}

// ------------------------------------------------------------------------------------------ activations

// The inputs of one product for the tokens of a pass, each token's row `stride` elements apart.
struct Acts {
    uint16_t* xb;      // bf16 weights: the activations rounded to bf16
    float* xf;         // ... and on AVX2 as fp32, laid out for the kernel that reads them (Fp32Inputs), or null
    int16_t* q;        // low-bit weights: int16 activations per group,
    int8_t *high, *low;  // split as 256 * high + low, both int8 (AVX-512's products: vpdpbusd takes bytes),
    float *step, *sum; // each group's step and exact sum
    int stride, group_stride;
    uint32_t* pack;    // a long pass's bf16 rows laid out by input pair (pack_rows), pack_stride apart per thread
    int64_t pack_stride;
};

// How AVX2's bf16 products of a pass of T tokens read their inputs (the tokens of a chunk, CHUNK at most): as bf16
// (a step, two tokens: the tiles split them as they go), or converted to fp32 once per product by prepare, shared by
// the team: a short pass's rows_short reads each token's 16 inputs as their 8 even then 8 odd, a long pass's
// packed_tile reads (k / 2, T, 2), a pair's tokens side by side. AVX-512's vdpbf16ps takes them as bf16.
static const int SHORT_ROWS_FROM = 3;  // fewer tokens stay bf16: two rows and two tokens at a time were faster
enum Fp32Inputs { AS_BF16, BY_TOKEN, BY_PAIR };
static inline Fp32Inputs fp32_inputs(int T) {
#ifdef RIVER_AVX512
    (void)T;
    return AS_BF16;
#else
    return T < SHORT_ROWS_FROM ? AS_BF16 : T <= SHORT_PASS ? BY_TOKEN : BY_PAIR;
#endif
}

// Activations for the low-bit products: integers in [-LEVELS, LEVELS] per group of `group` inputs (int16), symmetric,
// with each group's step and its exact fp32 sum (the weights' lows multiply the sum, so it need not be rounded).
// LEVELS = 127 * 256 + 127 keeps the high half of the split within int8.
static const float LEVELS = 32639.0f;

// No fused multiply-add here: x * inv is rounded to fp32 before rounding to an integer, as the torch twin does, so
// both give the same codes (a fused x * inv + 1.5 * 2^23 rounds once, and differs from it at near-ties).
__attribute__((optimize("fp-contract=off")))
static void quantize_activations(const float* x, int k, int group, int16_t* q, int8_t* high, int8_t* low,
                                 float* step, float* sum) {
    for (int g = 0; g < k / group; g++) {  // group is a multiple of 32: whole vectors of 16
        const float* xg = x + g * group;
#ifdef RIVER_AVX512
        f32x16 vmax = {}, vsum = {};
        for (int i = 0; i < group; i += 16) {
            f32x16 v = load16(xg + i);
            f32x16 a = v < 0 ? -v : v;
            vmax = a > vmax ? a : vmax;
            vsum += v;
        }
        const float amax = max_lanes(vmax);
        const float inv = amax > 0 ? LEVELS / amax : 0.0f;
        for (int i = 0; i < group; i += 16) {
            f32x16 r = load16(xg + i) * inv + 12582912.0f;  // round half to even through the mantissa, |v| < 2^22
            i32x16 v = __builtin_convertvector(r - 12582912.0f, i32x16);
            i32x16 h = (v + 128) >> 8;  // arithmetic shift: floor
            i16x16 v16 = __builtin_convertvector(v, i16x16);
            i8x16 h8 = __builtin_convertvector(h, i8x16), l8 = __builtin_convertvector(v - 256 * h, i8x16);
            memcpy(q + g * group + i, &v16, 32);
            memcpy(high + g * group + i, &h8, 16);
            memcpy(low + g * group + i, &l8, 16);
        }
        step[g] = amax / LEVELS;
        sum[g] = hsum16(vsum);
#else  // the same arithmetic on 8 lanes: lanes 0-7 and 8-15 of each 16 in two vectors, so the sums keep their order
        (void)high, (void)low;
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 max_lo = _mm256_setzero_ps(), max_hi = max_lo, sum_lo = max_lo, sum_hi = max_lo;
        for (int i = 0; i < group; i += 16) {
            const __m256 lo = _mm256_loadu_ps(xg + i), hi = _mm256_loadu_ps(xg + i + 8);
            max_lo = _mm256_max_ps(_mm256_andnot_ps(sign, lo), max_lo);  // a NaN input keeps the max, as above
            max_hi = _mm256_max_ps(_mm256_andnot_ps(sign, hi), max_hi);
            sum_lo = _mm256_add_ps(sum_lo, lo);
            sum_hi = _mm256_add_ps(sum_hi, hi);
        }
        const __m256 m8 = _mm256_max_ps(max_lo, max_hi);
        const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
        const float amax = larger(larger(m4[0], m4[2]), larger(m4[1], m4[3]));
        const __m256 s8 = _mm256_add_ps(sum_lo, sum_hi);
        const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        const float inv = amax > 0 ? LEVELS / amax : 0.0f;
        const __m256 vinv = _mm256_set1_ps(inv), magic = _mm256_set1_ps(12582912.0f);
        for (int i = 0; i < group; i += 16) {  // AVX2's products read the int16 codes only, not the halves
            __m256i v[2];
            for (int j = 0; j < 2; j++) {
                const __m256 r = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(xg + i + 8 * j), vinv), magic);
                v[j] = _mm256_cvttps_epi32(_mm256_sub_ps(r, magic));
            }
            _mm256_storeu_si256((__m256i*)(q + g * group + i),
                                _mm256_permute4x64_epi64(_mm256_packs_epi32(v[0], v[1]), 0xd8));
        }
        step[g] = amax / LEVELS;
        sum[g] = (s4[0] + s4[2]) + (s4[1] + s4[3]);
#endif
    }
}

// Inputs i0..i1 of token t of T for a product with weights m, from x (m.k,); i0 and i1 on group boundaries, or
// multiples of 16 (or m.k).
static void prepare(const Mat& m, const float* x, const Acts& a, int t, int T, int i0, int i1) {
    if (m.kind == KIND_BF16) {
        uint16_t* xb = a.xb + (int64_t)t * a.stride;
        for (int i = i0; i < i1; i++) xb[i] = to_bf16(x[i]);
        if (fp32_inputs(T) == BY_TOKEN)
            for (int i = i0; i + 16 <= i1; i += 16)
                for (int l = 0; l < 8; l++) {
                    a.xf[(int64_t)t * a.stride + i + l] = bf16_value(xb[i + 2 * l]);
                    a.xf[(int64_t)t * a.stride + i + 8 + l] = bf16_value(xb[i + 2 * l + 1]);
                }
        if (fp32_inputs(T) == BY_PAIR)
            for (int c = i0 / 2; c < i1 / 2; c++) {
                a.xf[((int64_t)c * T + t) * 2] = bf16_value(xb[2 * c]);
                a.xf[((int64_t)c * T + t) * 2 + 1] = bf16_value(xb[2 * c + 1]);
            }
        return;
    }
    const int64_t o = (int64_t)t * a.stride + i0, og = (int64_t)t * a.group_stride + i0 / m.group;
    quantize_activations(x + i0, i1 - i0, m.group, a.q + o, a.high + o, a.low + o, a.step + og, a.sum + og);
#ifdef RIVER_AVX512
    if (m.kind == KIND_Q8)  // the int8 halves in the order of a lane's 8-bit codes: inputs 0, 2, 1, 3 of each 4
        for (int i = 0; i < i1 - i0; i += 4) {
            int8_t* h = a.high + o + i;
            int8_t* l = a.low + o + i;
            const int8_t h1 = h[1], l1 = l[1];
            h[1] = h[2], h[2] = h1, l[1] = l[2], l[2] = l1;
        }
#else
    if (m.kind == KIND_Q4)  // the int16 inputs in the order group_dots pairs a lane's 4-bit codes: 0 2 4 6 1 3 5 7
        for (int i = 0; i < i1 - i0; i += 8) {
            int16_t* q = a.q + o + i;
            const int16_t in_order[8] = {q[0], q[2], q[4], q[6], q[1], q[3], q[5], q[7]};
            memcpy(q, in_order, sizeof in_order);
        }
#endif
}

// ------------------------------------------------------------------------------------------ weight products

// A bf16 product's end: its sum so far plus the inputs past the last multiple of 32, in order.
static inline float with_tail(float s, const uint16_t* w, const uint16_t* x, int k32, int k) {
    for (int c = k32; c < k; c++) s += bf16_value(w[c]) * bf16_value(x[c]);
    return s;
}

#ifndef RIVER_AVX512
// AVX2: the two chains of a bf16 product's pairs added, then their 8 lanes as a tree.
static inline float pair_sums(__m256 even, __m256 odd) {
    const __m256 v = _mm256_add_ps(even, odd);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
#endif

// bf16 rows, every pass alike: y[t][r] = W[r] . x[t] over rows [r, r + R) and tokens [t, t + TT), R * TT
// independent sums. Each pair of inputs is multiplied exactly into one fp32 lane per 32 inputs (vdpbf16ps; AVX2 keeps
// the even and the odd products in two chains, added at the end), the lanes summed at the end (the tree of
// _mm512_reduce_add_ps), then the inputs past the last multiple of 32 in order. A sum's order is the same whatever R
// and TT, so a token's result does not depend on the tokens beside it, nor on how many there are.
//
// The R rows lie side by side in memory and are read in lockstep: R streams, which the hardware prefetcher follows
// badly (AVX-512, one-token products of 212 MB from memory: 7.8-8.1 ms, against 7.1-7.3 one row at a time). So each
// step also asks for R lines of the tile PREFETCH_TILES ahead, in address order, into L2: a 5-token pass then streams
// the weights about as fast as a one-token one (6.2-6.9 against 7.1 ms; 9.2-11.6 with the per-row kernel it
// replaces). On AVX2 a one-token step runs in lockstep too (LOCKSTEP_TOKENS).
static const int PREFETCH_TILES = 4;
template <int R, int TT>
static inline void tile_bf16(const uint16_t* w, int k, const uint16_t* xb, int xs, float* y, int ys) {
    const int k32 = k & ~31;
    const char* ahead = (const char*)(w + (int64_t)PREFETCH_TILES * R * k);  // a hint: never faults, even past the end
    float s[R][TT];
#ifdef RIVER_AVX512
    __m512 acc[R][TT];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < TT; j++) acc[i][j] = _mm512_setzero_ps();
    for (int c = 0; c < k32; c += 32) {  // 64 bytes of each row a step: R lines ahead
        __m512i wv[R];
        for (int i = 0; i < R; i++) wv[i] = _mm512_loadu_si512(w + (int64_t)i * k + c);
        if (R > 1)
            for (int i = 0; i < R; i++) _mm_prefetch(ahead + ((c / 32) * R + i) * 64, _MM_HINT_T1);
        for (int j = 0; j < TT; j++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512(xb + (int64_t)j * xs + c);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)wv[i], xv);
        }
    }
    if constexpr (R * TT == 16) {  // the 16 sums of a full tile across their lanes at once
        f32x16 v[16];
        for (int i = 0; i < R; i++)
            for (int j = 0; j < TT; j++) v[i * TT + j] = (f32x16)acc[i][j];
        const f32x16 sums = sums16(v);
        for (int i = 0; i < R; i++)
            for (int j = 0; j < TT; j++) s[i][j] = sums[i * TT + j];
    } else {
        for (int i = 0; i < R; i++)
            for (int j = 0; j < TT; j++) s[i][j] = _mm512_reduce_add_ps(acc[i][j]);
    }
#else
    __m256 even[R][TT], odd_sum[R][TT];  // two chains per sum: AVX2's FMA latency, not its loads, bounds a step
    for (int i = 0; i < R; i++)
        for (int j = 0; j < TT; j++) even[i][j] = odd_sum[i][j] = _mm256_setzero_ps();
    for (int c = 0; c < k32; c += 16) {  // 8 pairs a step: the even input by a shift, the odd one by a mask
        __m256 we[R], wo[R];
        for (int i = 0; i < R; i++) {
            const __m256i v = _mm256_loadu_si256((const __m256i*)(w + (int64_t)i * k + c));
            we[i] = low_halves(v), wo[i] = high_halves(v);
        }
        if (R > 1 && c % 32 == 0)
            for (int i = 0; i < R; i++) _mm_prefetch(ahead + ((c / 32) * R + i) * 64, _MM_HINT_T1);
        for (int j = 0; j < TT; j++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(xb + (int64_t)j * xs + c));
            const __m256 xe = low_halves(v), xo = high_halves(v);
            for (int i = 0; i < R; i++) {
                even[i][j] = _mm256_fmadd_ps(we[i], xe, even[i][j]);
                odd_sum[i][j] = _mm256_fmadd_ps(wo[i], xo, odd_sum[i][j]);
            }
        }
    }
    for (int i = 0; i < R; i++)
        for (int j = 0; j < TT; j++) s[i][j] = pair_sums(even[i][j], odd_sum[i][j]);
#endif
    for (int i = 0; i < R; i++)
        for (int j = 0; j < TT; j++)
            y[(int64_t)j * ys + i] = with_tail(s[i][j], w + (int64_t)i * k, xb + (int64_t)j * xs, k32, k);
}

#ifdef RIVER_AVX512
static const int BF16_ROWS = 4, BF16_TOKENS = 4;  // 16 sums in registers, 4 weight and 1 input vector loaded
static const int LOCKSTEP_TOKENS = 2;  // from this many tokens on, rows run in tiles; a one-token step a row at a
                                       // time, one stream, the next rows' sums overlapping out of order
#else
static const int BF16_ROWS = 2, BF16_TOKENS = 2;  // 4 sums: AVX2's 16 registers also hold 4 weight halves
static const int LOCKSTEP_TOKENS = 1;  // a one-token step too: two rows in lockstep, with their prefetches, streamed
                                       // the weights 1.02-1.19x as fast as a row at a time (2026-12-03, Zen 3)
#endif

template <int R>
static inline void tile_bf16_tokens(const uint16_t* w, int k, const uint16_t* xb, int xs, float* y, int ys, int tt) {
    switch (tt) {
        case 1: tile_bf16<R, 1>(w, k, xb, xs, y, ys); break;
        case 2: tile_bf16<R, 2>(w, k, xb, xs, y, ys); break;
#ifdef RIVER_AVX512
        case 3: tile_bf16<R, 3>(w, k, xb, xs, y, ys); break;
        case 4: tile_bf16<R, 4>(w, k, xb, xs, y, ys); break;
#endif
    }
}

#ifndef RIVER_AVX512
// A short pass's bf16 rows on AVX2 (SHORT_ROWS_FROM..SHORT_PASS tokens): a row at a time against up to SHORT_TOKENS
// tokens, whose inputs were split into fp32 once (Acts.xf), so that a weight vector split once serves them all and
// each product is one FMA reading its input. Each sum is tile_bf16's, in its order: the tokens' results are a
// one-token step's. (Against the tiles: a 3-, 4-token check's products 1.04-1.19x, 1.08-1.13x as fast.)
static const int SHORT_TOKENS = 6;     // 12 sums in registers, and the weight vector's two halves
static const int SHORT_PREFETCH = 8192;  // bytes ahead in the rows' stream (8 rows of 576 inputs: a 5-token check
                                         // of 212 MB 8.6-9.2 -> 5.8-6.3 ms, 2026-12-03, Zen 3)
template <int TT>
static inline void row_short(const uint16_t* w, int k, const float* xf, const uint16_t* xb, int xs, float* y, int ys) {
    const int k32 = k & ~31;
    __m256 even[TT], odd[TT];
    for (int j = 0; j < TT; j++) even[j] = odd[j] = _mm256_setzero_ps();
    for (int c = 0; c < k32; c += 16) {
        const __m256i v = _mm256_loadu_si256((const __m256i*)(w + c));
        const __m256 we = low_halves(v), wo = high_halves(v);
        if (c % 32 == 0) _mm_prefetch((const char*)(w + c) + SHORT_PREFETCH, _MM_HINT_T0);  // a hint: never faults
        for (int j = 0; j < TT; j++) {
            even[j] = _mm256_fmadd_ps(we, _mm256_loadu_ps(xf + (int64_t)j * xs + c), even[j]);
            odd[j] = _mm256_fmadd_ps(wo, _mm256_loadu_ps(xf + (int64_t)j * xs + c + 8), odd[j]);
        }
    }
    for (int j = 0; j < TT; j++)
        y[(int64_t)j * ys] = with_tail(pair_sums(even[j], odd[j]), w, xb + (int64_t)j * xs, k32, k);
}

// Rows r0..r1 for tokens 0..T-1, the tokens in near-equal groups of at most SHORT_TOKENS.
static void rows_short(const uint16_t* w, int k, const Acts& a, int T, float* y, int ys, int r0, int r1) {
    const int groups = (T + SHORT_TOKENS - 1) / SHORT_TOKENS;
    for (int r = r0; r < r1; r++)
        for (int g = 0, t = 0; g < groups; g++) {
            const int tt = T / groups + (g < T % groups);
            const float* xf = a.xf + (int64_t)t * a.stride;
            const uint16_t* xb = a.xb + (int64_t)t * a.stride;
            float* out = y + (int64_t)t * ys + r;
            const uint16_t* row = w + (int64_t)r * k;
            switch (tt) {
                case 1: row_short<1>(row, k, xf, xb, a.stride, out, ys); break;
                case 2: row_short<2>(row, k, xf, xb, a.stride, out, ys); break;
                case 3: row_short<3>(row, k, xf, xb, a.stride, out, ys); break;
                case 4: row_short<4>(row, k, xf, xb, a.stride, out, ys); break;
                case 5: row_short<5>(row, k, xf, xb, a.stride, out, ys); break;
                case 6: row_short<6>(row, k, xf, xb, a.stride, out, ys); break;
            }
            t += tt;
        }
}
#endif

#ifdef RIVER_AVX512
// A long pass's bf16 rows on AVX-512 (compute-bound): each block of PACK_ROWS rows is first laid out by input pair
// (pack_rows: lane i of vector 2c + h holds row 16h + i's inputs 2c and 2c + 1), then each token's input pairs are
// broadcast against it, PACK_TOKENS tokens at a time (packed_tile): the 32 rows' sums lie in the lanes of two
// registers, so nothing is summed across lanes, and each weight vector loaded serves 12 tokens. 87% of vdpbf16ps's
// peak prepacked, 73-80% packing each block anew (the tiles above: 58-65%; 2026-12-02, Zen 4). Each sum is one chain
// over the pairs in order: a prefill rounds its products unlike a decode step, which keeps tile_bf16's order.
static const int PACK_ROWS = 32, PACK_TOKENS = 12;  // 24 sums in registers

// r[i] lane j <- r[j] lane i, for 16 vectors of 16 32-bit lanes: pairs, then quads, then 128-bit blocks swapped.
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
        t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xdd);
        t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
        t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
        r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
        r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xdd);
    }
}

// PACK_ROWS rows of k inputs (k a multiple of 32) -> p (k / 2, PACK_ROWS) input pairs.
static void pack_rows(const uint16_t* w, int k, uint32_t* p) {
    for (int h = 0; h < PACK_ROWS / 16; h++)
        for (int c = 0; c < k / 2; c += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_si512((const uint32_t*)(w + (int64_t)(16 * h + i) * k) + c);
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(p + (int64_t)(c + i) * PACK_ROWS + 16 * h, r[i]);
        }
}

template <int TT>
static inline void packed_tile(const uint32_t* p, int pairs, const uint16_t* xb, int xs, float* y, int ys) {
    __m512 lo[TT], hi[TT];  // rows 0..15, 16..31
    for (int j = 0; j < TT; j++) lo[j] = hi[j] = _mm512_setzero_ps();
    for (int c = 0; c < pairs; c++) {
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(p + (int64_t)c * PACK_ROWS);
        const __m512bh w1 = (__m512bh)_mm512_loadu_si512(p + (int64_t)c * PACK_ROWS + 16);
#pragma GCC unroll 12
        for (int j = 0; j < TT; j++) {
            uint32_t pair;
            memcpy(&pair, xb + (int64_t)j * xs + 2 * c, 4);
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int)pair);
            lo[j] = _mm512_dpbf16_ps(lo[j], w0, x);
            hi[j] = _mm512_dpbf16_ps(hi[j], w1, x);
        }
    }
    for (int j = 0; j < TT; j++) {
        _mm512_storeu_ps(y + (int64_t)j * ys, lo[j]);
        _mm512_storeu_ps(y + (int64_t)j * ys + 16, hi[j]);
    }
}

#else
// A long pass's bf16 rows on AVX2, as on AVX-512 with 16 rows to a block (pack_rows: lane i of vector 2c + h holds
// row 8h + i's inputs 2c and 2c + 1), split by a mask (odd inputs) and then a shift (even ones) into fp32 lanes, each
// token's two inputs (converted to fp32 once per product by prepare: Acts.xf, by pair) broadcast against them: per
// pair 4 weight loads and 10 broadcasts for 20 FMAs. (8 rows and 12 tokens loaded 25 times for 24 FMAs; 6 tokens
// need one register more than AVX2 has and GCC spills: 5 tokens, 10-20% faster than either, 2026-12-03, Zen 3.)
static const int PACK_ROWS = 16, PACK_TOKENS = 5;  // 10 sums, 2 weight vectors, a mask and a broadcast

// r[i] lane j <- r[j] lane i, for 8 vectors of 8 32-bit lanes: pairs, then quads, then 128-bit halves swapped.
static inline void transpose8(__m256i r[8]) {
    __m256i t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm256_permute2x128_si256(r[i], r[i + 4], 0x20);
        t[i + 4] = _mm256_permute2x128_si256(r[i], r[i + 4], 0x31);
    }
    for (int i = 0; i < 8; i++) r[i] = t[i];
}

// PACK_ROWS rows of k inputs (k a multiple of 16) -> p (k / 2, PACK_ROWS) input pairs: 8 x 8 transposes of 32 bits.
static void pack_rows(const uint16_t* w, int k, uint32_t* p) {
    for (int h = 0; h < PACK_ROWS / 8; h++)
        for (int c = 0; c < k / 2; c += 8) {
            __m256i r[8];
            for (int i = 0; i < 8; i++)
                r[i] = _mm256_loadu_si256((const __m256i*)((const uint32_t*)(w + (int64_t)(8 * h + i) * k) + c));
            transpose8(r);
            for (int i = 0; i < 8; i++) _mm256_storeu_si256((__m256i*)(p + (int64_t)(c + i) * PACK_ROWS + 8 * h), r[i]);
        }
}

template <int TT>
static inline void packed_tile(const uint32_t* p, int pairs, const float* xf, int xs, float* y, int ys) {
    __m256 lo[TT], hi[TT];  // rows 0..7, 8..15; every loop over them unrolled, else GCC keeps them on the stack
#pragma GCC unroll 12
    for (int j = 0; j < TT; j++) lo[j] = hi[j] = _mm256_setzero_ps();
    for (int c = 0; c < pairs; c++, xf += xs) {  // xf: pair c's inputs of the tile's tokens side by side
        const uint32_t* pc = p + (int64_t)c * PACK_ROWS;
        {  // the pair's odd products first
            const __m256 w0 = high_halves(_mm256_loadu_si256((const __m256i*)pc));
            const __m256 w1 = high_halves(_mm256_loadu_si256((const __m256i*)(pc + 8)));
#pragma GCC unroll 12
            for (int j = 0; j < TT; j++) {
                const __m256 x = _mm256_broadcast_ss(xf + 2 * j + 1);
                lo[j] = _mm256_fmadd_ps(w0, x, lo[j]);
                hi[j] = _mm256_fmadd_ps(w1, x, hi[j]);
            }
        }
        {
            const __m256 w0 = low_halves(_mm256_loadu_si256((const __m256i*)pc));
            const __m256 w1 = low_halves(_mm256_loadu_si256((const __m256i*)(pc + 8)));
#pragma GCC unroll 12
            for (int j = 0; j < TT; j++) {
                const __m256 x = _mm256_broadcast_ss(xf + 2 * j);
                lo[j] = _mm256_fmadd_ps(w0, x, lo[j]);
                hi[j] = _mm256_fmadd_ps(w1, x, hi[j]);
            }
        }
    }
#pragma GCC unroll 12
    for (int j = 0; j < TT; j++) {
        _mm256_storeu_ps(y + (int64_t)j * ys, lo[j]);
        _mm256_storeu_ps(y + (int64_t)j * ys + 8, hi[j]);
    }
}
#endif

// The packed rows p against tokens 0..T-1 (token t's inputs at xb + t * token_step).
#ifdef RIVER_AVX512
typedef uint16_t PackedInput;  // the tokens' bf16 inputs as they are
#else
typedef float PackedInput;     // the tokens' inputs converted to fp32 (prepare, Acts.xf)
#endif
// The last n < PACK_TOKENS tokens: packed_tile<n>, instantiated only for the sizes this ISA's tiles leave.
template <int TT>
static inline void packed_rest(const uint32_t* p, int pairs, const PackedInput* x, int xs, float* y, int ys, int n) {
    if (n == TT)
        packed_tile<TT>(p, pairs, x, xs, y, ys);
    else if constexpr (TT > 1)
        packed_rest<TT - 1>(p, pairs, x, xs, y, ys, n);
}

static void packed_tokens(const uint32_t* p, int pairs, const PackedInput* xb, int xs, int token_step, float* y, int ys,
                          int T) {
    int t = 0;
    for (; t + PACK_TOKENS <= T; t += PACK_TOKENS)
        packed_tile<PACK_TOKENS>(p, pairs, xb + (int64_t)t * token_step, xs, y + (int64_t)t * ys, ys);
    packed_rest<PACK_TOKENS - 1>(p, pairs, xb + (int64_t)t * token_step, xs, y + (int64_t)t * ys, ys, T - t);
}

// Rows r0..r1 of a bf16 matrix for tokens 0..T-1: y[t * ys + r]. Each weight tile is loaded once for all the tokens
// (a prefill's products are compute-bound; a decode step's or a check's stream the weights).
static void rows_bf16(const Mat& m, const Acts& a, int T, float* y, int ys, int r0, int r1) {
    const uint16_t* w = (const uint16_t*)m.w;
    int r = r0;
    if (T > SHORT_PASS && m.k % 32 == 0) {
        uint32_t* p = a.pack + omp_get_thread_num() * a.pack_stride;
#ifdef RIVER_AVX512
        const PackedInput* x = a.xb;
        const int xs = a.stride, token_step = xs;
#else
        const PackedInput* x = a.xf;          // (k / 2, T, 2): a pair's tokens side by side
        const int xs = 2 * T, token_step = 2;
#endif
        for (; r + PACK_ROWS <= r1; r += PACK_ROWS) {
            pack_rows(w + (int64_t)r * m.k, m.k, p);
            packed_tokens(p, m.k / 2, x, xs, token_step, y + r, ys, T);
        }
    }
#ifndef RIVER_AVX512
    if (fp32_inputs(T) == BY_TOKEN) {
        rows_short(w, m.k, a, T, y, ys, r, r1);
        return;
    }
#endif
    if (T >= LOCKSTEP_TOKENS)
        for (; r + BF16_ROWS <= r1; r += BF16_ROWS)
            for (int t = 0; t < T; t += BF16_TOKENS) {
                const int tt = T - t < BF16_TOKENS ? T - t : BF16_TOKENS;
                tile_bf16_tokens<BF16_ROWS>(w + (int64_t)r * m.k, m.k, a.xb + (int64_t)t * a.stride, a.stride,
                                            y + (int64_t)t * ys + r, ys, tt);
            }
    for (; r < r1; r++)
        for (int t = 0; t < T; t++)
            tile_bf16<1, 1>(w + (int64_t)r * m.k, m.k, a.xb + (int64_t)t * a.stride, a.stride,
                            y + (int64_t)t * ys + r, ys);
}

// Low-bit rows, 16 side by side in the packed layout (one 32-bit lane each): per group, exact integer dot products of
// the codes with the int16 activations, then y += scale * x_step * dot + low * x_sum, groups in order. A 64-byte
// chunk holds 8 codes of each row (4 bits) or 4 (8 bits):
//   4 bits: byte j of a lane holds code j in its low nibble and code 4+j in its high one. AVX-512: a mask or a
//           shift gives 4 codes as unsigned bytes, multiplied with the activations' int8 halves (vpdpbusd) and
//           combined as 256 * high + low; AVX2: shifts and a mask give int16 code pairs, multiplied with int16
//           activation pairs (pmaddwd);
//   8 bits: the byte at bit 8j is code 2j, the one at bit 16+8j code 2j+1. AVX-512: the 4 codes as unsigned bytes
//           against the activations' int8 halves in the same order (vpdpbusd, as 4 bits, with no unpacking);
//           AVX2: a shift and a mask give each row's int16 pair (k, k+1) in its lane, multiplied with an int16 pair
//           (pmaddwd: pmaddubsw would saturate on codes past 127).
static inline int32_t four(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#ifdef RIVER_AVX512
typedef __m512i Dots;  // one int32 dot product per row of a 16-row block
#define ROW_VECTORS 1  // vectors of 16 rows
static const int LOWBIT_TOKENS = 4;
#else
typedef __m256i Dots;  // 8 rows: a 16-row block is two of them
#define ROW_VECTORS 2
static const int LOWBIT_TOKENS = 2;
#endif

// The exact integer dot products of one group for TT tokens and the block's 16 rows (ROW_VECTORS vectors of them):
// codes at p, `chunks` chunks of 64 bytes, activations of token j at offset j * xs from input k0. Integer sums are
// exact, so their order is free: each ISA takes the one its instructions favour.
template <int BITS, int TT>
static inline void group_dots(const uint8_t* p, int chunks, const Acts& a, int64_t k0, int xs, Dots out[][TT]) {
#ifdef RIVER_AVX512
    __m512i d0[TT], d1[TT];
    for (int j = 0; j < TT; j++) d0[j] = d1[j] = _mm512_setzero_si512();
    if (BITS == 4) {  // d0: against the high halves, d1: the low halves
        const __m512i nib = _mm512_set1_epi8(0x0f);
        for (int c = 0; c < chunks; c++) {
            __m512i v = _mm512_loadu_si512(p + c * 64);
            __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            for (int j = 0; j < TT; j++) {
                const int8_t *xh = a.high + k0 + (int64_t)j * xs + c * 8, *xl = a.low + k0 + (int64_t)j * xs + c * 8;
                d0[j] = _mm512_dpbusd_epi32(d0[j], lo, _mm512_set1_epi32(four(xh)));
                d1[j] = _mm512_dpbusd_epi32(d1[j], lo, _mm512_set1_epi32(four(xl)));
                d0[j] = _mm512_dpbusd_epi32(d0[j], hi, _mm512_set1_epi32(four(xh + 4)));
                d1[j] = _mm512_dpbusd_epi32(d1[j], hi, _mm512_set1_epi32(four(xl + 4)));
            }
        }
        for (int j = 0; j < TT; j++) out[0][j] = _mm512_add_epi32(_mm512_slli_epi32(d0[j], 8), d1[j]);
        return;
    }
    for (int c = 0; c < chunks; c++) {  // 8 bits: the codes as they lie, against the halves in their order (prepare)
        __m512i v = _mm512_loadu_si512(p + c * 64);
        for (int j = 0; j < TT; j++) {
            const int8_t *xh = a.high + k0 + (int64_t)j * xs + c * 4, *xl = a.low + k0 + (int64_t)j * xs + c * 4;
            d0[j] = _mm512_dpbusd_epi32(d0[j], v, _mm512_set1_epi32(four(xh)));
            d1[j] = _mm512_dpbusd_epi32(d1[j], v, _mm512_set1_epi32(four(xl)));
        }
    }
    for (int j = 0; j < TT; j++) out[0][j] = _mm512_add_epi32(_mm512_slli_epi32(d0[j], 8), d1[j]);
#else
    // AVX2 has no u8 x s8 dot product into int32; vpmaddwd multiplies int16 pairs and adds each pair into a lane. So
    // the codes are widened to int16 words, a lane's two words being two codes of its row, against a broadcast pair
    // of int16 activations (a.q), both halves of the block from each chunk (the activations loaded once for both).
    __m256i d[2][TT];
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < TT; j++) d[h][j] = _mm256_setzero_si256();
    if (BITS == 4) {
        // a lane's words hold codes (0, 4, 1, 5) and (2, 6, 3, 7) by nibble: shifts of 0, 4, 8, 12 and a mask give the
        // code pairs (0, 2), (4, 6), (1, 3), (5, 7), against the inputs in that order (prepare: 0 2 4 6 1 3 5 7)
        const __m256i nib = _mm256_set1_epi16(0x000f);
#pragma GCC unroll 4
        for (int c = 0; c < chunks; c++) {  // chunks: a multiple of 4 (groups of 32 inputs)
            __m256i c02[2], c46[2], c13[2], c57[2];
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(p + c * 64 + h * 32));
                c02[h] = _mm256_and_si256(v, nib);
                c46[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                c13[h] = _mm256_and_si256(_mm256_srli_epi16(v, 8), nib);
                c57[h] = _mm256_srli_epi16(v, 12);
            }
            for (int j = 0; j < TT; j++) {
                int32_t x[4];  // the input pairs (0, 2), (4, 6), (1, 3), (5, 7)
                memcpy(x, a.q + k0 + (int64_t)j * xs + c * 8, 16);
                const __m256i x02 = _mm256_set1_epi32(x[0]), x46 = _mm256_set1_epi32(x[1]);
                const __m256i x13 = _mm256_set1_epi32(x[2]), x57 = _mm256_set1_epi32(x[3]);
                for (int h = 0; h < 2; h++) {
                    // |sum| <= 8 * 15 * 32639 a chunk: a group's stays in int32 up to 4096 inputs (quantize.py)
                    const __m256i s = _mm256_add_epi32(_mm256_madd_epi16(c02[h], x02), _mm256_madd_epi16(c46[h], x46));
                    const __m256i u = _mm256_add_epi32(_mm256_madd_epi16(c13[h], x13), _mm256_madd_epi16(c57[h], x57));
                    d[h][j] = _mm256_add_epi32(d[h][j], _mm256_add_epi32(s, u));
                }
            }
        }
    } else {  // 8 bits: a shift and a mask give each row's code pairs (0, 1) and (2, 3), against the inputs in order
        const __m256i bytes = _mm256_set1_epi32(0x00ff00ff);
        for (int c = 0; c < chunks; c++) {
            __m256i even[2], odd[2];
            for (int h = 0; h < 2; h++) {
                const __m256i v = _mm256_loadu_si256((const __m256i*)(p + c * 64 + h * 32));
                even[h] = _mm256_and_si256(v, bytes);
                odd[h] = _mm256_and_si256(_mm256_srli_epi32(v, 8), bytes);
            }
            for (int j = 0; j < TT; j++) {
                int32_t x[2];
                memcpy(x, a.q + k0 + (int64_t)j * xs + c * 4, 8);
                const __m256i x01 = _mm256_set1_epi32(x[0]), x23 = _mm256_set1_epi32(x[1]);
                for (int h = 0; h < 2; h++)
                    d[h][j] = _mm256_add_epi32(d[h][j], _mm256_add_epi32(_mm256_madd_epi16(even[h], x01),
                                                                         _mm256_madd_epi16(odd[h], x23)));
            }
        }
    }
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < TT; j++) out[h][j] = d[h][j];
#endif
}

// Row block b (16 rows) for tokens [t, t + TT): y[(t + j) * ys + 16 b ..].
template <int BITS, int TT>
static inline void block_lowbit(const Mat& m, const Acts& a, int t, float* y, int ys, int b) {
    const int groups = m.k / m.group, chunks = m.group / (BITS == 4 ? 8 : 4);
    const int64_t group_bytes = (int64_t)chunks * 64 + 64;
    const uint8_t* p = m.w + (int64_t)b * groups * group_bytes;
    const int64_t xt = (int64_t)t * a.stride, st = (int64_t)t * a.group_stride;
#ifdef RIVER_AVX512
    for (int h = 0; h < ROW_VECTORS; h++) {
        __m512 acc[TT];
        for (int j = 0; j < TT; j++) acc[j] = _mm512_setzero_ps();
        for (int g = 0; g < groups; g++) {
            const uint8_t* sl = p + g * group_bytes + chunks * 64;
            Dots dot[1][TT];
            group_dots<BITS, TT>(p + g * group_bytes, chunks, a, xt + (int64_t)g * m.group, a.stride, dot);
            __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sl));
            __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sl + 32)));
            for (int j = 0; j < TT; j++) {
                const float* step = a.step + st + (int64_t)j * a.group_stride;
                const float* sum = a.sum + st + (int64_t)j * a.group_stride;
                acc[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[0][j]),
                                         _mm512_mul_ps(scale, _mm512_set1_ps(step[g])), acc[j]);
                acc[j] = _mm512_fmadd_ps(low, _mm512_set1_ps(sum[g]), acc[j]);
            }
        }
        for (int j = 0; j < TT; j++) _mm512_storeu_ps(y + (int64_t)(t + j) * ys + b * 16, acc[j]);
    }
#else
    // AVX2: the two 8-row halves' sums side by side, from one pass over each group's chunks
    __m256 acc[2][TT];
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < TT; j++) acc[h][j] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
        const uint8_t* sl = p + g * group_bytes + chunks * 64;
        // the same group of the next block (this thread's next 16 rows), into L1: the hardware prefetcher alone left
        // a one-token step's products 15-20% slower from memory (a C harness, 30 layers, Zen 3, 2026-12-03)
        const uint8_t* next = p + (int64_t)(groups + g) * group_bytes;  // a hint: past the matrix it cannot fault
        for (int64_t i = 0; i < group_bytes; i += 64) _mm_prefetch((const char*)(next + i), _MM_HINT_T0);
        Dots dot[2][TT];
        group_dots<BITS, TT>(p + g * group_bytes, chunks, a, xt + (int64_t)g * m.group, a.stride, dot);
        for (int h = 0; h < 2; h++) {
            __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sl + h * 16)));
            __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sl + 32 + h * 16)));
            for (int j = 0; j < TT; j++) {
                const float* step = a.step + st + (int64_t)j * a.group_stride;
                const float* sum = a.sum + st + (int64_t)j * a.group_stride;
                acc[h][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[h][j]),
                                            _mm256_mul_ps(scale, _mm256_set1_ps(step[g])), acc[h][j]);
                acc[h][j] = _mm256_fmadd_ps(low, _mm256_set1_ps(sum[g]), acc[h][j]);
            }
        }
    }
    for (int h = 0; h < 2; h++)
        for (int j = 0; j < TT; j++) _mm256_storeu_ps(y + (int64_t)(t + j) * ys + b * 16 + h * 8, acc[h][j]);
#endif
}

template <int BITS>
static void rows_lowbit(const Mat& m, const Acts& a, int T, float* y, int ys, int b0, int b1) {
    for (int b = b0; b < b1; b++)
        for (int t = 0; t < T; t += LOWBIT_TOKENS) {
            switch (T - t < LOWBIT_TOKENS ? T - t : LOWBIT_TOKENS) {
                case 1: block_lowbit<BITS, 1>(m, a, t, y, ys, b); break;
                case 2: block_lowbit<BITS, 2>(m, a, t, y, ys, b); break;
#ifdef RIVER_AVX512
                case 3: block_lowbit<BITS, 3>(m, a, t, y, ys, b); break;
                case 4: block_lowbit<BITS, 4>(m, a, t, y, ys, b); break;
#endif
            }
        }
}

static inline int row_unit(const Mat& m) { return m.kind == KIND_BF16 ? 4 : 16; }

// Rows r0..r1 of W (rows first.. of m) into y[t * ys + r] for T tokens.
static void rows_of(const Mat& m, const Acts& a, int T, float* y, int ys, int first, int r0, int r1) {
    Mat sub = m;
    if (m.kind == KIND_BF16) {
        sub.w = m.w + (int64_t)first * m.k * 2;
        rows_bf16(sub, a, T, y, ys, r0, r1);
        return;
    }
    const int per_lane = m.kind == KIND_Q4 ? 8 : 4;
    sub.w = m.w + (int64_t)(first / 16) * (m.k / m.group) * ((m.group / per_lane) * 64 + 64);
    if (m.kind == KIND_Q4)
        rows_lowbit<4>(sub, a, T, y, ys, r0 / 16, r1 / 16);
    else
        rows_lowbit<8>(sub, a, T, y, ys, r0 / 16, r1 / 16);
}

static const int CLAIMED_ROWS = 32;  // a long pass's unit of rows: whole packed blocks (16 or 32) and low-bit blocks

// y = W x for T tokens, rows first..first+count-1 of W going to y[t * ys + 0..count), by the whole team. Up to
// SHORT_PASS tokens each thread takes its fixed share (row_unit's multiples; their writers fixed, see add_my_rows);
// a long pass's threads claim CLAIMED_ROWS rows at a time until none are left, so that one slowed core does not
// hold the other at the next barrier, and all rows are done when it returns. A row's sums do not depend on who
// computes it.
static void product(const Mat& m, const Acts& a, int T, float* y, int ys, int first, int count) {
    if (T > SHORT_PASS) {
#pragma omp for schedule(dynamic)
        for (int u = 0; u < (count + CLAIMED_ROWS - 1) / CLAIMED_ROWS; u++)
            rows_of(m, a, T, y, ys, first, u * CLAIMED_ROWS,
                    (u + 1) * CLAIMED_ROWS < count ? (u + 1) * CLAIMED_ROWS : count);
        return;
    }
    int r0, r1;
    my_share(count, row_unit(m), &r0, &r1);
    rows_of(m, a, T, y, ys, first, r0, r1);
}

// x[t][r] += y[t][r] for this thread's rows of a product of `count` rows (the partition `product` used for a short
// pass; a long pass's product ends when all its rows are done).
static void add_my_rows(const Mat& m, const float* y, int ys, float* x, int xs, int T, int count) {
    int r0, r1;
    my_share(count, row_unit(m), &r0, &r1);
    for (int t = 0; t < T; t++)
        for (int r = r0; r < r1; r++) x[(int64_t)t * xs + r] += y[(int64_t)t * ys + r];
}

// ----------------------------------------------------------------------------------------------- attention

// Where a pass's intermediates live (river_scratch_floats sizes them; carve cuts them).
struct Scratch {
    float *xn, *qkv, *att, *y, *gate, *up, *hidden;  // per token of a chunk
    Acts acts;
    float* partial;  // a short pass's attention (or a long chunk's last token's): per token, query head and tile,
                     // (max, sum, output)
    float* work;     // each thread's attention work area
    int64_t work_stride;
    int short_pass;  // the pass has at most SHORT_PASS tokens: attention token by token, as a decode step
};

// bf16 pairs: a u32 holding two bf16 (the first in its low half), multiplied pair by pair into an fp32 lane, the high
// halves' product added first (vdpbf16ps).
static inline u32x16 loadu32(const uint32_t* p) { u32x16 v; memcpy(&v, p, 64); return v; }
static inline void storeu32(uint32_t* p, u32x16 v) { memcpy(p, &v, 64); }
static inline u32x16 splat32(uint32_t x) { return u32x16{} + x; }
#ifdef RIVER_AVX512
static inline f32x16 dot_pairs(f32x16 acc, u32x16 a, u32x16 b) {
    return (f32x16)_mm512_dpbf16_ps((__m512)acc, (__m512bh)a, (__m512bh)b);
}
#endif
// Lanes rounded to bf16 (to nearest even; finite inputs): as fp32 bits (low halves zero), or as bf16 bits.
template <typename F, typename U>
static inline U bf16_rounded(F x) {
    const U u = (U)x;
    return (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
}
static inline u32x16 bf16_bits(f32x16 x) { return bf16_rounded<f32x16, u32x16>(x) >> 16; }

// The pairs (bf16 values 2i, 2i + 1) of a row of `pairs` pairs from i = c on, zero past its end.
static inline u32x16 pairs_at(const uint16_t* row, int c, int pairs) {
    if (pairs - c >= 16) return loadu32((const uint32_t*)row + c);
    u32x16 v = {};
    memcpy(&v, (const uint32_t*)row + c, 4 * (pairs - c));
    return v;
}

// GN heads' outputs over CN vectors of 16 dims: out[g] = sum_j w[g][j] v[j] over the n positions of a tile (w: the
// heads' weights TILE apart; v: rows hd apart; out: heads `os` apart), each value converted once for every head.
#ifdef RIVER_AVX512
static const int OUT_HEADS = 4, OUT_VECS = 4;  // 16 sums of 16 lanes in registers
template <int GN, int CN>
static inline void weighted_values(const float* w, const uint16_t* v, int hd, int n, float* out, int os) {
    f32x16 acc[GN][CN] = {};
    for (int j = 0; j < n; j++) {
        f32x16 x[CN];
        for (int i = 0; i < CN; i++) x[i] = bf16x16(v + (int64_t)j * hd + 16 * i);
        for (int g = 0; g < GN; g++) {
            const float wj = w[g * TILE + j];
            for (int i = 0; i < CN; i++) acc[g][i] += x[i] * wj;
        }
    }
    for (int g = 0; g < GN; g++)
        for (int i = 0; i < CN; i++) store16(out + g * os + 16 * i, acc[g][i]);
}
#else
// The sums across lanes of 4 vectors, in lanes 0..3.
static inline __m128 sums4(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// Scores of 4 keys (kp) against GN query heads (qd: the heads' dims as attend_tile lays them out, hd apart), times
// scale, to s[g * TILE + j]. One chain per score: its even, then its odd dims, 16 dims at a time.
template <int GN>
static inline void key_scores(const uint16_t* const* kp, const float* qd, int hd, float scale, float* s) {
    __m256 acc[GN][4];
    for (int g = 0; g < GN; g++)
        for (int j = 0; j < 4; j++) acc[g][j] = _mm256_setzero_ps();
    for (int c = 0; c < hd; c += 16)
        for (int j = 0; j < 4; j++) {
            const __m256i k = _mm256_loadu_si256((const __m256i*)(kp[j] + c));
            const __m256 ke = low_halves(k), ko = high_halves(k);
            for (int g = 0; g < GN; g++) {
                acc[g][j] = _mm256_fmadd_ps(ke, _mm256_loadu_ps(qd + g * hd + c), acc[g][j]);
                acc[g][j] = _mm256_fmadd_ps(ko, _mm256_loadu_ps(qd + g * hd + c + 8), acc[g][j]);
            }
        }
    for (int g = 0; g < GN; g++)
        _mm_storeu_ps(s + g * TILE, _mm_mul_ps(sums4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), _mm_set1_ps(scale)));
}

// weighted_values on AVX2: GN heads' outputs over 16 dims, out[g] = sum_j w[g][j] v[j], the value's even and odd
// dims in separate sums of 8 lanes, interleaved back at the end.
template <int GN>
static inline void weighted_values8(const float* w, const uint16_t* v, int hd, int n, float* out, int os) {
    __m256 e[GN], o[GN];
    for (int g = 0; g < GN; g++) e[g] = o[g] = _mm256_setzero_ps();
    for (int j = 0; j < n; j++) {
        const __m256i x = _mm256_loadu_si256((const __m256i*)(v + (int64_t)j * hd));
        const __m256 xe = low_halves(x), xo = high_halves(x);
        for (int g = 0; g < GN; g++) {
            const __m256 wj = _mm256_broadcast_ss(w + g * TILE + j);
            e[g] = _mm256_fmadd_ps(xe, wj, e[g]);
            o[g] = _mm256_fmadd_ps(xo, wj, o[g]);
        }
    }
    for (int g = 0; g < GN; g++) {
        const __m256 lo = _mm256_unpacklo_ps(e[g], o[g]), hi = _mm256_unpackhi_ps(e[g], o[g]);
        _mm256_storeu_ps(out + g * os, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(out + g * os + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
}
#endif

// One unit of a short pass's attention: the G query heads of KV head `kv` for the token at position `pos`, over the
// positions of tile `tile` (up to pos). For each head: its max score, its sum of 2^(score - max) and its output
// sum of 2^(score - max) * v (scores in log2 units: their scale carries log2 e), written to part (G * (hd + 2)
// floats). Scores, AVX-512: each query split into two bf16 parts (q = high + low to 16 bits), each multiplied with
// the bf16 keys in exact pairs (vdpbf16ps) into fp32 lanes, the lanes of 16 positions summed together (sums16);
// AVX2: the fp32 query against each key's dims (a shift and a mask split them), 4 keys' sums added across together
// (sums4). Outputs: fp32 weights times the values, each value converted once for up to 4 heads. work: G * (hd + 2
// TILE) floats.
static void attend_tile(const Dims& D, const float* q, const uint16_t* K, const uint16_t* V, int pos, int tile,
                        float* work, float* part) {
    const int hd = D.head_dim, G = D.n_heads / D.n_kv_heads;
    const int p0 = tile * TILE, p1 = (tile + 1) * TILE < pos + 1 ? (tile + 1) * TILE : pos + 1, n = p1 - p0;
    const float scale = LOG2E / sqrtf((float)hd);  // weights 2^(s - max)
    float* scores = work + G * hd;     // (G, TILE), then the weights 2^(score - max)
#ifdef RIVER_AVX512
    const int pairs = hd / 2;
    uint16_t* qh = (uint16_t*)work;    // (G, hd) the query heads' high and low bf16 parts
    uint16_t* ql = qh + G * hd;
    for (int i = 0; i < G * hd; i += 16) {
        const f32x16 x = load16(q + i);
        const u32x16 high = bf16_bits(x);
        const u16x16 h = __builtin_convertvector(high, u16x16), l = __builtin_convertvector(bf16_bits(x - (f32x16)(high << 16)), u16x16);
        memcpy(qh + i, &h, 32);
        memcpy(ql + i, &l, 32);
    }
    for (int g = 0; g < G; g++)
        for (int j0 = 0; j0 < n; j0 += 16) {
            const uint16_t* kp[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) kp[j] = K + (int64_t)(p0 + (j0 + j < n ? j0 + j : n - 1)) * hd;  // past the tile: a copy
            f32x16 acc[16];
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) acc[j] = f32x16{};
            for (int c = 0; c < pairs; c += 16) {
                const u32x16 high = pairs_at(qh + g * hd, c, pairs), low = pairs_at(ql + g * hd, c, pairs);
#pragma GCC unroll 16
                for (int j = 0; j < 16; j++) {
                    const u32x16 k = pairs_at(kp[j], c, pairs);
                    acc[j] = dot_pairs(dot_pairs(acc[j], k, high), k, low);
                }
            }
            store16(scores + g * TILE + j0, sums16(acc) * scale);
        }
#else  // AVX2: the query in fp32, each 16 dims laid out as its 8 even then its 8 odd ones, so that a key's 16 bf16
       // split by a shift and a mask multiply it directly; 4 keys against up to 3 heads at a time (12 sums of 8 lanes),
       // each key converted once for them, the 4 keys' sums then added across together (sums4)
    float* qd = work;  // (G, hd)
    for (int i = 0; i < G * hd; i += 16)
        for (int l = 0; l < 8; l++) qd[i + l] = q[i + 2 * l], qd[i + 8 + l] = q[i + 2 * l + 1];
    for (int g0 = 0; g0 < G; g0 += 3)
        for (int j0 = 0; j0 < n; j0 += 4) {
            const uint16_t* kp[4];
            for (int j = 0; j < 4; j++) kp[j] = K + (int64_t)(p0 + (j0 + j < n ? j0 + j : n - 1)) * hd;  // past the tile: a copy
            float* s = scores + g0 * TILE + j0;
            if (g0 == 0)  // the next tile's keys and values, usually this thread's next unit: a hint, never a fault
                for (int j = 0; j < 4; j++)
                    for (int b = 0; b < hd * 2; b += 64) {
                        _mm_prefetch((const char*)(kp[j] + TILE * hd) + b, _MM_HINT_T0);
                        _mm_prefetch((const char*)(V + (kp[j] - K) + TILE * hd) + b, _MM_HINT_T0);
                    }
            switch (G - g0 < 3 ? G - g0 : 3) {
                case 1: key_scores<1>(kp, qd + g0 * hd, hd, scale, s); break;
                case 2: key_scores<2>(kp, qd + g0 * hd, hd, scale, s); break;
                case 3: key_scores<3>(kp, qd + g0 * hd, hd, scale, s); break;
            }
        }
#endif
    for (int g = 0; g < G; g++) {
        float* s = scores + g * TILE;
        const SoftF first = load_as<SoftF>(&lanes);  // 0, 1, 2, ...
        SoftF vmax = SoftF{} - INFINITY;
        for (int j = 0; j < n; j += SOFT_LANES) {
            const SoftF v = load_as<SoftF>(s + j);
            vmax = first + (float)j < (float)n && v > vmax ? v : vmax;
        }
        const float mx = max_lanes(vmax);
        f32x16 total;  // lane i: the weights of positions i, 16 + i, ... in order, whatever SOFT_LANES
        SoftF part_sum[16 / SOFT_LANES] = {};
        for (int j0 = 0; j0 < n; j0 += 16)
#pragma GCC unroll 2
            for (int k = 0; k < 16 / SOFT_LANES; k++) {  // k known when compiled: the sums stay in registers
                const int j = j0 + k * SOFT_LANES;
                if (j >= n) break;
                SoftF e = exp2_lanes<SoftF, SoftI>(load_as<SoftF>(s + j) - mx);
                e = first + (float)j < (float)n ? e : SoftF{};
                store_as(s + j, e);
                part_sum[k] += e;
            }
        memcpy(&total, part_sum, sizeof total);
        float* o = part + g * (hd + 2);
        o[0] = mx;
        o[1] = hsum16(total);
    }
#ifdef RIVER_AVX512
    for (int c = 0; c < hd; c += 16 * OUT_VECS) {
        const int cn = hd - c < 16 * OUT_VECS ? (hd - c) / 16 : OUT_VECS;
        for (int g0 = 0; g0 < G; g0 += OUT_HEADS) {
            const int gn = G - g0 < OUT_HEADS ? G - g0 : OUT_HEADS;
            const float* w = scores + g0 * TILE;
            const uint16_t* v = V + (int64_t)p0 * hd + c;
            float* o = part + g0 * (hd + 2) + 2 + c;
#define RIVER_OUTPUTS(GN, CN) case GN * 8 + CN: weighted_values<GN, CN>(w, v, hd, n, o, hd + 2); break;
            switch (gn * 8 + cn) {
                RIVER_OUTPUTS(1, 1) RIVER_OUTPUTS(1, 2) RIVER_OUTPUTS(1, 3) RIVER_OUTPUTS(1, 4)
                RIVER_OUTPUTS(2, 1) RIVER_OUTPUTS(2, 2) RIVER_OUTPUTS(2, 3) RIVER_OUTPUTS(2, 4)
                RIVER_OUTPUTS(3, 1) RIVER_OUTPUTS(3, 2) RIVER_OUTPUTS(3, 3) RIVER_OUTPUTS(3, 4)
                RIVER_OUTPUTS(4, 1) RIVER_OUTPUTS(4, 2) RIVER_OUTPUTS(4, 3) RIVER_OUTPUTS(4, 4)
            }
#undef RIVER_OUTPUTS
        }
    }
#else
    for (int c = 0; c < hd; c += 16)
        for (int g0 = 0; g0 < G; g0 += 4) {
            const float* w = scores + g0 * TILE;
            const uint16_t* v = V + (int64_t)p0 * hd + c;
            float* o = part + g0 * (hd + 2) + 2 + c;
            switch (G - g0 < 4 ? G - g0 : 4) {
                case 1: weighted_values8<1>(w, v, hd, n, o, hd + 2); break;
                case 2: weighted_values8<2>(w, v, hd, n, o, hd + 2); break;
                case 3: weighted_values8<3>(w, v, hd, n, o, hd + 2); break;
                case 4: weighted_values8<4>(w, v, hd, n, o, hd + 2); break;
            }
        }
#endif
}

static inline int tiles_upto(int pos) { return pos / TILE + 1; }

// Attention of a short pass (T <= SHORT_PASS tokens at positions pos0..pos0+T-1, each over the cache up to itself):
// units of (token, KV head, tile of positions) shared out among the threads, then each (token, head) merged over its
// tiles in order: out = sum_tiles 2^(max_tile - max) out_tile / sum_tiles 2^(max_tile - max) sum_tile. The units and
// the merge do not depend on T or on the thread count.
static void attend_short(const Dims& D, const float* qkv, int qkv_stride, const uint16_t* kl, const uint16_t* vl,
                         int64_t head_stride, int pos0, int T, const Scratch& s, float* att, int att_stride) {
    const int hd = D.head_dim, G = D.n_heads / D.n_kv_heads, max_tiles = tiles_upto(pos0 + T - 1);
    const int64_t part_head = (int64_t)max_tiles * (hd + 2);  // floats per (token, query head)
    int units = 0;
    for (int t = 0; t < T; t++) units += D.n_kv_heads * tiles_upto(pos0 + t);
    int u0, u1;
    my_share(units, 1, &u0, &u1);
    float* scores = s.work + (int64_t)omp_get_thread_num() * s.work_stride;
    float* unit_out = scores + G * (hd + 2 * TILE);
    for (int u = 0, t = 0; t < T; t++) {
        const int n_tiles = tiles_upto(pos0 + t);
        for (int kv = 0; kv < D.n_kv_heads; kv++)
            for (int tile = 0; tile < n_tiles; tile++, u++) {
                if (u < u0 || u >= u1) continue;
                attend_tile(D, qkv + (int64_t)t * qkv_stride + kv * G * hd, kl + kv * head_stride,
                            vl + kv * head_stride, pos0 + t, tile, scores, unit_out);
                for (int g = 0; g < G; g++)
                    memcpy(s.partial + ((int64_t)t * D.n_heads + kv * G + g) * part_head + (int64_t)tile * (hd + 2),
                           unit_out + g * (hd + 2), sizeof(float) * (hd + 2));
            }
    }
#pragma omp barrier
    int h0, h1;
    my_share(T * D.n_heads, 1, &h0, &h1);
    for (int th = h0; th < h1; th++) {
        const int t = th / D.n_heads, h = th % D.n_heads, n_tiles = tiles_upto(pos0 + t);
        const float* part = s.partial + (int64_t)th * part_head;
        float mx = -INFINITY, total = 0;
        for (int i = 0; i < n_tiles; i++) mx = larger(mx, part[(int64_t)i * (hd + 2)]);
        float* out = att + (int64_t)t * att_stride + h * hd;
        memset(out, 0, sizeof(float) * hd);
        for (int i = 0; i < n_tiles; i++) {
            const float* p = part + (int64_t)i * (hd + 2);
            const float w = exp2f(p[0] - mx);
            total += w * p[1];
            for (int j = 0; j < hd; j += SOFT_LANES)
                store_as(out + j, load_as<SoftF>(out + j) + load_as<SoftF>(p + 2 + j) * w);
        }
        const float inv = 1.0f / total;
        for (int j = 0; j < hd; j += SOFT_LANES) store_as(out + j, load_as<SoftF>(out + j) * inv);
    }
}

// A long pass's attention unit: the G query heads of one KV head for a block of QUERY_BLOCK queries. Its rows (query
// head and query) run along the lanes, so that no key or value is ever transposed: a key's or a value's element (or
// pair) is broadcast against a vector of rows. The rows are cut into tiles of ATT_ROWS vectors, each tile's operands
// side by side in the layouts its register tiles read: the queries (Q), a key block's scores (St: (keys, rows) fp32)
// and probabilities (P), the outputs (Ot: (hd, rows) fp32), and per row the online softmax's state. Every product is
// exact (bf16 times bf16), each sum fp32.
#ifdef RIVER_AVX512
// AVX-512 keeps them bf16 pairs (Q: (hd / 2, rows) pairs, P: (keys / 2, rows) pairs, a block's values (keys / 2, hd)
// pairs) for vdpbf16ps, and reads the keys from the cache as they are.
static const int ATT_KEYS = 4, ATT_ROWS = 6, ATT_DIMS = 4;  // register tiles: 24 sums of 16 lanes (16 rows each)
static const int ATT_LANES = 16;
static const uint32_t ZERO_PAIRS[MAX_HEAD_DIM / 2] = {};

// Scores of ATT_KEYS keys (pair rows kp[i], hd / 2 pairs each) for NR vectors of rows (query pairs Qp, (hd / 2, nrv)
// vectors), into St (keys, nrv) vectors.
template <int NR>
static inline void score_tile(const uint32_t* const* kp, const uint32_t* Qp, int nrv, int pairs, float scale,
                              float* St) {
    f32x16 acc[ATT_KEYS][NR];
    for (int k = 0; k < ATT_KEYS; k++)
        for (int i = 0; i < NR; i++) acc[k][i] = f32x16{};
    for (int c = 0; c < pairs; c++) {
        u32x16 q[NR];
        for (int i = 0; i < NR; i++) q[i] = loadu32(Qp + ((int64_t)c * nrv + i) * 16);
        for (int k = 0; k < ATT_KEYS; k++) {
            const u32x16 key = splat32(kp[k][c]);
            for (int i = 0; i < NR; i++) acc[k][i] = dot_pairs(acc[k][i], q[i], key);
        }
    }
    for (int k = 0; k < ATT_KEYS; k++)
        for (int i = 0; i < NR; i++) store16(St + ((int64_t)k * nrv + i) * 16, acc[k][i] * scale);
}

// Outputs of ATT_DIMS dimensions (value pairs Vp + c, hd apart) for NR vectors of rows: Ot (hd, nrv) vectors rescaled,
// plus the key block's probability pairs Pp (n_pairs, nrv) vectors times the value pairs.
template <int NR>
static inline void output_tile(const uint32_t* Vp, int hd, const uint32_t* Pp, int nrv, int n_pairs,
                               const float* rescale, float* Ot) {
    f32x16 acc[ATT_DIMS][NR];
    for (int c = 0; c < ATT_DIMS; c++)
        for (int i = 0; i < NR; i++) acc[c][i] = load16(Ot + ((int64_t)c * nrv + i) * 16) * load16(rescale + i * 16);
    for (int j = 0; j < n_pairs; j++) {
        u32x16 p[NR];
        for (int i = 0; i < NR; i++) p[i] = loadu32(Pp + ((int64_t)j * nrv + i) * 16);
        for (int c = 0; c < ATT_DIMS; c++) {
            const u32x16 v = splat32(Vp[(int64_t)j * hd + c]);
            for (int i = 0; i < NR; i++) acc[c][i] = dot_pairs(acc[c][i], p[i], v);
        }
    }
    for (int c = 0; c < ATT_DIMS; c++)
        for (int i = 0; i < NR; i++) store16(Ot + ((int64_t)c * nrv + i) * 16, acc[c][i]);
}

static inline int64_t query_floats(int rows, int hd) { return (int64_t)rows * hd / 2; }
static inline int64_t probability_floats(int rows) { return (int64_t)rows * KEY_BLOCK / 2; }
static inline int64_t key_floats(int) { return 0; }
static inline int64_t value_floats(int hd) { return (int64_t)KEY_BLOCK / 2 * hd; }

static inline void store_query(float* Q, int rows, int r, int c, const float* q) {  // row r's pair c
    ((uint32_t*)Q)[(int64_t)c * rows + r] = to_bf16(q[2 * c]) | (uint32_t)to_bf16(q[2 * c + 1]) << 16;
}

// Keys j and j + 1's probabilities (bf16-rounded fp32 bits) for rows v..: one bf16 pair each.
static inline void store_probabilities(float* P, int64_t rows, int j, int v, SoftU p0, SoftU p1) {
    store_as((uint32_t*)P + (j / 2) * rows + v, p0 >> 16 | p1);
}

// A key block's operands: its values (kn, hd) as pairs of keys, the missing odd one zero.
static void block_operands(const uint16_t*, const uint16_t* V, int kn, int hd, float*, float* values) {
    uint32_t* Vp = (uint32_t*)values;
    for (int j = 0; j < (kn + 1) / 2; j++) {
        const uint16_t* v0 = V + (int64_t)2 * j * hd;
        for (int c = 0; c < hd; c += 16)
            storeu32(Vp + (int64_t)j * hd + c, widen16(v0 + c) | (2 * j + 1 < kn ? widen16(v0 + hd + c) << 16 : u32x16{}));
    }
}

// The scores St (kn, rows) of keys K (kn, hd) for a tile's queries Q.
static void tile_scores(const uint16_t* K, const float*, int kn, int hd, const float* Q, int rows, float scale,
                        float* St) {
    const int nrv = rows / 16, pairs = hd / 2;
    for (int j = 0; j < kn; j += ATT_KEYS) {
        const uint32_t* kp[ATT_KEYS];
        for (int i = 0; i < ATT_KEYS; i++) kp[i] = j + i < kn ? (const uint32_t*)(K + (int64_t)(j + i) * hd) : ZERO_PAIRS;
        const uint32_t* q = (const uint32_t*)Q;
        float* s = St + (int64_t)j * rows;
        switch (nrv) {
            case 1: score_tile<1>(kp, q, nrv, pairs, scale, s); break;
            case 2: score_tile<2>(kp, q, nrv, pairs, scale, s); break;
            case 3: score_tile<3>(kp, q, nrv, pairs, scale, s); break;
            case 4: score_tile<4>(kp, q, nrv, pairs, scale, s); break;
            case 5: score_tile<5>(kp, q, nrv, pairs, scale, s); break;
            case 6: score_tile<6>(kp, q, nrv, pairs, scale, s); break;
        }
    }
}

// A tile's outputs Ot (hd, rows) = Ot * rescale + P (kn, rows) V (kn, hd).
static void tile_outputs(const float* values, int kn, int hd, const float* P, int rows, const float* rescale,
                         float* Ot) {
    const int nrv = rows / 16, n_pairs = (kn + 1) / 2;
    const uint32_t *Vp = (const uint32_t*)values, *p = (const uint32_t*)P;
    for (int c = 0; c < hd; c += ATT_DIMS) {
        float* o = Ot + (int64_t)c * rows;
        switch (nrv) {
            case 1: output_tile<1>(Vp + c, hd, p, nrv, n_pairs, rescale, o); break;
            case 2: output_tile<2>(Vp + c, hd, p, nrv, n_pairs, rescale, o); break;
            case 3: output_tile<3>(Vp + c, hd, p, nrv, n_pairs, rescale, o); break;
            case 4: output_tile<4>(Vp + c, hd, p, nrv, n_pairs, rescale, o); break;
            case 5: output_tile<5>(Vp + c, hd, p, nrv, n_pairs, rescale, o); break;
            case 6: output_tile<6>(Vp + c, hd, p, nrv, n_pairs, rescale, o); break;
        }
    }
}

#else
// AVX2 has no bf16 pair product: a pair's two products are two FMAs wherever its operands are converted, so the
// conversions leave the inner loops. The queries (rounded to bf16) are made fp32 once per unit, a block's keys and
// values once per block, its probabilities stored as fp32 (bf16 values): every product stays exact, and each sum
// takes a pair's odd product first, as vdpbf16ps does. Q: (hd, rows), P: (keys, rows), keys and values (keys, hd).
static const int ATT_KEYS = 4, ATT_ROWS = 3, ATT_DIMS = 4;  // register tiles: 12 sums of 8 lanes (8 rows each)
static const int ATT_LANES = 8;

// Scores of ATT_KEYS keys (Kf, rows hd apart) for NR vectors of rows (Q: dims `rows` apart), into St (keys, rows).
template <int NR>
static inline void score_tile(const float* Kf, int hd, const float* Q, int rows, float scale, float* St) {
    __m256 acc[ATT_KEYS][NR];  // every loop over it unrolled: else GCC keeps a copy on the stack, stored at every step
#pragma GCC unroll 16
    for (int k = 0; k < ATT_KEYS; k++)
#pragma GCC unroll 16
        for (int i = 0; i < NR; i++) acc[k][i] = _mm256_setzero_ps();
    for (int e = 0; e < hd; e++) {
        const int d = e ^ 1;  // a pair's odd dimension first
        __m256 q[NR];
#pragma GCC unroll 16
        for (int i = 0; i < NR; i++) q[i] = _mm256_loadu_ps(Q + (int64_t)d * rows + 8 * i);
#pragma GCC unroll 16
        for (int k = 0; k < ATT_KEYS; k++) {
            const __m256 key = _mm256_broadcast_ss(Kf + k * hd + d);
#pragma GCC unroll 16
            for (int i = 0; i < NR; i++) acc[k][i] = _mm256_fmadd_ps(q[i], key, acc[k][i]);
        }
    }
#pragma GCC unroll 16
    for (int k = 0; k < ATT_KEYS; k++)
#pragma GCC unroll 16
        for (int i = 0; i < NR; i++)
            _mm256_storeu_ps(St + (int64_t)k * rows + 8 * i, _mm256_mul_ps(acc[k][i], _mm256_set1_ps(scale)));
}

// Outputs of ATT_DIMS dimensions (values Vf + c, rows hd apart) for NR vectors of rows: Ot (hd, rows) rescaled, plus
// the block's probabilities P (keys, rows) times the values, over keys 0..2 n_pairs - 1.
template <int NR>
static inline void output_tile(const float* Vf, int hd, const float* P, int rows, int n_pairs, const float* rescale,
                               float* Ot) {
    __m256 acc[ATT_DIMS][NR];
#pragma GCC unroll 16
    for (int c = 0; c < ATT_DIMS; c++)
#pragma GCC unroll 16
        for (int i = 0; i < NR; i++)
            acc[c][i] = _mm256_mul_ps(_mm256_loadu_ps(Ot + (int64_t)c * rows + 8 * i), _mm256_loadu_ps(rescale + 8 * i));
    for (int j = 0; j < 2 * n_pairs; j++) {
        const int key = j ^ 1;  // a pair's odd key first
        __m256 p[NR];
#pragma GCC unroll 16
        for (int i = 0; i < NR; i++) p[i] = _mm256_loadu_ps(P + (int64_t)key * rows + 8 * i);
#pragma GCC unroll 16
        for (int c = 0; c < ATT_DIMS; c++) {
            const __m256 v = _mm256_broadcast_ss(Vf + (int64_t)key * hd + c);
#pragma GCC unroll 16
            for (int i = 0; i < NR; i++) acc[c][i] = _mm256_fmadd_ps(p[i], v, acc[c][i]);
        }
    }
#pragma GCC unroll 16
    for (int c = 0; c < ATT_DIMS; c++)
#pragma GCC unroll 16
        for (int i = 0; i < NR; i++) _mm256_storeu_ps(Ot + (int64_t)c * rows + 8 * i, acc[c][i]);
}

static inline int64_t query_floats(int rows, int hd) { return (int64_t)rows * hd; }
static inline int64_t probability_floats(int rows) { return (int64_t)rows * KEY_BLOCK; }
static inline int64_t key_floats(int hd) { return (int64_t)KEY_BLOCK * hd; }
static inline int64_t value_floats(int hd) { return (int64_t)KEY_BLOCK * hd; }

static inline void store_query(float* Q, int rows, int r, int c, const float* q) {
    Q[(int64_t)2 * c * rows + r] = bf16_value(to_bf16(q[2 * c]));
    Q[(int64_t)(2 * c + 1) * rows + r] = bf16_value(to_bf16(q[2 * c + 1]));
}

static inline void store_probabilities(float* P, int64_t rows, int j, int v, SoftU p0, SoftU p1) {
    store_as(P + j * rows + v, (SoftF)p0);
    store_as(P + (j + 1) * rows + v, (SoftF)p1);
}

// Rows 0..n-1 of x (bf16, hd apart) as fp32 into out, rows n..padded-1 zero.
static void rows_to_fp32(const uint16_t* x, int n, int padded, int hd, float* out) {
    for (int j = 0; j < n; j++)
        for (int c = 0; c < hd; c += 8) {
            const __m128i h = _mm_loadu_si128((const __m128i*)(x + (int64_t)j * hd + c));
            _mm256_storeu_ps(out + (int64_t)j * hd + c, low_halves(_mm256_cvtepu16_epi32(h)));
        }
    memset(out + (int64_t)n * hd, 0, sizeof(float) * (padded - n) * hd);
}

// A key block's operands: its keys and values (kn, hd) as fp32, zero past kn (to whole tiles of keys, whole pairs).
static void block_operands(const uint16_t* K, const uint16_t* V, int kn, int hd, float* keys, float* values) {
    rows_to_fp32(K, kn, (kn + ATT_KEYS - 1) / ATT_KEYS * ATT_KEYS, hd, keys);
    rows_to_fp32(V, kn, (kn + 1) / 2 * 2, hd, values);
}

static void tile_scores(const uint16_t*, const float* keys, int kn, int hd, const float* Q, int rows, float scale,
                        float* St) {
    for (int j = 0; j < kn; j += ATT_KEYS) {
        const float* k = keys + (int64_t)j * hd;
        float* s = St + (int64_t)j * rows;
        switch (rows / 8) {
            case 1: score_tile<1>(k, hd, Q, rows, scale, s); break;
            case 2: score_tile<2>(k, hd, Q, rows, scale, s); break;
            case 3: score_tile<3>(k, hd, Q, rows, scale, s); break;
        }
    }
}

static void tile_outputs(const float* values, int kn, int hd, const float* P, int rows, const float* rescale,
                         float* Ot) {
    const int n_pairs = (kn + 1) / 2;
    for (int c = 0; c < hd; c += ATT_DIMS) {
        float* o = Ot + (int64_t)c * rows;
        switch (rows / 8) {
            case 1: output_tile<1>(values + c, hd, P, rows, n_pairs, rescale, o); break;
            case 2: output_tile<2>(values + c, hd, P, rows, n_pairs, rescale, o); break;
            case 3: output_tile<3>(values + c, hd, P, rows, n_pairs, rescale, o); break;
        }
    }
}
#endif

static const int TILE_ROWS = ATT_ROWS * ATT_LANES;

// Rows of a long pass's attention unit: its G query heads times QUERY_BLOCK queries, in whole vectors of 16.
static inline int unit_rows(const Dims& D) { return (D.n_heads / D.n_kv_heads * QUERY_BLOCK + 15) / 16 * 16; }

// One tile of a unit's rows: its operands and each row's running max m, sum l, rescale and position.
struct RowTile {
    float *Q, *St, *P, *Ot, *m, *l, *rescale, *pos;
    int rows;
};

static inline int64_t tile_floats(int hd) {
    return query_floats(TILE_ROWS, hd) + (int64_t)TILE_ROWS * (KEY_BLOCK + hd + 4) + probability_floats(TILE_ROWS);
}

// Tile t of a unit of `rows` rows, in its part of the work area.
static RowTile row_tile(float* work, int t, int rows, int hd) {
    RowTile a;
    a.rows = rows - t * TILE_ROWS < TILE_ROWS ? rows - t * TILE_ROWS : TILE_ROWS;
    a.Q = work + t * tile_floats(hd);
    a.St = a.Q + query_floats(a.rows, hd);  // (KEY_BLOCK, rows)
    a.P = a.St + (int64_t)KEY_BLOCK * a.rows;
    a.Ot = a.P + probability_floats(a.rows);  // (hd, rows)
    a.m = a.Ot + (int64_t)hd * a.rows;
    a.l = a.m + a.rows;
    a.rescale = a.l + a.rows;
    a.pos = a.rescale + a.rows;
    return a;
}

// Floats of one thread's work area for a long pass's attention unit: its tiles, then a key block's operands.
static int64_t long_unit_floats(const Dims& D) {
    const int tiles = (unit_rows(D) + TILE_ROWS - 1) / TILE_ROWS;
    return tiles * tile_floats(D.head_dim) + key_floats(D.head_dim) + value_floats(D.head_dim);
}

// The online softmax's step over a key block (keys k0..k0+kn-1, scores in a.St) for a tile's rows: the running max
// raised, the rescale 2^(m_old - m_new) of what came before, the probabilities 2^(s - m) rounded to bf16 into a.P,
// the sum grown by them (the rounded ones, so that the output is their weighted mean). Keys past a row's position
// are masked for it where the block reaches past the unit's first query (`diagonal`).
static void block_softmax(const RowTile& a, int k0, int kn, bool diagonal) {
    const int64_t rows = a.rows;
    for (int v = 0; v < a.rows; v += SOFT_LANES) {  // rows v..v+SOFT_LANES-1
        const SoftF at = load_as<SoftF>(a.pos + v), none = SoftF{} - INFINITY;
        SoftF mx = load_as<SoftF>(a.m + v);
        for (int j = 0; j < kn; j++) {
            SoftF s = load_as<SoftF>(a.St + j * rows + v);
            if (diagonal) store_as(a.St + j * rows + v, s = (float)(k0 + j) <= at ? s : none);
            mx = s > mx ? s : mx;
        }
        const SoftF rs = exp2_lanes<SoftF, SoftI>(load_as<SoftF>(a.m + v) - mx);
        store_as(a.rescale + v, rs);
        SoftF total = {};
        for (int j = 0; j < kn; j += 2) {
            const SoftF s0 = load_as<SoftF>(a.St + j * rows + v);
            SoftF e0 = exp2_lanes<SoftF, SoftI>(s0 - mx), e1 = {};
            if (diagonal) e0 = s0 == none ? SoftF{} : e0;
            if (j + 1 < kn) {
                const SoftF s1 = load_as<SoftF>(a.St + (j + 1) * rows + v);
                e1 = exp2_lanes<SoftF, SoftI>(s1 - mx);
                if (diagonal) e1 = s1 == none ? SoftF{} : e1;
            }
            const SoftU p0 = bf16_rounded<SoftF, SoftU>(e0), p1 = bf16_rounded<SoftF, SoftU>(e1);
            store_probabilities(a.P, rows, j, v, p0, p1);
            total += (SoftF)p0 + (SoftF)p1;
        }
        store_as(a.l + v, load_as<SoftF>(a.l + v) * rs + total);
        store_as(a.m + v, mx);
    }
}

// One unit of a long pass's attention: the G query heads of KV head kv for queries q0..q1-1 of the pass (positions
// pos0 + q), over keys 0..pos0+q1-1 by blocks of KEY_BLOCK, each block's keys and values made operands once and then
// run through every tile: its scores, its softmax step, its outputs, on the tile's own operands. The query and each
// block's probabilities are rounded to bf16 (K and V are bf16 already).
static void attend_queries(const Dims& D, const float* qkv, int qkv_stride, const uint16_t* K, const uint16_t* V,
                           int pos0, int q0, int q1, float* work, float* att, int att_stride) {
    const int hd = D.head_dim, G = D.n_heads / D.n_kv_heads, used = G * (q1 - q0), rows = unit_rows(D);
    const int tiles = (rows + TILE_ROWS - 1) / TILE_ROWS;
    const float scale = LOG2E / sqrtf((float)hd);  // weights 2^(s - max)
    float* keys = work + tiles * tile_floats(hd);
    float* values = keys + key_floats(hd);
    static const float zeros[MAX_HEAD_DIM] = {};
    for (int t = 0; t < tiles; t++) {
        const RowTile a = row_tile(work, t, rows, hd);
        for (int i = 0; i < a.rows; i++) {  // unit row r = t * TILE_ROWS + i: query r / G, head r % G
            const int r = t * TILE_ROWS + i;
            const float* q = r < used ? qkv + (int64_t)(q0 + r / G) * qkv_stride + (r % G) * hd : zeros;
            for (int c = 0; c < hd / 2; c++) store_query(a.Q, a.rows, i, c, q);
            a.m[i] = -INFINITY, a.l[i] = 0;
            a.pos[i] = r < used ? (float)(pos0 + q0 + r / G) : 1e30f;  // unused rows see every key (of zero score)
        }
        memset(a.Ot, 0, sizeof(float) * hd * a.rows);
    }
    const int last = pos0 + q1 - 1;  // the last position any query here reads
    for (int k0 = 0; k0 <= last; k0 += KEY_BLOCK) {
        const int kn = last + 1 - k0 < KEY_BLOCK ? last + 1 - k0 : KEY_BLOCK;
        const bool diagonal = k0 + kn - 1 > pos0 + q0;  // some key here is past some row's query
        block_operands(K + (int64_t)k0 * hd, V + (int64_t)k0 * hd, kn, hd, keys, values);
        for (int t = 0; t < tiles; t++) {
            const RowTile a = row_tile(work, t, rows, hd);
            tile_scores(K + (int64_t)k0 * hd, keys, kn, hd, a.Q, a.rows, scale, a.St);
            block_softmax(a, k0, kn, diagonal);
            tile_outputs(values, kn, hd, a.P, a.rows, a.rescale, a.Ot);
        }
    }
    for (int t = 0; t < tiles; t++) {
        const RowTile a = row_tile(work, t, rows, hd);
        for (int i = 0; i < a.rows && t * TILE_ROWS + i < used; i++) {
            const int r = t * TILE_ROWS + i;
            float* out = att + (int64_t)(q0 + r / G) * att_stride + (r % G) * hd;
            const float inv = 1.0f / a.l[i];
            for (int c = 0; c < hd; c++) out[c] = a.Ot[(int64_t)c * a.rows + i] * inv;
        }
    }
}

// Attention of a long pass: units of (KV head, block of QUERY_BLOCK queries), claimed by the threads one at a time,
// the latest queries first (a unit's cost grows with its queries' positions: the largest first, the smallest fill
// in at the end). The caller's barrier ends it.
static void attend_long(const Dims& D, const float* qkv, int qkv_stride, const uint16_t* kl, const uint16_t* vl,
                        int64_t head_stride, int pos0, int T, const Scratch& s, float* att, int att_stride) {
    const int blocks = (T + QUERY_BLOCK - 1) / QUERY_BLOCK, G = D.n_heads / D.n_kv_heads, hd = D.head_dim;
    float* work = s.work + (int64_t)omp_get_thread_num() * s.work_stride;
#pragma omp for schedule(dynamic) nowait
    for (int u = 0; u < blocks * D.n_kv_heads; u++) {
        const int kv = u % D.n_kv_heads, qb = blocks - 1 - u / D.n_kv_heads;
        const int q0 = qb * QUERY_BLOCK, q1 = q0 + QUERY_BLOCK < T ? q0 + QUERY_BLOCK : T;
        attend_queries(D, qkv + kv * G * hd, qkv_stride, kl + kv * head_stride, vl + kv * head_stride, pos0, q0, q1,
                       work, att + kv * G * hd, att_stride);
    }
}

// ------------------------------------------------------------------------------------------------- a block

// Each token's RoPE angles, computed once per pass: cos and sin (half,) of token t at cos + t * half.
struct Rope {
    const float *cos, *sin;
    int half;
};

static void rope(float* v, const float* cos, const float* sin, int half) {
    for (int i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * cos[i] - b * sin[i];
        v[i + half] = b * cos[i] + a * sin[i];
    }
}

// hidden[i] = silu(gate[i]) * up[i] for i in i0..i1.
static void silu_times(const float* gate, const float* up, float* hidden, int i0, int i1) {
    int i = i0;
    for (; i + SOFT_LANES <= i1; i += SOFT_LANES) {
        const SoftF g = load_as<SoftF>(gate + i);
        store_as(hidden + i, g / (1.0f + exp_lanes<SoftF, SoftI>(-g)) * load_as<SoftF>(up + i));
    }
    for (; i < i1; i++) hidden[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// q and k of this thread's tokens rotated, their K/V stored as bf16 in cache layer l at their positions.
static void rotate_and_store(const Dims& D, float* qkv, int qkv_stride, const Cache& c, int l, int pos0, int T,
                             const Rope& r) {
    const int hd = D.head_dim, q_dim = D.n_heads * hd, kv_dim = D.n_kv_heads * hd;
    int t0, t1;
    my_share(T, 1, &t0, &t1);
    for (int t = t0; t < t1; t++) {
        float* row = qkv + (int64_t)t * qkv_stride;
        const float *cos = r.cos + (int64_t)t * r.half, *sin = r.sin + (int64_t)t * r.half;
        for (int h = 0; h < D.n_heads + D.n_kv_heads; h++) rope(row + h * hd, cos, sin, r.half);  // q heads, then k
        for (int h = 0; h < D.n_kv_heads; h++) {
            uint16_t* kd = c.k + l * c.layer_stride + h * c.head_stride + (int64_t)(pos0 + t) * hd;
            uint16_t* vd = c.v + l * c.layer_stride + h * c.head_stride + (int64_t)(pos0 + t) * hd;
            for (int i = 0; i < hd; i++) {
                kd[i] = to_bf16(row[q_dim + h * hd + i]);
                vd[i] = to_bf16(row[q_dim + kv_dim + h * hd + i]);
            }
        }
    }
}

// in = norm(x) (or x itself, norm null), prepared for the product with m, for T tokens: each token cut in pieces (the
// low-bit groups, or 64 inputs), the pieces shared out among the team, so that a one-token pass's inputs are prepared
// by every thread, not by one while the others wait. A piece's result does not depend on who prepares it.
static void prepare_tokens(const Mat& m, const float* x, int xs, const float* norm, float eps, float* xn,
                           const Acts& a, int T) {
    const int piece = m.kind == KIND_BF16 ? 64 : m.group, pieces = (m.k + piece - 1) / piece;
    int u0, u1;
    my_share(T * pieces, 1, &u0, &u1);
    for (int u = u0; u < u1;) {
        const int t = u / pieces, p0 = u % pieces, p1 = p0 + (u1 - u) < pieces ? p0 + (u1 - u) : pieces;
        const int i0 = p0 * piece, i1 = p1 * piece < m.k ? p1 * piece : m.k;
        const float* in = x + (int64_t)t * xs;
        if (norm) {
            rms_norm(in, norm, xn + (int64_t)t * m.k, m.k, eps, i0, i1);
            in = xn + (int64_t)t * m.k;
        }
        prepare(m, in, a, t, T, i0, i1);
        u += p1 - p0;
    }
}

// Block layer `l` on the T tokens of a chunk at positions pos0.., attending over cache layer l (which the block writes
// at their positions first): x (T, d) in place from token `from` on; the tokens before it only write their K/V (the
// model's last block, whose outputs past the last token nobody reads, as llama.cpp prunes it). Called by every
// thread of the team. A short pass's tokens, and a long pass's last token when the rest are pruned, attend token by
// token as a decode step does.
static void team_block(const Dims& D, const Layer& L, int l, float* x, int pos0, int T, int from, const Cache& c,
                       const Rope& r, const Scratch& s) {
    const int hd = D.head_dim, q_dim = D.n_heads * hd, qkv_dim = q_dim + 2 * D.n_kv_heads * hd, d = D.d;
    const uint16_t* kl = c.k + l * c.layer_stride;
    const uint16_t* vl = c.v + l * c.layer_stride;
    prepare_tokens(L.qkv, x, d, L.attn_norm, D.eps, s.xn, s.acts, T);
#pragma omp barrier
    product(L.qkv, s.acts, T, s.qkv, qkv_dim, 0, L.qkv.n);
#pragma omp barrier
    rotate_and_store(D, s.qkv, qkv_dim, c, l, pos0, T, r);
#pragma omp barrier
    if (from >= T) return;
    x += (int64_t)from * d, pos0 += from, T -= from;  // the tokens whose outputs are read, over the whole cache
    const float* qkv = s.qkv + (int64_t)from * qkv_dim;
    if (s.short_pass || from > 0)
        attend_short(D, qkv, qkv_dim, kl, vl, c.head_stride, pos0, T, s, s.att, q_dim);
    else
        attend_long(D, qkv, qkv_dim, kl, vl, c.head_stride, pos0, T, s, s.att, q_dim);
#pragma omp barrier
    prepare_tokens(L.o, s.att, q_dim, nullptr, 0, nullptr, s.acts, T);
#pragma omp barrier
    product(L.o, s.acts, T, s.y, d, 0, d);
    add_my_rows(L.o, s.y, d, x, d, T, d);  // the residual, each thread its own rows
#pragma omp barrier
    prepare_tokens(L.gate_up, x, d, L.mlp_norm, D.eps, s.xn, s.acts, T);
#pragma omp barrier
    // MLP: gate and up rows of the same units go to the same thread, so SwiGLU needs no barrier between them
    product(L.gate_up, s.acts, T, s.gate, D.ffn, 0, D.ffn);
    product(L.gate_up, s.acts, T, s.up, D.ffn, D.ffn, D.ffn);
    int i0, i1;
    my_share(D.ffn, row_unit(L.gate_up), &i0, &i1);
    for (int t = 0; t < T; t++)
        silu_times(s.gate + (int64_t)t * D.ffn, s.up + (int64_t)t * D.ffn, s.hidden + (int64_t)t * D.ffn, i0, i1);
#pragma omp barrier
    prepare_tokens(L.down, s.hidden, D.ffn, nullptr, 0, nullptr, s.acts, T);
#pragma omp barrier
    product(L.down, s.acts, T, s.y, d, 0, d);
    add_my_rows(L.down, s.y, d, x, d, T, d);
#pragma omp barrier
}

// Blocks first..last-1 of `layers` on a pass of T tokens at pos0.., x (T, d) in place, CHUNK tokens at a time; the
// last of them updates x only from token last_from on (0: every token).
static void team_blocks(const Dims& D, const Layer* layers, int first, int last, float* x, int pos0, int T,
                        int last_from, const Cache& c, const Rope& r, const Scratch& s) {
    for (int l = first; l < last; l++)
        for (int t = 0; t < T; t += CHUNK) {
            const int n = T - t < CHUNK ? T - t : CHUNK, from = l == last - 1 && last_from > t ? last_from - t : 0;
            const Rope chunk{r.cos + (int64_t)t * r.half, r.sin + (int64_t)t * r.half, r.half};
            team_block(D, layers[l], l, x + (int64_t)t * D.d, pos0 + t, n, from, c, chunk, s);
        }
}

// ----------------------------------------------------------------------------------------------- scratch

static int widest_input(const Dims& D) {
    const int q_dim = D.n_heads * D.head_dim;
    int w = D.d > q_dim ? D.d : q_dim;
    return D.ffn > w ? D.ffn : w;
}

static inline int64_t floats_of_bytes(int64_t bytes) { return (bytes + 63) / 64 * 16; }  // whole 64-byte lines

// Floats of the fp32 inputs of the bf16 products of a chunk of T tokens (Acts.xf; none where they stay bf16).
static int64_t fp32_input_floats(const Dims& D, int T) {
    return fp32_inputs(T) == AS_BF16 ? 0 : floats_of_bytes((int64_t)T * widest_input(D) * 4);
}

// Floats of one thread's packed rows in a long pass of T tokens at once (none where its products keep the tiles).
static int64_t pack_floats(const Dims& D, int T) {
    return T > SHORT_PASS ? (int64_t)PACK_ROWS * widest_input(D) / 2 + 16 : 0;  // (k / 2, PACK_ROWS) 32-bit pairs
}

// Floats of a pass's intermediates: a chunk's per-token buffers, the activations of one product, a short pass's
// attention partials at positions up to last_pos, and each thread's attention work area.
static int64_t chunk_floats(const Dims& D, int T, int last_pos, int threads, int64_t* work_stride) {
    const int n = T < CHUNK ? T : CHUNK, hd = D.head_dim, G = D.n_heads / D.n_kv_heads, w = widest_input(D);
    const int qkv = (D.n_heads + 2 * D.n_kv_heads) * hd;
    const int64_t partial = (int64_t)(n <= SHORT_PASS ? n : 1) * D.n_heads * tiles_upto(last_pos) * (hd + 2);
    const int64_t short_work = (int64_t)G * (hd + 2 * TILE) + G * (hd + 2), long_work = long_unit_floats(D);
    *work_stride = (short_work > long_work ? short_work : long_work) + 16;
    const int64_t acts = floats_of_bytes((int64_t)n * w * 2) * 3 + 2 * (int64_t)n * (w / 32 + 1) + 64 +
                         fp32_input_floats(D, n);
    return (int64_t)n * (2 * D.d + qkv + D.n_heads * hd + 3 * (int64_t)D.ffn + w) + acts + partial +
           threads * (*work_stride + pack_floats(D, n)) + 64;
}

static Scratch carve(const Dims& D, int T, int last_pos, int threads, float* p) {
    const int n = T < CHUNK ? T : CHUNK, w = widest_input(D);
    Scratch s;
    chunk_floats(D, T, last_pos, threads, &s.work_stride);
    s.xn = p;                     p += (int64_t)n * w;
    s.qkv = p;                    p += (int64_t)n * (D.n_heads + 2 * D.n_kv_heads) * D.head_dim;
    s.att = p;                    p += (int64_t)n * D.n_heads * D.head_dim;
    s.y = p;                      p += (int64_t)n * D.d;
    s.gate = p;                   p += (int64_t)n * D.ffn;
    s.up = p;                     p += (int64_t)n * D.ffn;
    s.hidden = p;                 p += (int64_t)n * D.ffn + D.d;
    s.acts.stride = w;
    s.acts.group_stride = w / 32 + 1;
    s.acts.xb = (uint16_t*)p;     p += floats_of_bytes((int64_t)n * w * 2);
    s.acts.xf = fp32_input_floats(D, n) ? p : nullptr;  p += fp32_input_floats(D, n);
    s.acts.q = (int16_t*)p;       p += floats_of_bytes((int64_t)n * w * 2);
    s.acts.high = (int8_t*)p;
    s.acts.low = s.acts.high + (int64_t)n * w;
    p += floats_of_bytes((int64_t)n * w * 2);
    s.acts.step = p;              p += (int64_t)n * s.acts.group_stride;
    s.acts.sum = p;               p += (int64_t)n * s.acts.group_stride + 64;
    s.acts.pack_stride = pack_floats(D, n);
    s.acts.pack = (uint32_t*)p;   p += threads * s.acts.pack_stride;
    s.partial = p;                p += (int64_t)(n <= SHORT_PASS ? n : 1) * D.n_heads * tiles_upto(last_pos) * (D.head_dim + 2);
    s.work = p;
    s.short_pass = T <= SHORT_PASS;
    return s;
}

// ------------------------------------------------------------------------------------------------ a pass

// A model as the native path holds it.
struct Model {
    Dims dims;
    int32_t n_layers;
    const Layer* backbone;   // the blocks held, the first ones (every rule leaves by then: kernels.Decoder checks)
    const Layer* river;      // (n_layers,), or null without a river
    const uint16_t* embed;   // (vocab, d) bf16
    const double* inv_freq;  // (head_dim / 2,) RoPE frequencies
    const float* norm;       // (d,) final norm
    Mat head;                // (vocab, d) the model's own LM head, bf16: where a pass that ran every backbone block ends
    Mat river_head;          // where a pass that left the backbone ends: the river's low-bit copy, or `head` again
};

// exit_policy.ExitRule as the pass reads it (river.native_exit fills it): after backbone block l, leave when
// checks and l >= min_layer and s_l = cos(h_l, h_{l+1}), at its minimum over the pass's tokens, exceeds tau, or once
// max_depth blocks have run (0: every block a river copy); never after the last block.
struct Exit {
    int32_t checks;
    float tau;
    int32_t min_layer, max_depth;
};

// s = cos(a, b) in double, each norm kept away from zero as torch's cosine_similarity does.
static double cosine(const float* a, const float* b, int d) {
    double dot = 0, aa = 0, bb = 0;
    for (int i = 0; i < d; i++) {
        dot += (double)a[i] * b[i];
        aa += (double)a[i] * a[i];
        bb += (double)b[i] * b[i];
    }
    return dot / (fmax(sqrt(aa), 1e-8) * fmax(sqrt(bb), 1e-8));
}

// Floats of scratch memory river_forward needs for T tokens at pos.. with `threads` threads.
extern "C" int64_t river_forward_scratch_floats(const Dims* dims, int T, int pos, int threads) {
    int64_t ws;
    const Dims D = *dims;
    return chunk_floats(D, T, pos + T - 1, threads, &ws) + (int64_t)T * (3 * D.d + D.head_dim + 2) + 64;
}

// T tokens at positions pos..pos+T-1 through the model: embedding, backbone blocks until the exit rule says leave
// (one depth for the pass: the minimum similarity over its tokens), river copies of the rest, final norm and LM head
// (the model's own after every backbone block, the river's after an exit) into logits (the last token's (vocab,), or every token's (T, vocab) with all_logits); one thread team, no return
// to Python between blocks. Without all_logits the last block computes only the last token's output (every token's
// K/V still). Returns the number of backbone blocks run, or -1, having written nothing, where a token id is not a
// row of the embedding (as many as the head's). similarity (n_layers,), never null: s_l of every backbone block run
// (its minimum over the tokens it updated), when the rule checks it.
extern "C" int river_forward(const Model* m, const int64_t* tokens, int T, int pos, const Cache* cache,
                             const Exit* rule, float* scratch, float* logits, int all_logits, float* similarity,
                             int threads) {
    for (int t = 0; t < T; t++)
        if (tokens[t] < 0 || tokens[t] >= m->head.n) return -1;
    const Dims D = m->dims;
    const int n = m->n_layers, half = D.head_dim / 2, d = D.d;
    int64_t ws;
    float* x = scratch + chunk_floats(D, T, pos + T - 1, threads, &ws);  // (T, d): the residual stream
    float* prev = x + (int64_t)T * d;                                     // (T, d): its state before a block
    float* cos = prev + (int64_t)T * d;                                   // (T, half) each
    float* sin = cos + (int64_t)T * half;
    double* cosines = (double*)(sin + (int64_t)T * half);                 // (T,)
    float* xn = (float*)(cosines + T);                                    // (T, d): final norm
    const Scratch s = carve(D, T, pos + T - 1, threads, scratch);
    const Rope r{cos, sin, half};
    for (int t = 0; t < T; t++) {
        for (int i = 0; i < d; i++) x[(int64_t)t * d + i] = bf16_value(m->embed[(int64_t)tokens[t] * d + i]);
        for (int i = 0; i < half; i++) {
            cos[(int64_t)t * half + i] = (float)::cos((pos + t) * m->inv_freq[i]);
            sin[(int64_t)t * half + i] = (float)::sin((pos + t) * m->inv_freq[i]);
        }
    }
    int depth = 0, leave = rule->max_depth == 0;
    const int first_out = all_logits ? 0 : T - 1;
#pragma omp parallel num_threads(threads)
    {
        while (!leave) {
            int t0, t1;
            my_share(T, 1, &t0, &t1);
            memcpy(prev + (int64_t)t0 * d, x + (int64_t)t0 * d, sizeof(float) * (t1 - t0) * d);
#pragma omp barrier
            const int from = depth == n - 1 ? first_out : 0;  // the last block updates only the tokens read after it
            team_blocks(D, m->backbone, depth, depth + 1, x, pos, T, from, *cache, r, s);
            if (rule->checks)
                for (int t = t0 > from ? t0 : from; t < t1; t++)
                    cosines[t] = cosine(prev + (int64_t)t * d, x + (int64_t)t * d, d);
#pragma omp barrier
#pragma omp single
            {
                const int l = depth++;
                double sim = 0;
                if (rule->checks) {
                    sim = cosines[from];
                    for (int t = from + 1; t < T; t++) sim = fmin(sim, cosines[t]);
                    similarity[l] = (float)sim;
                }
                leave = depth == n || depth >= rule->max_depth || (rule->checks && l >= rule->min_layer && sim > rule->tau);
            }
        }
        if (depth < n) team_blocks(D, m->river, depth, n, x, pos, T, first_out, *cache, r, s);
        // A pass that never left the backbone ends exactly as the backbone does; only one that left takes the river's.
        const Mat& head = depth == n ? m->head : m->river_head;
        for (int t = first_out; t < T; t += CHUNK) {  // the activations hold a chunk's tokens
            const int chunk = T - t < CHUNK ? T - t : CHUNK;
            prepare_tokens(head, x + (int64_t)t * d, d, m->norm, D.eps, xn, s.acts, chunk);
#pragma omp barrier
            product(head, s.acts, chunk, logits + (int64_t)(t - first_out) * head.n, head.n, 0, head.n);
#pragma omp barrier
        }
    }
    return depth;
}

// ------------------------------------------------------------------------------------- for tests and bench.py

// One product y (T, n) = x (T, k) W^T on its own.
extern "C" void river_product(const Mat* m, const float* x, int T, float* y, int threads) {
    const int groups = m->k / 32 + 1;
    Acts a;
    a.stride = m->k;
    a.group_stride = groups;
    const Dims widest{m->k, 1, 1, 1, 0, 0};
    a.xb = (uint16_t*)malloc(sizeof(uint16_t) * T * m->k);
    a.xf = fp32_input_floats(widest, T) ? (float*)malloc(sizeof(float) * fp32_input_floats(widest, T)) : nullptr;
    a.q = (int16_t*)malloc(sizeof(int16_t) * T * m->k);
    a.high = (int8_t*)malloc(2 * T * m->k);
    a.low = a.high + T * m->k;
    a.step = (float*)malloc(sizeof(float) * 2 * T * groups);
    a.sum = a.step + T * groups;
    a.pack_stride = pack_floats(widest, T);
    a.pack = (uint32_t*)malloc(sizeof(uint32_t) * (threads * a.pack_stride + 1));
#pragma omp parallel num_threads(threads)
    {
        prepare_tokens(*m, x, m->k, nullptr, 0, nullptr, a, T);
#pragma omp barrier
        product(*m, a, T, y, m->n, 0, m->n);
    }
    free(a.xb);
    free(a.xf);
    free(a.q);
    free(a.high);
    free(a.step);
    free(a.pack);
}

// The softmax weights' 2^x, lane by lane (n a multiple of 16), as attention computes them.
extern "C" void river_exp2(const float* x, int n, float* y) {
    for (int i = 0; i < n; i += SOFT_LANES) store_as(y + i, exp2_lanes<SoftF, SoftI>(load_as<SoftF>(x + i)));
}

// Floats of scratch memory a one-token run of blocks at position pos needs (river_run_blocks, river_run_products).
extern "C" int64_t river_blocks_scratch_floats(const Dims* dims, int pos, int threads) {
    int64_t ws;
    return chunk_floats(*dims, 1, pos, threads, &ws);
}

// Blocks first..last-1 of `layers` for one token at `pos`, x (d,) in place: a block's whole time.
extern "C" void river_run_blocks(const Dims* dims, const Layer* layers, int first, int last, float* x,
                                 const Cache* cache, int pos, const float* cos, const float* sin, float* scratch,
                                 int threads) {
    const Scratch s = carve(*dims, 1, pos, threads, scratch);
    const Rope r{cos, sin, dims->head_dim / 2};
#pragma omp parallel num_threads(threads)
    team_blocks(*dims, layers, first, last, x, pos, 1, 0, *cache, r, s);
}

// The four weight products of blocks first..last-1 alone, as a one-token pass runs them (inputs prepared, rows
// shared out among the team, a barrier after each), on whatever the scratch holds: the products' share of a block.
extern "C" void river_run_products(const Dims* dims, const Layer* layers, int first, int last, float* scratch,
                                   int threads) {
    const Dims D = *dims;
    const Scratch s = carve(D, 1, 0, threads, scratch);
#pragma omp parallel num_threads(threads)
    for (int l = first; l < last; l++) {
        const Layer& L = layers[l];
        const Mat* mats[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
        const float* inputs[4] = {s.xn, s.att, s.xn, s.hidden};
        float* outputs[4] = {s.qkv, s.y, s.gate, s.y};
        for (int i = 0; i < 4; i++) {
            prepare_tokens(*mats[i], inputs[i], mats[i]->k, nullptr, 0, nullptr, s.acts, 1);
#pragma omp barrier
            product(*mats[i], s.acts, 1, outputs[i], mats[i]->n, 0, mats[i]->n);
#pragma omp barrier
        }
    }
}
