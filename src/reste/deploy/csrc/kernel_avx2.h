/* AVX2 kernel (no VPOPCNTDQ): popcounts by nibble lookup, output channels across vector lanes. */
/* -------------------------------------------------------------------- AVX2 */

#if RESTE_X86
/* Popcount. AVX2 has no vector popcount instruction; VPSHUFB looks up 32 bytes at once in
   a 16-entry table, so the count of each byte is table[low nibble] + table[high nibble]
   (the weights' nibbles are split ahead, see avx2_add_popcount). The byte counts of up to 31 words (31 * 8 = 248 < 256)
   add up in 8-bit lanes; VPSADBW then sums each 64-bit lane's 8 bytes into that lane,
   which is exactly one output channel's count: no horizontal sums.

   A block is LANES = 16 output channels = 4 vectors of 4 64-bit words; AVX2_PIX output
   pixels go together so every weight vector loaded serves several pixels (8 byte
   accumulators for 2 pixels: with the table, the nibble mask and the temporaries that
   fills the 16 vector registers). */
#define AVX2_PIX 2
#define AVX2_BYTE_WORDS 31 /* words whose byte counts fit an 8-bit lane */

/* Per (row, channel block) constants of the epilogue, loaded once into registers. */
typedef struct {
    __m256 alpha[2], bias[2], scale[2], shift[2], next_scale[2], next_shift[2];
    __m256i K, store_mask[2];
    int relu, post, fma, partial, next_map, next_relu, next_fma;
    int64_t nv;
} epi_avx2;

TARGET_AVX2 __attribute__((always_inline)) static inline __m256i avx2_lane_mask(int64_t count) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)count), idx); /* lane v: v < count */
}

TARGET_AVX2 __attribute__((always_inline)) static inline epi_avx2 epi_load_avx2(const conv_args *a, int64_t ob) {
    epi_avx2 e;
    int64_t o0 = ob * LANES, nv = a->O - o0 < LANES ? a->O - o0 : LANES;
    e.partial = nv < LANES;
    for (int h = 0; h < 2; h++) {
        __m256i m = avx2_lane_mask(nv - 8 * h);
        const int64_t c = o0 + 8 * h;
        e.store_mask[h] = m;
        e.alpha[h] = a->alpha_per_channel ? _mm256_maskload_ps(a->alpha + c, m) : _mm256_set1_ps(a->alpha[0]);
        e.bias[h] = a->bias ? _mm256_maskload_ps(a->bias + c, m) : _mm256_setzero_ps();
        e.scale[h] = a->post_scale ? _mm256_maskload_ps(a->post_scale + c, m) : _mm256_setzero_ps();
        e.shift[h] = a->post_scale ? _mm256_maskload_ps(a->post_shift + c, m) : _mm256_setzero_ps();
        const int next_map = a->next_x && a->next_map.scale;
        e.next_scale[h] = next_map ? _mm256_maskload_ps(a->next_map.scale + c, m) : _mm256_setzero_ps();
        e.next_shift[h] = next_map ? _mm256_maskload_ps(a->next_map.shift + c, m) : _mm256_setzero_ps();
    }
    e.nv = nv;
    e.next_map = a->next_x && a->next_map.scale;
    e.next_relu = a->next_map.relu;
    e.next_fma = a->next_map.fma;
    e.relu = a->relu != 0;
    e.post = a->post_scale != NULL;
    e.fma = a->post_fma != 0;
    e.K = _mm256_set1_epi32((int)a->K);
    return e;
}

/* Eight channels' counts as int32 from two vectors of four 64-bit counts (< 2^31): take the
   low halves (within 128-bit lanes: channels 0 1 4 5 | 2 3 6 7), then restore the order. */
