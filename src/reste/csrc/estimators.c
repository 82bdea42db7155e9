/*
 * Fused CPU kernels for the estimators' hot paths (float32, contiguous).
 *
 * In eager PyTorch every elementwise op is a separate pass over memory: the
 * ReSTE backward written with torch ops takes ~9 passes, the sign forward 3.
 * These kernels do each in one pass. They take raw pointers (tensor.data_ptr())
 * so the build needs neither torch nor numpy headers, split the work over
 * OpenMP threads (torch's own libgomp, see run_parallel), and release the GIL
 * while they run. Python falls back to the torch formulas when the
 * extension is missing or the tensors are not contiguous float32 on the CPU.
 *
 * sign:            y = (z < 0) ? -1 : +1           (sign(0) = +1, NaN -> +1)
 * reste_backward:  dz = dy * c(|z|) * min(max(|z|, m), t)^((1-o)/o),
 *                  c = 1 on |z| <= m, 1/o on (m, t], 0 beyond t
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <string.h>

#define MIN_PER_THREAD (1 << 16)

typedef struct {
    const float *z;
    const float *g;
    float *out;
    float e, inv_o, t, m;
    int kind; /* 0 = sign, 1 = reste backward */
} job_t;

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

MULTIVERSION
static void sign_range(const float *restrict z, float *restrict out, int64_t begin, int64_t end) {
    /* On the bits, so that fast-math (no signed zeros) cannot turn -0.0 into -1:
       negative means sign bit set and magnitude non-zero. */
    const uint32_t *restrict bits = (const uint32_t *)z;
    for (int64_t i = begin; i < end; i++) {
        uint32_t b = bits[i];
        out[i] = ((b >> 31) & ((b & 0x7fffffffu) != 0)) ? -1.0f : 1.0f;
    }
}

MULTIVERSION
/* g and out may be the same buffer (in-place backward): element i is read before it is written */
static void reste_range(const float *restrict z, const float *g, float *out, int64_t begin, int64_t end,
                        float e, float inv_o, float t, float m) {
    for (int64_t i = begin; i < end; i++) {
        float a = fabsf(z[i]);
        float c = a <= m ? 1.0f : (a <= t ? inv_o : 0.0f);
        /* min(max(a, m), t)^e = 2^(e * log2(...)); e = 0 (o = 1) gives exactly 1. Clamped at t
           too, where c = 0 anyway, so an infinite z meets no 0 * inf. The libm calls stay
           outside branches so gcc can vectorise them (glibc libmvec). */
        out[i] = g[i] * c * exp2f(e * log2f(fminf(fmaxf(a, m), t)));
    }
}

MULTIVERSION
/* A NaN z gets a NaN gradient, as the PyTorch formula gives (a NaN weight must not train on as if
   it were small): fast-math assumes no NaN, so reste_range folds NaN into |z| <= m. Tested on the
   bits, which fast-math cannot fold, and in a pass of its own: the same test inside reste_range's
   loop changed how gcc split it between vector and scalar libm calls, and with it the last bits
   of some gradients, so trained runs would no longer repeat earlier ones. */
static void nan_range(const float *restrict z, float *restrict out, int64_t begin, int64_t end) {
    const uint32_t *restrict bits = (const uint32_t *)z;
    const uint32_t quiet_nan = 0x7fc00000u;
    for (int64_t i = begin; i < end; i++) {
        if ((bits[i] & 0x7fffffffu) > 0x7f800000u) memcpy(&out[i], &quiet_nan, sizeof quiet_nan);
    }
}

static void run_job(const job_t *j, int64_t begin, int64_t end) {
    if (j->kind == 0)
        sign_range(j->z, j->out, begin, end);
    else {
        reste_range(j->z, j->g, j->out, begin, end, j->e, j->inv_o, j->t, j->m);
        nan_range(j->z, j->out, begin, end);
    }
}

/* Split [0, n) over OpenMP threads. The extension links libgomp.so.1, which resolves to the
   copy torch has already loaded, so these threads are torch's own pool: no second pool spinning
   against it for the same cores. */
static void run_parallel(job_t proto, int64_t n, int threads) {
    int64_t max_useful = n / MIN_PER_THREAD;
    if (threads > max_useful) threads = max_useful > 0 ? (int)max_useful : 1;
    if (threads < 1) threads = 1;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
        int64_t chunk = ((n + nt - 1) / nt + 15) & ~(int64_t)15; /* vector-aligned chunks */
        int64_t begin = (int64_t)id * chunk;
        int64_t end = begin + chunk < n ? begin + chunk : n;
        if (begin < n) run_job(&proto, begin, end);
    }
#else
    (void)threads;
    run_job(&proto, 0, n);
#endif
}

static PyObject *py_sign(PyObject *self, PyObject *args) {
    unsigned long long zp, op;
    long long n;
    int threads;
    if (!PyArg_ParseTuple(args, "KKLi", &zp, &op, &n, &threads)) return NULL;
    job_t j = {(const float *)(uintptr_t)zp, NULL, (float *)(uintptr_t)op, 0, 0, 0, 0, 0};
    Py_BEGIN_ALLOW_THREADS run_parallel(j, n, threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyObject *py_reste_backward(PyObject *self, PyObject *args) {
    unsigned long long zp, gp, op;
    long long n;
    double o, t, m;
    int threads;
    if (!PyArg_ParseTuple(args, "KKKLdddi", &zp, &gp, &op, &n, &o, &t, &m, &threads)) return NULL;
    if (!(o >= 1.0) || !(m > 0.0) || !(t > m)) {
        PyErr_SetString(PyExc_ValueError, "reste_backward needs o >= 1 and 0 < m < t");
        return NULL;
    }
    job_t j = {(const float *)(uintptr_t)zp, (const float *)(uintptr_t)gp, (float *)(uintptr_t)op,
               (float)((1.0 - o) / o), (float)(1.0 / o), (float)t, (float)m, 1};
    Py_BEGIN_ALLOW_THREADS run_parallel(j, n, threads);
    Py_END_ALLOW_THREADS Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"sign", py_sign, METH_VARARGS, "sign(z_ptr, out_ptr, n, threads): out = z < 0 ? -1 : 1 (float32)"},
    {"reste_backward", py_reste_backward, METH_VARARGS,
     "reste_backward(z_ptr, grad_ptr, out_ptr, n, o, t, m, threads): out = grad * g_o(z) (float32)"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "Fused CPU kernels for reste's estimators.", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
