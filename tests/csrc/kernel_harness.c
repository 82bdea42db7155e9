/* Bit-exactness harness of the deploy kernels, plain C without Python, so it builds for other
   architectures (tests/test_kernels_neon.py cross-compiles it for aarch64 and runs it under qemu).

   Random convolutions (odd channel counts, strides 1-2, 1x1 / 3x3 / 5x3 / 3x5 kernels, zero
   padding with the wsum correction, "+1" padding, no padding, per-layer and per-channel alpha,
   bias, ReLU, the post affine map with and without FMA, N 1-3, tiny to larger images, and
   extreme cases: counts at the 16-bit accumulator limit, inf/NaN in the epilogue) go through
   run_pack_rows + run_conv once per kernel path this CPU supports. Every path's packed input and
   float output must equal the portable kernel's byte for byte (memcmp), and the portable output
   must equal a direct per-tap computation here (which checks the harness's own layouts). Each
   case also runs chained (conv_args.next_x: the epilogue writes the next conv's packed input, with
   a random padding, "+1" border and prologue map, with and without the float output), and that
   buffer must equal run_pack_rows_map of the path's float output byte for byte.

   usage: kernel_harness [random_cases [seed]]; exit status 0 only if everything matched. */
#include <stdio.h>
#include "dispatch.h"

/* ------------------------------------------------------------- PRNG */
static uint64_t rng_state;
static uint64_t rnd(void) { /* splitmix64: deterministic on every platform */
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}
static int64_t rnd_int(int64_t lo, int64_t hi) { return lo + (int64_t)(rnd() % (uint64_t)(hi - lo + 1)); } /* [lo, hi] */
static float rnd_float(void) { return (float)((double)(rnd() >> 11) / 9007199254740992.0 * 2.0 - 1.0); } /* [-1, 1) */
static int64_t pick(const int64_t *v, int n) { return v[rnd() % (uint64_t)n]; }

static void *xcalloc(size_t n, size_t size) {
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "kernel_harness: out of memory\n");
        exit(2);
    }
    return p;
}

/* ------------------------------------------------------------- one case */
typedef struct {
    int64_t N, H, W, C, O, kh, kw, sh, sw;
    int pad;           /* 0 none, 1 zero (wsum correction), 2 "+1" */
    int alpha_pc, bias, relu, post, post_fma, residual;
    int input_kind;    /* 0 random with 0, -0 and NaN sprinkled in; 1 all negative */
    int weight_kind;   /* 0 random bits; 1 all ones (with input_kind 1: every tap differs) */
    int special_alpha; /* inf and NaN among alpha */
} conv_case;

typedef struct {
    long cases, conv_bytes, pack_bytes, chain_bytes, mismatches;
} tally;

static int verbose_failures = 5;

static void describe(const conv_case *c, const char *what) {
    if (verbose_failures-- <= 0) return;
    fprintf(stderr,
            "MISMATCH %s: N=%lld H=%lld W=%lld C=%lld O=%lld k=%lldx%lld s=%lldx%lld pad=%d alpha_pc=%d bias=%d relu=%d "
            "post=%d fma=%d residual=%d input=%d weight=%d special_alpha=%d\n",
            what, (long long)c->N, (long long)c->H, (long long)c->W, (long long)c->C, (long long)c->O, (long long)c->kh,
            (long long)c->kw, (long long)c->sh, (long long)c->sw, c->pad, c->alpha_pc, c->bias, c->relu, c->post, c->post_fma,
            c->residual, c->input_kind, c->weight_kind, c->special_alpha);
}

#define GUARD 64 /* bytes after each output, to catch a kernel writing past the last channel block */