TARGET_AVX2 __attribute__((always_inline)) static inline __m256i avx2_low_halves(__m256i a, __m256i b) {
    __m256 s = _mm256_shuffle_ps(_mm256_castsi256_ps(a), _mm256_castsi256_ps(b), _MM_SHUFFLE(2, 0, 2, 0));
    return _mm256_permute4x64_epi64(_mm256_castps_si256(s), _MM_SHUFFLE(3, 1, 2, 0));
}

/* `epilogue` on vectors: 16 channels of one output pixel from 4 vectors of 64-bit counts. */
TARGET_AVX2 __attribute__((always_inline)) static inline void epilogue_avx2(
    const conv_args *a, const epi_avx2 *e, int64_t n, int64_t oh, int64_t ow, int64_t ob, const __m256i *pc, int border,
    const int NEXT) {
    int64_t i0, i1, j0, j1;
    int fix = border && !inside(a, oh, ow, &i0, &i1, &j0, &j1);
    const int64_t at = ((n * a->OH + oh) * a->OW + ow) * a->O + ob * LANES;
    float *dst = a->out ? a->out + at : NULL;
    unsigned bits = 0; /* the next conv's input bits (next_bits_scalar on vectors) */
    for (int h = 0; h < 2; h++) {
        __m256i c = avx2_low_halves(pc[2 * h], pc[2 * h + 1]);
        __m256i dot = _mm256_sub_epi32(e->K, _mm256_add_epi32(c, c)); /* K - 2 * popcount */
        if (fix) { /* + total weight sum - the sum over the taps inside the image */
#define TAP(i, j) _mm256_loadu_si256((const __m256i *)(tap_prefix(a, i, j, ob) + 8 * h))
            __m256i rect = _mm256_add_epi32(_mm256_sub_epi32(_mm256_sub_epi32(TAP(i1, j1), TAP(i0, j1)), TAP(i1, j0)), TAP(i0, j0));
            dot = _mm256_add_epi32(dot, _mm256_sub_epi32(TAP(a->kh, a->kw), rect));
#undef TAP
        }
        /* multiply then add, two roundings, like the generic kernel and the PyTorch reference */
        __m256 y = _mm256_add_ps(_mm256_mul_ps(e->alpha[h], _mm256_cvtepi32_ps(dot)), e->bias[h]);
        if (e->relu) y = _mm256_max_ps(y, _mm256_setzero_ps()); /* NaN and -0 give +0, as max(., 0) in the scalar code */
        if (e->post)
            y = e->fma ? _mm256_fmadd_ps(y, e->scale[h], e->shift[h]) : _mm256_add_ps(_mm256_mul_ps(y, e->scale[h]), e->shift[h]);
        if (a->residual) /* the shortcut of a ResNet block, added as the last op like PyTorch's x + y */
            y = _mm256_add_ps(y, e->partial ? _mm256_maskload_ps(a->residual + at + 8 * h, e->store_mask[h])
                                            : _mm256_loadu_ps(a->residual + at + 8 * h));
        if (NEXT && !a->out)
            ;
        else if (e->partial)
            _mm256_maskstore_ps(dst + 8 * h, e->store_mask[h], y);
        else
            _mm256_storeu_ps(dst + 8 * h, y);
        if (NEXT) {
            const __m256 zero = _mm256_setzero_ps();
            if (e->next_map) {
                if (e->next_relu) y = _mm256_blendv_ps(y, zero, _mm256_cmp_ps(y, zero, _CMP_LT_OQ)); /* NaN, -0 stay */
                y = e->next_fma ? _mm256_fmadd_ps(y, e->next_scale[h], e->next_shift[h])
                                : _mm256_add_ps(_mm256_mul_ps(y, e->next_scale[h]), e->next_shift[h]);
            }
            /* !(y < 0) per lane; lanes past O cleared by the store mask's sign bits */
            __m256 ge = _mm256_and_ps(_mm256_cmp_ps(y, zero, _CMP_NLT_UQ), _mm256_castsi256_ps(e->store_mask[h]));
            bits |= (unsigned)_mm256_movemask_ps(ge) << (8 * h);
        }
    }
    if (NEXT) {
        uint8_t *next = next_pixel(a, n, oh, ow) + 2 * ob;
        next[0] = (uint8_t)bits;
        if (e->nv > 8) next[1] = (uint8_t)(bits >> 8);
    }
}

