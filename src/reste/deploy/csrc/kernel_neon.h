/* ARM NEON (aarch64) kernel: byte popcounts (vcntq_u8) summed by pairwise widening adds
   (vpadalq_u8) into 16-bit lanes, 8 output channels x 2 output pixels per pass. */
/* -------------------------------------------------------------------- NEON */

#if defined(__aarch64__)
#include <arm_neon.h>

#define NEON_PIX 2 /* output pixels per pass, sharing each weight load */
/* Words one 16-bit lane can count: a word adds at most 16 to a lane (two bytes of 8 bits each).
   A pixel with more words (kh * Kw, e.g. a 3x3 kernel over more than ~29k channels) takes the 32-bit path. */
#define NEON_U16_WORDS 4095

/* Per (row, channel block) constants of the epilogue, in registers. Channels beyond O get 0
   (never stored), so no load reads past the end of alpha, bias, post_scale or post_shift. */
typedef struct {
    float32x4_t alpha[4], bias[4], scale[4], shift[4];
    int32x4_t K;
    int64_t nv;
    int relu, post, fma;
} epi_neon;

static inline epi_neon epi_load_neon(const conv_args *a, int64_t ob) {
    epi_neon e;
    int64_t o0 = ob * LANES;
    e.nv = a->O - o0 < LANES ? a->O - o0 : LANES;
    float al[LANES] = {0}, bi[LANES] = {0}, sc[LANES] = {0}, sh[LANES] = {0};
    for (int64_t v = 0; v < e.nv; v++) {
        al[v] = a->alpha[a->alpha_per_channel ? o0 + v : 0];
        if (a->bias) bi[v] = a->bias[o0 + v];
        if (a->post_scale) {
            sc[v] = a->post_scale[o0 + v];
            sh[v] = a->post_shift[o0 + v];
        }
    }
    for (int q = 0; q < 4; q++) {
        e.alpha[q] = vld1q_f32(al + 4 * q);
        e.bias[q] = vld1q_f32(bi + 4 * q);
        e.scale[q] = vld1q_f32(sc + 4 * q);
        e.shift[q] = vld1q_f32(sh + 4 * q);
    }
    e.K = vdupq_n_s32((int32_t)a->K);
    e.relu = a->relu != 0;
    e.post = a->post_scale != NULL;
    e.fma = a->post_fma != 0;
    return e;
}

/* a * b rounded on its own. vmulq_f32 and vaddq_f32 are plain C operators in GCC's arm_neon.h,
   so a compiler contracting floating point (GCC's default outside ISO C mode) would fuse the
   following add into one FMLA; the empty asm hides the product from it, so the epilogue rounds
   twice like the scalar one and PyTorch whatever -ffp-contract the file is built with. */
static inline float32x4_t mul_rounded(float32x4_t a, float32x4_t b) {
    float32x4_t p = vmulq_f32(a, b);
    __asm__("" : "+w"(p));
    return p;
}

/* `epilogue` on vectors: pc[q] holds the popcounts of channels 4q..4q+3 of one output pixel;
   `border` asks for the zero-padding correction. Rounds exactly like the scalar epilogue. */
__attribute__((always_inline)) static inline void epilogue_neon(const conv_args *a, const epi_neon *e, int64_t n, int64_t oh, int64_t ow, int64_t ob,
                                 const uint32x4_t pc[4], int border, const int NEXT) {
    int32x4_t dot[4];
    for (int q = 0; q < 4; q++) dot[q] = vsubq_s32(e->K, vreinterpretq_s32_u32(vshlq_n_u32(pc[q], 1)));
    int64_t i0, i1, j0, j1;
    if (border && a->wsum && !inside(a, oh, ow, &i0, &i1, &j0, &j1)) {
        const int32_t *c00 = tap_prefix(a, i0, j0, ob), *c01 = tap_prefix(a, i0, j1, ob);
        const int32_t *c10 = tap_prefix(a, i1, j0, ob), *c11 = tap_prefix(a, i1, j1, ob);
        const int32_t *all = tap_prefix(a, a->kh, a->kw, ob);
        for (int q = 0; q < 4; q++) {
            int32x4_t rect = vsubq_s32(vld1q_s32(c11 + 4 * q), vld1q_s32(c01 + 4 * q));
            rect = vaddq_s32(vsubq_s32(rect, vld1q_s32(c10 + 4 * q)), vld1q_s32(c00 + 4 * q));
            dot[q] = vaddq_s32(dot[q], vsubq_s32(vld1q_s32(all + 4 * q), rect));
        }
    }
    const float32x4_t zero = vdupq_n_f32(0.0f);
    float y[LANES];
    for (int q = 0; q < 4; q++) {
        /* |dot| < 2^24: the conversion is exact */
        float32x4_t v = vaddq_f32(mul_rounded(e->alpha[q], vcvtq_f32_s32(dot[q])), e->bias[q]);
        /* y > 0 ? y : +0 as a mask, like the scalar code: NaN and -0 give +0 (FMAX would keep NaN) */
        if (e->relu) v = vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(v), vcgtq_f32(v, zero)));
        if (e->post) v = e->fma ? vfmaq_f32(e->shift[q], v, e->scale[q]) : vaddq_f32(mul_rounded(v, e->scale[q]), e->shift[q]);
        vst1q_f32(y + 4 * q, v);
    }
    const int64_t at = ((n * a->OH + oh) * a->OW + ow) * a->O + ob * LANES;
    if (a->residual)
        for (int v = 0; v < e->nv; v++) y[v] += a->residual[at + v]; /* one rounding each, like PyTorch's add */
    if (!NEXT || a->out) memcpy(a->out + at, y, (size_t)e->nv * sizeof(float)); /* the last block may hold fewer than LANES channels */
    if (NEXT) next_bits_scalar(a, n, oh, ow, ob, y, e->nv); /* the next conv's packed input */
}

