// Attention over the cache for a decode step, or each token of a short pass (up to SHORT_PASS tokens: a check of
// drafted tokens), part of the one unit river.cpp includes. Each (token, KV head) runs over tiles of TILE positions
// shared out among the threads; a tile keeps, per query head, its maximum score, its sum of 2^(score - max) and its
// weighted values, and the tiles merge in order (the split-softmax sum), so a token's result does not depend on the
// threads or the other tokens. K/V are bf16, every product exact, every sum fp32. The torch twin: model.attend
// (softmax(q k^T / sqrt(d)) v over the cache, GQA heads sharing their KV head).

// Where a pass's intermediates live (river_scratch_floats sizes them; carve cuts them).
struct Scratch {
    float *qkv, *att, *y, *gate, *up, *hidden;  // per token of a chunk
    Acts acts;            // a product's inputs: the team's, or thread 0's copy where each thread has its own
    int own_inputs;       // each thread prepares every input into a copy of its own, acts_floats apart
    int64_t acts_floats;
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

// Rows first..first+rows-1 of a head's keys or values, asked for ahead of use: a long context's step would otherwise
// wait on memory, then compute, tile by tile. A hint: past the cache's end it never faults. What to ask for, and how
// far ahead, was measured (KERNELS.md): on AVX-512 the keys half a tile ahead (this tile's second half, then the
// start of the thread's next unit; keys and values a whole tile ahead had crowded the current tile's lines out of
// L1) and the values of the 16 positions being scored, which the weighted sums read after all the tile's scores; on
// AVX2 both, half a tile ahead.
static inline void prefetch_rows(const uint16_t* KV, int first, int rows, int hd) {
    const char* p = (const char*)(KV + (int64_t)first * hd);
    for (int64_t b = 0; b < (int64_t)rows * hd * 2; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
}

#ifdef RIVER_AVX512
// One query head's score sums against 16 keys (rows hd apart from k): acc[j] lanes sum to the score of key j, the
// query's high and low bf16 parts (qh, ql) each multiplied with the key in exact pairs. N = 16: all 16 keys there and
// the head's pairs whole vectors, their loads at fixed offsets; N = 0: the first `n` keys, key n - 1 standing in for
// the rest (a copy), any head size.
template <int N>
static inline void key_block_scores(const uint16_t* k, int hd, const uint16_t* qh, const uint16_t* ql, f32x16* acc,
                                    int n = 16) {
    const int pairs = hd / 2;
#pragma GCC unroll 16
    for (int j = 0; j < 16; j++) acc[j] = f32x16{};
    for (int c = 0; c < pairs; c += 16) {
        const u32x16 high = pairs_at(qh, c, pairs), low = pairs_at(ql, c, pairs);
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) {
            const u32x16 key = N ? loadu32((const uint32_t*)(k + (int64_t)j * hd) + c)
                                 : pairs_at(k + (int64_t)(j < n ? j : n - 1) * hd, c, pairs);
            acc[j] = dot_pairs(dot_pairs(acc[j], key, high), key, low);
        }
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
            if (g == 0) prefetch_rows(K, p0 + j0 + TILE / 2, 16, hd);  // spread over the first two heads' scores
            if (g == (G > 1)) prefetch_rows(V, p0 + j0, 16, hd);
            f32x16 acc[16];
            if (j0 + 16 <= n && pairs % 16 == 0)
                key_block_scores<16>(K + (int64_t)(p0 + j0) * hd, hd, qh + g * hd, ql + g * hd, acc);
            else
                key_block_scores<0>(K + (int64_t)(p0 + j0) * hd, hd, qh + g * hd, ql + g * hd, acc, n - j0);
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
            if (g0 == 0) prefetch_rows(K, p0 + j0 + TILE / 2, 4, hd), prefetch_rows(V, p0 + j0 + TILE / 2, 4, hd);
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

