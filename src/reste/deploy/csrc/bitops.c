/*
 * Bit-packed binary convolution for CPU inference (reste.deploy._bitops).
 *
 * A binary layer computes dot(sign(x), sign(w)) over K taps. With bits
 * b = 1 for +1 and b = 0 for -1, that dot is K - 2 * popcount(bx XOR bw), so
 * 64 multiply-adds become one XOR and one POPCNT on a 64-bit word.
 *
 * Layouts (all little-endian bit order: bit t of byte B is bit 8B + t):
 *
 *   packed input   one bit stream per image row, input zero-padded by (ph, pw)
 *                  pixels: pixel w of the padded row holds its C channel bits in
 *                  bits [w * Cb, w * Cb + C), Cb = C rounded up to 8, the other
 *                  Cb - C bits are 0. Rows are row_bytes apart, with at least 8
 *                  spare zero bytes at the end so word loads never leave the row.
 *                  The kw pixels one kernel row of an output position reads are
 *                  therefore kw * Cb contiguous bits starting on a byte boundary:
 *                  Kw = ceil(kw * Cb / 64) (unaligned) 64-bit words, the last one
 *                  masked with last_mask. Small channel counts (16, 32) thus share
 *                  words between taps instead of wasting most of a word each.
 *   packed weights [O / 16][kh][Kw][16] words: word k of kernel row i of 16
 *                  consecutive output channels, the same bit layout as the input
 *                  segment; bits beyond the real channels are 0.
 *   output         float32 [N][OH][OW][O] (channels last): alpha * dot + bias, then
 *                  optionally ReLU and a per-channel affine map (an eval-mode BatchNorm
 *                  that followed the layer), fused so the output is written once.
 *
 * Padding. The padded border is packed as bit 0 (-1) or, for input padding
 * "+1", as bit 1; for both the popcount is then exact. With zero padding (the
 * border value is 0, not +-1) the caller passes per-tap weight sums
 * wsum[i][j][o] = sum_c sign(w[o, c, i, j]); the kernel computed the border taps
 * as -1 * w, so adding wsum back over the taps that fall outside the image gives
 * the exact zero-padded sum (via 2-D prefix sums over taps, see tap_prefix).
 *
 * Kernels. An AVX-512 kernel with VPOPCNTDQ (8 words per instruction; output
 * channels across vector lanes, so no horizontal sums), chosen at run time
 * with __builtin_cpu_supports, and a portable one on __builtin_popcountll
 * (compiled for POPCNT where the target has it). Both are exact and tested
 * against each other and against the PyTorch reference. OpenMP splits output
 * channel blocks x rows over threads; it runs on the same libgomp as torch
 * (same soname, loaded once), so no second thread pool competes for the cores.
 *
 * The functions take raw addresses (tensor.data_ptr()) and sizes, so the build
 * needs no torch or numpy headers; Python checks shapes, dtypes and layouts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#define RESTE_X86 1
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vpopcntdq,popcnt")))
#define TARGET_POPCNT __attribute__((target("popcnt")))
#else
#define RESTE_X86 0
#define TARGET_AVX512
#define TARGET_POPCNT
#endif

#define LANES 16 /* output channels per block: two 8-word vectors */
#define PIX_BLOCK 8 /* output pixels per register block */
#define L1_WEIGHT_BYTES (32 * 1024) /* weights of the channel blocks one work item cycles through */

typedef struct {
    const uint8_t *x; /* packed input [N][Hp][row_bytes] */
    int64_t N, H, W, Hp, row_bytes, pix_bytes;
    int64_t kh, kw, sh, sw, ph, pw, OH, OW;
    const uint64_t *w; /* packed weights [OB][kh][Kw][LANES] */
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
    float *out;        /* [N][OH][OW][O] */
} conv_args;

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

/* wsum holds 2-D prefix sums over taps: entry (i, j) = sum of sign(w) over taps i' < i, j' < j
   and all channels. The zero-padding correction (the weight sum over the taps outside the
   image) is then total - inside rectangle: four lookups, no loop over taps. */
