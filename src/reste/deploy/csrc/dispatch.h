/* Kernel selection and the two whole-tensor entry points (packing, convolution), in plain C
   without Python, so a test harness can build them for another architecture. */
#ifndef RESTE_BITOPS_DISPATCH_H
#define RESTE_BITOPS_DISPATCH_H
#include "bitops_common.h"
#include "kernel_generic.h"
#if RESTE_X86
#include "kernel_avx512.h"
#include "kernel_avx2.h"
#endif
#if defined(__aarch64__)
#include "kernel_neon.h"
#endif

typedef void (*conv_block_fn)(const conv_args *, int64_t, int64_t);
typedef void (*pack_pixels_fn)(const float *, int64_t, int64_t, int64_t, uint8_t *);

/* One kernel path. `name` is what RESTE_DEPLOY_ISA and select() accept; `needs` names the CPU
   features it uses (for kernel_info and the error when a path is forced on a CPU without them). */
typedef struct {
    const char *name, *needs;
    int (*supported)(void);
    conv_block_fn conv_block;
    pack_pixels_fn pack_pixels;
    pre_map_fn pre_map; /* optional (NULL: the portable one) */
    int nibbles;        /* reads conv_args.w_nibbles */
} kernel_path;

static int cpu_any(void) { return 1; }
#if RESTE_X86
/* __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0). */
static int cpu_popcnt(void) { __builtin_cpu_init(); return __builtin_cpu_supports("popcnt"); }
static int cpu_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("popcnt");
}
static int cpu_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("popcnt");
}
#endif

/* Best first: "auto" takes the first entry this CPU supports. A name may appear twice (the
   portable kernel with and without POPCNT): a forced name takes its first supported entry.
   A new instruction set adds its header above and one row here, in its #if block. */
static const kernel_path kernel_paths[] = {
#if RESTE_X86
    {"avx512", "avx512f+avx512bw+avx512dq+avx512vl+avx512vpopcntdq", cpu_avx512, conv_block_avx512, pack_pixels_avx512, pre_map_avx512},
    {"avx2", "avx2+fma+popcnt", cpu_avx2, conv_block_avx2, pack_pixels_avx2, pre_map_avx2, 1},
    {"portable", "popcnt", cpu_popcnt, conv_block_generic_popcnt, pack_pixels_generic},
#endif
#if defined(__aarch64__)
    /* Advanced SIMD is part of the aarch64 base the compiler already targets: every CPU has it */
    {"neon", "asimd (aarch64 Advanced SIMD)", cpu_any, conv_block_neon, pack_pixels_neon},
#endif
    {"portable", "nothing beyond the base instruction set", cpu_any, conv_block_generic, pack_pixels_generic},
};
#define N_PATHS ((int)(sizeof kernel_paths / sizeof kernel_paths[0]))
/* every path name of every architecture, for the message about a name this build lacks */
#define ALL_PATH_NAMES "auto, portable, avx2, avx512, neon"

static conv_block_fn conv_block = conv_block_generic;
static pack_pixels_fn pack_pixels = pack_pixels_generic;
static pre_map_fn pre_map_pixels = pre_map_generic;
static int path_nibbles = 0;
static const char *isa_name = "portable";
static char isa_reason[256] = "not selected yet";
static char select_error[512];

/* Names of the paths this CPU supports, best first, comma-separated, each once. */
static const char *supported_path_names(void) {
    static char buf[128];
    buf[0] = 0;
    for (int i = 0; i < N_PATHS; i++) {
        if (!kernel_paths[i].supported()) continue;
        int seen = 0;
        for (int j = 0; j < i; j++) seen |= kernel_paths[j].supported() && strcmp(kernel_paths[j].name, kernel_paths[i].name) == 0;
        if (seen) continue;
        if (buf[0]) strncat(buf, ", ", sizeof buf - strlen(buf) - 1);
        strncat(buf, kernel_paths[i].name, sizeof buf - strlen(buf) - 1);
    }
    return buf;
}

/* Choose the kernel path: `name` NULL, "" or "auto" takes the best this CPU supports; otherwise
   that path ("generic" is the old name of "portable"). `by` says who forced it, for kernel_info.
   Returns NULL, or a message naming the problem and the fix (the previous choice then stays). */