static void run_case(const conv_case *c, const char **paths, int n_paths, tally *t) {
    const int64_t N = c->N, H = c->H, W = c->W, C = c->C, O = c->O, kh = c->kh, kw = c->kw;
    const int64_t ph = c->pad ? kh / 2 : 0, pw = c->pad ? kw / 2 : 0;
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, Cb = (C + 7) / 8 * 8, pix_bytes = Cb / 8;
    const int64_t row_bytes = Wp * pix_bytes + 8 + 8 * (int64_t)(rnd() % 2); /* sometimes more spare than needed */
    const int64_t OH = (Hp - kh) / c->sh + 1, OW = (Wp - kw) / c->sw + 1;
    const int64_t Kw = (kw * pix_bytes + 7) / 8, OB = (O + LANES - 1) / LANES, bits = kw * Cb - (Kw - 1) * 64;
    const uint64_t last_mask = bits == 64 ? ~0ULL : (1ULL << bits) - 1;

    /* input, NHWC */
    float *x = xcalloc((size_t)(N * H * W * C), sizeof(float));
    for (int64_t i = 0; i < N * H * W * C; i++) {
        if (c->input_kind == 1) {
            x[i] = -1.0f - (float)(rnd() % 4);
            continue;
        }
        uint64_t r = rnd() % 64;
        x[i] = r == 0 ? 0.0f : r == 1 ? -0.0f : r == 2 ? NAN : r == 3 ? -NAN : rnd_float();
    }
    /* sign of weight (o, c, i, j) as a bit; the packed words and the tap sums follow from it */
    uint8_t *wbit = xcalloc((size_t)(O * C * kh * kw), 1);
    for (int64_t i = 0; i < O * C * kh * kw; i++) wbit[i] = c->weight_kind == 1 ? 1 : (uint8_t)(rnd() & 1);
#define WBIT(o, ch, i, j) wbit[(((o) * C + (ch)) * kh + (i)) * kw + (j)]
    uint64_t *w = xcalloc((size_t)(OB * kh * Kw * LANES), sizeof(uint64_t)); /* padded channels stay 0 */
    for (int64_t o = 0; o < O; o++)
        for (int64_t i = 0; i < kh; i++)
            for (int64_t j = 0; j < kw; j++)
                for (int64_t ch = 0; ch < C; ch++)
                    if (WBIT(o, ch, i, j)) {
                        int64_t b = j * Cb + ch; /* bit b of the kernel row's segment */
                        w[(((o / LANES) * kh + i) * Kw + b / 64) * LANES + o % LANES] |= 1ULL << (b % 64);
                    }
    int32_t *wsum = NULL;
    if (c->pad == 1) { /* prefix sums over taps of sum_c sign(w) */
        wsum = xcalloc((size_t)((kh + 1) * (kw + 1) * OB * LANES), sizeof(int32_t));
        for (int64_t o = 0; o < O; o++)
            for (int64_t i = 1; i <= kh; i++)
                for (int64_t j = 1; j <= kw; j++) {
                    int32_t s = 0;
                    for (int64_t ch = 0; ch < C; ch++) s += WBIT(o, ch, i - 1, j - 1) ? 1 : -1;
                    int64_t at = (i * (kw + 1) + j) * OB * LANES + o, up = ((i - 1) * (kw + 1) + j) * OB * LANES + o;
                    int64_t left = (i * (kw + 1) + j - 1) * OB * LANES + o, diag = ((i - 1) * (kw + 1) + j - 1) * OB * LANES + o;
                    wsum[at] = s + wsum[up] + wsum[left] - wsum[diag];
                }
    }
    /* epilogue parameters */
    float *alpha = xcalloc((size_t)O, sizeof(float)), *bias = xcalloc((size_t)O, sizeof(float));
    float *scale = xcalloc((size_t)O, sizeof(float)), *shift = xcalloc((size_t)O, sizeof(float));
    for (int64_t o = 0; o < O; o++) {
        alpha[o] = rnd_float() * 0.1f + (rnd() % 8 == 0 ? -0.02f : 0.05f);
        bias[o] = rnd_float() * 3.0f;
        scale[o] = rnd_float() * 2.0f;
        shift[o] = rnd_float();
    }
    if (c->special_alpha) {
        alpha[0] = INFINITY;
        if (O > 1) alpha[1] = NAN;
        if (O > 2) alpha[2] = -INFINITY;
    }

    conv_args a;
    memset(&a, 0, sizeof a);
    a.N = N; a.H = H; a.W = W; a.Hp = Hp; a.row_bytes = row_bytes; a.pix_bytes = pix_bytes;
    a.kh = kh; a.kw = kw; a.sh = c->sh; a.sw = c->sw; a.ph = ph; a.pw = pw; a.OH = OH; a.OW = OW;
    a.w = w; a.O = O; a.OB = OB; a.Kw = Kw; a.last_mask = last_mask;
    a.wsum = wsum; a.K = kh * kw * C;
    a.alpha = alpha; a.alpha_per_channel = c->alpha_pc;
    a.bias = c->bias ? bias : NULL;
    a.relu = c->relu;
    a.post_scale = c->post ? scale : NULL;
    a.post_shift = c->post ? shift : NULL;
    a.post_fma = c->post_fma;
    /* a residual of the output's layout (the ResNet shortcut the kernel adds last), with a NaN and an inf */
    const size_t res_count = (size_t)(N * OH * OW * O);
    float *res = xcalloc(res_count, sizeof(float));
    for (size_t i = 0; i < res_count; i++) res[i] = rnd_float() * 4.0f;
    if (res_count > 2) {
        res[res_count / 2] = NAN;
        res[res_count - 1] = -INFINITY;
    }
    a.residual = c->residual ? res : NULL;

    /* a chained next conv (conv_args.next_x): its padding, "+1" border or not, and its prologue map,
       with zero scales (0 * inf = NaN, 0 * x + 0 = +-0) among them */
    const int64_t nph = (int64_t)(rnd() % 3), npw = (int64_t)(rnd() % 3), npix = (O + 7) / 8;
    const int64_t nrow_bytes = (OW + 2 * npw) * npix + 8 + 8 * (int64_t)(rnd() % 2);
    const int nplus_one = (int)(rnd() % 2), nmapped = (int)(rnd() % 2);
    float *nscale = xcalloc((size_t)O, sizeof(float)), *nshift = xcalloc((size_t)O, sizeof(float));
    for (int64_t o = 0; o < O; o++) {
        nscale[o] = rnd() % 8 == 0 ? 0.0f : rnd_float() * 2.0f;
        nshift[o] = rnd() % 8 == 0 ? (rnd() % 2 ? 0.0f : -0.0f) : rnd_float();
    }
    pre_map nmap = {(int)(rnd() % 2), (int)(rnd() % 2), nscale, nshift};
    const size_t next_size = (size_t)(N * (OH + 2 * nph) * nrow_bytes);
    uint8_t *next_ref = xcalloc(next_size, 1), *next = xcalloc(next_size, 1);
    float *out2 = xcalloc((size_t)(N * OH * OW * O) + 1, sizeof(float));

    const size_t pack_size = (size_t)(N * Hp * row_bytes), out_count = (size_t)(N * OH * OW * O);
    uint8_t *packed_ref = NULL, *packed = xcalloc(pack_size, 1);
    uint8_t *out_ref = NULL, *out = xcalloc(out_count * sizeof(float) + GUARD, 1);
    for (int p = 0; p < n_paths; p++) {
        const char *err = select_isa(paths[p], "kernel_harness");
        if (err) {
            fprintf(stderr, "kernel_harness: %s\n", err);
            exit(2);
        }
        memset(packed, 0xa5, pack_size); /* run_pack_rows must write every byte */
        err = run_pack_rows(x, N, H, W, C, ph, pw, pix_bytes, row_bytes, c->pad == 2, packed, 1);
        if (!err) {
            a.x = packed;
            a.out = (float *)out;
            memset(out, 0x5a, out_count * sizeof(float) + GUARD); /* the kernel must write every output */
            err = run_conv(&a, 1);
        }
        if (err) {
            fprintf(stderr, "kernel_harness: %s (path %s)\n", err, paths[p]);
            exit(2);
        }
        for (int g = 0; g < GUARD; g++)
            if (out[out_count * sizeof(float) + g] != 0x5a) {
                describe(c, "write past the output");
                t->mismatches++;
                break;
            }
        /* chained: the next conv's packed input written by the epilogue must equal run_pack_rows_map
           of this path's float output, byte for byte; with the floats (out2) written too, or not */
        memset(next_ref, 0x3c, next_size);
        err = run_pack_rows_map((const float *)out, N, OH, OW, O, nph, npw, npix, nrow_bytes, nplus_one,
                                nmapped ? &nmap : NULL, next_ref, 1);
        if (!err) {
            conv_args chained = a;
            const int with_floats = (int)(rnd() % 2);
            chained.next_x = next;
            chained.next_ph = nph; chained.next_pw = npw; chained.next_row_bytes = nrow_bytes;
            chained.next_plus_one = nplus_one;
            if (nmapped) chained.next_map = nmap;
            chained.out = with_floats ? out2 : NULL;
            memset(next, 0xa5, next_size); /* the chain must write every byte */
            err = run_conv(&chained, 1);
            if (!err && memcmp(next, next_ref, next_size) != 0) {
                char what[64];
                snprintf(what, sizeof what, "chained packing, %s vs pack_rows", paths[p]);
                describe(c, what);
                t->mismatches++;
            }
            if (!err && with_floats && memcmp(out2, out, out_count * sizeof(float)) != 0) {
                describe(c, "chained conv's float output");
                t->mismatches++;
            }
            t->chain_bytes += (long)next_size;
        }
        if (err) {
            fprintf(stderr, "kernel_harness: %s (path %s, chained)\n", err, paths[p]);
            exit(2);
        }
        if (p == 0) { /* the portable path: keep its results */
            packed_ref = packed;
            out_ref = out;
            packed = xcalloc(pack_size, 1);
            out = xcalloc(out_count * sizeof(float) + GUARD, 1);
            continue;
        }
        char what[64];
        if (memcmp(packed, packed_ref, pack_size) != 0) {
            snprintf(what, sizeof what, "packing, %s vs portable", paths[p]);
            describe(c, what);
            t->mismatches++;
        }
        if (memcmp(out, out_ref, out_count * sizeof(float)) != 0) {
            snprintf(what, sizeof what, "conv output, %s vs portable", paths[p]);
            describe(c, what);
            t->mismatches++;
        }
        t->pack_bytes += (long)pack_size;
        t->conv_bytes += (long)(out_count * sizeof(float));
    }

    /* the portable output against a direct per-tap sum of sign products: padding taps count
       0 (zero padding), +1 or -1 (bit 0 where not padded "+1"), like the packed border */
    const float *ref = (const float *)out_ref;
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < OH; oh++)
            for (int64_t ow = 0; ow < OW; ow++)
                for (int64_t o = 0; o < O; o++) {
                    int64_t dot = 0;
                    for (int64_t i = 0; i < kh; i++)
                        for (int64_t j = 0; j < kw; j++) {
                            int64_t ih = oh * c->sh + i - ph, iw = ow * c->sw + j - pw;
                            int in = ih >= 0 && ih < H && iw >= 0 && iw < W;
                            for (int64_t ch = 0; ch < C; ch++) {
                                int sw_ = WBIT(o, ch, i, j) ? 1 : -1, sx;
                                if (in) sx = x[((n * H + ih) * W + iw) * C + ch] < 0.0f ? -1 : 1;
                                else sx = c->pad == 1 ? 0 : c->pad == 2 ? 1 : -1;
                                dot += sw_ * sx;
                            }
                        }
                    float y = alpha[c->alpha_pc ? o : 0] * (float)dot + (c->bias ? bias[o] : 0.0f);
                    if (c->relu) y = y > 0.0f ? y : 0.0f;
                    if (c->post) y = c->post_fma ? fmaf(y, scale[o], shift[o]) : y * scale[o] + shift[o];
                    if (c->residual) y += res[((n * OH + oh) * OW + ow) * O + o];
                    if (memcmp(&y, &ref[((n * OH + oh) * OW + ow) * O + o], sizeof y) != 0) {
                        describe(c, "portable conv output vs direct sum");
                        t->mismatches++;
                        goto done;
                    }
                }
