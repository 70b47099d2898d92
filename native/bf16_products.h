// bf16 weight products y = x W^T for T tokens (part of the one unit river.cpp includes): the backbone's matrices and
// the model's LM head. Each product of a bf16 pair is exact, every sum fp32 (vdpbf16ps with AVX512_BF16; on AVX2 a
// shift, a mask and two FMAs per pair). Up to SHORT_PASS tokens every sum keeps one order whatever tokens share its
// tile, so k one-token steps equal one k-token pass bit for bit; a longer pass packs each block of rows by input
// pair and sums in another order. The torch twin: model.Linear on bf16-rounded activations. KERNELS.md says why
// each tile has the shape it has.

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
// badly (slower than one row at a time, from memory). So each step also asks for R lines of the tile PREFETCH_TILES
// ahead, in address order, into L2: a 5-token pass then streams the weights about as fast as a one-token one
// (KERNELS.md has the timings). On AVX2 a one-token step runs in lockstep too (LOCKSTEP_TOKENS).
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
                                       // the weights faster than a row at a time (KERNELS.md)
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
// one-token step's. (A 3- or 4-token check's products ran faster this way than in the tiles: KERNELS.md.)
static const int SHORT_TOKENS = 6;     // 12 sums in registers, and the weight vector's two halves
static const int SHORT_PREFETCH = 8192;  // bytes ahead in the rows' stream (8 rows of 576 inputs), which the
                                         // hardware prefetcher alone did not keep up with (KERNELS.md)
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
// registers, so nothing is summed across lanes, and each weight vector loaded serves 12 tokens: closer to
// vdpbf16ps's peak than the tiles above, even packing each block anew (KERNELS.md). Each sum is one chain over the
// pairs in order: a prefill rounds its products unlike a decode step, which keeps tile_bf16's order.
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
// need one register more than AVX2 has and GCC spills: 5 tokens ran faster than either, KERNELS.md.)
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

