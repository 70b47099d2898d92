// One-token decode of a run of Llama blocks on the CPU: bf16 and 4-bit weight products (int16 activations), attention over
// the shared bf16 KV cache, norms, RoPE, SwiGLU, all inside one thread team. Built twice by kernels.py, once per
// instruction set (RIVER_AVX512: AVX-512 VNNI; otherwise AVX2 + FMA + F16C), and picked by the CPU's flags.
// Activations and the residual stream stay fp32; K/V are stored as bf16, as the torch path stores them.
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

enum { KIND_BF16 = 0, KIND_Q4 = 1, KIND_Q8 = 2 };

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

// ------------------------------------------------------------------------------------------------ helpers

static inline f32x16 load16(const float* p) { f32x16 v; memcpy(&v, p, 64); return v; }
static inline void store16(float* p, f32x16 v) { memcpy(p, &v, 64); }
static inline float hsum16(f32x16 v) {
    float s = 0;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}
#ifndef RIVER_AVX512
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#endif
static inline f32x16 splat(float x) { return f32x16{} + x; }

// 16 bf16 -> 16 fp32 (a bf16 is the top half of an fp32).
static inline f32x16 bf16x16(const uint16_t* p) {
    u16x16 h;
    memcpy(&h, p, 32);
    u32x16 w = __builtin_convertvector(h, u32x16) << 16;
    f32x16 f;
    memcpy(&f, &w, 64);
    return f;
}

static inline uint16_t to_bf16(float f) {  // round to nearest even, as torch's conversion does
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

// exp for 16 lanes: 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2]; relative error about 2e-7.
static inline f32x16 exp16(f32x16 x) {
    x = x < -87.0f ? splat(-87.0f) : x;
    x = x > 88.0f ? splat(88.0f) : x;
    f32x16 n = x * 1.44269504f + 12582912.0f;  // round to nearest through the float mantissa
    n = n - 12582912.0f;
    f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln 2 in two parts, the first exact in n * part
    f32x16 p = 1.98756912e-4f + r * 1.39819994e-3f;
    p = 8.33345205e-3f + r * p;
    p = 4.16657962e-2f + r * p;
    p = 1.66666657e-1f + r * p;
    p = 0.5f + r * p;
    p = 1.0f + r + r * r * p;
    i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23;
    f32x16 scale;
    memcpy(&scale, &e, 64);
    return p * scale;
}

static void rms_norm(const float* x, const float* w, float* out, int d, float eps) {
    float ss = 0;
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / d + eps);
    for (int i = 0; i < d; i++) out[i] = x[i] * r * w[i];
}

// Activations for the low-bit products: integers in [-LEVELS, LEVELS] per group of `group` inputs (int16),
// symmetric, with each group's step and its exact fp32 sum (the weights' lows multiply the sum, so it need not be
// rounded). Each is also split as 256 * high + low with both halves int8, for the 4-bit products' int8 dot
// products (vpdpbusd / pmaddubsw); LEVELS = 127 * 256 + 127 keeps the high half within int8.
static const float LEVELS = 32639.0f;

typedef int16_t i16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

static void quantize_activations(const float* x, int k, int group, int16_t* q, int8_t* high, int8_t* low,
                                 float* step, float* sum) {
    for (int g = 0; g < k / group; g++) {  // group is a multiple of 32: whole vectors of 16
        const float* xg = x + g * group;
        f32x16 vmax = {}, vsum = {};
        for (int i = 0; i < group; i += 16) {
            f32x16 v = load16(xg + i);
            f32x16 a = v < 0 ? -v : v;
            vmax = a > vmax ? a : vmax;
            vsum += v;
        }
        float amax = 0;
        for (int i = 0; i < 16; i++) amax = fmaxf(amax, vmax[i]);
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
    }
}

