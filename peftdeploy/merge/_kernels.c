/* Fused LoRA merge kernel: out = round(W + sum_f coef_f * (L_f @ R_f)) over a range of elements.
 *
 * One pass over the weight: each tile of RB rows x TW columns is converted to float32, the
 * rank-r products are accumulated in registers, and the result is rounded to the output dtype
 * once (bf16: round to nearest even, NaN -> 0x7FC0, bit for bit torch's cast; f16: IEEE round to
 * nearest even). The numpy path it replaces needs ~six passes over memory per element.
 *
 * Results do not depend on the CPU or on how a tensor is cut into ranges: the file is compiled
 * with -ffp-contract=off (no fused multiply-add), and the vector tiles and the scalar edges do the
 * same IEEE operations in the same order (d = 0; d = d + l*r for k = 0..r-1; acc = w + coef*d), so
 * every build (AVX-512, AVX2, baseline x86-64, other architectures) writes the same bytes.
 *
 * Loaded with ctypes (which drops the GIL for the call) by peftdeploy/merge/kernels.py; the
 * module init below only makes the file an importable extension so that setuptools builds and
 * installs it and Python can locate it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#define PD_ABI 1 /* bump when a signature changes: the loader refuses a stale build */

enum { BF16 = 0, F16 = 1, F32 = 2 };
#define VL 16 /* floats per vector (one AVX-512 register, two AVX2 registers) */
#define NV 2  /* vectors per tile row */
#define RB 4  /* rows per tile */
#define TW (VL * NV)

#ifdef __FLT16_MAX__
#define PD_HAVE_F16 1
typedef _Float16 f16_t;
#else
#define PD_HAVE_F16 0
typedef uint16_t f16_t; /* unused: F16 is refused at run time */
#endif

typedef float vf __attribute__((vector_size(64)));
typedef uint32_t vu __attribute__((vector_size(64)));
typedef uint16_t vh __attribute__((vector_size(32)));

typedef struct {
    const float* L; /* rows x r, row-major */
    const float* R; /* r x cols, row-major */
    int64_t r;
    float coef;
} pd_factor;