static inline const int32_t *tap_prefix(const conv_args *a, int64_t i, int64_t j, int64_t ob) {
    return a->wsum + (i * (a->kw + 1) + j) * a->OB * LANES + ob * LANES;
}

/* out = alpha * (K - 2 * popcount + zero-padding correction) + bias for LANES channels. */
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
    float *dst = a->out + ((n * a->OH + oh) * a->OW + ow) * a->O + o0;
    for (int64_t v = 0; v < nv; v++) {
        float al = a->alpha[a->alpha_per_channel ? o0 + v : 0];
        float b = a->bias ? a->bias[o0 + v] : 0.0f;
        float y = al * (float)dot[v] + b;
        if (a->relu) y = y > 0.0f ? y : 0.0f;
        if (a->post_scale) {
            float sc = a->post_scale[o0 + v], sh = a->post_shift[o0 + v];
            y = a->post_fma ? fmaf(y, sc, sh) : y * sc + sh;
        }
        dst[v] = y;
    }
}

/* ---------------------------------------------------------------- portable */

TARGET_POPCNT
static void conv_block_generic(const conv_args *a, int64_t r, int64_t ob) {
    int64_t n = r / a->OH, oh = r % a->OH;
    const uint64_t *wb = a->w + ob * a->kh * a->Kw * LANES;
    const uint8_t *rowbase = a->x + (n * a->Hp + oh * a->sh) * a->row_bytes;
    int64_t step = a->sw * a->pix_bytes;
    for (int64_t ow = 0; ow < a->OW; ow++) {
        int64_t pc[LANES] = {0};
        for (int64_t i = 0; i < a->kh; i++) {
            const uint8_t *xr = rowbase + i * a->row_bytes + ow * step;
            const uint64_t *wi = wb + i * a->Kw * LANES;
            for (int64_t k = 0; k < a->Kw; k++) {
                uint64_t xv = load_word(xr + 8 * k);
                if (k == a->Kw - 1) xv &= a->last_mask;
                for (int v = 0; v < LANES; v++) pc[v] += __builtin_popcountll(xv ^ wi[k * LANES + v]);
            }
        }
        epilogue(a, n, oh, ow, ob, pc);
    }
}

/* ----------------------------------------------------------------- AVX-512 */

#if RESTE_X86
/* Per (row, channel block) constants of the epilogue, loaded once into registers
   (through `a` the compiler would reload them after every store to the output). */
typedef struct {
    __m512 alpha, bias, scale, shift;
    __m512i K;
    __mmask16 store_mask;
    int relu, post, fma;
} epi_avx512;

TARGET_AVX512 __attribute__((always_inline)) static inline epi_avx512 epi_load(const conv_args *a, int64_t ob) {
    epi_avx512 e;
    int64_t o0 = ob * LANES, nv = a->O - o0 < LANES ? a->O - o0 : LANES;
    __mmask16 m = (__mmask16)(nv == LANES ? 0xffffu : (1u << nv) - 1u);
    e.store_mask = m;
    e.alpha = a->alpha_per_channel ? _mm512_maskz_loadu_ps(m, a->alpha + o0) : _mm512_set1_ps(a->alpha[0]);
    e.bias = a->bias ? _mm512_maskz_loadu_ps(m, a->bias + o0) : _mm512_setzero_ps();
    e.relu = a->relu != 0;
    e.post = a->post_scale != NULL;
    e.fma = a->post_fma != 0;
    e.scale = e.post ? _mm512_maskz_loadu_ps(m, a->post_scale + o0) : _mm512_setzero_ps();
    e.shift = e.post ? _mm512_maskz_loadu_ps(m, a->post_shift + o0) : _mm512_setzero_ps();
    e.K = _mm512_set1_epi32((int)a->K);
    return e;
}