// What a product needs of its input: fp32 for bf16 weights, int16 groups for Q4.
struct Input {
    const float* x;
    const float* xeo;  // bf16 weights: x in even_odd order
    const int16_t* q;  // low-bit weights: the int16 activations,
    const int8_t* high;  // their high and low int8 halves,
    const int8_t* low;
    const float* scale;  // each group's step
    const float* sum;    // and exact sum
};

// ------------------------------------------------------------------------------------------ weight products

// x rearranged for bf16 products: per 32 inputs, the 16 even ones then the 16 odd ones. A bf16 pair read as one
// 32-bit lane gives the even weight by a left shift and the odd one by masking the low half: no unpacking.
static void even_odd(const float* x, int k, float* xeo) {
    for (int c = 0; c + 32 <= k; c += 32)
        for (int j = 0; j < 16; j++) {
            xeo[c + j] = x[c + 2 * j];
            xeo[c + 16 + j] = x[c + 2 * j + 1];
        }
}

static inline float bf16_value(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// y[r] = W[r] . x for rows r0..r1 of a bf16 matrix, four rows at a time sharing each load of x.
static void rows_bf16(const Mat& m, const float* x, const float* xeo, float* y, int r0, int r1) {
    const uint16_t* w = (const uint16_t*)m.w;
    const int k = m.k, k32 = k & ~31;
    int r = r0;
#ifdef RIVER_AVX512
    const __m512i odd = _mm512_set1_epi32((int)0xffff0000);
#define BF16_DOT(acc_e, acc_o, p)                                                                          \
    {                                                                                                      \
        __m512i v = _mm512_loadu_si512(p);                                                                 \
        acc_e = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe, acc_e);                 \
        acc_o = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, odd)), xo, acc_o);                 \
    }
    for (; r + 4 <= r1; r += 4) {
        const uint16_t* w0 = w + (int64_t)r * k;
        __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0, e2 = e0, o2 = e0, e3 = e0, o3 = e0;
        for (int i = 0; i < k32; i += 32) {
            __m512 xe = _mm512_loadu_ps(xeo + i), xo = _mm512_loadu_ps(xeo + i + 16);
            BF16_DOT(e0, o0, w0 + i);
            BF16_DOT(e1, o1, w0 + k + i);
            BF16_DOT(e2, o2, w0 + 2 * k + i);
            BF16_DOT(e3, o3, w0 + 3 * k + i);
        }
        float s[4] = {_mm512_reduce_add_ps(_mm512_add_ps(e0, o0)), _mm512_reduce_add_ps(_mm512_add_ps(e1, o1)),
                      _mm512_reduce_add_ps(_mm512_add_ps(e2, o2)), _mm512_reduce_add_ps(_mm512_add_ps(e3, o3))};
#undef BF16_DOT
#else
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000);
#define BF16_DOT(acc_e, acc_o, p)                                                                          \
    {                                                                                                      \
        __m256i v = _mm256_loadu_si256((const __m256i*)(p));                                               \
        acc_e = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc_e);                 \
        acc_o = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, odd)), xo, acc_o);                 \
    }
    for (; r + 4 <= r1; r += 4) {
        const uint16_t* w0 = w + (int64_t)r * k;
        __m256 e0 = _mm256_setzero_ps(), o0 = e0, e1 = e0, o1 = e0, e2 = e0, o2 = e0, e3 = e0, o3 = e0;
        for (int i = 0; i < k32; i += 16) {  // 16 inputs: the even/odd halves of a 32-input chunk, 8 pairs each
            const int c = i & ~31, half = (i & 16) / 2;
            __m256 xe = _mm256_loadu_ps(xeo + c + half), xo = _mm256_loadu_ps(xeo + c + 16 + half);
            BF16_DOT(e0, o0, w0 + i);
            BF16_DOT(e1, o1, w0 + k + i);
            BF16_DOT(e2, o2, w0 + 2 * k + i);
            BF16_DOT(e3, o3, w0 + 3 * k + i);
        }
        float s[4] = {hsum8(_mm256_add_ps(e0, o0)), hsum8(_mm256_add_ps(e1, o1)), hsum8(_mm256_add_ps(e2, o2)),
                      hsum8(_mm256_add_ps(e3, o3))};
#undef BF16_DOT
#endif
        for (int j = 0; j < 4; j++) {
            for (int i = k32; i < k; i++) s[j] += bf16_value(w0[j * k + i]) * x[i];
            y[r + j] = s[j];
        }
    }
    for (; r < r1; r++) {
        const uint16_t* wr = w + (int64_t)r * k;
        float s = 0;
        for (int i = 0; i < k; i++) s += bf16_value(wr[i]) * x[i];
        y[r] = s;
    }
}