/* P output pixels x LANES channels with 16-bit accumulators (kh * Kw <= NEON_U16_WORDS), in two
   passes of 8 channels: 4P accumulators, 4 weight vectors (2 channels each) loaded once per word
   for all P pixels, so everything stays in the 32 vector registers (16 channels x 2 pixels at once
   made gcc spill accumulators in the inner loop). Accumulator j holds channel 2j of the pass in
   lanes 0-3 and 2j + 1 in lanes 4-7. KW: the words per kernel row as a compile-time constant
   (1-3 for 16-64 channels), or 0 to read `a`. */
__attribute__((always_inline)) static inline void conv_pixels_neon(const conv_args *a, const epi_neon *e,
                                                                   const uint8_t *rowbase, const uint64_t *wb, int64_t n,
                                                                   int64_t oh, int64_t ow, int64_t ob, int border,
                                                                   const int P, const int KW, const int NEXT) {
    const int64_t step = a->sw * a->pix_bytes, Kw = KW ? KW : a->Kw;
    uint32x4_t pc[NEON_PIX][4];
    for (int half = 0; half < 2; half++) {
        uint16x8_t acc[NEON_PIX][4];
        for (int p = 0; p < P; p++)
            for (int j = 0; j < 4; j++) acc[p][j] = vdupq_n_u16(0);
        for (int64_t i = 0; i < a->kh; i++) {
            const uint8_t *xr = rowbase + i * a->row_bytes + ow * step;
            const uint64_t *wi = wb + i * Kw * LANES + 8 * half;
            for (int64_t k = 0; k < Kw; k++) {
                uint8x16_t xv[NEON_PIX];
                for (int p = 0; p < P; p++) {
                    uint64_t word = load_word(xr + p * step + 8 * k);
                    if (k == Kw - 1) word &= a->last_mask; /* bits past the kernel row's taps */
                    xv[p] = vreinterpretq_u8_u64(vdupq_n_u64(word));
                }
                for (int j = 0; j < 4; j++) {
                    uint8x16_t w = vreinterpretq_u8_u64(vld1q_u64(wi + k * LANES + 2 * j));
                    for (int p = 0; p < P; p++) acc[p][j] = vpadalq_u8(acc[p][j], vcntq_u8(veorq_u8(xv[p], w)));
                }
            }
        }
        /* widen to u32 first (two full u16 lanes can sum past 65535): lanes 0-1 hold channel 2j,
           2-3 channel 2j + 1; one pairwise add of two neighbours then gives four channels */
        for (int p = 0; p < P; p++)
            for (int q = 0; q < 2; q++)
                pc[p][2 * half + q] = vpaddq_u32(vpaddlq_u16(acc[p][2 * q]), vpaddlq_u16(acc[p][2 * q + 1]));
    }
    for (int p = 0; p < P; p++) epilogue_neon(a, e, n, oh, ow + p, ob, pc[p], border, NEXT);
}

/* One output pixel with 32-bit accumulators, for pixels of more than NEON_U16_WORDS words (rare:
   very wide layers); one more widening add per vector than the 16-bit path. */
static void conv_pixel_neon_wide(const conv_args *a, const epi_neon *e, const uint8_t *rowbase, const uint64_t *wb,
                                 int64_t n, int64_t oh, int64_t ow, int64_t ob, int border) {
    const int64_t step = a->sw * a->pix_bytes, Kw = a->Kw;
    uint32x4_t acc[8];
    for (int j = 0; j < 8; j++) acc[j] = vdupq_n_u32(0);
    for (int64_t i = 0; i < a->kh; i++) {
        const uint8_t *xr = rowbase + i * a->row_bytes + ow * step;
        const uint64_t *wi = wb + i * Kw * LANES;
        for (int64_t k = 0; k < Kw; k++) {
            uint64_t word = load_word(xr + 8 * k);
            if (k == Kw - 1) word &= a->last_mask;
            uint8x16_t xv = vreinterpretq_u8_u64(vdupq_n_u64(word));
            for (int j = 0; j < 8; j++) {
                uint8x16_t w = vreinterpretq_u8_u64(vld1q_u64(wi + k * LANES + 2 * j));
                acc[j] = vpadalq_u16(acc[j], vpaddlq_u8(vcntq_u8(veorq_u8(xv, w))));
            }
        }
    }
    /* acc[j]: lanes 0-1 channel 2j, lanes 2-3 channel 2j + 1 */
    uint32x4_t pc[4];
    for (int q = 0; q < 4; q++) pc[q] = vpaddq_u32(acc[2 * q], acc[2 * q + 1]);
    epilogue_neon(a, e, n, oh, ow, ob, pc, border, a->next_x != NULL); /* rare: no compile-time copy */
}