static inline float ld(const void* p, int code, int64_t i) {
    if (code == BF16) {
        uint32_t u = (uint32_t)((const uint16_t*)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
#if PD_HAVE_F16
    if (code == F16) return (float)((const f16_t*)p)[i];
#endif
    return ((const float*)p)[i];
}

static inline void st(void* p, int code, int64_t i, float f) {
    if (code == BF16) {
        uint32_t u;
        memcpy(&u, &f, 4);
        uint16_t h = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
        ((uint16_t*)p)[i] = (f != f) ? (uint16_t)0x7FC0 : h;
        return;
    }
#if PD_HAVE_F16
    if (code == F16) {
        ((f16_t*)p)[i] = (f16_t)f;
        return;
    }
#endif
    ((float*)p)[i] = f;
}

static inline vf vld(const void* p, int code, int64_t i) {
    vf f;
    if (code == BF16) {
        vh h;
        memcpy(&h, (const uint16_t*)p + i, sizeof h);
        vu u = __builtin_convertvector(h, vu) << 16;
        memcpy(&f, &u, sizeof f);
    } else if (code == F16) {
        for (int j = 0; j < VL; j++) f[j] = ld(p, F16, i + j);
    } else {
        memcpy(&f, (const float*)p + i, sizeof f);
    }
    return f;
}

static inline void vst(void* p, int code, int64_t i, vf f) {
    if (code == BF16) {
        vu u;
        memcpy(&u, &f, sizeof u);
        vu h = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        vu nan = (vu)(f != f);
        h = (h & ~nan) | (nan & 0x7FC0u);
        vh o = __builtin_convertvector(h, vh);
        memcpy((uint16_t*)p + i, &o, sizeof o);
    } else if (code == F16) {
        for (int j = 0; j < VL; j++) st(p, F16, i + j, f[j]);
    } else {
        memcpy((float*)p + i, &f, sizeof f);
    }
}

/* W holds elements from index wb on, out from index ob on (flat indices of the rows x cols tensor) */
#define WI(r, c) ((r) * cols + (c) - wb)
#define OI(r, c) ((r) * cols + (c) - ob)

/* NR full rows from r0, columns [c, c + TW) */
static inline __attribute__((always_inline)) void vtile(const void* W, int sc, int64_t wb, void* out, int oc,
                                                        int64_t ob, int64_t cols, int64_t r0, const int NR,
                                                        int64_t c, int nf, const pd_factor* F) {
    vf acc[RB][NV];
    for (int f = 0; f < nf; f++) {
        vf d[RB][NV];
        for (int i = 0; i < NR; i++)
            for (int v = 0; v < NV; v++) d[i][v] = (vf){0};
        const int64_t r = F[f].r;
        const float* L = F[f].L + r0 * r;
        const float* R = F[f].R + c;
        for (int64_t k = 0; k < r; k++) {
            vf Rv[NV];
            for (int v = 0; v < NV; v++) memcpy(&Rv[v], R + k * cols + v * VL, sizeof(vf));
            for (int i = 0; i < NR; i++) {
                vf l = (vf){0} + L[i * r + k];
                for (int v = 0; v < NV; v++) d[i][v] = d[i][v] + l * Rv[v];
            }
        }
        vf cf = (vf){0} + F[f].coef;
        for (int i = 0; i < NR; i++)
            for (int v = 0; v < NV; v++) {
                vf base = f == 0 ? vld(W, sc, WI(r0 + i, c + v * VL)) : acc[i][v];
                acc[i][v] = base + cf * d[i][v];
            }
    }
    for (int i = 0; i < NR; i++)
        for (int v = 0; v < NV; v++) vst(out, oc, OI(r0 + i, c + v * VL), acc[i][v]);
}

/* row `row`, columns [c0, c1), one element at a time: the same operations as vtile */
static inline __attribute__((always_inline)) void srow(const void* W, int sc, int64_t wb, void* out, int oc,
                                                       int64_t ob, int64_t cols, int64_t row, int64_t c0,
                                                       int64_t c1, int nf, const pd_factor* F) {
    for (int64_t c = c0; c < c1; c++) {
        float acc = 0;
        for (int f = 0; f < nf; f++) {
            const int64_t r = F[f].r;
            const float* L = F[f].L + row * r;
            float d = 0;
            for (int64_t k = 0; k < r; k++) d = d + L[k] * F[f].R[k * cols + c];
            float base = f == 0 ? ld(W, sc, WI(row, c)) : acc;
            acc = base + F[f].coef * d;
        }
        st(out, oc, OI(row, c), acc);
    }
}

static inline __attribute__((always_inline)) void rows_full(const void* W, int sc, int64_t wb, void* out, int oc,
                                                            int64_t ob, int64_t cols, int64_t r0, const int NR,
                                                            int nf, const pd_factor* F) {
    const int64_t cv = cols / TW * TW;
    for (int64_t c = 0; c < cv; c += TW) vtile(W, sc, wb, out, oc, ob, cols, r0, NR, c, nf, F);
    if (cv < cols)
        for (int i = 0; i < NR; i++) srow(W, sc, wb, out, oc, ob, cols, r0 + i, cv, cols, nf, F);
}

/* elements [e0, e1) */
static inline __attribute__((always_inline)) void span(const void* W, int sc, int64_t wb, void* out, int oc,
                                                       int64_t ob, int64_t rows, int64_t cols, int64_t e0,
                                                       int64_t e1, int nf, const pd_factor* F) {
    int64_t r = e0 / cols, c = e0 % cols;
    if (c) { /* partial first row */
        int64_t c1 = (e1 - r * cols) < cols ? (e1 - r * cols) : cols;
        srow(W, sc, wb, out, oc, ob, cols, r, c, c1, nf, F);
        r++;
    }
    while ((r + RB) * cols <= e1) {
        rows_full(W, sc, wb, out, oc, ob, cols, r, RB, nf, F);
        r += RB;
    }
    while ((r + 1) * cols <= e1) {
        rows_full(W, sc, wb, out, oc, ob, cols, r, 1, nf, F);
        r++;
    }
    if (r < rows && r * cols < e1) srow(W, sc, wb, out, oc, ob, cols, r, 0, e1 - r * cols, nf, F);
}

#define SPEC(a, b)                                                          \
    if (sc == a && oc == b) {                                               \
        span(W, a, wb, out, b, ob, rows, cols, e0, e1, nf, F);              \
        return 0;                                                           \
    }

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#endif
static int merge_dispatch(const void* W, int sc, int64_t wb, void* out, int oc, int64_t ob, int64_t rows,
                          int64_t cols, int64_t e0, int64_t e1, int nf, const pd_factor* F) {
    SPEC(BF16, BF16)
    SPEC(F32, F32)
    SPEC(BF16, F32)
    SPEC(F32, BF16)
#if PD_HAVE_F16
    SPEC(F16, F16)
    SPEC(F16, F32)
    SPEC(F32, F16)
    SPEC(BF16, F16)
    SPEC(F16, BF16)
#endif
    return -2;
}

static int bad_args(int sc, int oc, int64_t rows, int64_t cols, int64_t e0, int64_t e1, int nf,
                    const pd_factor* F) {
    if (rows < 0 || cols <= 0 || e0 < 0 || e0 > e1 || e1 > rows * cols || nf < 1) return 1;
    if (sc < 0 || sc > F32 || oc < 0 || oc > F32) return 1;
    if (!PD_HAVE_F16 && (sc == F16 || oc == F16)) return 1;
    for (int f = 0; f < nf; f++)
        if (F[f].r < 1 || !F[f].L || !F[f].R) return 1;
    return 0;
}

static int64_t itemsize(int code) { return code == F32 ? 4 : 2; }

int pd_abi(void) { return PD_ABI; }
int pd_have_f16(void) { return PD_HAVE_F16; }

/* Elements [e0, e1) of the rows x cols weight W (W points at element e0) into out (at element e0). */
int pd_merge_span(const void* W, int sc, void* out, int oc, int64_t rows, int64_t cols, int64_t e0, int64_t e1,
                  int nf, const pd_factor* F) {
    if (bad_args(sc, oc, rows, cols, e0, e1, nf, F)) return -EINVAL;
    return merge_dispatch(W, sc, e0, out, oc, e0, rows, cols, e0, e1, nf, F) ? -EINVAL : 0;
}

/* The same, reading W from a file: the weight's data starts at byte `data_off` of `fd`; the
 * elements are read with pread in pieces of at most `scratch_bytes` into `scratch` (pick a size
 * that stays in the core's cache), each piece merged straight into `out`. 0 or -errno. */
int pd_merge_fd(int fd, int64_t data_off, int sc, void* out, int oc, int64_t rows, int64_t cols, int64_t e0,
                int64_t e1, int nf, const pd_factor* F, void* scratch, int64_t scratch_bytes) {
    if (bad_args(sc, oc, rows, cols, e0, e1, nf, F)) return -EINVAL;
    const int64_t isz = itemsize(sc), osz = itemsize(oc);
    const int64_t step = scratch_bytes / isz;
    if (step < 1) return -EINVAL;
    for (int64_t a = e0; a < e1; a += step) {
        const int64_t b = (e1 - a) < step ? e1 : a + step;
        const int64_t want = (b - a) * isz;
        int64_t got = 0;
        while (got < want) {
            ssize_t n = pread(fd, (char*)scratch + got, (size_t)(want - got), (off_t)(data_off + a * isz + got));
            if (n < 0) {
                if (errno == EINTR) continue;
                return -errno;
            }
            if (n == 0) return -EIO; /* the file is shorter than its header says */
            got += n;
        }
        if (merge_dispatch(scratch, sc, a, (char*)out + (a - e0) * osz, oc, a, rows, cols, a, b, nf, F))
            return -EINVAL;
    }
    return 0;
}

static struct PyModuleDef pd_module = {PyModuleDef_HEAD_INIT, "_kernels",
                                       "peftdeploy's fused merge kernels (loaded with ctypes)", -1, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&pd_module); }