// y for row blocks b0..b1 (16 rows each) of a 4- or 8-bit matrix: per group, exact integer dot products of the
// codes with the int16 activations (16 rows side by side, one 32-bit lane each), then
// y += scale * x_step * dot + low * x_sum. A 64-byte chunk holds 8 codes of each row (4 bits) or 4 (8 bits):
//   4 bits: byte j of a lane holds code j in its low nibble and code 4+j in its high one; a mask or a shift gives
//           4 codes as unsigned bytes, multiplied with the activations' int8 halves (vpdpbusd / pmaddubsw) and
//           combined as 256 * high + low;
//   8 bits: the byte at bit 8j is code 2j, the one at bit 16+8j code 2j+1: a shift and a mask give each row's
//           int16 pair (k, k+1) in its lane, multiplied with an int16 pair (vpdpwssd / pmaddwd).
static inline int32_t four(const int8_t* p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

#ifdef RIVER_AVX512
typedef __m512i Dots;  // one int32 dot product per row of a 16-row block
#define ROW_VECTORS 1  // vectors of 16 rows
#else
typedef __m256i Dots;  // 8 rows: a 16-row block is two of them
#define ROW_VECTORS 2
#endif

// The exact integer dot products of one group for rows h*8.. (AVX2) or all 16 (AVX-512): codes at p, chunks of 64
// bytes, activations from input index k0.
template <int BITS>
static inline Dots group_dot(const uint8_t* p, int chunks, const Input& in, int k0, int h) {
#ifdef RIVER_AVX512
    (void)h;
    __m512i d0 = _mm512_setzero_si512(), d1 = _mm512_setzero_si512();
    if (BITS == 4) {  // d0: against the high halves, d1: the low halves
        const __m512i nib = _mm512_set1_epi8(0x0f);
        const int8_t *xh = in.high + k0, *xl = in.low + k0;
        for (int c = 0; c < chunks; c++) {
            __m512i v = _mm512_loadu_si512(p + c * 64);
            __m512i lo = _mm512_and_si512(v, nib), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
            d0 = _mm512_dpbusd_epi32(d0, lo, _mm512_set1_epi32(four(xh + c * 8)));
            d1 = _mm512_dpbusd_epi32(d1, lo, _mm512_set1_epi32(four(xl + c * 8)));
            d0 = _mm512_dpbusd_epi32(d0, hi, _mm512_set1_epi32(four(xh + c * 8 + 4)));
            d1 = _mm512_dpbusd_epi32(d1, hi, _mm512_set1_epi32(four(xl + c * 8 + 4)));
        }
        return _mm512_add_epi32(_mm512_slli_epi32(d0, 8), d1);
    }
    const __m512i bytes = _mm512_set1_epi32(0x00ff00ff);
    for (int c = 0; c < chunks; c++) {  // d0, d1: the pairs (k, k+1) and (k+2, k+3)
        __m512i v = _mm512_loadu_si512(p + c * 64);
        int32_t xp[2];
        memcpy(xp, in.q + k0 + c * 4, 8);
        d0 = _mm512_dpwssd_epi32(d0, _mm512_and_si512(v, bytes), _mm512_set1_epi32(xp[0]));
        d1 = _mm512_dpwssd_epi32(d1, _mm512_and_si512(_mm512_srli_epi32(v, 8), bytes), _mm512_set1_epi32(xp[1]));
    }
    return _mm512_add_epi32(d0, d1);
#else
    __m256i d0 = _mm256_setzero_si256(), d1 = _mm256_setzero_si256();
    if (BITS == 4) {
        const __m256i nib = _mm256_set1_epi8(0x0f), ones = _mm256_set1_epi16(1);
        const int8_t *xh = in.high + k0, *xl = in.low + k0;
        for (int c = 0; c < chunks; c++) {
            __m256i v = _mm256_loadu_si256((const __m256i*)(p + c * 64 + h * 32));
            __m256i lo = _mm256_and_si256(v, nib), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
            // codes <= 15 and |x| <= 128: the int16 pair sums of pmaddubsw cannot saturate, nor their sum
            __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(four(xh + c * 8))),
                                          _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four(xh + c * 8 + 4))));
            __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(four(xl + c * 8))),
                                          _mm256_maddubs_epi16(hi, _mm256_set1_epi32(four(xl + c * 8 + 4))));
            d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(ph, ones));
            d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(pl, ones));
        }
        return _mm256_add_epi32(_mm256_slli_epi32(d0, 8), d1);
    }
    const __m256i bytes = _mm256_set1_epi32(0x00ff00ff);
    for (int c = 0; c < chunks; c++) {
        __m256i v = _mm256_loadu_si256((const __m256i*)(p + c * 64 + h * 32));
        int32_t xp[2];
        memcpy(xp, in.q + k0 + c * 4, 8);
        d0 = _mm256_add_epi32(d0, _mm256_madd_epi16(_mm256_and_si256(v, bytes), _mm256_set1_epi32(xp[0])));
        d1 = _mm256_add_epi32(d1, _mm256_madd_epi16(_mm256_and_si256(_mm256_srli_epi32(v, 8), bytes),
                                                    _mm256_set1_epi32(xp[1])));
    }
    return _mm256_add_epi32(d0, d1);
