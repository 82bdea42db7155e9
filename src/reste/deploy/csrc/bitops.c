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
 *                  optionally ReLU, a per-channel affine map (an eval-mode BatchNorm
 *                  that followed the layer) and a residual tensor of the output's
 *                  layout (a ResNet shortcut), fused so the output is written once.
 *   chained        instead of (or beside) the output: the next binary conv's packed
 *                  input (conv_args.next_x), its prologue map and sign applied to each
 *                  final value, in its padded row layout, byte for byte as pack_rows
 *                  would pack the float output (reste.deploy.fuse.fuse_chains).
 *
 * Padding. The padded border is packed as bit 0 (-1) or, for input padding
 * "+1", as bit 1; for both the popcount is then exact. With zero padding (the
 * border value is 0, not +-1) the caller passes per-tap weight sums
 * wsum[i][j][o] = sum_c sign(w[o, c, i, j]); the kernel computed the border taps
 * as -1 * w, so adding wsum back over the taps that fall outside the image gives
 * the exact zero-padded sum (via 2-D prefix sums over taps, see tap_prefix).
 *
 * Kernels. AVX-512 with VPOPCNTDQ (8 words per instruction; output channels
 * across vector lanes, so no horizontal sums), AVX2 (nibble-lookup popcount with
 * VPSHUFB, byte counts summed per 64-bit lane by VPSADBW: again one lane per
 * output channel), NEON on aarch64, and a portable one on __builtin_popcountll
 * (compiled for POPCNT where the target has it), chosen at run time from the
 * table in dispatch.h (__builtin_cpu_supports), or forced by name
 * (RESTE_DEPLOY_ISA, select()). All are exact and tested against each other
 * and against the PyTorch reference. OpenMP splits output
 * channel blocks x rows over threads; it runs on the same libgomp as torch
 * (same soname, loaded once), so no second thread pool competes for the cores.
 *
 * Files: bitops_common.h (argument block, scalar epilogue), kernel_*.h (one per instruction
 * set), dispatch.h (selection, whole-tensor loops, no Python), this file (the Python module).
 *
 * The functions take raw addresses (tensor.data_ptr()) and sizes, so the build
 * needs no torch or numpy headers; Python checks shapes, dtypes and layouts.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "dispatch.h"

/* ------------------------------------------------------- Python functions */

