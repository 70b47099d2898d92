// The shared ground of the native pass (part of the one unit river.cpp includes, in order): the shapes and weights as
// the pass sees them (Mat, Layer, Dims, Cache), the sizes every part tiles by, and the small helpers they all use --
// vector loads and stores, sums and maxima across lanes, bf16 conversions (rounding to nearest even, as torch's),
// 2^x and e^x over a vector, RMSNorm (model.RMSNorm's twin) and the split of work among the team's threads.

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
// A long pass's attention: queries per unit (each key block read once for them all, made fp32 once on AVX2, where
// 64 queries ran faster than 32: KERNELS.md).
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
    f32x16 squares = {};  // 16 running sums, not one chain: the chain's latency was a microsecond per norm
    int i = 0;
    for (; i + 16 <= d; i += 16) squares += load16(x + i) * load16(x + i);
    float ss = hsum16(squares);
    for (; i < d; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / d + eps);
    for (int i = i0; i < i1; i++) out[i] = x[i] * r * w[i];
}

// This thread's share [*i0, *i1) of `count` items, cut at multiples of `unit` (the last thread takes the rest).
static inline void my_share(int count, int unit, int* i0, int* i1) {
    int t = omp_get_thread_num(), n = omp_get_num_threads(), units = count / unit;
    *i0 = (int)((int64_t)units * t / n) * unit;
    *i1 = t == n - 1 ? count : (int)((int64_t)units * (t + 1) / n) * unit;
}