done:
    t->cases++;
    free(x); free(wbit); free(w); free(wsum); free(alpha); free(bias); free(scale); free(shift); free(res);
    free(packed_ref); free(packed); free(out_ref); free(out);
    free(nscale); free(nshift); free(next_ref); free(next); free(out2);
#undef WBIT
}

/* A random case; `large` allows bigger images and channel counts. */
static conv_case random_case(int large) {
    static const int64_t channels[] = {1, 3, 7, 8, 16, 17, 24, 32, 33, 64, 65, 130};
    static const int64_t outs[] = {1, 3, 16, 17, 31, 32, 48, 64, 65};
    static const int64_t ksizes[][2] = {{1, 1}, {3, 3}, {3, 3}, {3, 3}, {5, 3}, {3, 5}, {1, 3}, {2, 2}};
    conv_case c;
    memset(&c, 0, sizeof c);
    c.N = rnd_int(1, 3);
    c.C = rnd() % 4 == 0 ? rnd_int(1, 200) : pick(channels, (int)(sizeof channels / sizeof *channels));
    c.O = rnd() % 4 == 0 ? rnd_int(1, 80) : pick(outs, (int)(sizeof outs / sizeof *outs));
    int k = (int)(rnd() % (sizeof ksizes / sizeof *ksizes));
    c.kh = ksizes[k][0];
    c.kw = ksizes[k][1];
    c.sh = rnd_int(1, 2);
    c.sw = rnd_int(1, 2);
    c.pad = (int)(rnd() % 3);
    int64_t lo = c.pad ? 1 : (c.kh > c.kw ? c.kh : c.kw), hi = large ? 24 : 9; /* an image smaller than the kernel needs padding */
    c.H = rnd_int(c.pad ? lo : c.kh, hi);
    c.W = rnd_int(c.pad ? lo : c.kw, hi);
    if (large) c.N = 1;
    c.alpha_pc = (int)(rnd() & 1);
    c.bias = (int)(rnd() & 1);
    c.relu = (int)(rnd() & 1);
    c.post = (int)(rnd() % 3 != 0);
    c.post_fma = c.post && (rnd() & 1);
    c.residual = rnd() % 3 == 0;
    c.special_alpha = rnd() % 16 == 0;
    return c;
}