static const char *select_isa(const char *name, const char *by) {
    int automatic = name == NULL || name[0] == 0 || strcmp(name, "auto") == 0;
    if (!automatic && strcmp(name, "generic") == 0) name = "portable";
    const kernel_path *pick = NULL, *first_known = NULL;
    for (int i = 0; i < N_PATHS && !pick; i++) {
        const kernel_path *k = &kernel_paths[i];
        if (!automatic && strcmp(k->name, name) != 0) continue;
        if (!first_known) first_known = k;
        if (k->supported()) pick = k;
    }
    if (!pick) {
        if (first_known)
            snprintf(select_error, sizeof select_error,
                     "kernel path '%s' needs %s, which this CPU lacks; paths it supports: %s. "
                     "Unset RESTE_DEPLOY_ISA (or set it to auto) to use the best of them.",
                     name, first_known->needs, supported_path_names());
        else
            snprintf(select_error, sizeof select_error,
                     "no kernel path '%s' in this build for this CPU (known names: " ALL_PATH_NAMES "; this CPU supports: %s). "
                     "Unset RESTE_DEPLOY_ISA (or set it to auto) to use the best of them.",
                     name, supported_path_names());
        return select_error;
    }
    conv_block = pick->conv_block;
    pack_pixels = pick->pack_pixels;
    pre_map_pixels = pick->pre_map ? pick->pre_map : pre_map_generic;
    path_nibbles = pick->nibbles;
    isa_name = pick->name;
    if (automatic)
        snprintf(isa_reason, sizeof isa_reason, "auto: best path for this CPU (it has %s)", pick->needs);
    else
        snprintf(isa_reason, sizeof isa_reason, "forced by %s", by ? by : "select()");
    return NULL;
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

/* Sign-and-pack float32 NHWC x into padded row bit streams (layout in bitops.c), with the
   optional map `pre` (NULL: none) applied to x first. Returns NULL, or a message naming
   what is inconsistent. */
static const char *run_pack_rows_map(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t ph, int64_t pw,
                                     int64_t pix_bytes, int64_t row_bytes, int plus_one_pad, const pre_map *pre, uint8_t *out,
                                     int64_t threads) {
    if (N < 0 || H < 0 || W < 0 || C < 1 || ph < 0 || pw < 0 || pix_bytes * 8 < C ||
        row_bytes < (W + 2 * pw) * pix_bytes + 8)
        return "pack_rows: inconsistent sizes";
    if (pre && (!pre->scale || !pre->shift)) return "pack_rows: the input map needs both scale and shift";
    int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, rows = N * Hp;
    /* the bits of one "+1" border pixel: C ones, then zeros up to Cb */
    uint8_t pad_pixel[4096];
    if (pix_bytes > (int64_t)sizeof pad_pixel && plus_one_pad) return "pack_rows: '+1' padding supports at most 32768 channels";
    if (plus_one_pad) {
        memset(pad_pixel, 0, (size_t)pix_bytes);
        for (int64_t c = 0; c < C; c++) pad_pixel[c / 8] |= (uint8_t)(1u << (c % 8));
    }
    /* ~cycles: reading the floats from memory dominates, about one cycle per 4 channels */
    int nt = thread_count(threads, rows * W * (C / 4 + 1) * (pre ? 3 : 1));
    (void)nt; /* unused when built without OpenMP */
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        float *mapped = pre ? (float *)malloc((size_t)(W * C) * sizeof(float)) : NULL; /* one image row, per thread */
        if (pre && !mapped) failed = 1;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            int64_t n = r / Hp, hp = r % Hp;
            uint8_t *row = out + r * row_bytes;
            memset(row, 0, (size_t)row_bytes);
            int border_row = hp < ph || hp >= ph + H;
            if (plus_one_pad)
                for (int64_t wp = 0; wp < Wp; wp++)
                    if (border_row || wp < pw || wp >= pw + W) memcpy(row + wp * pix_bytes, pad_pixel, (size_t)pix_bytes);
            if (border_row || (pre && !mapped)) continue;
            const float *src = x + ((n * H + (hp - ph)) * W) * C;
            if (pre) {
                pre_map_pixels(src, W, C, pre, mapped);
                src = mapped;
            }
            pack_pixels(src, W, C, pix_bytes, row + pw * pix_bytes);
        }
        free(mapped);
    }
    return failed ? "pack_rows: out of memory for one mapped image row" : NULL;
}

/* Without an input map: the C harness's entry (inline, so the extension, which always passes a map, builds
   without an unused-function warning). */
static inline const char *run_pack_rows(const float *x, int64_t N, int64_t H, int64_t W, int64_t C, int64_t ph,
                                        int64_t pw, int64_t pix_bytes, int64_t row_bytes, int plus_one_pad,
                                        uint8_t *out, int64_t threads) {
    return run_pack_rows_map(x, N, H, W, C, ph, pw, pix_bytes, row_bytes, plus_one_pad, NULL, out, threads);
}

/* The bytes of the next conv's packed input that the kernels do not write (a conv_args.next_x
   chain): the padding rows and columns and each row's spare bytes, exactly as run_pack_rows_map
   leaves them (0, and the "+1" pixel's C ones where next_plus_one). The kernels write every
   interior pixel byte; unused channel bits come from their masks. */
