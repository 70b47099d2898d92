// One Llama block for the T tokens of a pass, run by the whole thread team (part of the one unit river.cpp
// includes): RMSNorm, the qkv product, RoPE (rotate-half), K/V written as bf16 into the block's layer of the cache,
// attention, the o product and the residual; RMSNorm, gate_up, SwiGLU, down and the residual. A backbone block and
// its river copy run the same code on weights of another kind. The torch twin: model.Block.forward. Then the layout
// of the pass's scratch memory.

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

// The q and k heads of the T tokens rotated, each k head's K/V stored as bf16 in cache layer l at its token's position:
// (token, head) units shared out among the team, so that a decode step's one token is not one thread's work alone.
static void rotate_and_store(const Dims& D, float* qkv, int qkv_stride, const Cache& c, int l, int pos0, int T,
                             const Rope& r) {
    const int hd = D.head_dim, q_dim = D.n_heads * hd, kv_dim = D.n_kv_heads * hd, heads = D.n_heads + D.n_kv_heads;
    int u0, u1;
    my_share(T * heads, 1, &u0, &u1);
    for (int u = u0; u < u1; u++) {
        const int t = u / heads, h = u % heads;  // q heads, then k heads
        float* row = qkv + (int64_t)t * qkv_stride;
        rope(row + h * hd, r.cos + (int64_t)t * r.half, r.sin + (int64_t)t * r.half, r.half);
        if (h < D.n_heads) continue;
        const int kv = h - D.n_heads;
        uint16_t* kd = c.k + l * c.layer_stride + kv * c.head_stride + (int64_t)(pos0 + t) * hd;
        uint16_t* vd = c.v + l * c.layer_stride + kv * c.head_stride + (int64_t)(pos0 + t) * hd;
        for (int i = 0; i < hd; i++) {
            kd[i] = to_bf16(row[q_dim + kv * hd + i]);
            vd[i] = to_bf16(row[q_dim + kv_dim + kv * hd + i]);
        }
    }
}

// in = norm(x) (or x itself, norm null), prepared for the product with m, for T tokens into a. Each thread its own
// copy of all of them (each = 1: the few tokens of a step or a check, where that costs less than waiting for the
// others at a barrier), or each token cut in pieces (the low-bit groups, or 64 inputs) shared out among the team. A
// piece's result does not depend on who prepares it.
static void prepare_tokens(const Mat& m, const float* x, int xs, const float* norm, float eps, const Acts& a, int T,
                           int each) {
    const int piece = m.kind == KIND_BF16 ? 64 : m.group, pieces = (m.k + piece - 1) / piece;
    int u0 = 0, u1 = T * pieces;
    if (!each) my_share(T * pieces, 1, &u0, &u1);
    for (int u = u0; u < u1;) {
        const int t = u / pieces, p0 = u % pieces, p1 = p0 + (u1 - u) < pieces ? p0 + (u1 - u) : pieces;
        const int i0 = p0 * piece, i1 = p1 * piece < m.k ? p1 * piece : m.k;
        const float* in = x + (int64_t)t * xs;
        if (norm) {
            rms_norm(in, norm, a.normed + (int64_t)t * m.k, m.k, eps, i0, i1);
            in = a.normed + (int64_t)t * m.k;
        }
        prepare(m, in, a, t, T, i0, i1);
        u += p1 - p0;
    }
}

template <typename P> static inline P* moved_by(P* p, int64_t bytes) { return p ? (P*)((char*)p + bytes) : p; }

// The inputs this thread's products read: its own copy, or the team's.
static Acts thread_acts(const Scratch& s) {
    if (!s.own_inputs) return s.acts;
    const int64_t b = (int64_t)omp_get_thread_num() * s.acts_floats * 4;
    Acts a = s.acts;
    a.normed = moved_by(a.normed, b), a.xb = moved_by(a.xb, b), a.xf = moved_by(a.xf, b), a.q = moved_by(a.q, b);
    a.high = moved_by(a.high, b), a.low = moved_by(a.low, b), a.step = moved_by(a.step, b), a.sum = moved_by(a.sum, b);
    return a;
}