/* `epilogue` on vectors, 16 channels of one output pixel; `border` asks for the zero-padding fix. */
TARGET_AVX512 __attribute__((always_inline)) static inline void epilogue_avx512(
    const conv_args *a, const epi_avx512 *e, int64_t n, int64_t oh, int64_t ow, int64_t ob, __m512i pc0, __m512i pc1,
    int border) {
    /* popcounts (< 2^31) to 16 x int32 (the low halves of both vectors' 64-bit lanes, one
       permute), then K - 2 * popcount (exact in float: |dot| < 2^24) */
    const __m512i low_halves = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    __m512i pc = _mm512_permutex2var_epi32(pc0, low_halves, pc1);
    __m512i dot = _mm512_sub_epi32(e->K, _mm512_add_epi32(pc, pc));
    int64_t i0, i1, j0, j1;
    if (border && !inside(a, oh, ow, &i0, &i1, &j0, &j1)) {
        __m512i rect = _mm512_sub_epi32(_mm512_loadu_si512(tap_prefix(a, i1, j1, ob)), _mm512_loadu_si512(tap_prefix(a, i0, j1, ob)));
        rect = _mm512_add_epi32(_mm512_sub_epi32(rect, _mm512_loadu_si512(tap_prefix(a, i1, j0, ob))), _mm512_loadu_si512(tap_prefix(a, i0, j0, ob)));
        dot = _mm512_add_epi32(dot, _mm512_sub_epi32(_mm512_loadu_si512(tap_prefix(a, a->kh, a->kw, ob)), rect));
    }
    /* multiply then add, two roundings, like the generic kernel and the PyTorch reference */
    __m512 y = _mm512_add_ps(_mm512_mul_ps(e->alpha, _mm512_cvtepi32_ps(dot)), e->bias);
    if (e->relu) y = _mm512_max_ps(y, _mm512_setzero_ps());
    if (e->post) y = e->fma ? _mm512_fmadd_ps(y, e->scale, e->shift) : _mm512_add_ps(_mm512_mul_ps(y, e->scale), e->shift);
    _mm512_mask_storeu_ps(a->out + ((n * a->OH + oh) * a->OW + ow) * a->O + ob * LANES, e->store_mask, y);
}

/* P output pixels x LANES channels: 2P accumulators stay in registers. KW: the words per
   kernel row as a compile-time constant (1-3 for 16-64 channels: the loops unroll), or 0 to
   read it from `a`. */
TARGET_AVX512 __attribute__((always_inline)) static inline void conv_pixels_avx512(
    const conv_args *a, const epi_avx512 *e, const uint8_t *rowbase, const uint64_t *wb, int64_t n, int64_t oh,
    int64_t ow, int64_t ob, int border, const int P, const int KW) {
    const int64_t step = a->sw * a->pix_bytes, Kw = KW ? KW : a->Kw;
    const __m512i mask = _mm512_set1_epi64((long long)a->last_mask);
    __m512i acc0[PIX_BLOCK], acc1[PIX_BLOCK];
    for (int p = 0; p < P; p++) acc0[p] = acc1[p] = _mm512_setzero_si512();
    for (int64_t i = 0; i < a->kh; i++) {
        const uint8_t *xr = rowbase + i * a->row_bytes + ow * step;
        const uint64_t *wi = wb + i * Kw * LANES;
        int64_t k = 0;
        for (; k < Kw - 1; k++) {
            __m512i w0 = _mm512_loadu_si512(wi + k * LANES), w1 = _mm512_loadu_si512(wi + k * LANES + 8);
            for (int p = 0; p < P; p++) {
                __m512i xv = _mm512_set1_epi64((long long)load_word(xr + p * step + 8 * k));
                acc0[p] = _mm512_add_epi64(acc0[p], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w0)));
                acc1[p] = _mm512_add_epi64(acc1[p], _mm512_popcnt_epi64(_mm512_xor_si512(xv, w1)));
            }
        }
        /* last word: (x ^ w) & mask in one ternary-logic instruction (0x28) */
        __m512i w0 = _mm512_loadu_si512(wi + k * LANES), w1 = _mm512_loadu_si512(wi + k * LANES + 8);
        for (int p = 0; p < P; p++) {
            __m512i xv = _mm512_set1_epi64((long long)load_word(xr + p * step + 8 * k));
            acc0[p] = _mm512_add_epi64(acc0[p], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(xv, w0, mask, 0x28)));
            acc1[p] = _mm512_add_epi64(acc1[p], _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(xv, w1, mask, 0x28)));
        }
    }
    for (int p = 0; p < P; p++) epilogue_avx512(a, e, n, oh, ow + p, ob, acc0[p], acc1[p], border);
}

