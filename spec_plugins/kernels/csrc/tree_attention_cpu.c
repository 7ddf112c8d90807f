/* Tree attention over a paged KV cache, float32, in two cache layouts:
 *
 * - vLLM's CPU cache ("vec" layout, tree_attention_f32): [num_blocks][kv_heads][2]
 *   [block_size * D]; per block and KV head the keys are stored transposed (D rows of
 *   block_size) and the values as block_size rows of D; read in place.
 * - a token-slot cache (SGLang's, tree_attention_slots_f32): keys and values in two
 *   tensors [slots][kv_heads][D]; request r's position p is in slot slot_table[r][p].
 *   Tiles of KB positions are gathered into the vLLM tile layout (keys transposed) per
 *   work unit, so both layouts share the same register-blocked products.
 *
 * Request r has q_len = q_start[r + 1] - q_start[r] query tokens: its root then its
 * draft-tree nodes in topological order; their K/V are already in the cache at logical
 * positions prefix_lens[r] + j. Token i attends to positions [0, prefix) and to
 * prefix + a for every ancestor-or-self a of i (parents[] gives each token's parent as
 * an index within its request, -1 for the root).
 *
 * Work unit: one (request, KV head). All query heads of the KV group and all tokens of
 * the request are scored together, so every key and value is read once per unit.
 * C compiled with -O3 -march=native: the two products
 * are register-blocked (RB rows x KB lanes of accumulators) with GCC vector extensions, and
 * exp is a vectorised Cephes polynomial. block_size must be a multiple of KB (16).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* GCC/Clang vector extensions: portable SIMD (AVX2 here, NEON or AVX-512 elsewhere). */
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline v8 select8(v8i mask, v8 a, v8 b) {   /* mask ? a : b, lane-wise */
    v8i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    ai = (ai & mask) | (bi & ~mask);
    memcpy(&a, &ai, sizeof a);
    return a;
}

static inline v8 exp_nonpos(v8 x) {
    /* exp(x) for x <= 0 (scores minus their max), Cephes polynomial, relative error
     * ~1e-7; exactly 0 below -87 (masked columns). */
    const v8i keep = x >= -87.0f;
    x = select8(keep, x, (v8){0} - 87.0f);
    const v8i n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v8i);
    const v8 fn = __builtin_convertvector(n, v8);   /* trunc(t - 0.5) = round(t), t <= 0 */
    const v8 r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    v8 p = (v8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i bits = (n + 127) << 23;
    v8 scale;
    memcpy(&scale, &bits, sizeof scale);
    return select8(keep, p * scale, (v8){0});
}

#define RB 4    /* score rows per register block */
#define KB 16   /* keys (or head-dim lanes) per register block: two AVX2 vectors */

/* Where one request's keys and values are: vLLM's blocks (read in place) or token slots
 * (gathered tile by tile into `tile`). */
typedef struct {
    const float *kv;              /* vLLM: the cache */
    const int32_t *blocks;        /* vLLM: the request's blocks */
    int64_t block_stride;         /* vLLM: floats per block */
    const float *k, *v;           /* slots: key and value tensors */
    const int64_t *slots;         /* slots: the request's slot per position */
    int32_t num_kv_heads;
    float *tile;                  /* slots: [D * bs] work tile */
} cache_t;

/* Keys of positions b*bs .. b*bs+bs-1 for KV head kvh as [D][bs] (positions >= L: 0). */
static const float *key_tile(const cache_t *c, int32_t b, int32_t kvh, int32_t D,
                             int32_t bs, int32_t L) {
    if (c->kv)
        return c->kv + (int64_t)c->blocks[b] * c->block_stride + (int64_t)kvh * 2 * bs * D;
    for (int32_t k = 0; k < bs; k++) {
        const int32_t pos = b * bs + k;
        if (pos < L) {
            const float *src = c->k + (c->slots[pos] * c->num_kv_heads + kvh) * D;
            for (int32_t d = 0; d < D; d++) c->tile[(int64_t)d * bs + k] = src[d];
        } else {
            for (int32_t d = 0; d < D; d++) c->tile[(int64_t)d * bs + k] = 0.0f;
        }
    }
    return c->tile;
}

