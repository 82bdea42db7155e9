/* The portable kernel: __builtin_popcountll, built twice on x86 (with POPCNT, and without it
   for the rare CPU that lacks the instruction). */
/* ---------------------------------------------------------------- portable */

__attribute__((always_inline)) static inline void conv_block_generic_body(const conv_args *a, int64_t r, int64_t ob) {
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

static void conv_block_generic(const conv_args *a, int64_t r, int64_t ob) { conv_block_generic_body(a, r, ob); }
#if RESTE_X86
TARGET_POPCNT static void conv_block_generic_popcnt(const conv_args *a, int64_t r, int64_t ob) { conv_block_generic_body(a, r, ob); }
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