#endif
}

template <int BITS>
static void rows_lowbit(const Mat& m, const Input& in, float* y, int b0, int b1) {
    const int groups = m.k / m.group, chunks = m.group / (BITS == 4 ? 8 : 4);
    const int64_t group_bytes = (int64_t)chunks * 64 + 64;
    for (int b = b0; b < b1; b++) {
        const uint8_t* p = m.w + (int64_t)b * groups * group_bytes;
        for (int h = 0; h < ROW_VECTORS; h++) {
#ifdef RIVER_AVX512
            __m512 acc = _mm512_setzero_ps();
            for (int g = 0; g < groups; g++) {
                const uint8_t* sl = p + g * group_bytes + chunks * 64;
                __m512 dot = _mm512_cvtepi32_ps(group_dot<BITS>(p + g * group_bytes, chunks, in, g * m.group, h));
                __m512 scale = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)sl));
                __m512 low = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(sl + 32)));
                acc = _mm512_fmadd_ps(dot, _mm512_mul_ps(scale, _mm512_set1_ps(in.scale[g])), acc);
                acc = _mm512_fmadd_ps(low, _mm512_set1_ps(in.sum[g]), acc);
            }
            _mm512_storeu_ps(y + b * 16, acc);
#else
            __m256 acc = _mm256_setzero_ps();
            for (int g = 0; g < groups; g++) {
                const uint8_t* sl = p + g * group_bytes + chunks * 64;
                __m256 dot = _mm256_cvtepi32_ps(group_dot<BITS>(p + g * group_bytes, chunks, in, g * m.group, h));
                __m256 scale = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sl + h * 16)));
                __m256 low = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(sl + 32 + h * 16)));
                acc = _mm256_fmadd_ps(dot, _mm256_mul_ps(scale, _mm256_set1_ps(in.scale[g])), acc);
                acc = _mm256_fmadd_ps(low, _mm256_set1_ps(in.sum[g]), acc);
            }
            _mm256_storeu_ps(y + b * 16 + h * 8, acc);