/* Output columns [from, to) of one row in blocks of 8, 4, 2 and 1 pixels. */
TARGET_AVX512 __attribute__((always_inline)) static inline void conv_columns_avx512(
    const conv_args *a, const epi_avx512 *e, const uint8_t *rowbase, const uint64_t *wb, int64_t n, int64_t oh,
    int64_t ob, int64_t from, int64_t to, int border, const int KW) {
    int64_t ow = from;
    for (; ow + PIX_BLOCK <= to; ow += PIX_BLOCK) conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, PIX_BLOCK, KW);
    if (ow + 4 <= to) { conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, 4, KW); ow += 4; }
    if (ow + 2 <= to) { conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, 2, KW); ow += 2; }
    if (ow < to) conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, 1, KW);
}

TARGET_AVX512 __attribute__((always_inline)) static inline void conv_block_avx512_kw(
    const conv_args *a, int64_t r, int64_t ob, const int KW) {
    int64_t n = r / a->OH, oh = r % a->OH;
    const uint64_t *wb = a->w + ob * a->kh * a->Kw * LANES;
    const uint8_t *rowbase = a->x + (n * a->Hp + oh * a->sh) * a->row_bytes;
    const epi_avx512 e = epi_load(a, ob);
    if (!a->wsum) { /* no zero-padding correction anywhere */
        conv_columns_avx512(a, &e, rowbase, wb, n, oh, ob, 0, a->OW, 0, KW);
        return;
    }
    int64_t ih = oh * a->sh - a->ph;
    if (ih < 0 || ih + a->kh > a->H) { /* a kernel row reads the top or bottom padding */
        conv_columns_avx512(a, &e, rowbase, wb, n, oh, ob, 0, a->OW, 1, KW);
        return;
    }
    /* columns [c0, c1) read no padding: only the few columns outside take the border path */
    int64_t c0 = (a->pw + a->sw - 1) / a->sw;
    int64_t c1 = a->W + a->pw - a->kw < 0 ? 0 : (a->W + a->pw - a->kw) / a->sw + 1;
    if (c0 > a->OW) c0 = a->OW;
    if (c1 < c0) c1 = c0;
    if (c1 > a->OW) c1 = a->OW;
    conv_columns_avx512(a, &e, rowbase, wb, n, oh, ob, 0, c0, 1, KW);
    conv_columns_avx512(a, &e, rowbase, wb, n, oh, ob, c0, c1, 0, KW);
    conv_columns_avx512(a, &e, rowbase, wb, n, oh, ob, c1, a->OW, 1, KW);
}

TARGET_AVX512
static void conv_block_avx512(const conv_args *a, int64_t r, int64_t ob) {
    switch (a->Kw) { /* the words per kernel row of 16, 32 and 64 channels as constants */
    case 1: conv_block_avx512_kw(a, r, ob, 1); break;
    case 2: conv_block_avx512_kw(a, r, ob, 2); break;
    case 3: conv_block_avx512_kw(a, r, ob, 3); break;
    default: conv_block_avx512_kw(a, r, ob, 0); break;
    }
}

/* Pack `count` floats into count / 8 bytes (count a multiple of 8): bit t of byte b = !(x[8b + t] < 0),
   so 0, -0 and NaN give +1, like the estimators' sign. */