/* Values of the same positions as [bs][D] (only the first `kend` rows are read). */
static const float *value_tile(const cache_t *c, int32_t b, int32_t kvh, int32_t D,
                               int32_t bs, int32_t kend) {
    if (c->kv)
        return c->kv + (int64_t)c->blocks[b] * c->block_stride + (int64_t)kvh * 2 * bs * D
               + (int64_t)bs * D;
    for (int32_t k = 0; k < kend; k++)
        memcpy(c->tile + (int64_t)k * D,
               c->v + (c->slots[b * bs + k] * c->num_kv_heads + kvh) * D,
               sizeof(float) * (size_t)D);
    return c->tile;
}

static void unit(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                 const int64_t *rows, const cache_t *cache,
                 const int32_t *parents, int32_t prefix, int32_t q_len, int32_t kvh,
                 int32_t G, int32_t D, int32_t bs, float scale, float *buf) {
    const int32_t M = G * q_len;                  /* score rows: (token, head) */
    const int32_t MP = (M + RB - 1) / RB * RB;    /* padded with zero queries */
    const int32_t L = prefix + q_len;             /* columns: positions 0 .. L-1 */
    const int32_t nblk = (L + bs - 1) / bs;
    const int32_t Lp = nblk * bs;
    float *qs = buf;                              /* [MP][D] scaled queries */
    float *sc = qs + (int64_t)MP * D;             /* [MP][Lp] scores, then probabilities */
    float *acc = sc + (int64_t)MP * Lp;           /* [MP][D] outputs */
    unsigned char *see = (unsigned char *)(acc + (int64_t)MP * D);  /* [q_len][q_len] */

    memset(qs, 0, sizeof(float) * (size_t)MP * D);
    for (int32_t i = 0; i < q_len; i++) {
        const float *src = q + rows[i] * q_stride + (int64_t)kvh * G * D;
        for (int32_t h = 0; h < G; h++)
            for (int32_t d = 0; d < D; d++)
                qs[((int64_t)i * G + h) * D + d] = src[(int64_t)h * D + d] * scale;
    }
    /* ancestor-or-self matrix of the request's tokens */
    memset(see, 0, (size_t)q_len * q_len);
    for (int32_t i = 0; i < q_len; i++) {
        int32_t p = parents[i];
        if (p >= 0) memcpy(see + (int64_t)i * q_len, see + (int64_t)p * q_len, (size_t)q_len);
        see[(int64_t)i * q_len + i] = 1;
    }

    /* scores: sc[m][b*bs + k] = qs[m] . K[k]; RB x KB accumulators stay in registers */
    for (int32_t b = 0; b < nblk; b++) {
        const float *kt = key_tile(cache, b, kvh, D, bs, L);                /* [D][bs] */
        for (int32_t k0 = 0; k0 < bs; k0 += KB)
            for (int32_t m0 = 0; m0 < MP; m0 += RB) {
                v8 a0[RB], a1[RB];
                for (int32_t r = 0; r < RB; r++) a0[r] = a1[r] = (v8){0};
                for (int32_t d = 0; d < D; d++) {
                    const float *kd = kt + (int64_t)d * bs + k0;
                    const v8 k_lo = load8(kd), k_hi = load8(kd + 8);
                    for (int32_t r = 0; r < RB; r++) {
                        const float qv = qs[(int64_t)(m0 + r) * D + d];
                        a0[r] += qv * k_lo;
                        a1[r] += qv * k_hi;
                    }
                }
                for (int32_t r = 0; r < RB; r++) {
                    float *dst = sc + (int64_t)(m0 + r) * Lp + (int64_t)b * bs + k0;
                    store8(dst, a0[r]);
                    store8(dst + 8, a1[r]);
                }
            }
    }
    /* mask, softmax (lane-parallel max and sum, so they vectorise) */
    for (int32_t m = 0; m < MP; m++) {
        float *s = sc + (int64_t)m * Lp;
        if (m >= M) {                              /* padding row */
            memset(s, 0, sizeof(float) * (size_t)Lp);
            continue;
        }
        const unsigned char *vis = see + (int64_t)(m / G) * q_len;
        for (int32_t j = 0; j < q_len; j++)
            if (!vis[j]) s[prefix + j] = -1e30f;
        for (int32_t k = L; k < Lp; k++) s[k] = -1e30f;
        float lane[KB];
        for (int32_t k = 0; k < KB; k++) lane[k] = -1e30f;
        for (int32_t k0 = 0; k0 < Lp; k0 += KB)
            for (int32_t k = 0; k < KB; k++) lane[k] = s[k0 + k] > lane[k] ? s[k0 + k] : lane[k];
        float mx = lane[0];
        for (int32_t k = 1; k < KB; k++) mx = lane[k] > mx ? lane[k] : mx;
        for (int32_t k = 0; k < Lp; k += 8) store8(s + k, exp_nonpos(load8(s + k) - mx));
        for (int32_t k = 0; k < KB; k++) lane[k] = 0.0f;
        for (int32_t k0 = 0; k0 < Lp; k0 += KB)
            for (int32_t k = 0; k < KB; k++) lane[k] += s[k0 + k];
        float sum = 0.0f;
        for (int32_t k = 0; k < KB; k++) sum += lane[k];
        const float inv = 1.0f / sum;
        for (int32_t k = 0; k < Lp; k++) s[k] *= inv;
    }
    /* outputs: acc[m] = sum_k sc[m][k] V[k] over k < L (the cache past L is not ours) */
    memset(acc, 0, sizeof(float) * (size_t)MP * D);
    for (int32_t b = 0; b < nblk; b++) {
        const int32_t kend = (b + 1) * bs <= L ? bs : L - b * bs;
        const float *vb = value_tile(cache, b, kvh, D, bs, kend);           /* [bs][D] */
        const float *pb = sc + (int64_t)b * bs;
        if (D % KB == 0) {
            for (int32_t d0 = 0; d0 < D; d0 += KB)
                for (int32_t m0 = 0; m0 < MP; m0 += RB) {
                    v8 a0[RB], a1[RB];
                    for (int32_t r = 0; r < RB; r++) {
                        a0[r] = load8(acc + (int64_t)(m0 + r) * D + d0);
                        a1[r] = load8(acc + (int64_t)(m0 + r) * D + d0 + 8);
                    }
                    for (int32_t k = 0; k < kend; k++) {
                        const float *v = vb + (int64_t)k * D + d0;
                        const v8 v_lo = load8(v), v_hi = load8(v + 8);
                        for (int32_t r = 0; r < RB; r++) {
                            const float pv = pb[(int64_t)(m0 + r) * Lp + k];
                            a0[r] += pv * v_lo;
                            a1[r] += pv * v_hi;
                        }
                    }
                    for (int32_t r = 0; r < RB; r++) {
                        store8(acc + (int64_t)(m0 + r) * D + d0, a0[r]);
                        store8(acc + (int64_t)(m0 + r) * D + d0 + 8, a1[r]);
                    }
                }
        } else {
            for (int32_t k = 0; k < kend; k++)
                for (int32_t m = 0; m < M; m++) {
                    const float pv = pb[(int64_t)m * Lp + k];
                    for (int32_t d = 0; d < D; d++) acc[(int64_t)m * D + d] += pv * vb[(int64_t)k * D + d];
                }
        }
    }
    for (int32_t i = 0; i < q_len; i++) {
        float *dst = out + rows[i] * out_stride + (int64_t)kvh * G * D;
        memcpy(dst, acc + (int64_t)i * G * D, sizeof(float) * (size_t)G * D);
    }
}