int main(int argc, char **argv) {
    long random_cases = argc > 1 ? atol(argv[1]) : 300;
    rng_state = argc > 2 ? strtoull(argv[2], NULL, 10) : 12345;

    /* every path this CPU supports, the portable one first (the reference) */
    const char *paths[16];
    int n_paths = 0;
    static char names[256];
    snprintf(names, sizeof names, "%s", supported_path_names());
    paths[n_paths++] = "portable";
    for (char *tok = strtok(names, ", "); tok && n_paths < 16; tok = strtok(NULL, ", "))
        if (strcmp(tok, "portable") != 0) paths[n_paths++] = tok;
    printf("paths compared with the portable kernel:");
    for (int p = 1; p < n_paths; p++) printf(" %s", paths[p]);
    printf(n_paths > 1 ? "\n" : " none (only the portable kernel runs here; checked against direct sums)\n");

    tally t = {0, 0, 0, 0, 0};
    long fixed = 0;
    /* extremes: the 16-bit accumulators at their limit (every tap differs: kh * Kw = 4095 words
       adds 16 * 4095 to a lane), one word past it (the 32-bit path), and a wide 3x3 with borders */
    conv_case c;
    memset(&c, 0, sizeof c);
    c = (conv_case){1, 1, 2, 4095 * 64, 17, 1, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1, 1, 0};
    run_case(&c, paths, n_paths, &t); fixed++;
    c.C = 4096 * 64;
    run_case(&c, paths, n_paths, &t); fixed++;
    c = (conv_case){1, 3, 3, 30000, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0};
    run_case(&c, paths, n_paths, &t); fixed++;
    /* every channel count 1-70 and 120-136 once, 3x3 zero-padded stride 1, then +1 padded stride 2 */
    for (int64_t C = 1; C <= 136; C = C == 70 ? 120 : C + 1) {
        c = (conv_case){1, 5, 6, C, C % 2 ? 17 : 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0};
        run_case(&c, paths, n_paths, &t); fixed++;
        c = (conv_case){2, 4, 7, C, 5, 3, 3, 2, 2, 2, 0, 0, 0, 1, 1, 0, 0, 0};
        run_case(&c, paths, n_paths, &t); fixed++;
    }
    /* ResNet-like layers at their real sizes, with borders */
    c = (conv_case){1, 32, 32, 16, 16, 3, 3, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0};
    run_case(&c, paths, n_paths, &t); fixed++;
    c = (conv_case){1, 16, 16, 32, 64, 3, 3, 2, 2, 1, 1, 1, 0, 1, 1, 0, 0, 0};
    run_case(&c, paths, n_paths, &t); fixed++;
    c = (conv_case){1, 8, 8, 64, 64, 3, 3, 1, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0};
    run_case(&c, paths, n_paths, &t); fixed++;
    c = (conv_case){1, 8, 8, 256, 33, 3, 3, 1, 1, 2, 1, 0, 1, 1, 0, 0, 0, 0};
    run_case(&c, paths, n_paths, &t); fixed++;

    for (long i = 0; i < random_cases; i++) {
        c = random_case(i % 10 == 0);
        run_case(&c, paths, n_paths, &t);
    }
    printf("%ld cases (%ld fixed, %ld random, seed %llu): %ld packed bytes and %ld output bytes compared per path, "
           "%ld chained packed bytes compared with pack_rows on all paths, %ld mismatches\n",
           t.cases, fixed, random_cases, (unsigned long long)(argc > 2 ? strtoull(argv[2], NULL, 10) : 12345),
           t.pack_bytes / (n_paths > 1 ? n_paths - 1 : 1), t.conv_bytes / (n_paths > 1 ? n_paths - 1 : 1), t.chain_bytes,
           t.mismatches);
    if (t.mismatches) {
        printf("FAILED\n");
        return 1;
    }
    printf("OK: bit-exact\n");
    return 0;
}