TARGET_AVX512
static void pack_flat_avx512(const float *x, int64_t count, uint8_t *dst) {
    const __m512 zero = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= count; i += 64) {
        uint64_t m = (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), zero, _CMP_NLT_UQ) |
                     (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 16), zero, _CMP_NLT_UQ) << 16 |
                     (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 32), zero, _CMP_NLT_UQ) << 32 |
                     (uint64_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + i + 48), zero, _CMP_NLT_UQ) << 48;
        memcpy(dst + i / 8, &m, 8);
    }
    for (; i < count; i += 8) {
        __mmask16 eight = 0xff;
        dst[i / 8] = (uint8_t)_mm512_mask_cmp_ps_mask(eight, _mm512_maskz_loadu_ps(eight, x + i), zero, _CMP_NLT_UQ);
    }
}

/* Pack one pixel's C floats into Cb/8 bytes: bit c = !(x[c] < 0), bits C..Cb-1 zero. */
TARGET_AVX512
static void pack_pixel_avx512(const float *x, int64_t C, uint8_t *dst) {
    const __m512 zero = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        uint16_t m = (uint16_t)_mm512_cmp_ps_mask(_mm512_loadu_ps(x + c), zero, _CMP_NLT_UQ);
        memcpy(dst + c / 8, &m, 2);
    }
    if (c < C) {
        __mmask16 tail = (__mmask16)((1u << (C - c)) - 1u);
        uint16_t m = (uint16_t)_mm512_mask_cmp_ps_mask(tail, _mm512_maskz_loadu_ps(tail, x + c), zero, _CMP_NLT_UQ);
        dst[c / 8] = (uint8_t)(m & 0xff);
        if (C - c > 8) dst[c / 8 + 1] = (uint8_t)(m >> 8);
    }
}

/* W pixels of C channels (NHWC) -> W packed pixels of Cb/8 bytes. */
TARGET_AVX512
static void pack_pixels_avx512(const float *x, int64_t W, int64_t C, int64_t pix_bytes, uint8_t *dst) {
    if (C % 8 == 0) { /* no padding bits: the whole run is one flat bit stream */
        pack_flat_avx512(x, W * C, dst);
        return;
    }
    for (int64_t w = 0; w < W; w++) pack_pixel_avx512(x + w * C, C, dst + w * pix_bytes);
}
#endif

static void pack_pixels_generic(const float *x, int64_t W, int64_t C, int64_t pix_bytes, uint8_t *dst) {
    for (int64_t w = 0; w < W; w++, x += C, dst += pix_bytes)
        for (int64_t c0 = 0; c0 < C; c0 += 8) {
            uint8_t byte = 0;
            int64_t end = c0 + 8 < C ? c0 + 8 : C;
            for (int64_t c = c0; c < end; c++) byte |= (uint8_t)(!(x[c] < 0.0f) << (c - c0));
            dst[c0 / 8] = byte;
        }
}

/* ------------------------------------------------------------- dispatching */

typedef void (*conv_block_fn)(const conv_args *, int64_t, int64_t);
typedef void (*pack_pixels_fn)(const float *, int64_t, int64_t, int64_t, uint8_t *);

static conv_block_fn conv_block = conv_block_generic;
static pack_pixels_fn pack_pixels = pack_pixels_generic;
static const char *isa_name = "generic";

static void select_isa(const char *force) {
    conv_block = conv_block_generic;
    pack_pixels = pack_pixels_generic;
    isa_name = "generic";
    if (force && strcmp(force, "generic") == 0) return; /* the portable kernel, e.g. to test it */
#if RESTE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq")) {
        conv_block = conv_block_avx512;
        pack_pixels = pack_pixels_avx512;
        isa_name = "avx512_vpopcntdq";
    } else if (__builtin_cpu_supports("popcnt")) {
        isa_name = "popcnt";
    }
#endif
}

/* Threads for `work` units of roughly one cycle: waking a thread costs microseconds (more on
   a busy machine, where a parallel region waits for its slowest thread), so small calls stay
   on the calling thread and every extra thread gets at least ~100k units. */