/* Both layouts: one (request, KV head) per OpenMP task. Returns 0, or -1 if a work
 * buffer could not be allocated. */
static int run_units(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                     const int64_t *rows, const cache_t *base, const int32_t *block_table,
                     int64_t bt_stride, const int64_t *slot_table, int64_t st_stride,
                     const int32_t *q_start, const int32_t *prefix_lens,
                     const int32_t *parents, int32_t R, int32_t num_heads,
                     int32_t num_kv_heads, int32_t D, int32_t bs, float scale) {
    const int32_t G = num_heads / num_kv_heads;
    int32_t max_lp = 0, max_q = 0;
    for (int32_t r = 0; r < R; r++) {
        int32_t ql = q_start[r + 1] - q_start[r];
        int32_t L = prefix_lens[r] + ql;
        int32_t lp = (L + bs - 1) / bs * bs;
        if (ql > max_q) max_q = ql;
        if (lp > max_lp) max_lp = lp;
    }
    const int32_t max_m = (G * max_q + RB - 1) / RB * RB;
    const size_t per = sizeof(float) * ((size_t)max_m * (2 * D + max_lp) + (size_t)D * bs)
                       + (size_t)max_q * max_q + 64;
    int nthreads = 1;
#ifdef _OPENMP
    nthreads = omp_get_max_threads();
#endif
    const size_t per_floats = (per + 63) / 64 * 16;   /* 64-byte aligned slices */
    float *bufs = (float *)malloc(sizeof(float) * per_floats * (size_t)nthreads);
    if (!bufs) return -1;
    const int32_t units = R * num_kv_heads;
#pragma omp parallel for schedule(dynamic) num_threads(nthreads)
    for (int32_t u = 0; u < units; u++) {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        const int32_t r = u / num_kv_heads, h = u % num_kv_heads;
        const int32_t s0 = q_start[r], ql = q_start[r + 1] - s0;
        if (ql == 0) continue;
        float *buf = bufs + per_floats * (size_t)tid;
        cache_t c = *base;
        if (c.kv) c.blocks = block_table + (int64_t)r * bt_stride;
        else c.slots = slot_table + (int64_t)r * st_stride;
        c.tile = buf + per_floats - (size_t)D * bs;   /* the slice's end: past unit()'s */
        unit(q, q_stride, out, out_stride, rows + s0, &c, parents + s0,
             prefix_lens[r], ql, h, G, D, bs, scale, buf);
    }
    free(bufs);
    return 0;
}