// The inputs of a product with m, ready for every thread's rows when it returns.
static void ready_inputs(const Mat& m, const float* x, int xs, const float* norm, float eps, const Scratch& s,
                         const Acts& a, int T) {
    prepare_tokens(m, x, xs, norm, eps, a, T, s.own_inputs);
    if (!s.own_inputs) {
#pragma omp barrier
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
    const Acts a = thread_acts(s);
    ready_inputs(L.qkv, x, d, L.attn_norm, D.eps, s, a, T);
    product(L.qkv, a, T, s.qkv, qkv_dim, 0, L.qkv.n);
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
    ready_inputs(L.o, s.att, q_dim, nullptr, 0, s, a, T);
    product(L.o, a, T, s.y, d, 0, d);
    add_my_rows(L.o, s.y, d, x, d, T, d);  // the residual, each thread its own rows
#pragma omp barrier
    ready_inputs(L.gate_up, x, d, L.mlp_norm, D.eps, s, a, T);
    // MLP: gate and up rows of the same units go to the same thread, so SwiGLU needs no barrier between them
    product(L.gate_up, a, T, s.gate, D.ffn, 0, D.ffn);
    product(L.gate_up, a, T, s.up, D.ffn, D.ffn, D.ffn);
    int i0, i1;
    my_share(D.ffn, row_unit(L.gate_up), &i0, &i1);
    for (int t = 0; t < T; t++)
        silu_times(s.gate + (int64_t)t * D.ffn, s.up + (int64_t)t * D.ffn, s.hidden + (int64_t)t * D.ffn, i0, i1);
#pragma omp barrier
    ready_inputs(L.down, s.hidden, D.ffn, nullptr, 0, s, a, T);
    product(L.down, a, T, s.y, d, 0, d);
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

// Up to this many tokens in a pass, each thread prepares every input of a product into its own copy (a step's or a
// check's few), which costs less than the barrier that sharing the work needs; more are shared out among the team.
static const int OWN_INPUTS_UPTO = 2;
static inline int acts_copies(int n, int threads) { return n <= OWN_INPUTS_UPTO ? threads : 1; }

// Floats of one copy of the inputs of a product for n tokens (Acts), whole 64-byte lines: copies never share one.
static int64_t acts_floats(const Dims& D, int n) {
    const int w = widest_input(D);
    const int64_t f = (int64_t)n * w + floats_of_bytes((int64_t)n * w * 2) * 3 + 2 * (int64_t)n * (w / 32 + 1) + 64 +
                      fp32_input_floats(D, n);
    return (f + 15) / 16 * 16;
}

// Floats of a pass's intermediates: a chunk's per-token buffers, the inputs of one product (a copy per thread for a
// few tokens), a short pass's attention partials at positions up to last_pos, and each thread's attention work area.
static int64_t chunk_floats(const Dims& D, int T, int last_pos, int threads, int64_t* work_stride) {
    const int n = T < CHUNK ? T : CHUNK, hd = D.head_dim, G = D.n_heads / D.n_kv_heads;
    const int qkv = (D.n_heads + 2 * D.n_kv_heads) * hd;
    const int64_t partial = (int64_t)(n <= SHORT_PASS ? n : 1) * D.n_heads * tiles_upto(last_pos) * (hd + 2);
    const int64_t short_work = (int64_t)G * (hd + 2 * TILE) + G * (hd + 2), long_work = long_unit_floats(D);
    *work_stride = (short_work > long_work ? short_work : long_work) + 16;
    return (int64_t)n * (2 * D.d + qkv + D.n_heads * hd + 3 * (int64_t)D.ffn) + 16 +
           acts_copies(n, threads) * acts_floats(D, n) + partial + threads * (*work_stride + pack_floats(D, n)) + 64;
}

static Scratch carve(const Dims& D, int T, int last_pos, int threads, float* p) {
    const int n = T < CHUNK ? T : CHUNK, w = widest_input(D);
    Scratch s;
    chunk_floats(D, T, last_pos, threads, &s.work_stride);
    s.qkv = p;                    p += (int64_t)n * (D.n_heads + 2 * D.n_kv_heads) * D.head_dim;
    s.att = p;                    p += (int64_t)n * D.n_heads * D.head_dim;
    s.y = p;                      p += (int64_t)n * D.d;
    s.gate = p;                   p += (int64_t)n * D.ffn;
    s.up = p;                     p += (int64_t)n * D.ffn;
    s.hidden = p;                 p += (int64_t)n * D.ffn + D.d;
    p += (16 - (uintptr_t)p / 4 % 16) % 16;  // the inputs' copies from a line's start
    float* const acts = p;
    s.own_inputs = acts_copies(n, threads) > 1;
    s.acts_floats = acts_floats(D, n);
    s.acts.stride = w;
    s.acts.group_stride = w / 32 + 1;
    s.acts.normed = p;            p += (int64_t)n * w;
    s.acts.xb = (uint16_t*)p;     p += floats_of_bytes((int64_t)n * w * 2);
    s.acts.xf = fp32_input_floats(D, n) ? p : nullptr;  p += fp32_input_floats(D, n);
    s.acts.q = (int16_t*)p;       p += floats_of_bytes((int64_t)n * w * 2);
    s.acts.high = (int8_t*)p;
    s.acts.low = s.acts.high + (int64_t)n * w;
    p += floats_of_bytes((int64_t)n * w * 2);
    s.acts.step = p;              p += (int64_t)n * s.acts.group_stride;
    s.acts.sum = p;
    p = acts + acts_copies(n, threads) * s.acts_floats;
    s.acts.pack_stride = pack_floats(D, n);
    s.acts.pack = (uint32_t*)p;   p += threads * s.acts.pack_stride;
    s.partial = p;                p += (int64_t)(n <= SHORT_PASS ? n : 1) * D.n_heads * tiles_upto(last_pos) * (D.head_dim + 2);
    s.work = p;
    s.short_pass = T <= SHORT_PASS;
    return s;
}

