// A product's inputs, prepared once per product for every token of the pass (part of the one unit river.cpp
// includes): rounded to bf16 for a bf16 weight (model.Linear's bf16 activations), or rounded to int16 per group of
// inputs and split into int8 halves for a low-bit weight (quantize.quantize_activations is the twin), each token's
// row laid out as the products read it.

// The inputs of one product for the tokens of a pass, each token's row `stride` elements apart.
struct Acts {
    float* normed;     // the inputs after their RMSNorm, where the product has one
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

