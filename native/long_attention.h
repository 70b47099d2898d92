// Causal attention of a long pass (a prefill of more than SHORT_PASS tokens), part of the one unit river.cpp
// includes: units of (KV head, block of QUERY_BLOCK queries) claimed by the threads, each running over blocks of
// KEY_BLOCK keys with an online softmax, no mask materialized and the blocks past the diagonal never read. Products
// of bf16 values are exact, sums fp32; the order differs from a step's, which only a prefill may. The torch twin:
// model.attend with the causal mask.

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