/* Output columns [from, to) of one row, NEON_PIX pixels at a time, then the odd one. */
__attribute__((always_inline)) static inline void conv_columns_neon(const conv_args *a, const epi_neon *e,
                                                                    const uint8_t *rowbase, const uint64_t *wb, int64_t n,
                                                                    int64_t oh, int64_t ob, int64_t from, int64_t to,
                                                                    int border, const int KW, const int NEXT) {
    int64_t ow = from;
    if (a->kh * a->Kw > NEON_U16_WORDS) {
        for (; ow < to; ow++) conv_pixel_neon_wide(a, e, rowbase, wb, n, oh, ow, ob, border);
        return;
    }
    for (; ow + NEON_PIX <= to; ow += NEON_PIX) conv_pixels_neon(a, e, rowbase, wb, n, oh, ow, ob, border, NEON_PIX, KW, NEXT);
    if (ow < to) conv_pixels_neon(a, e, rowbase, wb, n, oh, ow, ob, border, 1, KW, NEXT);
}

DEFINE_CONV_BLOCK(neon, )

/* Bit t of each byte: the byte-wide masks AND these, then pairwise adds sum (= OR) them. */
static const uint8_t neon_bit_weights[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};

/* 16 floats -> 16 bytes, 0xff where the bit is set: !(x < 0), so 0, -0 and NaN give +1 like the
   estimators' sign (x < 0 is false for NaN). */
static inline uint8x16_t sign_bytes16_neon(const float *x) {
    uint16x8_t lo = vcombine_u16(vmovn_u32(vcltq_f32(vld1q_f32(x), vdupq_n_f32(0.0f))),
                                 vmovn_u32(vcltq_f32(vld1q_f32(x + 4), vdupq_n_f32(0.0f))));
    uint16x8_t hi = vcombine_u16(vmovn_u32(vcltq_f32(vld1q_f32(x + 8), vdupq_n_f32(0.0f))),
                                 vmovn_u32(vcltq_f32(vld1q_f32(x + 12), vdupq_n_f32(0.0f))));
    return vmvnq_u8(vcombine_u8(vmovn_u16(lo), vmovn_u16(hi)));
}

/* 64 floats -> 8 packed bytes. */
static inline void pack64_neon(const float *x, uint8_t *dst) {
    const uint8x16_t bits = vld1q_u8(neon_bit_weights);
    uint8x16_t m0 = vandq_u8(sign_bytes16_neon(x), bits), m1 = vandq_u8(sign_bytes16_neon(x + 16), bits);
    uint8x16_t m2 = vandq_u8(sign_bytes16_neon(x + 32), bits), m3 = vandq_u8(sign_bytes16_neon(x + 48), bits);
    /* three rounds of pairwise adds: byte b of the result sums floats 8b..8b+7 */
    uint8x16_t s = vpaddq_u8(vpaddq_u8(m0, m1), vpaddq_u8(m2, m3));
    vst1_u8(dst, vget_low_u8(vpaddq_u8(s, s)));
}

/* 8 floats -> 1 packed byte. */
static inline uint8_t pack8_neon(const float *x) {
    uint16x8_t lt = vcombine_u16(vmovn_u32(vcltq_f32(vld1q_f32(x), vdupq_n_f32(0.0f))),
                                 vmovn_u32(vcltq_f32(vld1q_f32(x + 4), vdupq_n_f32(0.0f))));
    return vaddv_u8(vbic_u8(vld1_u8(neon_bit_weights), vmovn_u16(lt)));
}

/* W pixels of C channels (NHWC) -> W packed pixels of pix_bytes bytes (bits C..Cb-1 zero). */
static void pack_pixels_neon(const float *x, int64_t W, int64_t C, int64_t pix_bytes, uint8_t *dst) {
    if (C % 8 == 0 && pix_bytes * 8 == C) { /* no padding bits: the whole run is one flat bit stream */
        int64_t count = W * C, i = 0;
        for (; i + 64 <= count; i += 64) pack64_neon(x + i, dst + i / 8);
        for (; i < count; i += 8) dst[i / 8] = pack8_neon(x + i);
        return;
    }
    for (int64_t w = 0; w < W; w++, x += C, dst += pix_bytes) {
        int64_t c = 0;
        for (; c + 8 <= C; c += 8) dst[c / 8] = pack8_neon(x + c);
        uint8_t byte = 0; /* the last C % 8 channels; reading past them could leave the tensor */
        for (int64_t t = c; t < C; t++) byte |= (uint8_t)(!(x[t] < 0.0f) << (t - c));
        dst[c / 8] = byte;
    }
}
#endif