static PyObject *py_pack_rows(PyObject *self, PyObject *args) {
    unsigned long long x_addr, out_addr, scale_addr = 0, shift_addr = 0;
    long long N, H, W, C, ph, pw, pix_bytes, row_bytes, plus_one_pad, threads, relu = 0, fma = 0;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLLKL|LKKL", &x_addr, &N, &H, &W, &C, &ph, &pw, &pix_bytes, &row_bytes,
                          &plus_one_pad, &out_addr, &threads, &relu, &scale_addr, &shift_addr, &fma))
        return NULL;
    pre_map map = {(int)(relu != 0), (int)(fma != 0), (const float *)(uintptr_t)scale_addr, (const float *)(uintptr_t)shift_addr};
    int mapped = relu || scale_addr || shift_addr;
    if (mapped && !(scale_addr && shift_addr)) {
        PyErr_SetString(PyExc_ValueError, "pack_rows: give the input map's scale and shift (a ReLU alone is not supported)");
        return NULL;
    }
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = run_pack_rows_map((const float *)(uintptr_t)x_addr, N, H, W, C, ph, pw, pix_bytes, row_bytes, plus_one_pad != 0,
                            mapped ? &map : NULL, (uint8_t *)(uintptr_t)out_addr, threads);
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_conv(PyObject *self, PyObject *args) {
    conv_args a;
    unsigned long long x_addr, w_addr, wsum_addr, alpha_addr, bias_addr, out_addr, last_mask, scale_addr, shift_addr;
    unsigned long long residual_addr = 0, nibbles_addr = 0, next_addr = 0, next_scale = 0, next_shift = 0;
    long long N, H, W, Hp, row_bytes, pix_bytes, kh, kw, sh, sw, ph, pw, OH, OW, O, OB, Kw, K, alpha_pc, threads, relu, post_fma;
    long long next_ph = 0, next_pw = 0, next_row_bytes = 0, next_plus_one = 0, next_relu = 0, next_fma = 0;
    if (!PyArg_ParseTuple(args, "KLLLLLLLLLLLLLLKLLLKKLKLKLKKLKL|KKKLLLLLKKL", &x_addr, &N, &H, &W, &Hp, &row_bytes, &pix_bytes,
                          &kh, &kw, &sh, &sw, &ph, &pw, &OH, &OW, &w_addr, &O, &OB, &Kw, &last_mask, &wsum_addr, &K,
                          &alpha_addr, &alpha_pc, &bias_addr, &relu, &scale_addr, &shift_addr, &post_fma, &out_addr, &threads,
                          &residual_addr, &nibbles_addr, &next_addr, &next_ph, &next_pw, &next_row_bytes, &next_plus_one,
                          &next_relu, &next_scale, &next_shift, &next_fma))
        return NULL;
    if (next_addr && next_relu && !(next_scale && next_shift)) {
        PyErr_SetString(PyExc_ValueError, "conv: give the next conv's map scale and shift (a ReLU alone is not supported)");
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
    a.residual = (const float *)(uintptr_t)residual_addr;
    a.w_nibbles = (const uint64_t *)(uintptr_t)nibbles_addr;
    a.out = (float *)(uintptr_t)out_addr;
    a.next_x = (uint8_t *)(uintptr_t)next_addr;
    a.next_ph = next_ph; a.next_pw = next_pw; a.next_row_bytes = next_row_bytes; a.next_plus_one = next_plus_one != 0;
    a.next_map.relu = next_relu != 0;
    a.next_map.fma = next_fma != 0;
    a.next_map.scale = (const float *)(uintptr_t)next_scale;
    a.next_map.shift = (const float *)(uintptr_t)next_shift;
    const char *err;
    Py_BEGIN_ALLOW_THREADS
    err = run_conv(&a, threads);
    Py_END_ALLOW_THREADS
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(isa_name); }

static PyObject *py_why(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(isa_reason); }

static PyObject *py_available(PyObject *self, PyObject *noargs) { return PyUnicode_FromString(supported_path_names()); }

static PyObject *py_select(PyObject *self, PyObject *args) {
    const char *name, *by = NULL;
    if (!PyArg_ParseTuple(args, "s|s", &name, &by)) return NULL;
    const char *err = select_isa(name, by);
    if (err) {
        PyErr_SetString(PyExc_ValueError, err);
        return NULL;
    }
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
     "pack_rows(x, N, H, W, C, ph, pw, pix_bytes, row_bytes, plus_one_pad, out, threads[, relu, scale, shift, fma]): "
     "sign-and-pack float32 NHWC x into padded row bit streams at out, optionally after the per-channel map "
     "y = max(x, 0) (relu), y * scale + shift (fma: fused)."},
    {"conv", py_conv, METH_VARARGS,
     "conv(x, N, H, W, Hp, row_bytes, pix_bytes, kh, kw, sh, sw, ph, pw, OH, OW, w, O, OB, Kw, last_mask, "
     "wsum, K, alpha, alpha_per_channel, bias, relu, post_scale, post_shift, post_fma, out, threads[, residual, "
     "w_nibbles]): XNOR-popcount convolution into float32 NHWC out, with the fused epilogue (residual: a float32 "
     "NHWC tensor of out's shape added last, or 0; w_nibbles: the weights split by split_nibbles, kept by the "
     "caller for the AVX2 path, or 0 to split them per call). With next_x (after w_nibbles: next_x, next_ph, next_pw, "
     "next_row_bytes, next_plus_one[, next_relu, next_scale, next_shift, next_fma]) it also writes the next binary "
     "conv's packed input, as pack_rows would from out with that conv's padding and map; out may then be 0."},
    {"isa", py_isa, METH_NOARGS, "Name of the kernel path in use (portable, avx2, avx512, neon)."},
    {"why", py_why, METH_NOARGS, "Why that path runs: 'auto: ...' or 'forced by ...'."},
    {"available", py_available, METH_NOARGS, "The paths this CPU supports, best first, comma-separated."},
    {"select", py_select, METH_VARARGS,
     "select(name, by=None): 'auto' (the best path for this CPU) or a path name; `by` is recorded as who "
     "forced it. Returns the path's name; ValueError (naming what the CPU supports) if it cannot run here."},
    {"openmp", py_openmp, METH_NOARGS, "Whether the extension was built with OpenMP."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_bitops",
                                    "XNOR-popcount kernels for bit-packed binary layers.", -1, methods};

PyMODINIT_FUNC PyInit__bitops(void) {
    select_isa("auto", NULL); /* RESTE_DEPLOY_ISA is applied by reste.deploy.packed, which can raise a clear error */
    return PyModule_Create(&module);
}

