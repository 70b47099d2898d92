// The native pass: T tokens at once through the model -- one for a decode step, a few for a check of drafted tokens,
// a prompt for a prefill -- in one call and one thread team: the embedding, backbone blocks with the exit rule after
// each, the river's copies of the rest, the final norm and the LM head (the model's own after every backbone block,
// the river's after an exit). The torch twin is river.Engine.torch_forward. Built once per instruction set by
// river_native.py (RIVER_AVX512: AVX-512 with VNNI and BF16; otherwise AVX2 + FMA + F16C) and picked by the CPU's
// flags. This file is the one translation unit: it includes the parts below in this order, so the compiler sees one
// source and inlines and contracts across them. KERNELS.md is the reader's guide to all of it.
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

#include "common.h"             // shapes, sizes, vector helpers
#include "activations.h"        // a product's inputs: bf16, or int16 per group
#include "bf16_products.h"      // the backbone's products and the model's head
#include "lowbit_products.h"    // the river's copies and its low-bit head
#include "step_attention.h"     // a decode step's (or a check's) attention
#include "long_attention.h"     // a prefill's causal attention
#include "block.h"              // one block for the pass's tokens; the scratch

// ------------------------------------------------------------------------------------------------ a pass

// A model as the native path holds it.
struct Model {
    Dims dims;
    int32_t n_layers;
    const Layer* backbone;   // the blocks held, the first ones (every rule leaves by then: river_native.Decoder checks)
    const Layer* river;      // (n_layers,), or null without a river
    const uint16_t* embed;   // (vocab, d) bf16
    const double* inv_freq;  // (head_dim / 2,) RoPE frequencies
    const float* norm;       // (d,) final norm
    Mat head;                // (vocab, d) the model's own LM head, bf16: where a pass that ran every backbone block ends
    Mat river_head;          // where a pass that left the backbone ends: the river's low-bit copy, or `head` again
};

// exit_policy.ExitRule as the pass reads it (river_native.native_exit fills it): after backbone block l, leave when
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
    return chunk_floats(D, T, pos + T - 1, threads, &ws) + (int64_t)T * (2 * D.d + D.head_dim + 2) + 64;
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
        const Acts a = thread_acts(s);
        for (int t = first_out; t < T; t += CHUNK) {  // the activations hold a chunk's tokens
            const int chunk = T - t < CHUNK ? T - t : CHUNK;
            ready_inputs(head, x + (int64_t)t * d, d, m->norm, D.eps, s, a, chunk);
            product(head, a, chunk, logits + (int64_t)(t - first_out) * head.n, head.n, 0, head.n);
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
    a.normed = nullptr;  // no norm here
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
        prepare_tokens(*m, x, m->k, nullptr, 0, a, T, 0);
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
        const float* inputs[4] = {s.y, s.att, s.y, s.hidden};
        float* outputs[4] = {s.qkv, s.y, s.gate, s.y};
        const Acts a = thread_acts(s);
        for (int i = 0; i < 4; i++) {
            ready_inputs(*mats[i], inputs[i], mats[i]->k, nullptr, 0, s, a, 1);
            product(*mats[i], a, 1, outputs[i], mats[i]->n, 0, mats[i]->n);
#pragma omp barrier
        }
    }
}