#define WORK_PER_THREAD 100000
static int thread_count(int64_t requested, int64_t work) {
    int64_t t = requested < 1 ? 1 : requested;
    if (t > work / WORK_PER_THREAD) t = work / WORK_PER_THREAD;
    return t < 1 ? 1 : (int)t;
}

/* ------------------------------------------------------- Python functions */

static PyObject *py_pack_rows(PyObject *self, PyObject *args) {
    unsigned long long x_addr, out_addr;
    long long N, H, W, C, ph, pw, pix_bytes, row_bytes, plus_one_pad, threads;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLLKL", &x_addr, &N, &H, &W, &C, &ph, &pw, &pix_bytes, &row_bytes,
                          &plus_one_pad, &out_addr, &threads))
        return NULL;
    if (N < 0 || H < 0 || W < 0 || C < 1 || ph < 0 || pw < 0 || pix_bytes * 8 < C ||
        row_bytes < (W + 2 * pw) * pix_bytes + 8) {
        PyErr_SetString(PyExc_ValueError, "pack_rows: inconsistent sizes");
        return NULL;
    }
    const float *x = (const float *)(uintptr_t)x_addr;
    uint8_t *out = (uint8_t *)(uintptr_t)out_addr;
    int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, rows = N * Hp;
    /* the bits of one "+1" border pixel: C ones, then zeros up to Cb */
    uint8_t pad_pixel[4096];
    if (pix_bytes > (long long)sizeof pad_pixel && plus_one_pad) {
        PyErr_SetString(PyExc_ValueError, "pack_rows: '+1' padding supports at most 32768 channels");
        return NULL;
    }
    if (plus_one_pad) {
        memset(pad_pixel, 0, (size_t)pix_bytes);
        for (int64_t c = 0; c < C; c++) pad_pixel[c / 8] |= (uint8_t)(1u << (c % 8));
    }
    int nt = thread_count(threads, rows * W * (C / 16 + 1));
    (void)nt; /* unused when built without OpenMP */
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t n = r / Hp, hp = r % Hp;
        uint8_t *row = out + r * row_bytes;
        memset(row, 0, (size_t)row_bytes);
        int border_row = hp < ph || hp >= ph + H;
        if (plus_one_pad)
            for (int64_t wp = 0; wp < Wp; wp++)
                if (border_row || wp < pw || wp >= pw + W) memcpy(row + wp * pix_bytes, pad_pixel, (size_t)pix_bytes);
        if (border_row) continue;
        const float *src = x + ((n * H + (hp - ph)) * W) * C;
        pack_pixels(src, W, C, pix_bytes, row + pw * pix_bytes);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_conv(PyObject *self, PyObject *args) {
    conv_args a;
    unsigned long long x_addr, w_addr, wsum_addr, alpha_addr, bias_addr, out_addr, last_mask, scale_addr, shift_addr;
    long long N, H, W, Hp, row_bytes, pix_bytes, kh, kw, sh, sw, ph, pw, OH, OW, O, OB, Kw, K, alpha_pc, threads, relu, post_fma;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLLLLLLLKLLLKKLKLKLKKLKL", &x_addr, &N, &H, &W, &Hp, &row_bytes, &pix_bytes, &kh,
                          &kw, &sh, &sw, &ph, &pw, &OH, &OW, &w_addr, &O, &OB, &Kw, &last_mask, &wsum_addr, &K,
                          &alpha_addr, &alpha_pc, &bias_addr, &relu, &scale_addr, &shift_addr, &post_fma, &out_addr, &threads))
        return NULL;
    if (N < 0 || OH < 0 || OW < 0 || kh < 1 || kw < 1 || sh < 1 || sw < 1 || Kw < 1 || O < 1 ||
        OB * LANES < O || (kw * pix_bytes + 7) / 8 != Kw || (OH - 1) * sh + kh > Hp ||
        (OW - 1) * sw * pix_bytes + Kw * 8 > row_bytes || K < 0 || K >= (1LL << 24)) {
        PyErr_SetString(PyExc_ValueError, "conv: inconsistent sizes");
        return NULL;
    }
    a.x = (const uint8_t *)(uintptr_t)x_addr;
    a.N = N; a.H = H; a.W = W; a.Hp = Hp; a.row_bytes = row_bytes; a.pix_bytes = pix_bytes;
    a.kh = kh; a.kw = kw; a.sh = sh; a.sw = sw; a.ph = ph; a.pw = pw; a.OH = OH; a.OW = OW;
    a.w = (const uint64_t *)(uintptr_t)w_addr;
    a.O = O; a.OB = OB; a.Kw = Kw; a.last_mask = (uint64_t)last_mask;
    a.wsum = (const int32_t *)(uintptr_t)wsum_addr;
    a.K = K;
    a.alpha = (const float *)(uintptr_t)alpha_addr;
    a.alpha_per_channel = alpha_pc;
    a.bias = (const float *)(uintptr_t)bias_addr;
    a.relu = relu;
    a.post_scale = (const float *)(uintptr_t)scale_addr;
    a.post_shift = (const float *)(uintptr_t)shift_addr;
    a.post_fma = post_fma;
    if ((scale_addr == 0) != (shift_addr == 0)) {
        PyErr_SetString(PyExc_ValueError, "conv: give both post_scale and post_shift, or neither");
        return NULL;
    }
    a.out = (float *)(uintptr_t)out_addr;
    /* Channel blocks go in groups whose weights fit in L1 (~32 KiB); a work item is one
       output row for one group, so the weights stay hot over many rows and the row's
       input bits stay hot over the group's blocks. */
    int64_t block_bytes = kh * Kw * LANES * 8;
    int64_t group = block_bytes >= L1_WEIGHT_BYTES ? 1 : L1_WEIGHT_BYTES / block_bytes;
    if (group > OB) group = OB;
    int64_t groups = (OB + group - 1) / group, rows = N * OH, items = groups * rows;
    int nt = thread_count(threads, OB * rows * OW * (kh * Kw * 3 + 16)); /* ~cycles: 3 per word pair + epilogue */
    (void)nt; /* unused when built without OpenMP */
    conv_block_fn fn = conv_block;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t g = it / rows, r = it % rows, end = (g + 1) * group < OB ? (g + 1) * group : OB;
        for (int64_t ob = g * group; ob < end; ob++) fn(&a, r, ob);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(isa_name); }