#endif
        }
    }
}

// This thread's rows [*r0, *r1) of `count`, cut at multiples of `unit` (the last thread takes the rest).
static inline void my_rows(int count, int unit, int* r0, int* r1) {
    int t = omp_get_thread_num(), n = omp_get_num_threads(), units = count / unit;
    *r0 = (int)((int64_t)units * t / n) * unit;
    *r1 = t == n - 1 ? count : (int)((int64_t)units * (t + 1) / n) * unit;
}

static inline int row_unit(const Mat& m) { return m.kind == KIND_BF16 ? 4 : 16; }

// This thread's rows of y = W x, rows first..first+count-1 of W going to y[0..count).
static void product(const Mat& m, const Input& in, float* y, int first, int count) {
    int r0, r1;
    my_rows(count, row_unit(m), &r0, &r1);
    Mat sub = m;
    if (m.kind == KIND_BF16) {
        sub.w = m.w + (int64_t)first * m.k * 2;
        rows_bf16(sub, in.x, in.xeo, y, r0, r1);
        return;
    }
    const int per_lane = m.kind == KIND_Q4 ? 8 : 4;
    sub.w = m.w + (int64_t)(first / 16) * (m.k / m.group) * ((m.group / per_lane) * 64 + 64);
    if (m.kind == KIND_Q4)
        rows_lowbit<4>(sub, in, y, r0 / 16, r1 / 16);
    else
        rows_lowbit<8>(sub, in, y, r0 / 16, r1 / 16);
}

// x[r] += y[r] for this thread's rows of a product of `count` rows (the partition `product` used).
static void add_my_rows(const Mat& m, const float* y, float* x, int count) {
    int r0, r1;
    my_rows(count, row_unit(m), &r0, &r1);
    for (int r = r0; r < r1; r++) x[r] += y[r];
}

// --------------------------------------------------------------------------------------------------- a block

struct Scratch {
    float *xn, *xeo, *qkv, *att, *y, *hidden, *gate, *up, *scores, *xs, *xsum;
    int16_t* xq;
};