static void fill_next_border(const conv_args *a, const uint8_t *pad_pixel) {
    const int64_t pix = (a->O + 7) / 8, ph = a->next_ph, pw = a->next_pw, H = a->OH, W = a->OW;
    const int64_t Hp = H + 2 * ph, Wp = W + 2 * pw, row_bytes = a->next_row_bytes;
    for (int64_t r = 0; r < a->N * Hp; r++) {
        int64_t hp = r % Hp;
        uint8_t *row = a->next_x + r * row_bytes;
        int border_row = hp < ph || hp >= ph + H;
        if (border_row) {
            memset(row, 0, (size_t)row_bytes);
        } else {
            memset(row, 0, (size_t)(pw * pix));
            memset(row + (pw + W) * pix, 0, (size_t)(row_bytes - (pw + W) * pix));
        }
        if (a->next_plus_one)
            for (int64_t wp = 0; wp < Wp; wp++)
                if (border_row || wp < pw || wp >= pw + W) memcpy(row + wp * pix, pad_pixel, (size_t)pix);
    }
}

/* The whole convolution of `a`. Returns NULL, or a message naming what is inconsistent. */
static const char *run_conv(const conv_args *a, int64_t threads) {
    if (a->N < 0 || a->OH < 0 || a->OW < 0 || a->kh < 1 || a->kw < 1 || a->sh < 1 || a->sw < 1 || a->Kw < 1 || a->O < 1 ||
        a->OB * LANES < a->O || (a->kw * a->pix_bytes + 7) / 8 != a->Kw || (a->OH - 1) * a->sh + a->kh > a->Hp ||
        (a->OW - 1) * a->sw * a->pix_bytes + a->Kw * 8 > a->row_bytes || a->K < 0 || a->K >= (1LL << 24))
        return "conv: inconsistent sizes";
    if ((a->post_scale == NULL) != (a->post_shift == NULL)) return "conv: give both post_scale and post_shift, or neither";
    if (a->next_x) {
        const int64_t pix = (a->O + 7) / 8;
        uint8_t pad_pixel[4096];
        if (a->next_ph < 0 || a->next_pw < 0 || a->next_row_bytes < (a->OW + 2 * a->next_pw) * pix + 8)
            return "conv: inconsistent sizes of the next conv's packed input";
        if ((a->next_map.scale == NULL) != (a->next_map.shift == NULL))
            return "conv: give the next conv's map both scale and shift, or neither";
        if (a->next_plus_one && pix > (int64_t)sizeof pad_pixel) return "conv: '+1' padding supports at most 32768 channels";
        memset(pad_pixel, 0, sizeof pad_pixel);
        for (int64_t c = 0; a->next_plus_one && c < a->O; c++) pad_pixel[c / 8] |= (uint8_t)(1u << (c % 8));
        fill_next_border(a, pad_pixel); /* before the kernels: they write only interior pixels, in parallel */
    } else if (!a->out) {
        return "conv: no output: give out, the next conv's packed input, or both";
    }
    conv_args split;
    uint64_t *nibbles = NULL;
    if (path_nibbles && a->w_nibbles == NULL) { /* the caller did not keep them: split them for this call */
        nibbles = malloc((size_t)(a->OB * a->kh * a->Kw) * 2 * LANES * sizeof(uint64_t));
        if (!nibbles) return "conv: out of memory for the weights' nibbles";
        split_nibbles(a->w, a->OB * a->kh * a->Kw, nibbles);
        split = *a;
        split.w_nibbles = nibbles;
        a = &split;
    }
    /* Channel blocks go in groups whose weights fit in L1 (~32 KiB); a work item is one
       output row for one group, so the weights stay hot over many rows and the row's
       input bits stay hot over the group's blocks. The groups are of equal size (to one
       block): the static split below gives each thread the same number of items, so items
       must cost the same (8 blocks in groups of 7 and 1 left one of two threads idle most
       of the time). */
    int64_t OB = a->OB, block_bytes = a->kh * a->Kw * LANES * 8 * (path_nibbles ? 2 : 1);
    int64_t most = block_bytes >= L1_WEIGHT_BYTES ? 1 : L1_WEIGHT_BYTES / block_bytes;
    if (most > OB) most = OB;
    int64_t groups = (OB + most - 1) / most, rows = a->N * a->OH, items = groups * rows;
    int nt = thread_count(threads, OB * rows * a->OW * (a->kh * a->Kw * 3 + 16)); /* ~cycles: 3 per word pair + epilogue */
    (void)nt; /* unused when built without OpenMP */
    conv_block_fn fn = conv_block;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t it = 0; it < items; it++) {
        int64_t g = it / rows, r = it % rows;
        for (int64_t ob = g * OB / groups; ob < (g + 1) * OB / groups; ob++) fn(a, r, ob);
    }
    free(nibbles);
    return NULL;
}

#endif
