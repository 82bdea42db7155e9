/* Shared definitions of the XNOR-popcount kernels: layouts are documented in bitops.c. */
#ifndef RESTE_BITOPS_COMMON_H
#define RESTE_BITOPS_COMMON_H
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#include <stdio.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define RESTE_X86 1
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,popcnt")))
#define TARGET_AVX2 __attribute__((target("avx2,fma,popcnt")))
#define TARGET_POPCNT __attribute__((target("popcnt")))
#else
#define RESTE_X86 0
#define TARGET_AVX512
#define TARGET_AVX2
#define TARGET_POPCNT
#endif

#define LANES 16 /* output channels per block: two 8-word vectors */
#define PIX_BLOCK 8 /* output pixels per register block */
#define L1_WEIGHT_BYTES (32 * 1024) /* weights of the channel blocks one work item cycles through */

/* An optional per-channel map of the input before its signs are packed: the eval-mode
   BatchNorm (and a ReLU before it) that fed a binary conv, applied on the fly so that
   tensor is never written: y = max(x, 0) if relu (NaN stays NaN, as torch.relu), then
   y * scale + shift, as one fused multiply-add if fma (else two roundings, like PyTorch). */
typedef struct {
    int relu, fma;
    const float *scale, *shift; /* [C] */
} pre_map;

typedef struct {
    const uint8_t *x; /* packed input [N][Hp][row_bytes] */
    int64_t N, H, W, Hp, row_bytes, pix_bytes;
    int64_t kh, kw, sh, sw, ph, pw, OH, OW;
    const uint64_t *w; /* packed weights [OB][kh][Kw][LANES] */
    const uint64_t *w_nibbles; /* [OB][kh][Kw][2][LANES]: each weight word's low nibbles (w & 0x0f..), then its
                                  high ones ((w >> 4) & 0x0f..), for the AVX2 kernel (split_nibbles); NULL: run_conv
                                  splits them per call */
    int64_t O, OB, Kw;
    uint64_t last_mask;
    const int32_t *wsum; /* [kh + 1][kw + 1][OB * LANES] tap prefix sums, or NULL: no zero-padding correction */
    int64_t K;           /* real taps: kh * kw * C */
    const float *alpha;  /* [O] or [1] */
    int64_t alpha_per_channel;
    const float *bias; /* [O] or NULL */
    int64_t relu;      /* max(., 0) after the bias */
    const float *post_scale, *post_shift; /* [O] affine after ReLU, or NULL */
    int64_t post_fma;  /* the affine map as one fused multiply-add (else multiply, then add) */
    const float *residual; /* [N][OH][OW][O] added last (a ResNet shortcut), or NULL; never aliases out */
    float *out;        /* [N][OH][OW][O], or NULL when only next_x is written */
    /* The next binary conv's packed input, written from the epilogue when that conv is the only
       consumer of this output (reste.deploy.fuse.fuse_chains), or NULL. Its layout is pack_rows'
       for an input of OH x OW pixels of O channels: [N][OH + 2 next_ph][next_row_bytes], pixel
       (oh, ow) at byte offset (ow + next_pw) * next_pix of row oh + next_ph, next_pix = (O + 7) / 8.
       Channel block ob owns bytes 2 ob, 2 ob + 1 of each pixel (16 channels = 2 bytes), so the
       threads, which split blocks x rows, write different bytes; run_conv writes the border. */
    uint8_t *next_x;
    int64_t next_ph, next_pw, next_row_bytes, next_plus_one;
    pre_map next_map; /* the next conv's prologue, applied before the sign (scale NULL: none) */
} conv_args;


/* The map over `pixels` pixels of C channels; the body is built once per instruction set
   (plain C that the compiler vectorises for each target). */
__attribute__((always_inline)) static inline void pre_map_body(const float *x, int64_t pixels, int64_t C, const pre_map *m,
                                                               float *out) {
    const float *sc = m->scale, *sh = m->shift;
    for (int64_t p = 0; p < pixels; p++, x += C, out += C) {
        if (m->fma)
            for (int64_t c = 0; c < C; c++) out[c] = fmaf(m->relu && x[c] < 0.0f ? 0.0f : x[c], sc[c], sh[c]);
        else
            for (int64_t c = 0; c < C; c++) out[c] = (m->relu && x[c] < 0.0f ? 0.0f : x[c]) * sc[c] + sh[c];
    }
}
typedef void (*pre_map_fn)(const float *, int64_t, int64_t, const pre_map *, float *);
static void pre_map_generic(const float *x, int64_t pixels, int64_t C, const pre_map *m, float *out) {
    pre_map_body(x, pixels, C, m, out);
}
#if RESTE_X86
TARGET_AVX2 static void pre_map_avx2(const float *x, int64_t pixels, int64_t C, const pre_map *m, float *out) {
    pre_map_body(x, pixels, C, m, out);
}
TARGET_AVX512 static void pre_map_avx512(const float *x, int64_t pixels, int64_t C, const pre_map *m, float *out) {
    pre_map_body(x, pixels, C, m, out);
}
#endif