static Input prepare(const Mat& m, const float* x, float* xeo, int16_t* xq, float* xs, float* xsum) {
    int8_t* high = (int8_t*)(xq + m.k);  // the int16 area holds both halves after the int16 values
    int8_t* low = high + m.k;
    if (m.kind != KIND_BF16)
        quantize_activations(x, m.k, m.group, xq, high, low, xs, xsum);
    else
        even_odd(x, m.k, xeo);
    return Input{x, xeo, xq, high, low, xs, xsum};
}

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
    for (; i + 16 <= i1; i += 16) {
        f32x16 g = load16(gate + i);
        store16(hidden + i, g / (1.0f + exp16(-g)) * load16(up + i));
    }
    for (; i < i1; i++) hidden[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

// Softmax attention of query head h over cache positions 0..pos of its KV head.
static void attend(const Dims& D, int h, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                   int64_t head_stride, int pos, float* scores, float* out) {
    const int hd = D.head_dim, kv = h / (D.n_heads / D.n_kv_heads);
    const uint16_t* K = k_cache + kv * head_stride;
    const uint16_t* V = v_cache + kv * head_stride;
    const float scale = 1.0f / sqrtf((float)hd);
    float mx = -INFINITY;
    for (int p = 0; p <= pos; p++) {
        const uint16_t* kp = K + (int64_t)p * hd;
        f32x16 a = {};
        int i = 0;
        for (; i + 16 <= hd; i += 16) a += bf16x16(kp + i) * load16(q + i);
        float s = hsum16(a);
        for (; i < hd; i++) {
            uint32_t u = (uint32_t)kp[i] << 16;
            float f;
            memcpy(&f, &u, 4);
            s += f * q[i];
        }
        scores[p] = s * scale;
        mx = fmaxf(mx, scores[p]);
    }
    float total = 0;
    int p = 0;
    for (; p + 16 <= pos + 1; p += 16) {
        f32x16 e = exp16(load16(scores + p) - mx);
        store16(scores + p, e);
        total += hsum16(e);
    }
    for (; p <= pos; p++) {
        scores[p] = expf(scores[p] - mx);
        total += scores[p];
    }
    for (int i = 0; i < hd; i++) out[i] = 0;
    for (int p2 = 0; p2 <= pos; p2++) {
        const uint16_t* vp = V + (int64_t)p2 * hd;
        const float w = scores[p2] / total;
        int i = 0;
        for (; i + 16 <= hd; i += 16) store16(out + i, load16(out + i) + bf16x16(vp + i) * w);
        for (; i < hd; i++) {
            uint32_t u = (uint32_t)vp[i] << 16;
            float f;
            memcpy(&f, &u, 4);
            out[i] += f * w;
        }
    }
}

// The widest input of a block's products: the size of each scratch vector.
static int widest_input(const Dims& D) {
    const int q_dim = D.n_heads * D.head_dim;
    return D.ffn > q_dim ? (D.ffn > D.d ? D.ffn : D.d) : (q_dim > D.d ? q_dim : D.d);
}

// Floats of scratch memory a block run needs for a token at position pos.
extern "C" int64_t river_scratch_floats(const Dims* dims, int pos) {
    const Dims D = *dims;
    return (int64_t)widest_input(D) * 10 + (D.n_heads + 2 * D.n_kv_heads) * D.head_dim + (int64_t)D.n_heads * (pos + 16);
}

static Scratch carve(const Dims& D, float* scratch) {
    const int q_dim = D.n_heads * D.head_dim, kv_dim = D.n_kv_heads * D.head_dim, widest = widest_input(D);
    Scratch s;
    s.xn = scratch;
    s.xeo = s.xn + widest;
    s.att = s.xeo + widest;
    s.y = s.att + widest;
    s.hidden = s.y + widest;
    s.gate = s.hidden + widest;
    s.up = s.gate + widest;
    s.xs = s.up + widest;
    s.xsum = s.xs + widest;
    s.qkv = s.xsum + widest;
    s.xq = (int16_t*)(s.qkv + q_dim + 2 * kv_dim);
    s.scores = s.qkv + q_dim + 2 * kv_dim + widest;  // scores per query head, so heads run in parallel
    return s;
}

// Where a token's K/V go: the whole cache (layers, 1, n_kv_heads, capacity, head_dim) bf16.
struct Cache {
    uint16_t *k, *v;
    int64_t layer_stride, head_stride;
};

// Blocks first..last-1 on x (d,), in place, for one token at `pos`; block j reads and writes cache layer j. Called by
// every thread of an enclosing parallel region; `in` is shared among them.
static void team_blocks(const Dims& D, const Layer* layers, int first, int last, float* x, const Cache& c, int pos,
                        const float* cos, const float* sin, const Scratch& s, Input& in) {
    const int hd = D.head_dim, q_dim = D.n_heads * hd, kv_dim = D.n_kv_heads * hd;
    for (int l = first; l < last; l++) {
        const Layer& L = layers[l];
        uint16_t* kl = c.k + (int64_t)l * c.layer_stride;
        uint16_t* vl = c.v + (int64_t)l * c.layer_stride;
        int lo, hi;
        // attention: q, k, v of the normed state; K/V into this layer's slots at pos; heads in parallel
#pragma omp single
        {
            rms_norm(x, L.attn_norm, s.xn, D.d, D.eps);
            in = prepare(L.qkv, s.xn, s.xeo, s.xq, s.xs, s.xsum);
        }
        product(L.qkv, in, s.qkv, 0, L.qkv.n);
#pragma omp barrier
#pragma omp single
        {
            for (int h = 0; h < D.n_heads; h++) rope(s.qkv + h * hd, cos, sin, hd / 2);
            for (int h = 0; h < D.n_kv_heads; h++) {
                float* k = s.qkv + q_dim + h * hd;
                const float* v = s.qkv + q_dim + kv_dim + h * hd;
                rope(k, cos, sin, hd / 2);
                uint16_t* kd = kl + h * c.head_stride + (int64_t)pos * hd;
                uint16_t* vd = vl + h * c.head_stride + (int64_t)pos * hd;
                for (int i = 0; i < hd; i++) {
                    kd[i] = to_bf16(k[i]);
                    vd[i] = to_bf16(v[i]);
                }
            }
        }
        my_rows(D.n_heads, 1, &lo, &hi);
        for (int h = lo; h < hi; h++)
            attend(D, h, s.qkv + h * hd, kl, vl, c.head_stride, pos, s.scores + (int64_t)h * (pos + 16),
                   s.att + h * hd);
#pragma omp barrier
#pragma omp single
        in = prepare(L.o, s.att, s.xeo, s.xq, s.xs, s.xsum);
        product(L.o, in, s.y, 0, D.d);
        add_my_rows(L.o, s.y, x, D.d);  // the residual, each thread its own rows
#pragma omp barrier
#pragma omp single
        {
            rms_norm(x, L.mlp_norm, s.xn, D.d, D.eps);
            in = prepare(L.gate_up, s.xn, s.xeo, s.xq, s.xs, s.xsum);
        }
        // MLP: gate and up rows of the same units go to the same thread, so SwiGLU needs no extra barrier
        product(L.gate_up, in, s.gate, 0, D.ffn);
        product(L.gate_up, in, s.up, D.ffn, D.ffn);
        my_rows(D.ffn, row_unit(L.gate_up), &lo, &hi);
        silu_times(s.gate, s.up, s.hidden, lo, hi);
#pragma omp barrier
#pragma omp single
        in = prepare(L.down, s.hidden, s.xeo, s.xq, s.xs, s.xsum);
        product(L.down, in, s.y, 0, D.d);
        add_my_rows(L.down, s.y, x, D.d);
#pragma omp barrier
    }
}

// ------------------------------------------------------------------------------------- for measuring (bench.py)

// Blocks first..last-1 of `layers` for one token (see team_blocks), in one thread team: a block's whole time.
extern "C" void river_run_blocks(const Dims* dims, const Layer* layers, int first, int last, float* x,
                                 const Cache* cache, int pos, const float* cos, const float* sin, float* scratch,
                                 int threads) {
    const Scratch s = carve(*dims, scratch);
    Input in;
#pragma omp parallel num_threads(threads)
    team_blocks(*dims, layers, first, last, x, *cache, pos, cos, sin, s, in);
}

// The four weight products of blocks first..last-1 alone, as team_blocks runs them (inputs prepared by one thread,
// rows split among the team, a barrier after each), on whatever the scratch holds: the products' share of a block.
extern "C" void river_run_products(const Dims* dims, const Layer* layers, int first, int last, float* scratch,
                                   int threads) {
    const Dims D = *dims;
    const Scratch s = carve(D, scratch);
    Input in;
#pragma omp parallel num_threads(threads)
    for (int l = first; l < last; l++) {
        const Layer& L = layers[l];
        const Mat* mats[4] = {&L.qkv, &L.o, &L.gate_up, &L.down};
        const float* inputs[4] = {s.xn, s.att, s.xn, s.hidden};
        float* outputs[4] = {s.qkv, s.y, s.gate, s.y};
        for (int i = 0; i < 4; i++) {
#pragma omp single
            in = prepare(*mats[i], inputs[i], s.xeo, s.xq, s.xs, s.xsum);
            product(*mats[i], in, outputs[i], 0, mats[i]->n);
#pragma omp barrier
        }
    }
}

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

// A model's decode step as the native path holds it.
struct Model {
    Dims dims;
    int32_t n_layers;
    const Layer* backbone;   // the blocks held, the first ones (every rule leaves by then: kernels.Decoder checks)
    const Layer* river;      // (n_layers,), or null without a river
    const uint16_t* embed;   // (vocab, d) bf16
    const double* inv_freq;  // (head_dim / 2,) RoPE frequencies
    const float* norm;       // (d,) final norm
    Mat head;                // (vocab, d) bf16
};

// exit_policy.ExitRule as the step reads it (river.native_exit fills it): after backbone block l, leave when
// checks and l >= min_layer and s_l = cos(h_l, h_{l+1}) > tau, or once max_depth blocks have run (0: every block a
// river copy); never after the last block. With checks, s_l is computed after every block run.
struct Exit {
    int32_t checks;
    float tau;
    int32_t min_layer, max_depth;
};

// One token through the whole model: embedding, backbone blocks until the exit rule says leave, river copies of
// the rest, final norm and LM head into logits (vocab,); one thread team, no return to Python between blocks.
// Returns the number of backbone blocks run. similarity (n_layers,), never null: s_l of every backbone block run, when
// the rule checks it.
extern "C" int river_step(const Model* m, int token, int pos, const Cache* cache, const Exit* rule, float* scratch,
                          float* logits, float* similarity, int threads) {
    const Dims D = m->dims;
    const int n = m->n_layers, half = D.head_dim / 2;
    const Scratch s = carve(D, scratch);
    // x, the previous state and the RoPE tables sit past the block scratch (river_step_scratch_floats)
    float* x = scratch + river_scratch_floats(&m->dims, pos);
    float* prev = x + D.d;
    float* cos = prev + D.d;
    float* sin = cos + half;
    for (int i = 0; i < D.d; i++) x[i] = bf16_value(m->embed[(int64_t)token * D.d + i]);
    for (int i = 0; i < half; i++) {
        cos[i] = (float)::cos(pos * m->inv_freq[i]);
        sin[i] = (float)::sin(pos * m->inv_freq[i]);
    }
    int depth = 0, leave = rule->max_depth == 0;
    Input in;
#pragma omp parallel num_threads(threads)
    {
        while (!leave) {
#pragma omp single
            memcpy(prev, x, sizeof(float) * D.d);
            team_blocks(D, m->backbone, depth, depth + 1, x, *cache, pos, cos, sin, s, in);
#pragma omp single
            {
                const int l = depth++;
                double sim = 0;
                if (rule->checks) similarity[l] = (float)(sim = cosine(prev, x, D.d));
                leave = depth == n || depth >= rule->max_depth || (rule->checks && l >= rule->min_layer && sim > rule->tau);
            }
        }
        if (depth < n) team_blocks(D, m->river, depth, n, x, *cache, pos, cos, sin, s, in);
#pragma omp single
        {
            rms_norm(x, m->norm, s.xn, D.d, D.eps);
            in = prepare(m->head, s.xn, s.xeo, s.xq, s.xs, s.xsum);
        }
        product(m->head, in, logits, 0, m->head.n);
    }
    return depth;
}

// Floats of scratch memory river_step needs.
extern "C" int64_t river_step_scratch_floats(const Dims* dims, int pos) {
    return river_scratch_floats(dims, pos) + 2 * dims->d + dims->head_dim;
}

// One product y = W x, for tests and for callers outside a block run.
extern "C" void river_product(const Mat* m, const float* x, float* y, int threads) {
    const int groups = m->k / m->group + 1;
    float* xeo = (float*)malloc(sizeof(float) * (m->k + 2 * groups));
    int16_t* xq = (int16_t*)malloc(4 * m->k);  // int16 values, then their int8 halves
    Input in = prepare(*m, x, xeo, xq, xeo + m->k, xeo + m->k + groups);
#pragma omp parallel num_threads(threads)
    product(*m, in, y, 0, m->n);
    free(xq);
    free(xeo);
}

