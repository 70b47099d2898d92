// Low-bit weight products y = x W^T for T tokens (part of the one unit river.cpp includes): the river's 4- and 8-bit
// copies and its low-bit LM head, 16 rows side by side in quantize.pack_lowbit's layout. Per group, exact integer dot
// products of the codes with int16 activations, then y += scale * step * dot + low * sum(x), groups in order
// (quantize.int_product is the twin). Then the one product every caller uses, whatever the weight's kind, and the
// residual add of a product's rows.

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

// Group g of the row block PREFETCH_BLOCKS ahead of the one at p (this thread's rows to come), asked into L1 while
// this one computes: a single stream of low-bit rows, left to the hardware prefetcher, read 25-30% fewer bytes per
// second from memory than the backbone's bf16 rows (KERNELS.md). A hint: past the matrix it never faults.
static const int PREFETCH_BLOCKS = 2;  // 1, 2 and 4 alike on AVX-512; AVX2 took 1 and 2 alike
static inline void prefetch_ahead(const uint8_t* p, int groups, int g, int64_t group_bytes) {
    const uint8_t* next = p + (int64_t)(PREFETCH_BLOCKS * groups + g) * group_bytes;
    for (int64_t i = 0; i < group_bytes; i += 64) _mm_prefetch((const char*)(next + i), _MM_HINT_T0);
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
            prefetch_ahead(p, groups, g, group_bytes);
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
        prefetch_ahead(p, groups, g, group_bytes);
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