static PyObject *py_select(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (strcmp(name, "generic") != 0 && strcmp(name, "auto") != 0) {
        PyErr_SetString(PyExc_ValueError, "select: use 'auto' (best kernel for this CPU) or 'generic'");
        return NULL;
    }
    select_isa(name);
    return PyUnicode_FromString(isa_name);
}

static PyObject *py_openmp(PyObject *self, PyObject *noargs) {
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef methods[] = {
    {"pack_rows", py_pack_rows, METH_VARARGS,
     "pack_rows(x, N, H, W, C, ph, pw, pix_bytes, row_bytes, plus_one_pad, out, threads): "
     "sign-and-pack float32 NHWC x into padded row bit streams at out."},
    {"conv", py_conv, METH_VARARGS,
     "conv(x, N, H, W, Hp, row_bytes, pix_bytes, kh, kw, sh, sw, ph, pw, OH, OW, w, O, OB, Kw, last_mask, "
     "wsum, K, alpha, alpha_per_channel, bias, relu, post_scale, post_shift, post_fma, out, threads): "
     "XNOR-popcount convolution into float32 NHWC out, with the fused epilogue."},
    {"isa", py_isa, METH_NOARGS, "Name of the kernel chosen for this CPU."},
    {"select", py_select, METH_VARARGS, "select('auto' | 'generic'): choose the kernel; returns its name."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the extension was built with OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitops",
                                    "XNOR-popcount kernels for bit-packed binary layers.", -1, methods};

PyMODINIT_FUNC PyInit__bitops(void) {
    select_isa(getenv("RESTE_BITOPS_ISA")); /* RESTE_BITOPS_ISA=generic forces the portable kernel */
    return PyModule_Create(&module);
}