/* The byte counts of popcount(x XOR w) added to acc, from the nibbles of x and of w: the
   nibbles of x XOR w are (x nibbles) XOR (w nibbles), so with the weights' nibbles split once
   (split_nibbles) and each input word's once per pixel, a popcount is 2 XOR + 2 VPSHUFB + 2 adds
   instead of XOR, AND, shift, AND, 2 VPSHUFB and 2 adds. */
TARGET_AVX2 __attribute__((always_inline)) static inline __m256i avx2_add_popcount(__m256i acc, __m256i x_lo, __m256i x_hi,
                                                                                   __m256i w_lo, __m256i w_hi, __m256i table) {
    __m256i lo = _mm256_shuffle_epi8(table, _mm256_xor_si256(x_lo, w_lo));
    __m256i hi = _mm256_shuffle_epi8(table, _mm256_xor_si256(x_hi, w_hi));
    return _mm256_add_epi8(acc, _mm256_add_epi8(lo, hi));
}

/* P output pixels x LANES channels. KW: the words per kernel row as a compile-time
   constant (1-3 for 16-64 channels: the loops unroll), or 0 to read it from `a`.
   The byte counters take whole kernel rows (31 / Kw of them) between two VPSADBW flushes,
   so the hot loop has no flush test and keeps its 4P counters in registers; only rows of
   more than 31 words (over 661 channels) are cut into pieces. */
TARGET_AVX2 __attribute__((always_inline)) static inline void conv_pixels_avx2(
    const conv_args *a, const epi_avx2 *e, const uint8_t *rowbase, const uint64_t *wb, int64_t n, int64_t oh,
    int64_t ow, int64_t ob, int border, const int P, const int KW, const int NEXT) {
    const int64_t step = a->sw * a->pix_bytes, Kw = KW ? KW : a->Kw;
    const int64_t rows_per_flush = Kw <= AVX2_BYTE_WORDS ? AVX2_BYTE_WORDS / Kw : 1;
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                           0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low4 = _mm256_set1_epi8(0x0f), zero = _mm256_setzero_si256();
    const __m256i keep = _mm256_set1_epi64x((long long)a->last_mask); /* the last word's bits past the taps go */
    const __m256i *wn = (const __m256i *)(a->w_nibbles + ob * a->kh * Kw * 2 * LANES); /* 8 vectors per word */
    (void)wb;
    __m256i total[AVX2_PIX][4];
    for (int p = 0; p < P; p++)
        for (int v = 0; v < 4; v++) total[p][v] = zero;
    for (int64_t i0 = 0; i0 < a->kh; i0 += rows_per_flush) {
        const int64_t i1 = i0 + rows_per_flush < a->kh ? i0 + rows_per_flush : a->kh;
        for (int64_t k0 = 0; k0 < Kw; k0 += AVX2_BYTE_WORDS) {
            const int64_t k1 = k0 + AVX2_BYTE_WORDS < Kw ? k0 + AVX2_BYTE_WORDS : Kw;
            __m256i acc[AVX2_PIX][4];
            for (int p = 0; p < P; p++)
                for (int v = 0; v < 4; v++) acc[p][v] = zero;
            for (int64_t i = i0; i < i1; i++) {
                const uint8_t *xr = rowbase + i * a->row_bytes + ow * step;
                const __m256i *wi = wn + i * Kw * 8;
                for (int64_t k = k0; k < k1; k++) {
                    __m256i x_lo[AVX2_PIX], x_hi[AVX2_PIX];
                    for (int p = 0; p < P; p++) { /* a broadcast from memory: a load, no shuffle */
                        __m256i xv = _mm256_set1_epi64x((long long)load_word(xr + p * step + 8 * k));
                        if (k == Kw - 1) xv = _mm256_and_si256(xv, keep);
                        x_lo[p] = _mm256_and_si256(xv, low4);
                        x_hi[p] = _mm256_and_si256(_mm256_srli_epi16(xv, 4), low4);
                    }
                    for (int v = 0; v < 4; v++) {
                        __m256i w_lo = _mm256_loadu_si256(wi + k * 8 + v), w_hi = _mm256_loadu_si256(wi + k * 8 + 4 + v);
                        for (int p = 0; p < P; p++) acc[p][v] = avx2_add_popcount(acc[p][v], x_lo[p], x_hi[p], w_lo, w_hi, table);
                    }
                }
            }
            for (int p = 0; p < P; p++)
                for (int v = 0; v < 4; v++) total[p][v] = _mm256_add_epi64(total[p][v], _mm256_sad_epu8(acc[p][v], zero));
        }
    }
    for (int p = 0; p < P; p++) epilogue_avx2(a, e, n, oh, ow + p, ob, total[p], border, NEXT);
}