static inline uint64_t load_word(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, sizeof v); /* unaligned load; compiles to one mov */
    return v;
}

/* The taps of output (oh, ow) that fall inside the image: rows [i0, i1), columns [j0, j1). */
static inline int inside(const conv_args *a, int64_t oh, int64_t ow, int64_t *i0, int64_t *i1, int64_t *j0, int64_t *j1) {
    int64_t ih = oh * a->sh - a->ph, iw = ow * a->sw - a->pw;
    *i0 = ih < 0 ? -ih : 0;
    *j0 = iw < 0 ? -iw : 0;
    *i1 = a->H - ih < a->kh ? a->H - ih : a->kh;
    *j1 = a->W - iw < a->kw ? a->W - iw : a->kw;
    return *i0 == 0 && *j0 == 0 && *i1 == a->kh && *j1 == a->kw;
}

/* With zero padding, the output columns [c0, c1) of row oh read no padding and skip the
   correction; the few outside take the border path. Returns 0 when no column needs to be
   told apart: no correction at all (wsum NULL), or a kernel row reads the top or bottom padding. */
static inline int interior_columns(const conv_args *a, int64_t oh, int64_t *c0, int64_t *c1) {
    int64_t ih = oh * a->sh - a->ph;
    if (!a->wsum || ih < 0 || ih + a->kh > a->H) return 0;
    *c0 = (a->pw + a->sw - 1) / a->sw;
    *c1 = a->W + a->pw - a->kw < 0 ? 0 : (a->W + a->pw - a->kw) / a->sw + 1;
    if (*c0 > a->OW) *c0 = a->OW;
    if (*c1 < *c0) *c1 = *c0;
    if (*c1 > a->OW) *c1 = a->OW;
    return 1;
}

/* Each kernel's per-(row, channel block) entry point, the same for every instruction set: the
   output columns that read left or right padding take the border path, the interior ones skip
   the test; the words per kernel row of 16, 32 and 64 channels (Kw 1-3) become compile-time
   constants so the inner loops unroll, and so does NEXT (whether the epilogue writes the next
   conv's packed input, a->next_x), so a conv that is not chained runs no chaining code in its
   pixel loop (on 16-channel layers the epilogue is a large part of the work). ISA names the
   kernel's functions: it provides epi_load_ISA(a, ob) -> epi_ISA and conv_columns_ISA(a, &e,
   rowbase, wb, n, oh, ob, from, to, border, KW, NEXT); TARGET is its target attribute (empty
   where none is needed). */
#define DEFINE_CONV_BLOCK(ISA, TARGET)                                                                     \
    TARGET __attribute__((always_inline)) static inline void conv_block_##ISA##_kw(                         \
        const conv_args *a, int64_t r, int64_t ob, const int KW, const int NEXT) {                          \
        int64_t n = r / a->OH, oh = r % a->OH;                                                              \
        const uint64_t *wb = a->w + ob * a->kh * a->Kw * LANES;                                            \
        const uint8_t *rowbase = a->x + (n * a->Hp + oh * a->sh) * a->row_bytes;                           \
        const epi_##ISA e = epi_load_##ISA(a, ob);                                                         \
        int64_t c0, c1;                                                                                     \
        if (!interior_columns(a, oh, &c0, &c1)) { /* the whole row reads padding, or no zero-padding fix */ \
            conv_columns_##ISA(a, &e, rowbase, wb, n, oh, ob, 0, a->OW, a->wsum != NULL, KW, NEXT);         \
            return;                                                                                         \
        }                                                                                                   \
        conv_columns_##ISA(a, &e, rowbase, wb, n, oh, ob, 0, c0, 1, KW, NEXT);                              \
        conv_columns_##ISA(a, &e, rowbase, wb, n, oh, ob, c0, c1, 0, KW, NEXT);                             \
        conv_columns_##ISA(a, &e, rowbase, wb, n, oh, ob, c1, a->OW, 1, KW, NEXT);                          \
    }                                                                                                       \
    TARGET static void conv_block_##ISA(const conv_args *a, int64_t r, int64_t ob) {                        \
        const int next = a->next_x != NULL;                                                                 \
        switch (a->Kw) {                                                                                    \
        case 1: next ? conv_block_##ISA##_kw(a, r, ob, 1, 1) : conv_block_##ISA##_kw(a, r, ob, 1, 0); break; \
        case 2: next ? conv_block_##ISA##_kw(a, r, ob, 2, 1) : conv_block_##ISA##_kw(a, r, ob, 2, 0); break; \
        case 3: next ? conv_block_##ISA##_kw(a, r, ob, 3, 1) : conv_block_##ISA##_kw(a, r, ob, 3, 0); break; \
        default: next ? conv_block_##ISA##_kw(a, r, ob, 0, 1) : conv_block_##ISA##_kw(a, r, ob, 0, 0); break; \
        }                                                                                                   \
    }