/* vLLM's cache. q, out: rows of query / output ([*, heads * D] with the given row
 * strides, in floats); rows[t]: the row of packed tree token t; block_table:
 * [R][bt_stride] int32. */
int tree_attention_f32(const float *q, int64_t q_stride, float *out, int64_t out_stride,
                       const int64_t *rows, const float *kv, const int32_t *block_table,
                       int64_t bt_stride, const int32_t *q_start, const int32_t *prefix_lens,
                       const int32_t *parents, int32_t R, int32_t num_heads,
                       int32_t num_kv_heads, int32_t D, int32_t bs, float scale) {
    cache_t c = {0};
    c.kv = kv;
    c.block_stride = (int64_t)num_kv_heads * 2 * bs * D;
    c.num_kv_heads = num_kv_heads;
    return run_units(q, q_stride, out, out_stride, rows, &c, block_table, bt_stride, 0, 0,
                     q_start, prefix_lens, parents, R, num_heads, num_kv_heads, D, bs,
                     scale);
}

/* A token-slot cache: k, v [slots][num_kv_heads][D]; slot_table: [R][st_stride] int64,
 * request r's position p (p < prefix_lens[r] + its query tokens) in slot_table[r][p]. */
int tree_attention_slots_f32(const float *q, int64_t q_stride, float *out,
                             int64_t out_stride, const int64_t *rows, const float *k,
                             const float *v, const int64_t *slot_table, int64_t st_stride,
                             const int32_t *q_start, const int32_t *prefix_lens,
                             const int32_t *parents, int32_t R, int32_t num_heads,
                             int32_t num_kv_heads, int32_t D, float scale) {
    cache_t c = {0};
    c.k = k;
    c.v = v;
    c.num_kv_heads = num_kv_heads;
    return run_units(q, q_stride, out, out_stride, rows, &c, 0, 0, slot_table, st_stride,
                     q_start, prefix_lens, parents, R, num_heads, num_kv_heads, D, KB,
                     scale);
}