/* Output columns [from, to) of one row in blocks of AVX2_PIX pixels, then single ones. */
TARGET_AVX2 __attribute__((always_inline)) static inline void conv_columns_avx2(
    const conv_args *a, const epi_avx2 *e, const uint8_t *rowbase, const uint64_t *wb, int64_t n, int64_t oh,
    int64_t ob, int64_t from, int64_t to, int border, const int KW, const int NEXT) {
    int64_t ow = from;
    for (; ow + AVX2_PIX <= to; ow += AVX2_PIX) conv_pixels_avx2(a, e, rowbase, wb, n, oh, ow, ob, border, AVX2_PIX, KW, NEXT);
    for (; ow < to; ow++) conv_pixels_avx2(a, e, rowbase, wb, n, oh, ow, ob, border, 1, KW, NEXT);
}

DEFINE_CONV_BLOCK(avx2, TARGET_AVX2)

/* Pack `count` floats into count / 8 bytes (count a multiple of 8): bit t of byte b = !(x[8b + t] < 0)
   (0, -0 and NaN give +1, like the estimators' sign); MOVMSKPS gathers the 8 compare results. */
TARGET_AVX2
static void pack_flat_avx2(const float *x, int64_t count, uint8_t *dst) {
    const __m256 zero = _mm256_setzero_ps();
#define BITS8(p) ((uint64_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(p), zero, _CMP_NLT_UQ)))
    int64_t i = 0;
    for (; i + 64 <= count; i += 64) {
        uint64_t m = BITS8(x + i) | BITS8(x + i + 8) << 8 | BITS8(x + i + 16) << 16 | BITS8(x + i + 24) << 24 |
                     BITS8(x + i + 32) << 32 | BITS8(x + i + 40) << 40 | BITS8(x + i + 48) << 48 | BITS8(x + i + 56) << 56;
        memcpy(dst + i / 8, &m, 8);
    }
    for (; i < count; i += 8) dst[i / 8] = (uint8_t)BITS8(x + i);
#undef BITS8
}

/* W pixels of C channels (NHWC) -> W packed pixels of Cb/8 bytes. */
TARGET_AVX2
static void pack_pixels_avx2(const float *x, int64_t W, int64_t C, int64_t pix_bytes, uint8_t *dst) {
    if (C % 8 == 0) { /* no padding bits: the whole run is one flat bit stream */
        pack_flat_avx2(x, W * C, dst);
        return;
    }
    for (int64_t w = 0; w < W; w++) {
        int64_t full = C / 8 * 8;
        pack_flat_avx2(x + w * C, full, dst + w * pix_bytes);
        pack_pixels_generic(x + w * C + full, 1, C - full, 1, dst + w * pix_bytes + full / 8); /* the last C % 8 channels */
    }
}
#endif
