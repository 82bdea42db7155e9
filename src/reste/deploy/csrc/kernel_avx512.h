/* AVX-512 VPOPCNTDQ kernel: 8 words per instruction, output channels across vector lanes. */
/* ----------------------------------------------------------------- AVX-512 */

#if RESTE_X86
/* Per (row, channel block) constants of the epilogue, loaded once into registers
   (through `a` the compiler would reload them after every store to the output). */
typedef struct {
    __m512 alpha, bias, scale, shift, next_scale, next_shift;
    __m512i K;
    __mmask16 store_mask;
    int relu, post, fma, next_map, next_relu, next_fma;
} epi_avx512;

TARGET_AVX512 __attribute__((always_inline)) static inline epi_avx512 epi_load_avx512(const conv_args *a, int64_t ob) {
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
    e.next_map = a->next_x && a->next_map.scale;
    e.next_relu = a->next_map.relu;
    e.next_fma = a->next_map.fma;
    e.next_scale = e.next_map ? _mm512_maskz_loadu_ps(m, a->next_map.scale + o0) : _mm512_setzero_ps();
    e.next_shift = e.next_map ? _mm512_maskz_loadu_ps(m, a->next_map.shift + o0) : _mm512_setzero_ps();
    return e;
}

/* `epilogue` on vectors, 16 channels of one output pixel; `border` asks for the zero-padding fix. */
TARGET_AVX512 __attribute__((always_inline)) static inline void epilogue_avx512(
    const conv_args *a, const epi_avx512 *e, int64_t n, int64_t oh, int64_t ow, int64_t ob, __m512i pc0, __m512i pc1,
    int border, const int NEXT) {
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
    const int64_t at = ((n * a->OH + oh) * a->OW + ow) * a->O + ob * LANES;
    if (a->residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(e->store_mask, a->residual + at));
    if (!NEXT || a->out) _mm512_mask_storeu_ps(a->out + at, e->store_mask, y);
    if (NEXT) { /* next_bits_scalar on vectors: the next conv's prologue, then the sign bits */
        const __m512 zero = _mm512_setzero_ps();
        if (e->next_map) {
            if (e->next_relu) y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(y, zero, _CMP_LT_OQ), y, zero); /* NaN, -0 stay */
            y = e->next_fma ? _mm512_fmadd_ps(y, e->next_scale, e->next_shift)
                            : _mm512_add_ps(_mm512_mul_ps(y, e->next_scale), e->next_shift);
        }
        unsigned bits = (unsigned)_mm512_mask_cmp_ps_mask(e->store_mask, y, zero, _CMP_NLT_UQ); /* channels past O: 0 */
        uint8_t *dst = next_pixel(a, n, oh, ow) + 2 * ob;
        dst[0] = (uint8_t)bits;
        if (e->store_mask >> 8) dst[1] = (uint8_t)(bits >> 8);
    }
}

/* P output pixels x LANES channels: 2P accumulators stay in registers. KW: the words per
   kernel row as a compile-time constant (1-3 for 16-64 channels: the loops unroll), or 0 to
   read it from `a`. */
TARGET_AVX512 __attribute__((always_inline)) static inline void conv_pixels_avx512(
    const conv_args *a, const epi_avx512 *e, const uint8_t *rowbase, const uint64_t *wb, int64_t n, int64_t oh,
    int64_t ow, int64_t ob, int border, const int P, const int KW, const int NEXT) {
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
    for (int p = 0; p < P; p++) epilogue_avx512(a, e, n, oh, ow + p, ob, acc0[p], acc1[p], border, NEXT);
}

/* Output columns [from, to) of one row in blocks of 8, 4, 2 and 1 pixels. */
TARGET_AVX512 __attribute__((always_inline)) static inline void conv_columns_avx512(
    const conv_args *a, const epi_avx512 *e, const uint8_t *rowbase, const uint64_t *wb, int64_t n, int64_t oh,
    int64_t ob, int64_t from, int64_t to, int border, const int KW, const int NEXT) {
    int64_t ow = from;
    for (; ow + PIX_BLOCK <= to; ow += PIX_BLOCK) conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, PIX_BLOCK, KW, NEXT);
    if (ow + 4 <= to) { conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, 4, KW, NEXT); ow += 4; }
    if (ow + 2 <= to) { conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, 2, KW, NEXT); ow += 2; }
    if (ow < to) conv_pixels_avx512(a, e, rowbase, wb, n, oh, ow, ob, border, 1, KW, NEXT);
}

DEFINE_CONV_BLOCK(avx512, TARGET_AVX512)

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