/* The weights' nibbles for the AVX2 kernel, [groups][2][LANES] from [groups][LANES] words. */
static void split_nibbles(const uint64_t *w, int64_t groups, uint64_t *out) {
    const uint64_t low4 = 0x0f0f0f0f0f0f0f0fULL;
    for (int64_t g = 0; g < groups; g++)
        for (int v = 0; v < LANES; v++) {
            out[(2 * g) * LANES + v] = w[g * LANES + v] & low4;
            out[(2 * g + 1) * LANES + v] = (w[g * LANES + v] >> 4) & low4;
        }
}

/* wsum holds 2-D prefix sums over taps: entry (i, j) = sum of sign(w) over taps i' < i, j' < j
   and all channels. The zero-padding correction (the weight sum over the taps outside the
   image) is then total - inside rectangle: four lookups, no loop over taps. */
static inline const int32_t *tap_prefix(const conv_args *a, int64_t i, int64_t j, int64_t ob) {
    return a->wsum + (i * (a->kw + 1) + j) * a->OB * LANES + ob * LANES;
}

/* Where pixel (n, oh, ow) of this conv's output starts in the next conv's packed input. */
static inline uint8_t *next_pixel(const conv_args *a, int64_t n, int64_t oh, int64_t ow) {
    return a->next_x + (n * (a->OH + 2 * a->next_ph) + oh + a->next_ph) * a->next_row_bytes + (ow + a->next_pw) * ((a->O + 7) / 8);
}

/* The next conv's input bits of channels ob * LANES + v, v < nv, from this conv's final values y[v]:
   the next conv's prologue map exactly as pre_map_body computes it, then bit = !(z < 0) (0, -0 and
   NaN give +1), as pack_rows decides; bits from nv on are 0 (the pixel's unused channel bits).
   Writes byte 2 ob and, when nv > 8, 2 ob + 1 of the pixel: this channel block's own bytes. */
static inline void next_bits_scalar(const conv_args *a, int64_t n, int64_t oh, int64_t ow, int64_t ob, const float *y,
                                    int64_t nv) {
    const pre_map *m = &a->next_map;
    const int64_t o0 = ob * LANES;
    unsigned bits = 0;
    for (int64_t v = 0; v < nv; v++) {
        float z = y[v];
        if (m->scale) {
            float x = m->relu && z < 0.0f ? 0.0f : z;
            z = m->fma ? fmaf(x, m->scale[o0 + v], m->shift[o0 + v]) : x * m->scale[o0 + v] + m->shift[o0 + v];
        }
        bits |= (unsigned)!(z < 0.0f) << v;
    }
    uint8_t *dst = next_pixel(a, n, oh, ow) + 2 * ob;
    dst[0] = (uint8_t)bits;
    if (nv > 8) dst[1] = (uint8_t)(bits >> 8);
}

/* out = alpha * (K - 2 * popcount + zero-padding correction) + bias for LANES channels, then the
   optional ReLU, affine map and residual, each rounded on its own like the PyTorch ops they replace;
   written to out and/or, as signs, to the next conv's packed input (next_bits_scalar). */
static inline void epilogue(const conv_args *a, int64_t n, int64_t oh, int64_t ow, int64_t ob, const int64_t *pc) {
    int32_t dot[LANES];
    for (int v = 0; v < LANES; v++) dot[v] = (int32_t)(a->K - 2 * pc[v]);
    int64_t i0, i1, j0, j1;
    if (a->wsum && !inside(a, oh, ow, &i0, &i1, &j0, &j1)) {
        const int32_t *c00 = tap_prefix(a, i0, j0, ob), *c01 = tap_prefix(a, i0, j1, ob);
        const int32_t *c10 = tap_prefix(a, i1, j0, ob), *c11 = tap_prefix(a, i1, j1, ob);
        const int32_t *all = tap_prefix(a, a->kh, a->kw, ob);
        for (int v = 0; v < LANES; v++) dot[v] += all[v] - (c11[v] - c01[v] - c10[v] + c00[v]);
    }
    int64_t o0 = ob * LANES, nv = a->O - o0 < LANES ? a->O - o0 : LANES;
    const int64_t at = ((n * a->OH + oh) * a->OW + ow) * a->O + o0;
    float ys[LANES];
    for (int64_t v = 0; v < nv; v++) {
        float al = a->alpha[a->alpha_per_channel ? o0 + v : 0];
        float b = a->bias ? a->bias[o0 + v] : 0.0f;
        float y = al * (float)dot[v] + b;
        if (a->relu) y = y > 0.0f ? y : 0.0f;
        if (a->post_scale) {
            float sc = a->post_scale[o0 + v], sh = a->post_shift[o0 + v];
            y = a->post_fma ? fmaf(y, sc, sh) : y * sc + sh;
        }
        if (a->residual) y += a->residual[at + v];
        ys[v] = y;
    }
    if (a->out) memcpy(a->out + at, ys, (size_t)nv * sizeof(float));
    if (a->next_x) next_bits_scalar(a, n, oh, ow, ob, ys, nv);
}


#endif
