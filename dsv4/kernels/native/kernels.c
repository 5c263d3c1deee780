/* The native CPU kernels of dsv4: the ops that cost a small model's step its time in torch overhead, each one
 * call instead of tens of torch ops. Plain C99, no dependency but libm; built at first use by
 * `dsv4/kernels/native/build.py` with the system compiler and loaded with ctypes.
 *
 * The arithmetic is the reference backend's (dsv4/kernels/reference.py), element by element: power-of-two block
 * scales, e4m3 / e2m1 round-half-even, the two-level fp32 accumulation per weight block, the Sinkhorn sequence,
 * RoPE's complex product, mHC's write-back. What differs is only the order of fp32 additions inside one block's
 * dot product (a sequential sum over k here, or 16 interleaved partial sums in attention's logits; BLAS's order
 * there) and libm's expf against torch's vectorised exp (SwiGLU, attention): last-bit differences, within the
 * tolerances the tests state. Built with -ffp-contract=off, so the rounding follows this source on every CPU.
 *
 * Tensors arrive as raw pointers to contiguous rows; a `bf16` flag says a tensor holds bfloat16 bit patterns
 * (uint16) instead of fp32. Every kernel is independent per row, so its result for a row does not depend on the
 * batch it came in.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

/* Whether the kernels may split their rows between OpenMP threads: set at load (`build.py`) when they share torch's
 * OpenMP runtime (its thread pool, whose threads spin between torch's ops and would hold the other cores against
 * threads of a second runtime). Each row's arithmetic is the same on any thread, so the results are too. Answers
 * the threads a split may use (torch's setting), 0 in a build without OpenMP. */
static int shared_runtime = 0;
int dsv4_share_threads(int on) {
#ifdef _OPENMP
    shared_runtime = on;
    return omp_get_max_threads();
#else
    (void)on;
    return 0;
#endif
}

/* below this much work (elements, or multiply-adds) a kernel stays on one thread: waking the pool costs a few
 * microseconds */
#define SPLIT_WORK (1 << 16)
static inline int split_threads(int64_t work) {
#ifdef _OPENMP
    return shared_runtime && work >= SPLIT_WORK ? omp_get_max_threads() : 1;
#else
    (void)work;
    return 1;
#endif
}

/* A helper inlined into each caller: called with literal arguments (a dtype flag, a vector width) its loops get
 * constant bounds and branches, which the compiler vectorises. */
#define INLINE static inline __attribute__((always_inline))

#define FP8_MAX 448.0f
#define FP4_MAX 6.0f
#define ACT_AMAX_FLOOR 1e-4f
#define FP4_AMAX_FLOOR (6.0f * 0x1p-126f)
#define X_BLOCK 128 /* activation quantisation block of every FP8 / FP4 GEMM */

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float load(const void *p, int bf16, int64_t i) {
    return bf16 ? float_of((uint32_t)((const uint16_t *)p)[i] << 16) : ((const float *)p)[i];
}

/* fp32 -> bf16 round-half-even, NaN kept quiet (torch's cast) */
static inline uint16_t bf16_bits(float f) {
    uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline void store(void *p, int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)p)[i] = bf16_bits(v);
    else ((float *)p)[i] = v;
}

/* v rounded to the dtype `bf16` names (a no-op for fp32) */
static inline float round_to(int bf16, float v) { return bf16 ? float_of((uint32_t)bf16_bits(v) << 16) : v; }

/* 2**ceil(log2(ratio)) for a positive normal ratio, clamped to the e8m0 range (dsv4.quant.pow2_scale) */
static inline float pow2_ceil(float ratio) {
    float s = float_of((bits_of(ratio) + 0x007fffffu) & 0x7f800000u);
    if (s < 0x1p-127f) s = 0x1p-127f;
    if (s > 0x1p127f) s = 0x1p127f;
    return s;
}

/* 1 / p for a normal power of two p, exactly, from its exponent bits. x * (1 / p) is then x / p (both round the
 * same real number once), at a multiplication's cost instead of a division's. */
static inline float pow2_inverse(float p) { return float_of(0x7f000000u - bits_of(p)); }

/* |v| <= 448 rounded to e4m3: a step of 2**(e-3) for |v| >= 2**-6, the subnormal step 2**-9 below */
static inline float e4m3_round(float v) {
    float a = fabsf(v);
    float step = float_of(bits_of(a) & 0x7f800000u) * 0.125f;
    if (step < 0x1p-9f) step = 0x1p-9f;
    return copysignf(rintf(a * pow2_inverse(step)) * step, v);
}

/* v (already divided by its scale) rounded to e2m1, saturating at 6: a step of 0.5 below 2, then 2**(e-1) */
static inline float e2m1_round(float v) {
    float a = fabsf(v);
    if (a > FP4_MAX) a = FP4_MAX;
    float step = float_of(bits_of(a) & 0x7f800000u) * 0.5f;
    if (step < 0.5f) step = 0.5f;
    return copysignf(rintf(a * pow2_inverse(step)) * step, v);
}

/* One block's power-of-two scale: amax floored, times fp32(1/elem_max), rounded up to a power of two */
static inline float block_scale(const float *x, int64_t n, float floor_, float inv_max) {
    /* the maximum in 8 lanes, then over the lanes: a maximum is the same in any order (a NaN is skipped either
     * way), and one running maximum does not vectorise */
    float part[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            float a = fabsf(x[i + l]);
            part[l] = a > part[l] ? a : part[l];
        }
    float amax = 0.0f;
    for (int l = 0; l < 8; l++) amax = part[l] > amax ? part[l] : amax;
    for (; i < n; i++) {
        float a = fabsf(x[i]);
        amax = a > amax ? a : amax;
    }
    if (amax < floor_) amax = floor_;
    return pow2_ceil(amax * inv_max);
}

/* ------------------------------------------------------------------------------------------ block simulation */

static void fp8_dequant_block(float *buf, int64_t n, float scale);

/* x [rows, k] through FP8 (fp4 = 0) or FP4 (fp4 = 1) blocks of `block` along k and back, into out (x's dtype) */
int dsv4_block_simulate(const void *x, void *out, int bf16, int64_t rows, int64_t k, int64_t block, int fp4) {
    const float floor_ = fp4 ? FP4_AMAX_FLOOR : ACT_AMAX_FLOOR;
    const float inv_max = fp4 ? 1.0f / FP4_MAX : 1.0f / FP8_MAX;
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * k * 4))
    for (int64_t r = 0; r < rows; r++) {
        float buf[block + 1];
        for (int64_t lo = 0; lo < k; lo += block) {
            int64_t n = k - lo < block ? k - lo : block;
            for (int64_t i = 0; i < n; i++) buf[i] = load(x, bf16, r * k + lo + i);
            float scale = block_scale(buf, n, floor_, inv_max);
            /* one loop per format, in place, then one store loop: a loop that branches on the format and the
             * output dtype per element ran at ~3 ns an element */
            if (fp4) {
                const float inverse = 1.0f / scale; /* exact: scales are powers of two (x * inverse is x / scale) */
                for (int64_t i = 0; i < n; i++) buf[i] = e2m1_round(buf[i] * inverse) * scale;
            } else {
                fp8_dequant_block(buf, n, scale);
            }
            if (bf16) {
                uint16_t *dst = (uint16_t *)out + r * k + lo;
                for (int64_t i = 0; i < n; i++) dst[i] = bf16_bits(buf[i]);
            } else {
                memcpy((float *)out + r * k + lo, buf, sizeof(float) * (size_t)n);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------ quantised linear */

/* A quantised weight [N, K] as the kernels read it: element values transposed [K, N], and scales
 * [ceil(K / block), N] fp32, one per `block` inputs of each output (128 for FP8 tiles, whose rows repeat the
 * tile's scale, 32 for MXFP4). The values are stored compactly but exactly: e4m3 values as bfloat16 (kind
 * VALUES_BF16), e2m1 values doubled as int8 (kind VALUES_I8, their scales halved), so a decode step reads 2 or 1
 * bytes per weight instead of 4. Halving a power-of-two scale and doubling the values changes no rounding. */
enum { VALUES_BF16 = 0, VALUES_I8 = 1 };
/* A float expert's weight as the model stores it, [N, K] row-major, fp32 or bf16: no activation quantisation, no
 * scales, each output a dot product over its contiguous row (scales_t and block unused). */
enum { FLOAT_ROWS_F32 = 2, FLOAT_ROWS_BF16 = 3 };

typedef struct {
    const void *values_t;
    const float *scales_t;
    int64_t n, k, block, kind;
} QWeight;

/* The activation row x [K] quantised as act_quant does: codes [K] (e4m3 values, unscaled) and scales [K/128] */
static void quantise_row(const float *x, int64_t k, float *codes, float *scales) {
    for (int64_t lo = 0, b = 0; lo < k; lo += X_BLOCK, b++) {
        int64_t n = k - lo < X_BLOCK ? k - lo : X_BLOCK;
        float scale = block_scale(x + lo, n, ACT_AMAX_FLOOR, 1.0f / FP8_MAX);
        const float inverse = 1.0f / scale; /* exact: a power of two (x * inverse is x / scale) */
        for (int64_t i = 0; i < n; i++) {
            float v = x[lo + i] * inverse;
            v = v > FP8_MAX ? FP8_MAX : (v < -FP8_MAX ? -FP8_MAX : v);
            codes[lo + i] = e4m3_round(v);
        }
        scales[b] = scale;
    }
}

/* Sixteen floats as one vector (GCC / Clang vector extensions: one AVX-512 register; two elsewhere) */
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));
static inline f32x16 load16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, f32x16 v) { memcpy(p, &v, sizeof v); }
/* s in every lane, as one broadcast load (`(f32x16){0} + s` is a scalar addition, kept for its -0.0 rule, and a
 * broadcast through the shuffle port, which shares an FMA unit's port: the panel products ran at half speed) */
static inline f32x16 splat16(float s) { return (f32x16){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
/* sixteen bf16 values and sixteen int8 ones as floats (exact): one widening load and a shift (a widening load and a
 * conversion) with AVX-512, where the vector extensions' conversion took three shuffles */
static inline f32x16 load16_bf16(const uint16_t *p) {
#ifdef __AVX512F__
    return (f32x16)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
#else
    u16x16 h;
    memcpy(&h, p, sizeof h);
    return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
#endif
}
static inline f32x16 load16_i8(const int8_t *p) {
#ifdef __AVX512F__
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    i8x16 v;
    memcpy(&v, p, sizeof v);
    return __builtin_convertvector(v, f32x16);
#endif
}

/* acc [N] = sum over weight blocks b, in order, of (sum_{k in b} codes[k] * W[k, n]) * (xs[b'] * ws[b, n]): the
 * official two-level accumulation, each block's dot summed over k in order. A block's weight rows (values_t is
 * [K, N]) are read one after another, each whole, into the block's partial sums `part` [N]: tiles of outputs that
 * walked down K read 64 bytes per row stride, a page each, at ~4 GMAC/s. The same sums in the same order (a
 * multiply, then an add: no contraction). One function per value kind. */
#define DEFINE_GEMV(NAME, VALUE_T, LOAD, LOAD16)                                                                \
    static void NAME(const float *codes, const float *xs, const QWeight *w, float *restrict acc,               \
                     float *restrict part) {                                                                  \
        const int64_t n_out = w->n, k_in = w->k, whole = n_out - n_out % 16;                                  \
        const VALUE_T *values = (const VALUE_T *)w->values_t;                                                 \
        for (int64_t lo = 0, b = 0; lo < k_in; lo += w->block, b++) {                                         \
            const int64_t hi = lo + w->block < k_in ? lo + w->block : k_in;                                   \
            memset(part, 0, sizeof(float) * (size_t)n_out);                                                   \
            int64_t i = lo;                                                                                   \
            for (; i + 4 <= hi; i += 4) { /* four rows a pass: each sum still adds them in order */           \
                const f32x16 c0 = splat16(codes[i]), c1 = splat16(codes[i + 1]);                              \
                const f32x16 c2 = splat16(codes[i + 2]), c3 = splat16(codes[i + 3]);                          \
                const VALUE_T *restrict r0 = values + i * n_out, *restrict r1 = r0 + n_out;                   \
                const VALUE_T *restrict r2 = r1 + n_out, *restrict r3 = r2 + n_out;                           \
                int64_t j = 0;                                                                                \
                for (; j < whole; j += 16) {                                                                  \
                    f32x16 sum = load16(part + j) + c0 * LOAD16(r0 + j);                                      \
                    sum = sum + c1 * LOAD16(r1 + j);                                                          \
                    sum = sum + c2 * LOAD16(r2 + j);                                                          \
                    store16(part + j, sum + c3 * LOAD16(r3 + j));                                             \
                }                                                                                             \
                for (; j < n_out; j++) {                                                                      \
                    float sum = part[j] + codes[i] * LOAD(r0[j]);                                             \
                    sum = sum + codes[i + 1] * LOAD(r1[j]);                                                   \
                    sum = sum + codes[i + 2] * LOAD(r2[j]);                                                   \
                    part[j] = sum + codes[i + 3] * LOAD(r3[j]);                                               \
                }                                                                                             \
            }                                                                                                 \
            for (; i < hi; i++) {                                                                             \
                const float c = codes[i];                                                                     \
                const f32x16 cv = splat16(c);                                                                 \
                const VALUE_T *restrict row = values + i * n_out;                                             \
                int64_t j = 0;                                                                                \
                for (; j < whole; j += 16) store16(part + j, load16(part + j) + cv * LOAD16(row + j));        \
                for (; j < n_out; j++) part[j] += c * LOAD(row[j]);                                           \
            }                                                                                                 \
            const float x_scale = xs[lo / X_BLOCK];                                                           \
            const float *ws = w->scales_t + b * n_out;                                                        \
            if (b == 0)                                                                                       \
                for (int64_t t = 0; t < n_out; t++) acc[t] = part[t] * (x_scale * ws[t]);                     \
            else                                                                                              \
                for (int64_t t = 0; t < n_out; t++) acc[t] += part[t] * (x_scale * ws[t]);                    \
        }                                                                                                     \
    }

#define LOAD_BF16(v) float_of((uint32_t)(v) << 16)
#define LOAD_I8(v) ((float)(v))
DEFINE_GEMV(gemv_bf16, uint16_t, LOAD_BF16, load16_bf16)
DEFINE_GEMV(gemv_i8, int8_t, LOAD_I8, load16_i8)

/* `part`: scratch for N partial sums */
static void quantised_gemv(const float *codes, const float *xs, const QWeight *w, float *acc, float *part) {
    if (w->kind == VALUES_I8) gemv_i8(codes, xs, w, acc, part);
    else gemv_bf16(codes, xs, w, acc, part);
}

/* Scratch for one row through a linear of at most `k` inputs and `n` outputs */
typedef struct {
    float *row, *codes, *scales, *acc, *part;
} Scratch;

static int scratch_init(Scratch *s, int64_t k, int64_t n) {
    s->row = malloc(sizeof(float) * (size_t)k);
    s->codes = malloc(sizeof(float) * (size_t)k);
    s->scales = malloc(sizeof(float) * (size_t)(k / X_BLOCK + 1));
    s->acc = malloc(sizeof(float) * (size_t)n);
    s->part = malloc(sizeof(float) * (size_t)n);
    return s->row && s->codes && s->scales && s->acc && s->part;
}

static void scratch_free(Scratch *s) {
    free(s->row); free(s->codes); free(s->scales); free(s->acc); free(s->part);
}

/* out [M, N] = linear(x [M, K], w): act_quant per 128 inputs, the two-level GEMM, cast to x's dtype. */
int dsv4_quantised_linear(const void *x, void *out, int bf16, int64_t m, const void *values_t, const float *scales_t,
                          int64_t n, int64_t k, int64_t block, int64_t kind) {
    const QWeight w = {values_t, scales_t, n, k, block, kind};
    const int64_t parts = split_threads(m > 1 ? m * n * k : 0);
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(parts) reduction(|:failed)
    for (int64_t part = 0; part < parts; part++) {
        Scratch s;
        if (!scratch_init(&s, k, n)) { scratch_free(&s); failed = 1; continue; }
        for (int64_t r = m * part / parts; r < m * (part + 1) / parts; r++) {
            for (int64_t i = 0; i < k; i++) s.row[i] = load(x, bf16, r * k + i);
            quantise_row(s.row, k, s.codes, s.scales);
            quantised_gemv(s.codes, s.scales, &w, s.acc, s.part);
            for (int64_t j = 0; j < n; j++) store(out, bf16, r * n + j, s.acc[j]);
        }
        scratch_free(&s);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ experts */

/* One expert's three weights, gate w1 [I, D], up w3 [I, D], down w2 [D, I]: all quantised, or all float */
typedef struct {
    QWeight w1, w3, w2;
} Expert;

/* acc [N] = W x for a float weight W [N, K] (FLOAT_ROWS_*) and x [K] fp32, one output at a time over its contiguous
 * row: 16 interleaved partial sums (lane l adds the products at l, l + 16, ...), then the lanes in order, then the
 * tail, an order the compiler vectorises. (Four outputs at a time measured 2-3x slower here: not vectorised.) */
#define DEFINE_FLOAT_GEMV(NAME, VALUE_T, LOAD)                                                                  \
    static void NAME(const float *restrict x, const QWeight *w, float *restrict acc) {                        \
        const int64_t n = w->n, k = w->k;                                                                     \
        const VALUE_T *values = (const VALUE_T *)w->values_t;                                                 \
        for (int64_t j = 0; j < n; j++) {                                                                     \
            const VALUE_T *restrict row = values + j * k;                                                     \
            float part[16] = {0};                                                                             \
            int64_t i = 0;                                                                                    \
            for (; i + 16 <= k; i += 16)                                                                      \
                for (int l = 0; l < 16; l++) part[l] += LOAD(row[i + l]) * x[i + l];                          \
            float sum = 0.0f;                                                                                 \
            for (int l = 0; l < 16; l++) sum += part[l];                                                      \
            for (; i < k; i++) sum += LOAD(row[i]) * x[i];                                                    \
            acc[j] = sum;                                                                                     \
        }                                                                                                     \
    }

#define LOAD_F32(v) (v)
DEFINE_FLOAT_GEMV(float_gemv_f32, float, LOAD_F32)
DEFINE_FLOAT_GEMV(float_gemv_bf16, uint16_t, LOAD_BF16)

static void float_gemv(const float *x, const QWeight *w, float *acc) {
    if (w->kind == FLOAT_ROWS_BF16) float_gemv_bf16(x, w, acc);
    else float_gemv_f32(x, w, acc);
}

/* acc [N] = the linear of x [K] (fp32, holding model-dtype values): act_quant and the two-level GEMM for a
 * quantised weight, a plain product for a float one. */
static void expert_gemv(const float *x, const QWeight *w, Scratch *s, float *acc) {
    if (w->kind >= FLOAT_ROWS_F32) {
        float_gemv(x, w, acc);
    } else {
        quantise_row(x, w->k, s->codes, s->scales);
        quantised_gemv(s->codes, s->scales, w, acc, s->part);
    }
}

/* out [D] fp32 (rounded to the model dtype) = w2((silu(min(w1 x, L)) * clamp(w3 x, -L, L)) * weight) for one
 * row x [D] already in fp32 (holding model-dtype values); route_weight NULL: none (the shared expert). */
static void swiglu_row(const float *x, const Expert *e, int bf16, float limit, const float *route_weight,
                       Scratch *s, float *hidden, float *gate, float *out) {
    const int64_t d = e->w1.k, inter = e->w1.n;
    if (e->w1.kind >= FLOAT_ROWS_F32) {
        float_gemv(x, &e->w1, gate);
        float_gemv(x, &e->w3, hidden);
    } else { /* w1 and w3 read the same quantised x */
        quantise_row(x, d, s->codes, s->scales);
        quantised_gemv(s->codes, s->scales, &e->w1, gate, s->part);
        quantised_gemv(s->codes, s->scales, &e->w3, hidden, s->part);
    }
    for (int64_t j = 0; j < inter; j++) {
        float g = round_to(bf16, gate[j]);
        float u = round_to(bf16, hidden[j]);
        g = g > limit ? limit : g;
        u = u > limit ? limit : (u < -limit ? -limit : u);
        float h = g / (1.0f + expf(-g)) * u; /* F.silu(g) * up */
        if (route_weight) h = *route_weight * h;
        hidden[j] = round_to(bf16, h);
    }
    expert_gemv(hidden, &e->w2, s, out);
    for (int64_t j = 0; j < d; j++) out[j] = round_to(bf16, out[j]);
}

static int expert_scratch(Scratch *s, float **bufs, int64_t d, int64_t inter) {
    int64_t wide = d > inter ? d : inter;
    int ok = scratch_init(s, wide, wide);
    for (int i = 0; i < 3; i++) {
        bufs[i] = malloc(sizeof(float) * (size_t)wide);
        ok = ok && bufs[i];
    }
    return ok;
}

static void expert_scratch_free(Scratch *s, float **bufs) {
    scratch_free(s);
    for (int i = 0; i < 3; i++) free(bufs[i]);
}

/* The shared expert (route weights NULL) or one routed expert over rows x [M, D] -> out [M, D] in x's dtype.
 * `tables` holds the expert's 3 x (values_t, scales_t) pointers (a float weight: its [N, K] rows, scales 0); dims
 * [I, D, block1, block3, block2, kind1, kind3, kind2]. */
int dsv4_swiglu(const void *x, void *out, int bf16, int64_t m, const int64_t *tables, const int64_t *dims,
                const float *route_weights, float limit) {
    const int64_t inter = dims[0], d = dims[1];
    Expert e = {
        {(const void *)tables[0], (const float *)tables[1], inter, d, dims[2], dims[5]},
        {(const void *)tables[2], (const float *)tables[3], inter, d, dims[3], dims[6]},
        {(const void *)tables[4], (const float *)tables[5], d, inter, dims[4], dims[7]},
    };
    const int64_t parts = split_threads(m > 1 ? m * 3 * d * inter : 0);
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(parts) reduction(|:failed)
    for (int64_t part = 0; part < parts; part++) {
        Scratch s;
        float *bufs[3];
        if (!expert_scratch(&s, bufs, d, inter)) { expert_scratch_free(&s, bufs); failed = 1; continue; }
        for (int64_t r = m * part / parts; r < m * (part + 1) / parts; r++) {
            for (int64_t i = 0; i < d; i++) bufs[2][i] = load(x, bf16, r * d + i);
            swiglu_row(bufs[2], &e, bf16, limit, route_weights ? route_weights + r : NULL, &s, bufs[0], bufs[1],
                       s.acc);
            for (int64_t j = 0; j < d; j++) store(out, bf16, r * d + j, s.acc[j]);
        }
        expert_scratch_free(&s, bufs);
    }
    return failed ? -1 : 0;
}

/* The routed experts' fp32 sum out [T, D] for tokens x [T, D]: token t's experts ids [T, topk] (with weights
 * [T, topk] fp32) that `tables` holds (6 pointers per expert, 0 for an expert not run here) are added into its
 * row in increasing expert id, from 0 (a repeated id in slot order): the reference's order of additions. Expert
 * by expert, so an expert's weights come from memory once for all its tokens (the later rows find them in cache),
 * where token by token they were read again for each token that chose them. dims as `dsv4_swiglu`. */
int dsv4_routed_experts(const void *x, float *out, int bf16, int64_t t, int64_t topk, const int64_t *ids,
                        const float *weights, int64_t n_experts, const int64_t *tables, const int64_t *dims,
                        float limit) {
    const int64_t inter = dims[0], d = dims[1];
    /* the tokens split into one contiguous part per thread, each part expert by expert */
    const int64_t parts = split_threads(t > 1 ? t * topk * 3 * d * inter : 0);
    int failed = 0;
    #pragma omp parallel for schedule(static) num_threads(parts) reduction(|:failed)
    for (int64_t part = 0; part < parts; part++) {
        const int64_t lo = t * part / parts, hi = t * (part + 1) / parts;
        Scratch s;
        float *bufs[3];
        float *rows = malloc(sizeof(float) * (size_t)((hi - lo) * d + 1)); /* x in fp32 */
        if (!expert_scratch(&s, bufs, d, inter) || !rows) {
            expert_scratch_free(&s, bufs);
            free(rows);
            failed = 1;
            continue;
        }
        for (int64_t i = 0; i < (hi - lo) * d; i++) rows[i] = load(x, bf16, lo * d + i);
        for (int64_t i = lo * d; i < hi * d; i++) out[i] = 0.0f;
        for (int64_t id = 0; id < n_experts; id++) {
            const int64_t *tb = tables + id * 6;
            if (tb[0] == 0) continue;
            const Expert e = {
                {(const void *)tb[0], (const float *)tb[1], inter, d, dims[2], dims[5]},
                {(const void *)tb[2], (const float *)tb[3], inter, d, dims[3], dims[6]},
                {(const void *)tb[4], (const float *)tb[5], d, inter, dims[4], dims[7]},
            };
            for (int64_t r = lo; r < hi; r++) {
                for (int64_t slot = 0; slot < topk; slot++) {
                    if (ids[r * topk + slot] != id) continue;
                    swiglu_row(rows + (r - lo) * d, &e, bf16, limit, weights + r * topk + slot, &s, bufs[0], bufs[1],
                               s.acc);
                    float *y = out + r * d;
                    for (int64_t j = 0; j < d; j++) y[j] += s.acc[j];
                }
            }
        }
        free(rows);
        expert_scratch_free(&s, bufs);
    }
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ mHC Sinkhorn */

/* The Sinkhorn normalisation of comb [T, h, h] fp32 in place, each matrix holding exp(logits - row max): the
 * reference's sequence exactly, a row softmax's division by the row sum + eps, a column normalisation, then
 * iters - 1 rounds of row and column normalisation, each dividing by (sum + eps), every sum over the row or column
 * in order (torch's order for these few elements). The exponentials stay torch's (its vectorised exp differs from
 * libm's in last bits, and those grow through the FP8 activations downstream). Tokens go LANES at a time, each
 * lane one token's matrix, so the divisions run as vector instructions; every lane does exactly the scalar
 * sequence. */
#define LANES 8

/* One step of LANES matrices c [h*h][LANES]: rows (step even) or columns divided by their sums (+ eps after the
 * first step), the first step adding eps after its division; the divisors go to div [h][LANES] if not NULL. */
static void sinkhorn_step(float *c, int64_t h, int64_t step, float eps, float *div) {
    const int rows = step % 2 == 0;
    for (int64_t a = 0; a < h; a++) {
        float sum[LANES] = {0};
        for (int64_t b = 0; b < h; b++) {
            const float *v = c + (rows ? a * h + b : b * h + a) * LANES;
            for (int l = 0; l < LANES; l++) sum[l] += v[l];
        }
        if (step > 0)
            for (int l = 0; l < LANES; l++) sum[l] += eps;
        for (int64_t b = 0; b < h; b++) {
            float *v = c + (rows ? a * h + b : b * h + a) * LANES;
            if (step == 0)
                for (int l = 0; l < LANES; l++) v[l] = v[l] / sum[l] + eps;
            else
                for (int l = 0; l < LANES; l++) v[l] = v[l] / sum[l];
        }
        if (div)
            for (int l = 0; l < LANES; l++) div[a * LANES + l] = sum[l];
    }
}

/* comb rows r0 .. r0+n-1 (n <= LANES) into lanes; the missing lanes hold ones (normalised and dropped) */
static void to_lanes(const float *src, float *c, int64_t r0, int64_t n, int64_t hh) {
    for (int64_t e = 0; e < hh; e++)
        for (int l = 0; l < LANES; l++) c[e * LANES + l] = l < n ? src[(r0 + l) * hh + e] : 1.0f;
}

static void from_lanes(const float *c, float *dst, int64_t r0, int64_t n, int64_t hh) {
    for (int64_t e = 0; e < hh; e++)
        for (int l = 0; l < n; l++) dst[(r0 + l) * hh + e] = c[e * LANES + l];
}

int dsv4_sinkhorn(float *comb, int64_t t, int64_t h, int64_t iters, float eps) {
    if (h > 16) return -1;
    const int64_t hh = h * h;
    float c[256 * LANES];
    for (int64_t r0 = 0; r0 < t; r0 += LANES) {
        const int64_t n = t - r0 < LANES ? t - r0 : LANES;
        to_lanes(comb, c, r0, n, hh);
        for (int64_t step = 0; step < 2 * iters; step++) sinkhorn_step(c, h, step, eps, NULL);
        from_lanes(c, comb, r0, n, hh);
    }
    return 0;
}

/* mHC's split, around torch's own sigmoid and exp. These two stay torch's because its results depend on more than
 * the element: a tensor's elements past its last 2 * vector width take libm's expf, the rest a SLEEF polynomial,
 * and torch.exp calls MKL on x86. Element for element the C arithmetic is the reference's separate torch ops.
 *
 * dsv4_hc_split: mixes [T, (2+h)*h] fp32, scale [3], base [(2+h)*h] -> pre_in, post_in [T, h] = m * s + b (before
 * their sigmoids) and logits [T, h, h] = m * s2 + b less each row's max (before the exp). */
int dsv4_hc_split(const float *mixes, const float *scale, const float *base, int64_t t, int64_t h, float *pre_in,
                  float *post_in, float *logits) {
    const int64_t m = (2 + h) * h;
    for (int64_t r = 0; r < t; r++) {
        const float *x = mixes + r * m;
        for (int64_t k = 0; k < h; k++) {
            pre_in[r * h + k] = x[k] * scale[0] + base[k];
            post_in[r * h + k] = x[h + k] * scale[1] + base[h + k];
        }
        for (int64_t a = 0; a < h; a++) {
            float *row = logits + (r * h + a) * h;
            float top = -INFINITY;
            for (int64_t b = 0; b < h; b++) {
                const int64_t e = 2 * h + a * h + b;
                row[b] = x[e] * scale[2] + base[e];
                if (row[b] > top || row[b] != row[b]) top = row[b]; /* a NaN wins, as in torch.amax */
            }
            for (int64_t b = 0; b < h; b++) row[b] = row[b] - top;
        }
    }
    return 0;
}

/* After the sigmoids and the exp, in place: pre = sigmoid + eps, post = 2 * sigmoid, comb Sinkhorn-normalised. */
int dsv4_hc_split_finish(float *pre, float *post, float *comb, int64_t t, int64_t h, int64_t iters, float eps) {
    for (int64_t i = 0; i < t * h; i++) {
        pre[i] = pre[i] + eps;
        post[i] = 2.0f * post[i];
    }
    return dsv4_sinkhorn(comb, t, h, iters, eps);
}

/* ------------------------------------------------------------------------------------------ Hadamard */

/* ------------------------------------------------------------------------------------------ sparse attention */

#define ATTN_BLOCK 64 /* slots per online-softmax step of the official kernel */

/* One run of KV rows (keys double as values) of the concatenation idx addresses: `count` rows per batch row,
 * dense ([B, count, D] at `rows`) or paged (row j of batch row b at rows[(table[b * table_width + j / per_page] *
 * per_page + j % per_page) * D]); layout of the int64 descriptor: rows, count, per_page (0: dense), table,
 * table_width. */
typedef struct {
    const void *rows;
    int64_t count, per_page;
    const int64_t *table;
    int64_t table_width;
} Run;

/* The runs of n_runs descriptors (five int64 each, as above), or NULL without memory; the caller frees them */
static Run *read_runs(const int64_t *run_desc, int64_t n_runs) {
    Run *runs = malloc(sizeof(Run) * (size_t)(n_runs > 0 ? n_runs : 1));
    if (!runs) return NULL;
    for (int64_t r = 0; r < n_runs; r++) {
        const int64_t *desc = run_desc + 5 * r;
        runs[r] = (Run){(const void *)desc[0], desc[1], desc[2], (const int64_t *)desc[3], desc[4]};
    }
    return runs;
}

static const void *row_at(const Run *runs, int64_t n_runs, int64_t batch, int64_t slot, int64_t d, int bf16) {
    for (int64_t r = 0; r < n_runs; r++) {
        const Run *run = runs + r;
        if (slot < run->count) {
            int64_t at;
            if (run->per_page) {
                int64_t page = run->table[batch * run->table_width + slot / run->per_page];
                at = (page * run->per_page + slot % run->per_page) * d;
            } else {
                at = (batch * run->count + slot) * d;
            }
            return bf16 ? (const void *)((const uint16_t *)run->rows + at) : (const void *)((const float *)run->rows + at);
        }
        slot -= run->count;
    }
    return NULL; /* past every run: treated as an unused slot */
}

/* A dot product in 16 interleaved partial sums (lane l adds the products at l, l + 16, ...; then the lanes in
 * order, then the tail): an order the compiler vectorises, where one running sum stays scalar. */
static inline float dot_lanes(const float *a, const float *b, int64_t n) {
    float part[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) part[l] += a[i + l] * b[i + l];
    float sum = 0.0f;
    for (int l = 0; l < 16; l++) sum += part[l];
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* out [B, S, H, D] (q's dtype) = each query's attention over the rows idx [B, S, K] names (-1: unused), with the
 * per-head sink [H] fp32: the reference's arithmetic (the official kernel's): slots walked in idx order, 64 at a
 * time, an online softmax in fp32 (running max, p = exp(logit - max), running sum), the unnormalised p rounded to
 * the rows' dtype before the value product into an fp32 accumulator, both rescaled by exp(old max - new max); at
 * the end exp(sink - max) joins the denominator only. A query's heads share each row read. */
int dsv4_sparse_attn(const void *q, void *out, int q_bf16, int64_t b, int64_t s, int64_t h, int64_t d,
                     const int64_t *run_desc, int64_t n_runs, int rows_bf16, const int64_t *idx, int64_t k,
                     const float *sink, float scale) {
    Run *runs = read_runs(run_desc, n_runs);
    if (!runs) return -1;
    int failed = 0;
    /* queries split between threads, each with its own scratch: qf and acc [h * d], logit [h * ATTN_BLOCK],
     * run_max and denom [h], the block's rows rowf [ATTN_BLOCK * d] and value [d] */
    #pragma omp parallel for schedule(static) num_threads(split_threads(b * s > 1 ? b * s * h * k * d : 0)) \
        reduction(|:failed)
    for (int64_t query = 0; query < b * s; query++) {
        float *qf = malloc(sizeof(float) * (size_t)(2 * h * d + h * ATTN_BLOCK + 2 * h + ATTN_BLOCK * d + d));
        if (!qf) { failed = 1; continue; }
        float *acc = qf + h * d, *logit = acc + h * d, *run_max = logit + h * ATTN_BLOCK, *denom = run_max + h;
        float *rowf = denom + h, *value = rowf + ATTN_BLOCK * d;
        const int64_t bi = query / s;
        const int64_t *slots = idx + query * k;
        int valid[ATTN_BLOCK];
        for (int64_t i = 0; i < h * d; i++) qf[i] = load(q, q_bf16, query * h * d + i);
        for (int64_t i = 0; i < h * d; i++) acc[i] = 0.0f;
        for (int64_t hi = 0; hi < h; hi++) { run_max[hi] = -INFINITY; denom[hi] = 0.0f; }
        for (int64_t lo = 0; lo < k; lo += ATTN_BLOCK) {
            const int64_t n = k - lo < ATTN_BLOCK ? k - lo : ATTN_BLOCK;
            for (int64_t j = 0; j < n; j++) { /* the block's rows, read once for every head */
                const int64_t slot = slots[lo + j];
                const void *row = slot < 0 ? NULL : row_at(runs, n_runs, bi, slot, d, rows_bf16);
                valid[j] = row != NULL;
                for (int64_t i = 0; i < d; i++) rowf[j * d + i] = valid[j] ? load(row, rows_bf16, i) : 0.0f;
            }
            for (int64_t hi = 0; hi < h; hi++) {
                const float *qh = qf + hi * d;
                float *lh = logit + hi * ATTN_BLOCK;
                float top = run_max[hi];
                for (int64_t j = 0; j < n; j++) {
                    if (!valid[j]) { lh[j] = -INFINITY; continue; }
                    lh[j] = dot_lanes(qh, rowf + j * d, d) * scale;
                    top = lh[j] > top ? lh[j] : top;
                }
                const float shift = isfinite(top) ? top : 0.0f;
                const float rescale = expf(run_max[hi] - shift);
                float sum = 0.0f;
                for (int64_t j = 0; j < n; j++) { lh[j] = expf(lh[j] - shift); sum += lh[j]; }
                denom[hi] = denom[hi] * rescale + sum;
                float *ah = acc + hi * d;
                for (int64_t i = 0; i < d; i++) value[i] = 0.0f;
                for (int64_t j = 0; j < n; j++) { /* sum_j p_j * row_j, over j in order for each i */
                    const float pj = round_to(rows_bf16, lh[j]);
                    for (int64_t i = 0; i < d; i++) value[i] += pj * rowf[j * d + i];
                }
                for (int64_t i = 0; i < d; i++) ah[i] = ah[i] * rescale + value[i];
                run_max[hi] = top;
            }
        }
        for (int64_t hi = 0; hi < h; hi++) {
            const float shift = isfinite(run_max[hi]) ? run_max[hi] : sink[hi];
            const float total = denom[hi] + expf(sink[hi] - shift);
            for (int64_t i = 0; i < d; i++) store(out, q_bf16, query * h * d + hi * d + i, acc[hi * d + i] / total);
        }
        free(qf);
    }
    free(runs);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ prefill attention */

/* A block of a prefill chunk's queries scores the rows its slots name with one GEMM (the "cpu" backend's dense
 * attention); these three kernels are its bookkeeping between the GEMMs, about thirty torch ops a block. */

/* The rows that queries lo .. hi-1 of slots idx [B, S, K] (-1: none) name among n rows: used [n] gets them in
 * increasing order and renumber [n] each one's place there, unless they are more than three quarters of the rows
 * (then every row is kept, in order, and used is left alone). Returns n', the rows kept, or -1 for a slot past the
 * rows. */
static int64_t named_rows(const int64_t *idx, int64_t b, int64_t s, int64_t k, int64_t lo, int64_t hi, int64_t n,
                          int64_t *used, int64_t *renumber) {
    for (int64_t i = 0; i < n; i++) renumber[i] = -1;
    for (int64_t bb = 0; bb < b; bb++) {
        for (int64_t t = lo; t < hi; t++) {
            const int64_t *slot = idx + (bb * s + t) * k;
            for (int64_t j = 0; j < k; j++) {
                if (slot[j] >= n) return -1;
                if (slot[j] >= 0) renumber[slot[j]] = 0;
            }
        }
    }
    int64_t kept = 0;
    for (int64_t i = 0; i < n; i++) kept += renumber[i] == 0;
    if (4 * kept > 3 * n) {
        for (int64_t i = 0; i < n; i++) renumber[i] = i;
        return n;
    }
    int64_t next = 0;
    for (int64_t i = 0; i < n; i++) {
        if (renumber[i] == 0) {
            used[next] = i;
            renumber[i] = next++;
        }
    }
    return kept;
}

/* The rows those queries name (`named_rows`), and cols [B, hi-lo, K] each slot's place among them (0 for an unused
 * slot). Returns n', or -1 for a slot past the rows (-2: no scratch). */
int64_t dsv4_attn_slot_rows(const int64_t *idx, int64_t b, int64_t s, int64_t k, int64_t lo, int64_t hi, int64_t n,
                            int64_t *used, int64_t *cols) {
    int64_t *renumber = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));
    if (!renumber) return -2;
    const int64_t kept = named_rows(idx, b, s, k, lo, hi, n, used, renumber);
    if (kept >= 0) {
        for (int64_t bb = 0; bb < b; bb++) {
            for (int64_t t = lo; t < hi; t++) {
                const int64_t *slot = idx + (bb * s + t) * k;
                int64_t *col = cols + (bb * (hi - lo) + t - lo) * k;
                for (int64_t j = 0; j < k; j++) col[j] = slot[j] >= 0 ? renumber[slot[j]] : 0;
            }
        }
    }
    free(renumber);
    return kept;
}

/* The rows those queries name (`named_rows`), and counts [B, hi-lo, n'] how many of each query's slots name each
 * kept row (a row named twice weighs twice, as the reference's slots do; 0 masks it). Returns n', or -1 for a slot
 * past the rows or no scratch. */
int64_t dsv4_attn_rows(const int64_t *idx, int64_t b, int64_t s, int64_t k, int64_t lo, int64_t hi, int64_t n,
                       int64_t *used, float *counts) {
    const int64_t m = hi - lo;
    int64_t *cols = malloc(sizeof(int64_t) * (size_t)(b * m * k > 0 ? b * m * k : 1));
    const int64_t kept = cols ? dsv4_attn_slot_rows(idx, b, s, k, lo, hi, n, used, cols) : -1;
    if (kept >= 0) {
        memset(counts, 0, sizeof(float) * (size_t)(b * m * kept));
        for (int64_t q = 0; q < b * m; q++) {
            const int64_t *slot = idx + (q / m * s + lo + q % m) * k, *col = cols + q * k;
            for (int64_t j = 0; j < k; j++) counts[q * kept + col[j]] += slot[j] >= 0 ? 1.0f : 0.0f;
        }
    }
    free(cols);
    return kept < 0 ? -1 : kept;
}

/* logits [B, m, H, K] = scores [B, m*H, n'] picked at each slot's column cols [B, m, K] (a copy). */
int dsv4_attn_pick(const float *scores, const int64_t *cols, int64_t b, int64_t m, int64_t h, int64_t k, int64_t n,
                   float *logits) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(b * m * h * k))
    for (int64_t q = 0; q < b * m; q++) {
        const int64_t *col = cols + q * k;
        for (int64_t head = 0; head < h; head++) {
            const float *score = scores + (q * h + head) * n;
            float *out = logits + (q * h + head) * k;
            for (int64_t j = 0; j < k; j++) out[j] = score[col[j]];
        }
    }
    return 0;
}

#define ATTN_LANES 8

/* Eight floats as one vector (GCC / Clang vector extensions): the masked maximum and the selects below do not
 * vectorise as plain loops (gcc turns their conditions into branches) */
typedef float f32x8 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
static inline f32x8 load8(const float *p) { f32x8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, f32x8 v) { memcpy(p, &v, sizeof v); }
static inline f32x8 splat8(float s) { return (f32x8){s, s, s, s, s, s, s, s}; }
static inline f32x8 select8(i32x8 mask, f32x8 a, f32x8 b) { /* lanes of a where mask is all ones, else of b */
    return (f32x8)((mask & (i32x8)a) | (~mask & (i32x8)b));
}

/* A block's scores [R, n] (R query heads, h a query; counts [R/h, n] the weights `dsv4_attn_rows` gave) in place as
 * the arguments of their exponentials: scale * score - shift, floored at `lowest`, where shift [R] is the largest
 * scaled score the row counts (the head's sink logit, sink [h], when that is not finite); an entry the row does
 * not count gets `lowest` (its weight, 0, removes it after the exponential). The same two roundings as
 * torch's `every * scale - shift`; a NaN stays NaN. */
int dsv4_attn_logits(float *restrict scores, const float *restrict counts, int64_t rows, int64_t h, int64_t n,
                     const float *restrict sink, float scale, float lowest, float *restrict shift) {
    const f32x8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    const f32x8 zero = {0};
    const f32x8 floor8 = zero + lowest;
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * n))
    for (int64_t r = 0; r < rows; r++) {
        float *restrict x = scores + r * n;
        const float *restrict c = counts + (r / h) * n;
        f32x8 top = none;
        int64_t j = 0;
        for (; j + ATTN_LANES <= n; j += ATTN_LANES) {
            const f32x8 a = load8(x + j) * scale;
            store8(x + j, a);
            const f32x8 v = select8(load8(c + j) > zero, a, none);
            top = select8(v > top, v, top);
        }
        float best = -INFINITY;
        for (int l = 0; l < ATTN_LANES; l++) best = top[l] > best ? top[l] : best;
        for (int64_t t = j; t < n; t++) {
            x[t] *= scale;
            if (c[t] > 0.0f && x[t] > best) best = x[t];
        }
        const float sh = isfinite(best) ? best : sink[r % h];
        shift[r] = sh;
        for (j = 0; j + ATTN_LANES <= n; j += ATTN_LANES) {
            const f32x8 a = load8(x + j) - sh;
            store8(x + j, select8(load8(c + j) > zero, select8(a < floor8, floor8, a), floor8));
        }
        for (; j < n; j++) {
            const float a = x[j] - sh;
            x[j] = c[j] > 0.0f ? (a < lowest ? lowest : a) : lowest;
        }
    }
    return 0;
}

/* After the exponentials: each of a block's probabilities p [R, n] times its weight (counts as above), and
 * denom [R] the row's sum plus its sink's share exp(sink - shift). */
int dsv4_attn_weights(float *restrict p, const float *restrict counts, int64_t rows, int64_t h, int64_t n,
                      const float *restrict sink, const float *restrict shift, float *restrict denom) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * n))
    for (int64_t r = 0; r < rows; r++) {
        float *restrict x = p + r * n;
        const float *restrict c = counts + (r / h) * n;
        float sum[ATTN_LANES] = {0};
        int64_t j = 0;
        for (; j + ATTN_LANES <= n; j += ATTN_LANES) {
            for (int l = 0; l < ATTN_LANES; l++) {
                const float w = x[j + l] * c[j + l];
                x[j + l] = w;
                sum[l] += w;
            }
        }
        for (; j < n; j++) {
            x[j] *= c[j];
            sum[0] += x[j];
        }
        const float total = ((sum[0] + sum[1]) + (sum[2] + sum[3])) + ((sum[4] + sum[5]) + (sum[6] + sum[7]));
        denom[r] = total + expf(sink[r % h] - shift[r]);
    }
    return 0;
}

static float torch_row_sum(const float *x, int64_t n, int lanes);

/* The reference's 64-slot blocks of attention over rows of another dtype (bf16: the probabilities are rounded to
 * it; the "cpu" backend's `_block_exponents` and `_block_probs`), bit for bit: everything between the logits' GEMM
 * and the value products but the exponentials, which stay torch's. Rows r of R = B*S*H query heads, h a query. */

/* logits [R, k] unscaled, idx [R/h, k] (-1: masked) -> exps [R, nb, 64] the exponentials' arguments (scale * logit
 * - shift; -inf for masked and missing slots), run_max [R, nb] the running maximum after each block (NaN
 * propagates, as torch's amax and cummax do) and shift [R, nb] (run_max, or 0 where it is not finite) */
int dsv4_attn_block_exponents(const float *logits, const int64_t *idx, int64_t rows, int64_t h, int64_t k,
                              int64_t nb, float scale, float *exps, float *run_max, float *shift) {
    const f32x8 none = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * nb * 64))
    for (int64_t query = 0; query < rows / h; query++) {
        int32_t keep[nb * 64 + 1]; /* the query's used slots */
        const int64_t *slot = idx + query * k;
        for (int64_t j = 0; j < nb * 64; j++) keep[j] = j < k && slot[j] >= 0 ? -1 : 0;
        for (int64_t r = query * h; r < (query + 1) * h; r++) {
            const float *x = logits + r * k;
            float *e = exps + r * nb * 64;
            for (int64_t j = 0; j < k; j++) e[j] = x[j] * scale;
            for (int64_t j = k; j < nb * 64; j++) e[j] = 0.0f;
            float running = -INFINITY;
            for (int64_t i = 0; i < nb; i++) {
                f32x8 top = none;
                for (int64_t j = i * 64; j < (i + 1) * 64; j += ATTN_LANES) {
                    i32x8 used;
                    memcpy(&used, keep + j, sizeof used);
                    const f32x8 v = select8(used, load8(e + j), none);
                    store8(e + j, v);
                    top = select8((v != v) | (v > top), v, top); /* a NaN stays the maximum, as in torch's amax */
                }
                float best = -INFINITY;
                int nan = 0;
                for (int l = 0; l < ATTN_LANES; l++) {
                    nan |= top[l] != top[l];
                    best = top[l] > best ? top[l] : best;
                }
                if (nan) best = NAN;
                if (i == 0 || best != best || best >= running) running = best; /* torch's cummax, NaN kept */
                run_max[r * nb + i] = running;
                const float sh = isfinite(running) ? running : 0.0f;
                shift[r * nb + i] = sh;
                for (int64_t j = i * 64; j < (i + 1) * 64; j += ATTN_LANES) store8(e + j, load8(e + j) - sh);
            }
        }
    }
    return 0;
}

/* p [R, nb, 64] the blocks' unnormalised probabilities (n_slots of them real) -> block_sum [R, nb] (torch's
 * summation order over each block's own slots, vector width `lanes`), then the probabilities rounded to bf16
 * (round_bf16) as the value products read them: whole blocks probs [R/h, full, h, 64], the partial last one tail
 * [R, n_slots % 64] */
int dsv4_attn_block_probs(const float *p, int64_t rows, int64_t h, int64_t nb, int64_t n_slots, int lanes,
                          int round_bf16, float *block_sum, float *probs, float *tail) {
    const int64_t full = n_slots / 64, rest = n_slots % 64;
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * nb * 64))
    for (int64_t r = 0; r < rows; r++) {
        const int64_t query = r / h, head = r % h;
        for (int64_t i = 0; i < nb; i++) {
            const float *block = p + (r * nb + i) * 64;
            block_sum[r * nb + i] = torch_row_sum(block, i < full ? 64 : rest, lanes); /* the block's own slots */
            if (i < full) {
                float *dst = probs + ((query * full + i) * h + head) * 64;
                for (int64_t j = 0; j < 64; j++) dst[j] = round_to(round_bf16, block[j]);
            } else {
                for (int64_t j = 0; j < rest; j++) tail[r * rest + j] = round_to(round_bf16, block[j]);
            }
        }
    }
    return 0;
}

/* Each 64-slot block's value product of attention over rows rounded to bf16 (`CpuBackend._block_values`): out
 * [B, S, nb, H, D], block i of a query = the sum over its slots j, in slot order and one term at a time, of p[h, j]
 * times the row idx names (row 0 of the batch row for an unused slot, as the reference's clamped gather; its p is
 * 0), from the whole blocks' probabilities [B*S*full, H, 64], the last partial block's [B, S, H, rest] and the rows
 * [B, N, D] fp32, read in place. That is the order in which the reference's batched GEMM sums 64 terms on this BLAS
 * (the backend checks it once before it uses this kernel), and every product is exact (both factors hold bf16
 * values), so a fused multiply-add rounds nothing differently: GCC may contract here. Returns -2 if a slot names a
 * row past N. */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=fast")))
#endif
int dsv4_attn_block_values(const float *probs, const float *tail, const float *rows, const int64_t *idx, int64_t b,
                           int64_t s, int64_t h, int64_t d, int64_t k, int64_t n, float *out) {
    const int64_t full = k / 64, rest = k % 64, nb = full + (rest > 0);
    int bad = 0;
    #pragma omp parallel for schedule(static) num_threads(split_threads(b * s * k * h * d)) reduction(|:bad)
    for (int64_t query = 0; query < b * s; query++) {
        const float *row[64];
        const int64_t *slots = idx + query * k;
        const float *batch_rows = rows + query / s * n * d;
        for (int64_t i = 0; i < nb; i++) {
            const int64_t width = i < full ? 64 : rest;
            for (int64_t j = 0; j < width; j++) {
                const int64_t at = slots[i * 64 + j];
                bad |= at >= n;
                row[j] = batch_rows + (at < 0 || at >= n ? 0 : at) * d;
            }
            for (int64_t head = 0; head < h; head++) {
                const float *p = i < full ? probs + ((query * full + i) * h + head) * 64 : tail + (query * h + head) * rest;
                float *o = out + ((query * nb + i) * h + head) * d;
                int64_t x = 0;
                for (; x + 128 <= d; x += 128) { /* 128 outputs in eight vectors, each a sum in slot order */
                    f32x16 a[8] = {{0}};
                    for (int64_t j = 0; j < width; j++) {
                        const f32x16 pj = splat16(p[j]);
                        const float *r = row[j] + x;
                        for (int v = 0; v < 8; v++) a[v] += pj * load16(r + 16 * v);
                    }
                    for (int v = 0; v < 8; v++) store16(o + x + 16 * v, a[v]);
                }
                for (; x + 16 <= d; x += 16) {
                    f32x16 a = {0};
                    for (int64_t j = 0; j < width; j++) a += splat16(p[j]) * load16(row[j] + x);
                    store16(o + x, a);
                }
                for (; x + 8 <= d; x += 8) {
                    f32x8 a = {0};
                    for (int64_t j = 0; j < width; j++) a += splat8(p[j]) * load8(row[j] + x);
                    store8(o + x, a);
                }
                for (; x < d; x++) {
                    float a = 0.0f;
                    for (int64_t j = 0; j < width; j++) a += p[j] * row[j][x];
                    o[x] = a;
                }
            }
        }
    }
    return bad ? -2 : 0;
}

/* ------------------------------------------------------------------------------------------ vocabulary head */

/* A few rows times a vocabulary-sized float weight kept in panels: out [M, N] = x [M, K] W^T, W stored as
 * panels [ceil(N / 32)][K][32] (panel p holds outputs 32p .. 32p + 31 of every k, zeros past N), so each panel
 * is one sequential read that the rows reuse while it is in cache; the panels are split between threads. A
 * product's sum runs over k in order with fused multiply-adds (plain fp32: BLAS sums in an order of its own
 * too). The head is a memory-bound stream at a decode's few rows, where BLAS's GEMM ran at about a third of it. */
#define PANEL 32
/* a0[r], a1[r] (r < M) = the sums over j < k, in order, of x[r * k + j] times a panel's 32 values at j, which
 * LANES(j, 0) and LANES(j, 16) read as floats; AHEAD(j) prefetches what a later j reads */
#define PANEL_SUMS(M, LANES, AHEAD)                                                                                 \
    f32x16 a0[M], a1[M];                                                                                            \
    for (int r = 0; r < M; r++) a0[r] = a1[r] = (f32x16){0};                                                        \
    for (int64_t j = 0; j < k; j++) {                                                                               \
        AHEAD(j);                                                                                                   \
        const f32x16 w0 = LANES(j, 0), w1 = LANES(j, 16);                                                           \
        for (int r = 0; r < M; r++) {                                                                               \
            const f32x16 v = splat16(x[r * k + j]);                                                                 \
            a0[r] += v * w0;                                                                                        \
            a1[r] += v * w1;                                                                                        \
        }                                                                                                           \
    }
#define FLOAT_LANES(j, at) load16(panel + (j) * PANEL + (at))
#define FLOAT_AHEAD(j) \
    (__builtin_prefetch(panel + ((j) + 16) * PANEL), __builtin_prefetch(panel + ((j) + 16) * PANEL + 16))
#define HEAD_TILE(M)                                                                                                \
    static void head_tile_##M(const float *x, int64_t k, const float *panel, float *out, int64_t n, int64_t cols) { \
        PANEL_SUMS(M, FLOAT_LANES, FLOAT_AHEAD)                                                                     \
        for (int r = 0; r < M; r++) {                                                                               \
            float tile[PANEL];                                                                                      \
            store16(tile, a0[r]);                                                                                   \
            store16(tile + 16, a1[r]);                                                                              \
            memcpy(out + r * n, tile, sizeof(float) * (size_t)cols);                                                \
        }                                                                                                           \
    }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif
HEAD_TILE(1)
HEAD_TILE(2)
HEAD_TILE(4)
HEAD_TILE(8)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* out [M, cols] (row stride n) = x [M, K] times one panel [K, 32]: rows eight, four, two or one at a time, each
 * row's sums the same whatever tile it falls in */
static void panel_rows(const float *x, int64_t m, int64_t k, const float *panel, float *out, int64_t n, int64_t cols) {
    for (int64_t r = 0; r < m;) {
        const int64_t left = m - r;
        const float *xr = x + r * k;
        float *o = out + r * n;
        if (left >= 8) { head_tile_8(xr, k, panel, o, n, cols); r += 8; }
        else if (left >= 4) { head_tile_4(xr, k, panel, o, n, cols); r += 4; }
        else if (left >= 2) { head_tile_2(xr, k, panel, o, n, cols); r += 2; }
        else { head_tile_1(xr, k, panel, o, n, cols); r += 1; }
    }
}

/* out [M, N] = x [M, K] times every panel of a weight [ceil(N / 32)][K][32] */
static void panels_product(const float *x, int64_t m, int64_t k, const float *panels, int64_t n, float *out) {
    for (int64_t col = 0; col < n; col += PANEL)
        panel_rows(x, m, k, panels + col * k, out + col, n, n - col < PANEL ? n - col : PANEL);
}

int dsv4_panel_gemm(const float *x, int64_t m, int64_t k, const float *panels, int64_t n, float *out) {
    const int64_t count = (n + PANEL - 1) / PANEL;
    #pragma omp parallel for schedule(static) num_threads(split_threads(m * k * n))
    for (int64_t p = 0; p < count; p++) {
        const int64_t col = p * PANEL;
        panel_rows(x, m, k, panels + p * k * PANEL, out + col, n, n - col < PANEL ? n - col : PANEL);
    }
    return 0;
}

/* The greedy token of a few rows against the head without reading its fp32 weight whole: a screen in integers over
 * int8 codes of the weight and of the rows (a quarter of the weight's bytes; with AVX-512 VNNI one instruction per
 * 64 products), then the exact fp32 sums of the few panels that may hold the maximum.
 * Weight row j is codes q_j [K] times scale s_j (q_j = round(w_j / s_j), s_j = max |w_j| / 127), kept four k at a
 * time in panels ([ceil(N / 32)][ceil(K / 4)][32][4] int8, zeros past N and K), with sums[j] = sum_k q_jk, norm
 * n_j >= |w_j|_2 and bound c_j >= |w_j - s_j q_j|_2 + gamma_(K+1) |w_j|_2 (the builder's, rounded up). Row x is
 * codes p [K] times t (p = round(x / t), t = max |x| / 127: x^ = t p), with e >= |x - x^|_2 and X >= |x|_2, |x^|_2
 * (float64, rounded up). The screened logit a_j = (t s_j) (p . q_j) (the integer sum exact, two fp32 products) and
 * the exact one f_j (what `dsv4_panel_gemm` computes: fp32, k in order) satisfy
 *   |a_j - f_j| <= e n_j + X c_j + |a_j| 2^-20 + 2^-100 = b_j
 * (x.w_j - x^.w^_j = (x - x^).w_j + x^.(w_j - w^_j), Cauchy-Schwarz on each; f_j's rounding is within
 * gamma_K |x|_2 |w_j|_2; the products' rounding is relative, their underflow absolute; the slack covers evaluating
 * b_j and lo_j, hi_j in fp32). So lo_j = a_j - b_j <= f_j <= a_j + b_j = hi_j, and every f_j is below
 * L = max_j lo_j <= max_j f_j where hi_j < L: only the panels holding some hi_j >= L can hold the maximum (all of
 * its ties, so the first maximum too). Those panels are computed as `dsv4_panel_gemm` computes them (the same
 * tile, the same bits) and the first maximum among them is the row's greedy token.
 * ids [M] int64 = that token, or -1 where the row was not screened: zero, tiny, not finite or so large the sums
 * could overflow (X max_j |w_j|_2 > 1e30; `wmax` is that maximum), or more than `max_panels` panels left (the
 * caller computes those rows' logits whole); every row past K = 65,536 (the integer sums could overflow). Padding
 * columns past N have scale 0 and bound +inf. */
#define SCREEN_MAX_K 65536
typedef int32_t i32x16 __attribute__((vector_size(64)));
static inline i32x16 loadi16(const void *p) { i32x16 v; memcpy(&v, p, sizeof v); return v; }
static inline i32x16 splati16(int32_t s) { return (i32x16){s, s, s, s, s, s, s, s, s, s, s, s, s, s, s, s}; }
/* a's lanes where `keep` is all ones, b's elsewhere */
static inline f32x16 select16(i32x16 keep, f32x16 a, f32x16 b) {
    return (f32x16)((keep & (i32x16)a) | (~keep & (i32x16)b));
}
/* lanes of a where a > b, else of b (a NaN lane of a: b's) */
static inline f32x16 max16(f32x16 a, f32x16 b) { return select16(a > b, a, b); }
static inline f32x16 abs16(f32x16 a) { return (f32x16)((i32x16)a & 0x7fffffff); }
/* min(a, hi) and max(a, lo) lane by lane, as torch's clamp: a NaN lane of a stays NaN */
static inline f32x16 upper16(f32x16 a, f32x16 hi) { return select16(a > hi, hi, a); }
static inline f32x16 lower16(f32x16 a, f32x16 lo) { return select16(a < lo, lo, a); }

/* v rounded to bf16 in every lane (`bf16_bits`: half to even, a NaN kept quiet) */
static inline f32x16 round_bf16_16(f32x16 v) {
    const u32x16 u = (u32x16)v;
    const i32x16 nan = (i32x16)((u & 0x7fffffffu) > 0x7f800000u);
    const u32x16 even = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u, quiet = (u | 0x00400000u) & 0xffff0000u;
    return select16(nan, (f32x16)quiet, (f32x16)even);
}

/* v (|v| <= 448 or NaN) rounded to e4m3 in every lane, as `e4m3_round`: the step 2**(e-3) (2**-9 below 2**-6) from
 * v's exponent bits, v / step (a multiplication by the power of two's inverse) rounded half to even by adding and
 * taking away 1.5 * 2**23 (v / step is below 16), times the step, v's sign kept */
static inline f32x16 e4m3_round16(f32x16 v) {
    const i32x16 sign = (i32x16)v & (int32_t)0x80000000u;
    const f32x16 a = abs16(v), magic = splat16(12582912.0f);
    f32x16 step = (f32x16)((i32x16)a & 0x7f800000) * splat16(0.125f);
    step = lower16(step, splat16(0x1p-9f));
    const f32x16 inverse = (f32x16)(splati16(0x7f000000) - (i32x16)step);
    const f32x16 r = ((a * inverse + magic) - magic) * step;
    return (f32x16)((i32x16)r | sign);
}

/* buf [n] in place: each value over its block's power-of-two scale, clamped to +-448, rounded to e4m3 and times the
 * scale again (exact: an e4m3 value times a power of two), 16 lanes at a time */
static void fp8_dequant_block(float *buf, int64_t n, float scale) {
    const float inverse = 1.0f / scale; /* exact: scales are powers of two (x * inverse is x / scale) */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const f32x16 v = upper16(lower16(load16(buf + i) * splat16(inverse), splat16(-FP8_MAX)), splat16(FP8_MAX));
        store16(buf + i, e4m3_round16(v) * splat16(scale));
    }
    for (; i < n; i++) {
        float v = buf[i] * inverse;
        v = v > FP8_MAX ? FP8_MAX : (v < -FP8_MAX ? -FP8_MAX : v);
        buf[i] = e4m3_round(v) * scale;
    }
}

/* e^x in every lane, Cephes' expf: x = n ln2 + r (n the nearest integer to x / ln2, ln2 in two parts), a degree-6
 * polynomial in r, times 2^n from n's bits. Within 1 ulp of e^x for x in [-87, 88] (0.97 measured); 0 below -87
 * (the true value is under 2^-125 there), e^88 above 88, NaN stays NaN. The fp32 fast paths' exponential (mHC's
 * sigmoids and softmax, the experts' SiLU): libm's expf one lane at a time cost them as much as their products. */
static inline f32x16 exp16(f32x16 in) {
    const i32x16 nan = in != in, under = in < splat16(-87.0f);
    const f32x16 x = lower16(upper16(in, splat16(88.0f)), splat16(-87.0f));
    const f32x16 magic = splat16(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer, half to even */
    const f32x16 n = (x * splat16(1.44269504088896341f) + magic) - magic;
    f32x16 r = x - n * splat16(0.693359375f);
    r = r - n * splat16(-2.12194440e-4f);
    f32x16 p = splat16(1.9875691500e-4f);
    p = p * r + splat16(1.3981999507e-3f);
    p = p * r + splat16(8.3334519073e-3f);
    p = p * r + splat16(4.1665795894e-2f);
    p = p * r + splat16(1.6666665459e-1f);
    p = p * r + splat16(5.0000001201e-1f);
    p = p * (r * r) + r + splat16(1.0f);
    const i32x16 e = (__builtin_convertvector(n, i32x16) + 127) << 23; /* 2^n, n in -126 .. 127 */
    const f32x16 y = p * (f32x16)e;
    return (f32x16)(((i32x16)y & ~under & ~nan) | ((i32x16)in & nan));
}

/* out [n] = exp16 of x [n] (the tests measure its error against float64's exponential) */
int dsv4_exp(const float *x, float *out, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) {
        float lanes[16] = {0};
        const int64_t w = n - i < 16 ? n - i : 16;
        memcpy(lanes, x + i, sizeof(float) * (size_t)w);
        store16(lanes, exp16(load16(lanes)));
        memcpy(out + i, lanes, sizeof(float) * (size_t)w);
    }
    return 0;
}

static inline f32x16 sqrt16(f32x16 x) { /* vectorised by the compiler (correctly rounded, as sqrtf) */
    f32x16 r = x;
    for (int l = 0; l < 16; l++) r[l] = sqrtf(x[l]);
    return r;
}
static inline f32x16 sigmoid16(f32x16 x) { return splat16(1.0f) / (splat16(1.0f) + exp16(-x)); }

/* softplus(x) = log(1 + e^x) in every lane, as max(x, 0) + log1p(e^-|x|): the logarithm of u = 1 + y in [1, 2] by
 * its atanh series in s = (u - 1) / (u + 1) <= 1/3 to s^15, times y / (u - 1) (u's rounding taken back out, so
 * log1p(y) stays accurate for the smallest y). Its square root within 2.5 ulp of float64's for x in [-80, 30]
 * (torch's: 1.2); below -87 it is 0 (`exp16`'s flush; the true value is under 2^-125); x past 20 gives x, as
 * torch's. */
static inline f32x16 softplus16(f32x16 x) {
    const f32x16 one = splat16(1.0f), a = abs16(x);
    const f32x16 y = exp16(-a), u = one + y, s = (u - one) / (u + one), s2 = s * s;
    f32x16 series = splat16(1.0f / 15.0f);
    series = series * s2 + splat16(1.0f / 13.0f);
    series = series * s2 + splat16(1.0f / 11.0f);
    series = series * s2 + splat16(1.0f / 9.0f);
    series = series * s2 + splat16(1.0f / 7.0f);
    series = series * s2 + splat16(1.0f / 5.0f);
    series = series * s2 + splat16(1.0f / 3.0f);
    series = series * s2 + one;
    const f32x16 log_u = splat16(2.0f) * s * series;
    const i32x16 exact = u == one; /* y below half an ulp of 1: log1p(y) = y */
    const f32x16 lp = select16(exact, y, log_u * (y / (u - one)));
    const f32x16 sp = lower16(x, splat16(0.0f)) + lp;
    const i32x16 big = x > splat16(20.0f);
    return select16(big, x, sp);
}

/* g [n] = route * F.silu(min(g, L)) * clamp(u, -L, L) in place, 16 at a time with `exp16` (the fp32 experts'
 * activation) */
static inline void swiglu_act_row(float *g, const float *u, int64_t n, float limit, float route) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        const f32x16 a = upper16(load16(g + j), splat16(limit));
        const f32x16 b = lower16(upper16(load16(u + j), splat16(limit)), splat16(-limit));
        store16(g + j, splat16(route) * (a / (splat16(1.0f) + exp16(-a)) * b));
    }
    for (; j < n; j++) {
        float a = g[j], b = u[j];
        a = a > limit ? limit : a;
        b = b > limit ? limit : (b < -limit ? -limit : b);
        g[j] = route * (a / (1.0f + expf(-a)) * b);
    }
}

/* SwiGLU's activation over fp32 projections gate, up [rows, n] into gate, each row times its routing weight
 * (weights [rows], or NULL for 1): the shared expert's between its GEMMs, one pass instead of five torch ops */
int dsv4_swiglu_act(float *gate, const float *up, const float *weights, int64_t rows, int64_t n, float limit) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * n * 8))
    for (int64_t r = 0; r < rows; r++) swiglu_act_row(gate + r * n, up + r * n, n, limit, weights ? weights[r] : 1.0f);
    return 0;
}

/* ------------------------------------------------------------------------------------------ Hadamard */

/* One butterfly stage at distance h < 16 inside each 16-float vector of y [n]: lane i and its partner i ^ h become
 * a + b (the lower lane) and a - b (the upper), a the lower lane's value: the reference's two roundings, the partner
 * brought in by one shuffle. */
#define HADAMARD_LANES(h, mask)                                                                                     \
    for (int64_t at = 0; at < n; at += 16) {                                                                        \
        const f32x16 v = load16(y + at), partner = __builtin_shuffle(v, mask);                                      \
        const i32x16 upper = (lane & (h)) != 0;                                                                     \
        store16(y + at, (f32x16)((upper & (i32x16)(partner - v)) | (~upper & (i32x16)(v + partner))));             \
    }
INLINE void hadamard_rows(const void *x, void *out, const int bf16, int64_t rows, int64_t n, float norm) {
    const i32x16 lane = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
    const i32x16 xor1 = {1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14};
    const i32x16 xor2 = {2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13};
    const i32x16 xor4 = {4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11};
    const i32x16 xor8 = {8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7};
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * n * 8))
    for (int64_t r = 0; r < rows; r++) {
        float y[n + 16];
        for (int64_t i = 0; i < n; i++) y[i] = load(x, bf16, r * n + i);
        int64_t half = 1;
        if (n >= 16) { /* the first four stages inside the vectors, the rest between them */
            HADAMARD_LANES(1, xor1)
            HADAMARD_LANES(2, xor2)
            HADAMARD_LANES(4, xor4)
            HADAMARD_LANES(8, xor8)
            for (half = 16; half < n; half *= 2)
                for (int64_t lo = 0; lo < n; lo += 2 * half)
                    for (int64_t i = lo; i < lo + half; i += 16) {
                        const f32x16 a = load16(y + i), b = load16(y + i + half);
                        store16(y + i, a + b);
                        store16(y + i + half, a - b);
                    }
        }
        for (; half < n; half *= 2) /* a row shorter than a vector */
            for (int64_t lo = 0; lo < n; lo += 2 * half)
                for (int64_t i = lo; i < lo + half; i++) {
                    const float a = y[i], b = y[i + half];
                    y[i] = a + b;
                    y[i + half] = a - b;
                }
        for (int64_t i = 0; i < n; i++) store(out, bf16, r * n + i, y[i] * norm);
    }
}
#undef HADAMARD_LANES

/* The normalised Walsh-Hadamard transform of rows x [rows, n] (n a power of two) into out, x's dtype: the
 * reference's butterflies (a + b, a - b at distance 1, 2, 4, ...) in fp32, then times fp32(1/sqrt(n)); the stages
 * 16 lanes at a time (`hadamard_rows`) where the rows allow. */
int dsv4_hadamard(const void *x, void *out, int bf16, int64_t rows, int64_t n, float norm) {
    if (bf16) hadamard_rows(x, out, 1, rows, n, norm);
    else hadamard_rows(x, out, 0, rows, n, norm);
    return 0;
}

/* d0[r], d1[r] (r < M) = the integer sums p . q_j of row r's codes (packed four to an int32 in xw [M, K4]) with a
 * panel's 32 columns */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define SCREEN_OFFSET 128 /* the rows' codes are stored p + 128: vpdpbusd multiplies unsigned bytes by signed ones */
#define SCREEN_SUMS(M)                                                                                              \
    __m512i s0[M], s1[M];                                                                                           \
    for (int r = 0; r < M; r++) s0[r] = s1[r] = _mm512_setzero_si512();                                             \
    for (int64_t j = 0; j < k4; j++) {                                                                              \
        __builtin_prefetch(codes + (j + 8) * 4 * PANEL);                                                            \
        __builtin_prefetch(codes + (j + 8) * 4 * PANEL + 64);                                                       \
        const __m512i w0 = _mm512_loadu_si512(codes + j * 4 * PANEL);                                               \
        const __m512i w1 = _mm512_loadu_si512(codes + j * 4 * PANEL + 64);                                         \
        for (int r = 0; r < M; r++) {                                                                               \
            const __m512i v = _mm512_set1_epi32(xw[r * k4 + j]);                                                    \
            s0[r] = _mm512_dpbusd_epi32(s0[r], v, w0);                                                              \
            s1[r] = _mm512_dpbusd_epi32(s1[r], v, w1);                                                              \
        }                                                                                                           \
    }                                                                                                               \
    i32x16 d0[M], d1[M];                                                                                            \
    for (int r = 0; r < M; r++) {                                                                                   \
        d0[r] = (i32x16)s0[r] - splati16(SCREEN_OFFSET) * loadi16(sums);                                           \
        d1[r] = (i32x16)s1[r] - splati16(SCREEN_OFFSET) * loadi16(sums + 16);                                      \
    }
#else
#define SCREEN_OFFSET 0
/* products of 8-bit codes summed in fp32 over at most 1,024 k are integers below 2^24: exact, in any order */
#define SCREEN_BLOCK 256
#define SCREEN_SUMS(M)                                                                                              \
    i32x16 d0[M], d1[M];                                                                                            \
    for (int r = 0; r < M; r++) d0[r] = d1[r] = splati16(0);                                                        \
    for (int64_t from = 0; from < k4; from += SCREEN_BLOCK) {                                                       \
        const int64_t to = k4 - from < SCREEN_BLOCK ? k4 : from + SCREEN_BLOCK;                                     \
        f32x16 a0[M], a1[M];                                                                                        \
        for (int r = 0; r < M; r++) a0[r] = a1[r] = splat16(0.0f);                                                  \
        for (int64_t j = from; j < to; j++) {                                                                       \
            const u32x16 w0 = (u32x16)loadi16(codes + j * 4 * PANEL);                                               \
            const u32x16 w1 = (u32x16)loadi16(codes + j * 4 * PANEL + 64);                                          \
            f32x16 b0[4], b1[4]; /* byte i of every lane */                                                        \
            for (int i = 0; i < 4; i++) {                                                                           \
                b0[i] = __builtin_convertvector((i32x16)(w0 << (24 - 8 * i)) >> 24, f32x16);                        \
                b1[i] = __builtin_convertvector((i32x16)(w1 << (24 - 8 * i)) >> 24, f32x16);                        \
            }                                                                                                       \
            for (int r = 0; r < M; r++)                                                                             \
                for (int i = 0; i < 4; i++) {                                                                       \
                    const f32x16 v = splat16(xq[(r * k4 + j) * 4 + i]);                                            \
                    a0[r] += b0[i] * v;                                                                             \
                    a1[r] += b1[i] * v;                                                                             \
                }                                                                                                   \
        }                                                                                                           \
        for (int r = 0; r < M; r++) {                                                                               \
            d0[r] += __builtin_convertvector(a0[r], i32x16);                                                        \
            d1[r] += __builtin_convertvector(a1[r], i32x16);                                                        \
        }                                                                                                           \
    }
#endif
#define SCREEN_TILE(M)                                                                                              \
    static void screen_tile_##M(const int32_t *xw, const float *xq, int64_t k4, const int8_t *codes,               \
                                const int32_t *sums, const float *scale, const float *norm, const float *bound,      \
                                const float *tx, const float *ex, const float *nx, float *lows, float *highs,        \
                                int64_t cols) {                                                                     \
        SCREEN_SUMS(M)                                                                                              \
        const f32x16 sc0 = load16(scale), sc1 = load16(scale + 16), n0 = load16(norm), n1 = load16(norm + 16);      \
        const f32x16 c0 = load16(bound), c1 = load16(bound + 16);                                                   \
        const f32x16 rel = splat16(0x1p-20f), floor_ = splat16(0x1p-100f);                                          \
        for (int r = 0; r < M; r++) {                                                                               \
            const f32x16 t = splat16(tx[r]), e = splat16(ex[r]), big = splat16(nx[r]);                             \
            const f32x16 p0 = (t * sc0) * __builtin_convertvector(d0[r], f32x16);                                   \
            const f32x16 p1 = (t * sc1) * __builtin_convertvector(d1[r], f32x16);                                   \
            const f32x16 b0 = e * n0 + big * c0 + abs16(p0) * rel + floor_;                                         \
            const f32x16 b1 = e * n1 + big * c1 + abs16(p1) * rel + floor_;                                         \
            store16(lows + 16 * r, max16(p0 - b0, max16(p1 - b1, load16(lows + 16 * r))));                          \
            float hi[PANEL], best = -INFINITY;                                                                      \
            if (cols == PANEL) { /* a whole panel: the lanes' maxima first */                                        \
                store16(hi, max16(p0 + b0, p1 + b1));                                                               \
                for (int c = 0; c < 16; c++) best = hi[c] > best ? hi[c] : best;                                    \
            } else {                                                                                                \
                store16(hi, p0 + b0);                                                                               \
                store16(hi + 16, p1 + b1);                                                                          \
                for (int64_t c = 0; c < cols; c++) best = hi[c] > best ? hi[c] : best;                              \
            }                                                                                                       \
            highs[r] = best;                                                                                        \
        }                                                                                                           \
    }
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")
#endif
SCREEN_TILE(1)
SCREEN_TILE(2)
SCREEN_TILE(4)
SCREEN_TILE(8)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* A row's codes p, packed four to an int32 in words [K4] (p + SCREEN_OFFSET as bytes) and as floats [4 K4] (zeros
 * past K), its scale t, e >= |x - x^|_2 and X >= |x|_2, |x^|_2 (NaN where the row is not screened) */
static void screen_row(const float *x, int64_t k, double wmax, int32_t *words, float *floats, float *t, float *e,
                       float *big) {
    const int64_t k4 = (k + 3) / 4;
    float amax = 0.0f;
    int finite = 1;
    for (int64_t j = 0; j < k; j++) {
        const float v = fabsf(x[j]);
        finite &= v <= 3.4028234663852886e38f;
        amax = v > amax ? v : amax;
    }
    const float scale = finite && amax > 0.0f ? amax / 127.0f : 0.0f;
    double xx = 0.0, hh = 0.0, ee = 0.0;
    uint8_t bytes[4];
    for (int64_t w = 0; w < k4; w++) {
        for (int i = 0; i < 4; i++) {
            const int64_t j = 4 * w + i;
            int p = 0;
            if (j < k && scale > 0.0f) {
                const float q = nearbyintf(x[j] / scale);
                p = (int)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
                const double v = x[j], h = (double)scale * p; /* exact: 24 bits times 8 */
                xx += v * v;
                hh += h * h;
                ee += (v - h) * (v - h);
            }
            bytes[i] = (uint8_t)(p + SCREEN_OFFSET);
            floats[j] = (float)p;
        }
        memcpy(words + w, bytes, 4);
    }
    const double nx = sqrt(xx > hh ? xx : hh) * (1.0 + 0x1p-20);
    *t = scale;
    *e = (float)(sqrt(ee) * (1.0 + 0x1p-20));
    *big = scale > 0.0f && nx > 1e-20 && nx * wmax <= 1e30 ? (float)nx : NAN; /* NaN: not screened */
}

int dsv4_head_greedy(const float *x, int64_t m, int64_t k, const int8_t *codes, const int32_t *sums,
                     const float *scales, const float *norms, const float *bounds, float wmax, const float *panels,
                     int64_t n, int64_t max_panels, int64_t *ids) {
    const int64_t count = (n + PANEL - 1) / PANEL, k4 = (k + 3) / 4;
    if (k > SCREEN_MAX_K) {
        for (int64_t r = 0; r < m; r++) ids[r] = -1;
        return 0;
    }
    int32_t *words = malloc(sizeof(int32_t) * (size_t)(m * k4));    /* [M, K4] the rows' codes, packed */
    float *prep = malloc(sizeof(float) * (size_t)(m * (3 + 4 * k4))); /* each row's t, e, X; codes [M, 4 K4] */
    float *highs = malloc(sizeof(float) * (size_t)(m * count));   /* [M, panels]: each panel's largest hi */
    float *lows = malloc(sizeof(float) * (size_t)(16 * m));       /* [M, 16] lanes of the largest lo */
    if (!words || !prep || !highs || !lows) { free(words); free(prep); free(highs); free(lows); return -1; }
    float *tx = prep, *ex = prep + m, *nx = prep + 2 * m, *codes_f = prep + 3 * m;
    for (int64_t r = 0; r < m; r++) {
        screen_row(x + r * k, k, wmax, words + r * k4, codes_f + r * k4 * 4, tx + r, ex + r, nx + r);
        store16(lows + 16 * r, splat16(-INFINITY));
    }
    int failed = 0;
    #pragma omp parallel num_threads(split_threads(m * k * n / 4)) reduction(|:failed)
    {
        float *mine = malloc(sizeof(float) * (size_t)(16 * m)); /* this thread's lows */
        if (!mine) failed = 1;
        else for (int64_t r = 0; r < m; r++) store16(mine + 16 * r, splat16(-INFINITY));
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < count; p++) {
            if (failed) continue;
            const int64_t col = p * PANEL, cols = n - col < PANEL ? n - col : PANEL;
            const int8_t *c = codes + p * k4 * 4 * PANEL;
            for (int64_t r = 0; r < m;) {
                const int64_t left = m - r;
                const int64_t step = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
                float h[8];
#define SCREEN_CALL(M) screen_tile_##M(words + r * k4, codes_f + r * k4 * 4, k4, c, sums + col, scales + col,     \
                                       norms + col, bounds + col, \
                                       tx + r, ex + r, nx + r, mine + 16 * r, h, cols)
                if (step == 8) SCREEN_CALL(8);
                else if (step == 4) SCREEN_CALL(4);
                else if (step == 2) SCREEN_CALL(2);
                else SCREEN_CALL(1);
#undef SCREEN_CALL
                for (int64_t i = 0; i < step; i++) highs[(r + i) * count + p] = h[i];
                r += step;
            }
        }
        #pragma omp critical
        if (mine)
            for (int64_t r = 0; r < m; r++)
                store16(lows + 16 * r, max16(load16(mine + 16 * r), load16(lows + 16 * r)));
        free(mine);
    }
    if (failed) { free(words); free(prep); free(highs); free(lows); return -1; }
    #pragma omp parallel for schedule(static) num_threads(split_threads(m > 1 ? m * max_panels * k * PANEL : 0))
    for (int64_t r = 0; r < m; r++) {
        ids[r] = -1;
        if (!(nx[r] == nx[r])) continue;
        float bar = -INFINITY;
        for (int i = 0; i < 16; i++) bar = lows[16 * r + i] > bar ? lows[16 * r + i] : bar;
        if (!(bar > -INFINITY && bar < INFINITY)) continue; /* a NaN or infinite screen: not screened */
        int64_t left = 0;
        for (int64_t p = 0; p < count; p++) left += highs[r * count + p] >= bar;
        if (left > max_panels) continue;
        float best = -INFINITY, tile[PANEL];
        int64_t at = -1;
        for (int64_t p = 0; p < count; p++) {
            if (!(highs[r * count + p] >= bar)) continue;
            const int64_t col = p * PANEL, cols = n - col < PANEL ? n - col : PANEL;
            head_tile_1(x + r * k, k, panels + p * k * PANEL, tile, PANEL, cols);
            for (int64_t c = 0; c < cols; c++)
                if (at < 0 || tile[c] > best) { best = tile[c]; at = col + c; }
        }
        ids[r] = at;
    }
    free(words); free(prep); free(highs); free(lows);
    return 0;
}

/* x [K] in place as act_quant quantises it (e4m3 per 128-block, power-of-two scales) and dequantised: exact in
 * fp32, an e4m3 value times a power of two */
static void act_dequant_row(float *x, int64_t k) {
    for (int64_t lo = 0; lo < k; lo += X_BLOCK) {
        const int64_t n = k - lo < X_BLOCK ? k - lo : X_BLOCK;
        fp8_dequant_block(x + lo, n, block_scale(x + lo, n, ACT_AMAX_FLOOR, 1.0f / FP8_MAX));
    }
}

/* x [n] rounded to bf16 in place (`round_to`) */
static void round_bf16_row(float *x, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) store16(x + i, round_bf16_16(load16(x + i)));
    for (; i < n; i++) x[i] = round_to(1, x[i]);
}

/* Experts over a batch, their weights in panels (w1, w3 [ceil(I / 32)][D][32], w2 [ceil(D / 32)][I][32]): out
 * [T, D] fp32 = each token's experts ids [T, topk] that `panels` holds (3 pointers per expert, w1 w3 w2; 0 for an
 * expert not run here), weighted by weights [T, topk] before w2, added into its row in increasing expert id (the
 * reference's order; a repeated id in slot order). x [T, D] is fp32 or bf16 (x_bf16). Float experts (quant 0)
 * multiply x as it is; quantised ones (quant 1: FP8 / FP4 weights with their block scales folded in, exactly) run
 * the reference's chain in exact numerics: x and the hidden activation quantised as act_quant does (dequantised:
 * the same products as the block-scaled GEMMs, summed over k in order instead of block by block, as BLAS's GEMMs
 * of the folded operands sum them in an order of their own), each projection rounded to x's dtype as the
 * reference's linear returns it. The routed rows are grouped by expert (token order inside) and run eight at a
 * time, so an expert's panels are read once for eight rows instead of once per row; each row's sums run over k in
 * order whatever its group, so a token's result does not depend on its batch. The groups split between threads
 * in contiguous runs (static): each thread then runs whole experts, their groups one after another, so an expert's
 * panels come from memory into one core's L2 once, where groups handed out as they come made both cores fetch most
 * experts (a prefill's experts are cold: 256 tokens over 16 experts of 256 x 128, 6.2 -> 5.2 ms for six layers).
 * Then the tokens' sums. */
#define EXPERT_ROWS 8
int dsv4_panel_experts(const void *x, int x_bf16, int quant, float *out, int64_t t, int64_t topk, const int64_t *ids,
                       const float *weights, int64_t n_experts, const int64_t *panels, int64_t d, int64_t inter,
                       float limit) {
    const int64_t n = t * topk;
    int64_t *count = calloc((size_t)n_experts + 1, sizeof(int64_t));
    int64_t *order = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));   /* routed rows grouped by expert */
    int64_t *tiles = malloc(sizeof(int64_t) * (size_t)(n ? n : 1));   /* each group's first row in `order` */
    float *routed = malloc(sizeof(float) * (size_t)(n * d + 1));     /* each routed row's output */
    if (!count || !order || !tiles || !routed) { free(count); free(order); free(tiles); free(routed); return -1; }
    for (int64_t a = 0; a < n; a++)
        if (ids[a] >= 0 && ids[a] < n_experts && panels[3 * ids[a]]) count[ids[a] + 1]++;
    for (int64_t e = 0; e < n_experts; e++) count[e + 1] += count[e]; /* count[e]: expert e's first row */
    int64_t n_tiles = 0;
    for (int64_t e = 0; e < n_experts; e++)
        for (int64_t at = count[e]; at < count[e + 1]; at += EXPERT_ROWS) tiles[n_tiles++] = at;
    {
        int64_t *next = malloc(sizeof(int64_t) * (size_t)(n_experts ? n_experts : 1));
        if (!next) { free(count); free(order); free(tiles); free(routed); return -1; }
        memcpy(next, count, sizeof(int64_t) * (size_t)n_experts);
        for (int64_t a = 0; a < n; a++)
            if (ids[a] >= 0 && ids[a] < n_experts && panels[3 * ids[a]]) order[next[ids[a]]++] = a;
        free(next);
    }
    float *xq = quant ? malloc(sizeof(float) * (size_t)(t * d + 1)) : NULL; /* the tokens quantised, once each */
    if (quant && !xq) { free(count); free(order); free(tiles); free(routed); return -1; }
    int failed = 0;
    if (xq) {
        #pragma omp parallel for schedule(static) num_threads(split_threads(t * d * 4))
        for (int64_t r = 0; r < t; r++) {
            for (int64_t j = 0; j < d; j++) xq[r * d + j] = load(x, x_bf16, r * d + j);
            act_dequant_row(xq + r * d, d);
        }
    }
    #pragma omp parallel num_threads(split_threads(count[n_experts] * 3 * d * inter)) reduction(|:failed)
    {
        float *rows = malloc(sizeof(float) * (size_t)(EXPERT_ROWS * d));
        float *gate = malloc(sizeof(float) * (size_t)(EXPERT_ROWS * inter));
        float *up = malloc(sizeof(float) * (size_t)(EXPERT_ROWS * inter));
        float *y = malloc(sizeof(float) * (size_t)(EXPERT_ROWS * d));
        if (!rows || !gate || !up || !y) failed = 1;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n_tiles; i++) {
            if (failed) continue;
            const int64_t lo = tiles[i], e = ids[order[lo]];
            const int64_t m = count[e + 1] - lo < EXPERT_ROWS ? count[e + 1] - lo : EXPERT_ROWS;
            const float *w1 = (const float *)panels[3 * e], *w3 = (const float *)panels[3 * e + 1];
            const float *w2 = (const float *)panels[3 * e + 2];
            for (int64_t r = 0; r < m; r++) {
                const int64_t token = order[lo + r] / topk;
                if (quant) memcpy(rows + r * d, xq + token * d, sizeof(float) * (size_t)d);
                else for (int64_t j = 0; j < d; j++) rows[r * d + j] = load(x, x_bf16, token * d + j);
            }
            panels_product(rows, m, d, w1, inter, gate);
            panels_product(rows, m, d, w3, inter, up);
            if (quant && x_bf16) {
                round_bf16_row(gate, m * inter);
                round_bf16_row(up, m * inter);
            }
            for (int64_t r = 0; r < m; r++) {
                swiglu_act_row(gate + r * inter, up + r * inter, inter, limit, weights[order[lo + r]]);
                if (!quant) continue;
                if (x_bf16) round_bf16_row(gate + r * inter, inter);
                act_dequant_row(gate + r * inter, inter);
            }
            panels_product(gate, m, inter, w2, d, y);
            if (quant && x_bf16) round_bf16_row(y, m * d);
            for (int64_t r = 0; r < m; r++) memcpy(routed + order[lo + r] * d, y + r * d, sizeof(float) * (size_t)d);
        }
        free(rows); free(gate); free(up); free(y);
    }
    if (!failed) {
        #pragma omp parallel for schedule(static) num_threads(split_threads(n * d))
        for (int64_t r = 0; r < t; r++) {
            float *o = out + r * d;
            for (int64_t j = 0; j < d; j++) o[j] = 0.0f;
            for (int64_t e = 0; e < n_experts; e++) { /* the row's experts in increasing id, slots in order */
                if (!panels[3 * e]) continue;
                for (int64_t slot = 0; slot < topk; slot++) {
                    if (ids[r * topk + slot] != e) continue;
                    const float *src = routed + (r * topk + slot) * d;
                    for (int64_t j = 0; j < d; j++) o[j] += src[j];
                }
            }
        }
    }
    free(count); free(order); free(tiles); free(routed); free(xq);
    return failed ? -1 : 0;
}

/* ------------------------------------------------------------------------------------------ indexer top-k */

/* Whether entry a (score sa) ranks before entry b: the greater score first, a tie to the earlier entry, NaN above
 * every number (a stable descending sort's order, torch's included) */
static inline int ranks_before(float sa, int64_t a, float sb, int64_t b) {
    const int na = sa != sa, nb = sb != sb;
    if (na | nb) return na && (!nb || a < b);
    return sa > sb || (sa == sb && a < b);
}

/* heap [n] of entry ids whose root ranks last: move the id at `at` down to its place */
static void sift_down(int64_t *heap, int64_t n, int64_t at, const float *v) {
    for (;;) {
        int64_t worst = at, l = 2 * at + 1, r = l + 1;
        if (l < n && ranks_before(v[heap[worst]], heap[worst], v[heap[l]], heap[l])) worst = l;
        if (r < n && ranks_before(v[heap[worst]], heap[worst], v[heap[r]], heap[r])) worst = r;
        if (worst == at) return;
        const int64_t t = heap[at];
        heap[at] = heap[worst];
        heap[worst] = t;
        at = worst;
    }
}

/* A row that sees at most this many entries ranks them by counting (O(m^2) comparisons, vectorised), which beats
 * the heap's O(m log k) branchy sifts on a prefill's rows (a short context's compressed entries, k about m) */
#define RANK_ENTRIES 256

/* rank [m] of the entries 0 .. m-1 of v (no NaN among them): how many entries rank before each (a greater score,
 * or an equal one earlier); with a total order these are a permutation of 0 .. m-1 */
static void count_ranks(const float *v, int64_t m, int32_t *rank) {
    for (int64_t j = 0; j < m; j++) {
        const float vj = v[j];
        int32_t before = 0;
        for (int64_t i = 0; i < j; i++) before += v[i] >= vj;
        for (int64_t i = j + 1; i < m; i++) before += v[i] > vj;
        rank[j] = before;
    }
}

/* The indexer's selection for rows of scores [R, N] (x's dtype), row r seeing entries 0 .. visible[r]-1: the
 * others become -inf in place; top [R, k] gets the k best entries by descending score, ties to the earlier
 * entry, and -1 for the picks past visible[r]; top_scores [R, k] their scores (the same picks and order as a
 * stable sort's first k). A hidden entry (-inf, after every seen one) never ranks before a seen one, so only the
 * m seen entries are ranked and the hidden ones follow in index order: by counting while m is small and no NaN is
 * among them, else a heap of the k best so far (its root the one ranking last) then heapsort, O(N log k). */
INLINE int index_topk_rows(void *scores, const int bf16, int64_t rows, int64_t n, const int64_t *visible, int64_t k,
                           int64_t *top, void *top_scores) {
    int failed = 0;
    #pragma omp parallel num_threads(split_threads(rows * n * 16)) reduction(|:failed)
    {
        float *v = malloc(sizeof(float) * (size_t)(n ? n : 1));
        int64_t *heap = malloc(sizeof(int64_t) * (size_t)(k ? k : 1));
        int32_t *rank = malloc(sizeof(int32_t) * (size_t)(n ? n : 1));
        if (!v || !heap || !rank) failed = 1;
        #pragma omp for schedule(static, 8) /* interleaved: a causal chunk's late rows see more entries */
        for (int64_t r = 0; r < rows; r++) {
            if (failed) continue;
            const int64_t seen = visible[r] < 0 ? 0 : visible[r] < n ? visible[r] : n;
            int nan = 0;
            for (int64_t j = 0; j < n; j++) {
                if (j >= seen) store(scores, bf16, r * n + j, -INFINITY);
                v[j] = load(scores, bf16, r * n + j);
                nan |= v[j] != v[j];
            }
            if (!nan && seen <= RANK_ENTRIES) {
                count_ranks(v, seen, rank);
                for (int64_t j = 0; j < seen; j++) {
                    if (rank[j] < k) {
                        top[r * k + rank[j]] = j;
                        store(top_scores, bf16, r * k + rank[j], v[j]);
                    }
                }
                for (int64_t i = seen; i < k; i++) { /* hidden entries, in index order */
                    top[r * k + i] = -1;
                    store(top_scores, bf16, r * k + i, v[i]);
                }
                continue;
            }
            const int64_t candidates = k <= seen ? seen : n;
            int64_t size = 0;
            for (int64_t j = 0; j < candidates; j++) {
                if (size < k) { /* sift the new id up from the last leaf */
                    int64_t at = size++;
                    heap[at] = j;
                    while (at > 0) {
                        const int64_t up = (at - 1) / 2;
                        if (!ranks_before(v[heap[up]], heap[up], v[heap[at]], heap[at])) break;
                        const int64_t t = heap[at];
                        heap[at] = heap[up];
                        heap[up] = t;
                        at = up;
                    }
                } else if (k > 0 && ranks_before(v[j], j, v[heap[0]], heap[0])) {
                    heap[0] = j;
                    sift_down(heap, k, 0, v);
                }
            }
            for (int64_t i = k - 1; i >= 0; i--) { /* the root ranks last: pop it into the last free place */
                const int64_t id = heap[0];
                heap[0] = heap[i];
                sift_down(heap, i, 0, v);
                top[r * k + i] = id < seen ? id : -1;
                store(top_scores, bf16, r * k + i, v[id]);
            }
        }
        free(v);
        free(heap);
        free(rank);
    }
    return failed ? -1 : 0;
}

int dsv4_index_topk(void *scores, int bf16, int64_t rows, int64_t n, const int64_t *visible, int64_t k,
                    int64_t *top, void *top_scores) {
    if (k > n || k < 0) return -1;
    return bf16 ? index_topk_rows(scores, 1, rows, n, visible, k, top, top_scores)
                : index_topk_rows(scores, 0, rows, n, visible, k, top, top_scores);
}

/* ------------------------------------------------------------------------------------------ RMSNorm */

/* torch's sum of `size` units of `lanes` floats each (SumKernel.cpp's row_sum): four interleaved partial sums,
 * each a cascade of four levels of 2**max(4, ceil(log2(size / 4)) / 4) units, then the leftover units into the
 * first, then the four added in order. out [lanes]. */
INLINE void cascade_units(const float *x, int64_t size, const int lanes, float *out) {
    float level[4][4][16]; /* [level][partial][lane] */
    const int64_t quads = size / 4;
    int log2q = 0;
    while (((int64_t)1 << log2q) < quads) log2q++;
    const int power = log2q / 4 > 4 ? log2q / 4 : 4;
    const int64_t step = (int64_t)1 << power;
    const int deep = step <= quads; /* the upper levels hold something only past one step (a short row: not) */
    memset(level, 0, (deep ? 4 : 1) * sizeof level[0]);
    int64_t i = 0;
    for (; i + step <= quads;) {
        for (int64_t j = 0; j < step; ++j, ++i)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++) level[0][k][l] += x[(i * 4 + k) * lanes + l];
        for (int j = 1; j < 4; ++j) {
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++) {
                    level[j][k][l] += level[j - 1][k][l];
                    level[j - 1][k][l] = 0.0f;
                }
            if ((i & ((step - 1) << (j * power))) != 0) break;
        }
    }
    for (; i < quads; ++i)
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < lanes; l++) level[0][k][l] += x[(i * 4 + k) * lanes + l];
    if (deep) {
        for (int j = 1; j < 4; ++j)
            for (int k = 0; k < 4; k++)
                for (int l = 0; l < lanes; l++) level[0][k][l] += level[j][k][l];
    } else { /* adding the three zero levels: x + 0 is x, but -0.0 becomes +0.0 */
        for (int k = 0; k < 4; k++)
            for (int l = 0; l < lanes; l++) level[0][k][l] += 0.0f;
    }
    for (int64_t u = quads * 4; u < size; ++u)
        for (int l = 0; l < lanes; l++) level[0][0][l] += x[u * lanes + l];
    for (int k = 1; k < 4; k++)
        for (int l = 0; l < lanes; l++) level[0][0][l] += level[0][k][l];
    for (int l = 0; l < lanes; l++) out[l] = level[0][0][l];
}

/* torch.sum over a contiguous row of n floats, vector width `lanes` (8 or 16): whole vectors by the cascade, the
 * tail elements in order, then the lanes in order; a row shorter than a vector by the cascade over elements */
static float torch_row_sum(const float *x, int64_t n, int lanes) {
    float acc[16];
    if (n < lanes) {
        cascade_units(x, n, 1, acc);
        return 0.0f + acc[0];
    }
    const int64_t vectors = n / lanes;
    if (lanes == 16) cascade_units(x, vectors, 16, acc); /* literal widths: the lane loops vectorise */
    else cascade_units(x, vectors, 8, acc);
    float sum = 0.0f;
    for (int64_t k = vectors * lanes; k < n; ++k) sum += x[k];
    for (int l = 0; l < lanes; l++) sum += acc[l];
    return 0.0f + sum;
}

/* out [rows, n] (x's dtype) = weight * (x * (1 / sqrt(sum(x^2) / n + eps))) in fp32, x [rows, n]: the reference's
 * torch ops element for element, its mean torch's summation order (`lanes` found by the backend's self-test); each
 * row's factor 1 / sqrt(...) also into inv_out [rows] unless it is NULL (training keeps it for the backward) */
INLINE void rms_norm_rows(const void *x, void *out, const int bf16, int64_t rows, int64_t n, const float *weight,
                          float eps, int lanes, float *inv_out, int64_t half, const float *cos_, const float *sin_,
                          int64_t group) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * n))
    for (int64_t r = 0; r < rows; r++) {
        float xf[n + 1], sq[n + 1];
        for (int64_t i = 0; i < n; i++) {
            xf[i] = load(x, bf16, r * n + i);
            sq[i] = xf[i] * xf[i];
        }
        const float inv = 1.0f / sqrtf(torch_row_sum(sq, n, lanes) / (float)n + eps);
        if (inv_out) inv_out[r] = inv;
        for (int64_t i = 0; i < n; i++) store(out, bf16, r * n + i, weight[i] * (xf[i] * inv));
        if (half) { /* the row's last 2 half dims rotated from what was stored, as `rope_rows` rotates them */
            const float *c = cos_ + (r / group) * half, *s = sin_ + (r / group) * half;
            for (int64_t i = 0; i < half; i++) {
                const int64_t at = r * n + n - 2 * half + 2 * i;
                const float a = load(out, bf16, at), b = load(out, bf16, at + 1);
                store(out, bf16, at, a * c[i] - b * s[i]);
                store(out, bf16, at + 1, a * s[i] + b * c[i]);
            }
        }
    }
}

int dsv4_rms_norm(const void *x, void *out, int bf16, int64_t rows, int64_t n, const float *weight, float eps,
                  int lanes, float *inv_out) {
    if (lanes != 8 && lanes != 16) return -1;
    if (bf16) rms_norm_rows(x, out, 1, rows, n, weight, eps, lanes, inv_out, 0, NULL, NULL, 1);
    else rms_norm_rows(x, out, 0, rows, n, weight, eps, lanes, inv_out, 0, NULL, NULL, 1);
    return 0;
}

/* `dsv4_rms_norm`, then each row's last 2 half dims rotated as `dsv4_rope` rotates them (cos / sin [rows / group,
 * half], not inverse): the queries' normalisation and RoPE in one pass, the same bits as the two calls */
int dsv4_rms_norm_rope(const void *x, void *out, int bf16, int64_t rows, int64_t n, const float *weight, float eps,
                       int lanes, int64_t half, const float *cos_, const float *sin_, int64_t group) {
    if ((lanes != 8 && lanes != 16) || half < 1 || 2 * half > n || group < 1) return -1;
    if (bf16) rms_norm_rows(x, out, 1, rows, n, weight, eps, lanes, NULL, half, cos_, sin_, group);
    else rms_norm_rows(x, out, 0, rows, n, weight, eps, lanes, NULL, half, cos_, sin_, group);
    return 0;
}

/* inv [rows] = 1 / sqrt(sum(x^2) / n + eps) of rows x [rows, n]: mHC's weightless RMS factor (`hc_mixes`), the
 * reference's rounding as in `dsv4_rms_norm` */
INLINE void rms_factor_rows(const void *x, float *inv, const int bf16, int64_t rows, int64_t n, float eps,
                            int lanes) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * n))
    for (int64_t r = 0; r < rows; r++) {
        float sq[n + 1];
        for (int64_t i = 0; i < n; i++) {
            const float v = load(x, bf16, r * n + i);
            sq[i] = v * v;
        }
        inv[r] = 1.0f / sqrtf(torch_row_sum(sq, n, lanes) / (float)n + eps);
    }
}

int dsv4_rms_factor(const void *x, float *inv, int bf16, int64_t rows, int64_t n, float eps, int lanes) {
    if (lanes != 8 && lanes != 16) return -1;
    if (bf16) rms_factor_rows(x, inv, 1, rows, n, eps, lanes);
    else rms_factor_rows(x, inv, 0, rows, n, eps, lanes);
    return 0;
}

/* ------------------------------------------------------------------------------------------ RoPE */

/* The loops of the kernels below with the dtype a constant: called with a literal 0 or 1 and inlined, each
 * becomes a loop without a branch per element, which the compiler vectorises (rope, hc_post and hc_collapse ran
 * 2-3x slower with the dtype tested per element). */

/* out = x [rows, width] (x's dtype) with each row's last 2 * half dims rotated by interleaved pairs, the rest
 * copied (out may be x: each pair is read before it is written): the complex fp32 product torch computes,
 * (a c - b s, a s + b c), each product rounded before the add, then cast to x's dtype; s negated for the inverse
 * rotation. cos / sin [rows / group, half] fp32: a row of them
 * serves `group` consecutive rows of x (a query's heads). */
INLINE void rope_rows(const void *x, void *out, const int bf16, int64_t rows, int64_t width, int64_t half,
                      const float *cos_, const float *sin_, int64_t group, int inverse) {
    const int64_t nope = width - 2 * half;
    const size_t elem = bf16 ? 2 : 4;
    #pragma omp parallel for schedule(static) num_threads(split_threads(rows * width))
    for (int64_t r = 0; r < rows; r++) {
        const float *c = cos_ + (r / group) * half, *s = sin_ + (r / group) * half;
        if (out != x) /* in place (out == x): the pass-through dims are already there */
            memcpy((char *)out + (size_t)(r * width) * elem, (const char *)x + (size_t)(r * width) * elem,
                   (size_t)nope * elem);
        for (int64_t i = 0; i < half; i++) {
            const int64_t at = r * width + nope + 2 * i;
            const float a = load(x, bf16, at), b = load(x, bf16, at + 1);
            const float sn = inverse ? -s[i] : s[i];
            store(out, bf16, at, a * c[i] - b * sn);
            store(out, bf16, at + 1, a * sn + b * c[i]);
        }
    }
}

int dsv4_rope(const void *x, void *out, int bf16, int64_t rows, int64_t width, int64_t half, const float *cos_,
              const float *sin_, int64_t group, int inverse) {
    if (bf16) rope_rows(x, out, 1, rows, width, half, cos_, sin_, group, inverse);
    else rope_rows(x, out, 0, rows, width, half, cos_, sin_, group, inverse);
    return 0;
}

/* ------------------------------------------------------------------------------------------ mHC write-back */

/* new [T, h, d] (x's dtype) = post[k] * out[i] + sum_j comb[j][k] * x[j][i] for each token: out [T, d] and
 * x [T, h, d] in x's dtype, post [T, h] and comb [T, h, h] fp32; the products rounded to fp32 and added over j
 * in order, as the reference does. */
INLINE void hc_post_rows(const void *out, const void *x, void *dst, const int bf16, int64_t t, int64_t h, int64_t d,
                         const float *post, const float *comb) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(t * h * h * d))
    for (int64_t r = 0; r < t; r++) {
        float mixed[h * d + 1]; /* the token's new streams, stored once all are computed: dst may be x */
        const float *c = comb + r * h * h;
        for (int64_t k = 0; k < h; k++) {
            float *m = mixed + k * d;
            for (int64_t i = 0; i < d; i++) m[i] = c[k] * load(x, bf16, (r * h) * d + i);
            for (int64_t j = 1; j < h; j++) {
                const float cj = c[j * h + k];
                for (int64_t i = 0; i < d; i++) m[i] = m[i] + cj * load(x, bf16, (r * h + j) * d + i);
            }
            const float p = post[r * h + k];
            for (int64_t i = 0; i < d; i++) m[i] = p * load(out, bf16, r * d + i) + m[i];
        }
        for (int64_t i = 0; i < h * d; i++) store(dst, bf16, r * h * d + i, mixed[i]);
    }
}

int dsv4_hc_post(const void *out, const void *x, void *dst, int bf16, int64_t t, int64_t h, int64_t d,
                 const float *post, const float *comb) {
    if (bf16) hc_post_rows(out, x, dst, 1, t, h, d, post, comb);
    else hc_post_rows(out, x, dst, 0, t, h, d, post, comb);
    return 0;
}

/* u [T, d] (x's dtype) = sum_k pre[k] * x[k][i] for each token: x [T, h, d] in x's dtype, pre [T, h] fp32; the
 * products rounded to fp32 and added in order from 0, which is torch's reduction over h <= 4 streams */
INLINE void hc_collapse_rows(const void *x, const float *pre, void *u, const int bf16, int64_t t, int64_t h,
                             int64_t d) {
    #pragma omp parallel for schedule(static) num_threads(split_threads(t * h * d))
    for (int64_t r = 0; r < t; r++)
        for (int64_t lo = 0; lo < d; lo += 64) { /* 64 sums at a time, each stream added to all of them in turn */
            const int64_t n = d - lo < 64 ? d - lo : 64;
            float sum[64];
            for (int64_t i = 0; i < n; i++) sum[i] = 0.0f;
            for (int64_t k = 0; k < h; k++) {
                const float p = pre[r * h + k];
                for (int64_t i = 0; i < n; i++) sum[i] += p * load(x, bf16, (r * h + k) * d + lo + i);
            }
            for (int64_t i = 0; i < n; i++) store(u, bf16, r * d + lo + i, sum[i]);
        }
}

int dsv4_hc_collapse(const void *x, const float *pre, void *u, int bf16, int64_t t, int64_t h, int64_t d) {
    if (bf16) hc_collapse_rows(x, pre, u, 1, t, h, d);
    else hc_collapse_rows(x, pre, u, 0, t, h, d);
    return 0;
}

/* ------------------------------------------------------------------------------------------ mHC's read, fp32 */


/* mHC's read of fp32 streams in one pass per 16 tokens, what `hc_mixes`, `hc_split_sinkhorn` and `hc_collapse`
 * compute in turn: x [T, h, d] -> u [T, d] = sum_k pre_k x_k, post [T, h], comb [T, h, h], where the mixes
 * (x . fn_c) / rms(x) take fn [m, h*d] (m = (2 + h) h) in panels [ceil(m / 32)][h*d][32] (`dsv4_panel_gemm`'s),
 * pre = sigmoid(mixes * scale[0] + base) + eps, post = 2 sigmoid(...), comb the row softmax + eps, then columns,
 * then iters - 1 rounds of rows and columns each divided by (sum + eps). Not the reference's bits: the panel sums'
 * order, `exp16`, and each sum's reciprocal multiplied in (one division per row instead of h); plain fp32 within
 * 1e-5 of it. The 16 tokens' coefficients run one token per lane. */
#define HC_MAX 8
#define HC_TOKENS 16
int dsv4_hc_pre(const float *x, int64_t t, int64_t h, int64_t d, const float *panels, const float *scale,
                const float *base, int64_t iters, float eps, float norm_eps, float *u, float *post, float *comb) {
    if (h < 1 || h > HC_MAX || d < 1 || iters < 1) return -1;
    const int64_t n = h * d, m = (2 + h) * h, blocks = (t + HC_TOKENS - 1) / HC_TOKENS;
    #pragma omp parallel for schedule(static) num_threads(split_threads(t * n * m))
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t lo = blk * HC_TOKENS, rows = t - lo < HC_TOKENS ? t - lo : HC_TOKENS;
        const float *xb = x + lo * n;
        float mixes[HC_TOKENS * (2 + HC_MAX) * HC_MAX];
        panels_product(xb, rows, n, panels, m, mixes);
        f32x16 inv = splat16(0.0f), v[(2 + HC_MAX) * HC_MAX];
        for (int64_t r = 0; r < rows; r++) { /* 1 / rms over the token's h * d values */
            f32x16 acc = splat16(0.0f);
            int64_t i = 0;
            for (; i + 16 <= n; i += 16) {
                const f32x16 a = load16(xb + r * n + i);
                acc += a * a;
            }
            float ss = 0.0f;
            for (int l = 0; l < 16; l++) ss += acc[l];
            for (; i < n; i++) ss += xb[r * n + i] * xb[r * n + i];
            inv[r] = 1.0f / sqrtf(ss / (float)n + norm_eps);
        }
        for (int64_t c = 0; c < m; c++) {
            f32x16 col = splat16(0.0f);
            for (int64_t r = 0; r < rows; r++) col[r] = mixes[r * m + c];
            v[c] = col * inv;
        }
        f32x16 pre[HC_MAX], out[HC_MAX], cm[HC_MAX * HC_MAX];
        for (int64_t k = 0; k < h; k++) {
            pre[k] = sigmoid16(v[k] * splat16(scale[0]) + splat16(base[k])) + splat16(eps);
            out[k] = splat16(2.0f) * sigmoid16(v[h + k] * splat16(scale[1]) + splat16(base[h + k]));
        }
        for (int64_t i = 0; i < h * h; i++) cm[i] = v[2 * h + i] * splat16(scale[2]) + splat16(base[2 * h + i]);
        for (int64_t i = 0; i < h; i++) { /* the row softmax, + eps */
            f32x16 top = cm[i * h], sum = splat16(0.0f);
            for (int64_t j = 1; j < h; j++) top = max16(cm[i * h + j], top);
            for (int64_t j = 0; j < h; j++) {
                cm[i * h + j] = exp16(cm[i * h + j] - top);
                sum += cm[i * h + j];
            }
            const f32x16 rcp = splat16(1.0f) / sum;
            for (int64_t j = 0; j < h; j++) cm[i * h + j] = cm[i * h + j] * rcp + splat16(eps);
        }
        for (int64_t it = 0; it < iters; it++) {
            if (it > 0)
                for (int64_t i = 0; i < h; i++) { /* rows */
                    f32x16 sum = cm[i * h];
                    for (int64_t j = 1; j < h; j++) sum += cm[i * h + j];
                    const f32x16 rcp = splat16(1.0f) / (sum + splat16(eps));
                    for (int64_t j = 0; j < h; j++) cm[i * h + j] *= rcp;
                }
            for (int64_t j = 0; j < h; j++) { /* columns */
                f32x16 sum = cm[j];
                for (int64_t i = 1; i < h; i++) sum += cm[i * h + j];
                const f32x16 rcp = splat16(1.0f) / (sum + splat16(eps));
                for (int64_t i = 0; i < h; i++) cm[i * h + j] *= rcp;
            }
        }
        for (int64_t r = 0; r < rows; r++) {
            const int64_t tok = lo + r;
            float p[HC_MAX];
            for (int64_t k = 0; k < h; k++) {
                p[k] = pre[k][r];
                post[tok * h + k] = out[k][r];
            }
            for (int64_t i = 0; i < h * h; i++) comb[tok * h * h + i] = cm[i][r];
            const float *xr = xb + r * n;
            float *ur = u + tok * d;
            int64_t i = 0; /* products rounded, added over the streams in order */
            for (; i + 16 <= d; i += 16) {
                f32x16 s = splat16(0.0f);
                for (int64_t k = 0; k < h; k++) s += splat16(p[k]) * load16(xr + k * d + i);
                store16(ur + i, s);
            }
            for (; i < d; i++) {
                float s = 0.0f;
                for (int64_t k = 0; k < h; k++) s += p[k] * xr[k * d + i];
                ur[i] = s;
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------- a chunk's attention, fp32 */

/* The 16 x 16 block of floats src[k][at .. at + 15] (k < 16) transposed: its column m into dst + m * stride (16
 * floats). Four rounds of two-source shuffles interleave ever wider units (1, 2, 4, 8 floats) of row pairs 1, 2, 4,
 * 8 apart, which leaves column bitreverse(k) in register k: 64 shuffles where the element-wise copy took 256
 * scattered stores. */
#define ROUND16(dist, lo, hi)                                                                                       \
    for (int k = 0; k < 16; k++)                                                                                    \
        if (!(k & (dist))) {                                                                                        \
            t[k] = __builtin_shuffle(r[k], r[k + (dist)], lo);                                                      \
            t[k + (dist)] = __builtin_shuffle(r[k], r[k + (dist)], hi);                                             \
        }                                                                                                           \
    for (int k = 0; k < 16; k++) r[k] = t[k];
static inline void transpose16(const float *const *src, int64_t at, float *dst, int64_t stride) {
    static const int bitreverse[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    const i32x16 lo1 = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};
    const i32x16 hi1 = {8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const i32x16 lo2 = {0, 1, 16, 17, 2, 3, 18, 19, 4, 5, 20, 21, 6, 7, 22, 23};
    const i32x16 hi2 = {8, 9, 24, 25, 10, 11, 26, 27, 12, 13, 28, 29, 14, 15, 30, 31};
    const i32x16 lo4 = {0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23};
    const i32x16 hi4 = {8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31};
    const i32x16 lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const i32x16 hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    f32x16 r[16], t[16];
    for (int k = 0; k < 16; k++) r[k] = load16(src[k] + at);
    ROUND16(1, lo1, hi1)
    ROUND16(2, lo2, hi2)
    ROUND16(4, lo4, hi4)
    ROUND16(8, lo8, hi8)
    for (int k = 0; k < 16; k++) store16(dst + bitreverse[k] * stride, r[k]);
}
#undef ROUND16

/* Attention of a prefill chunk's queries q [B, S, H, D] over fp32 rows at slots idx [B, S, K] (-1: none; a row
 * named twice weighs twice) with the sink, the N rows being runs read in place (`Run`: dense, or paged): what
 * `NativeBackend._dense_attn` computes (the "cpu" backend's arithmetic: scores over the rows a block of queries
 * names, the arguments of the exponentials shifted by the largest counted score and floored at `lowest`, weights
 * times counts, the sink's share in the denominator) CHUNK_QUERIES queries at a time instead of 64, so a window
 * band is W + CHUNK_QUERIES - 1 rows, not W + 63, each of W; the block's heads share each key (MQA) as the rows of
 * one panel product. The named rows' keys go into panels [ceil(n' / 32)][D][32] (16 x 16 register transposes)
 * and their values into [ceil(D / 32)][n'][32], both products run on the panel kernels and the exponentials on
 * `exp16`: plain fp32 within 1e-5 of the reference. Blocks go to threads as they come (a causal chunk's late
 * blocks name more rows). Returns 0, -1 for a slot past the rows, -2 without scratch. */
#define CHUNK_QUERIES 16
int dsv4_chunk_attn(const float *q, const int64_t *run_desc, int64_t n_runs, const int64_t *idx, const float *sink,
                    int64_t b, int64_t s, int64_t h, int64_t d, int64_t n, int64_t k, float scale, float lowest,
                    float *out) {
    const int64_t blocks = (s + CHUNK_QUERIES - 1) / CHUNK_QUERIES, qr = CHUNK_QUERIES * h;
    const int64_t np = (n + PANEL - 1) / PANEL * PANEL, dp = (d + PANEL - 1) / PANEL * PANEL;
    Run *runs = read_runs(run_desc, n_runs);
    if (!runs) return -2;
    int bad = 0;
    #pragma omp parallel num_threads(split_threads(b * s * h * k * d)) reduction(|:bad)
    {
        int64_t *used = malloc(sizeof(int64_t) * (size_t)(n + 1));
        float *counts = malloc(sizeof(float) * (size_t)(b * CHUNK_QUERIES * n + 1));
        float *keys = malloc(sizeof(float) * (size_t)(np * d + 1));
        float *values = malloc(sizeof(float) * (size_t)(dp * n + 1));
        float *p = malloc(sizeof(float) * (size_t)(qr * n + 1));
        float *o = malloc(sizeof(float) * (size_t)(qr * d + 1));
        float *denom = malloc(sizeof(float) * (size_t)(qr + 1));
        float *zeros = calloc((size_t)d + 1, sizeof(float)); /* the padding keys past n' */
        const float **row_of = malloc(sizeof(float *) * (size_t)(n + 1));
        if (!used || !counts || !keys || !values || !p || !o || !denom || !zeros || !row_of) bad |= 2;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (bad) continue;
            const int64_t lo = blk * CHUNK_QUERIES, m = s - lo < CHUNK_QUERIES ? s - lo : CHUNK_QUERIES;
            const int64_t kept = dsv4_attn_rows(idx, b, s, k, lo, lo + m, n, used, counts);
            if (kept < 0) {
                bad |= 1;
                continue;
            }
            if (kept == n)
                for (int64_t j = 0; j < n; j++) used[j] = j;
            const int64_t kp = (kept + PANEL - 1) / PANEL * PANEL, rws = m * h;
            for (int64_t bb = 0; bb < b; bb++) {
                for (int64_t j = 0; j < kept; j++) { /* the named rows where they are (a dense run, a page) */
                    row_of[j] = row_at(runs, n_runs, bb, used[j], d, 0);
                    if (!row_of[j]) row_of[j] = zeros;
                }
                for (int64_t c = 0; c < kp; c += PANEL) { /* key panel c / 32: rows used[c .. c + 31] transposed */
                    float *panel = keys + c * d;
                    for (int64_t half = 0; half < PANEL; half += 16) {
                        const float *src[16];
                        for (int k = 0; k < 16; k++) src[k] = c + half + k < kept ? row_of[c + half + k] : zeros;
                        int64_t i = 0;
                        for (; i + 16 <= d; i += 16) transpose16(src, i, panel + i * PANEL + half, PANEL);
                        for (; i < d; i++)
                            for (int k = 0; k < 16; k++) panel[i * PANEL + half + k] = src[k][i];
                    }
                }
                for (int64_t j = 0; j < kept; j++) { /* value panel c / 32: columns c .. c + 31 of every row */
                    const float *row = row_of[j];
                    int64_t c = 0;
                    for (; c + PANEL <= d; c += PANEL)
                        memcpy(values + c * kept + j * PANEL, row + c, sizeof(float) * PANEL);
                    if (c < d) {
                        float *tail = values + c * kept + j * PANEL;
                        memset(tail, 0, sizeof(float) * PANEL);
                        memcpy(tail, row + c, sizeof(float) * (size_t)(d - c));
                    }
                }
                panels_product(q + (bb * s + lo) * h * d, rws, d, keys, kept, p); /* scores [m H, n'] */
                const float *cb = counts + bb * m * kept;
                for (int64_t r = 0; r < rws; r++) {
                    float *x = p + r * kept;
                    const float *c = cb + (r / h) * kept;
                    f32x16 top16 = splat16(-INFINITY);
                    int64_t j = 0;
                    for (; j + 16 <= kept; j += 16) {
                        const f32x16 a = load16(x + j) * splat16(scale);
                        store16(x + j, a);
                        const i32x16 counted = load16(c + j) > splat16(0.0f);
                        top16 = max16(select16(counted, a, splat16(-INFINITY)),
                                      top16);
                    }
                    float top = -INFINITY;
                    for (int l = 0; l < 16; l++) top = top16[l] > top ? top16[l] : top;
                    for (; j < kept; j++) {
                        x[j] *= scale;
                        if (c[j] > 0.0f && x[j] > top) top = x[j];
                    }
                    const float shift = isfinite(top) ? top : sink[r % h];
                    f32x16 sum16 = splat16(0.0f);
                    for (j = 0; j + 16 <= kept; j += 16) {
                        const f32x16 e = exp16(lower16(load16(x + j) - splat16(shift), splat16(lowest)));
                        const f32x16 w = e * load16(c + j);
                        store16(x + j, w);
                        sum16 += w;
                    }
                    float sum = 0.0f;
                    for (int l = 0; l < 16; l++) sum += sum16[l];
                    for (; j < kept; j++) {
                        const float a = x[j] - shift;
                        x[j] = expf(a < lowest ? lowest : a) * c[j];
                        sum += x[j];
                    }
                    denom[r] = sum + expf(sink[r % h] - shift);
                }
                panels_product(p, rws, kept, values, d, o); /* [m H, D] */
                float *ob = out + (bb * s + lo) * h * d;
                for (int64_t r = 0; r < rws; r++) { /* times the reciprocal: a division per value cost a fifth */
                    const float inv = 1.0f / denom[r];
                    for (int64_t i = 0; i < d; i++) ob[r * d + i] = o[r * d + i] * inv;
                }
            }
        }
        free(used);
        free(counts);
        free(keys);
        free(values);
        free(p);
        free(o);
        free(denom);
        free(zeros);
        free(row_of);
    }
    free(runs);
    return bad & 2 ? -2 : (bad & 1 ? -1 : 0);
}

/* ------------------------------------------------------------------------------------------ attention, bf16 rows */

/* Attention over bf16 rows (exact numerics) as the reference computes it, bit for bit, in two C calls around torch's
 * own exponential: `dsv4_rounded_attn_args` scores the slots and writes the arguments of the reference's
 * exponentials (each slot's scaled logit minus its block's shift, each later block's rescale, the sink's share),
 * torch exponentiates them (its vector exp is MKL's, whose bits no portable code reproduces), and
 * `dsv4_rounded_attn_out` folds the blocks. An argument below EXP_ZERO (a masked slot's -inf) is written as 0 and
 * flagged instead: its exponential is 0, which MKL's slow path took 3 to 30 ns an element to say (0.15 otherwise).
 * Bit-exactness rests on three orders the backend checks before it uses these kernels: a logit is a dot product of
 * bf16 values (exact products) summed over d in order from 0, as BLAS's batched GEMM sums them and
 * `panels_product` does; a block's value product sums over its slots in order; a block's sum of probabilities is
 * torch's (`torch_row_sum`). The last partial block's logits come from torch (`tail`, the reference's own einsum:
 * BLAS sums a few slots in another order).
 *
 * A work item is queries lo .. lo+m-1 of batch row bb. Where the queries share their rows (a prefill chunk's
 * window band) they score the rows they name together (`named_rows`, one panel product for the item); otherwise
 * (a decode, m = 1) the query scores its slots' rows in slot order. A query's arguments are H segments of
 * nb * 64 + nb floats: the slots' (padded to whole blocks), the sink's, then block i's rescale at nb * 64 + i. */
#define EXP_ZERO -104.0f /* e^x < 2^-150 below it (half the least subnormal): torch's exp gives 0 */

typedef struct {
    int64_t *used, *renumber, *col; /* col [m][k]: each slot's row among the item's rows (0 for an unused slot) */
    int32_t *live;                  /* [m][nb * 64]: -1 where the slot is used, 0 where not (or past k) */
    float *rows, *keys, *qf, *scores, *zeros;
} RoundedScratch;

static int rounded_scratch(RoundedScratch *w, int64_t n, int64_t rows, int64_t h, int64_t d, int64_t k) {
    const int64_t kp = (rows + PANEL - 1) / PANEL * PANEL, padded = (k + ATTN_BLOCK - 1) / ATTN_BLOCK * ATTN_BLOCK;
    w->used = malloc(sizeof(int64_t) * (size_t)(n + 1));
    w->renumber = malloc(sizeof(int64_t) * (size_t)(n + 1));
    w->col = malloc(sizeof(int64_t) * (size_t)(CHUNK_QUERIES * k + 1));
    w->live = malloc(sizeof(int32_t) * (size_t)(CHUNK_QUERIES * padded + 1));
    w->rows = malloc(sizeof(float) * (size_t)(rows * d + 1));
    w->keys = malloc(sizeof(float) * (size_t)(kp * d + 1));
    w->qf = malloc(sizeof(float) * (size_t)(CHUNK_QUERIES * h * d + 1));
    w->scores = malloc(sizeof(float) * (size_t)(CHUNK_QUERIES * h * rows + 1));
    w->zeros = calloc((size_t)d + 1, sizeof(float));
    return w->used && w->renumber && w->col && w->live && w->rows && w->keys && w->qf && w->scores && w->zeros;
}

static void rounded_scratch_free(RoundedScratch *w) {
    free(w->used);
    free(w->renumber);
    free(w->col);
    free(w->live);
    free(w->rows);
    free(w->keys);
    free(w->qf);
    free(w->scores);
    free(w->zeros);
}

static void bf16_row(const uint16_t *src, int64_t d, float *dst) {
    for (int64_t i = 0; i < d; i++) dst[i] = LOAD_BF16(src[i]);
}

/* The item's rows in fp32 (w->rows [kept][d]), each slot's place among them (w->col) and which slots are used
 * (w->live). Returns kept. The slots were checked against the n rows. */
static int64_t rounded_item_rows(const Run *runs, int64_t n_runs, const int64_t *idx, int64_t bb, int64_t s,
                                 int64_t k, int64_t lo, int64_t m, int64_t n, int64_t d, int named,
                                 RoundedScratch *w) {
    const int64_t *slots = idx + (bb * s + lo) * k, padded = (k + ATTN_BLOCK - 1) / ATTN_BLOCK * ATTN_BLOCK;
    for (int64_t t = 0; t < m; t++)
        for (int64_t j = 0; j < padded; j++) w->live[t * padded + j] = j < k && slots[t * k + j] >= 0 ? -1 : 0;
    if (!named) {
        for (int64_t j = 0; j < k; j++) {
            w->col[j] = j;
            if (slots[j] >= 0) bf16_row(row_at(runs, n_runs, bb, slots[j], d, 1), d, w->rows + j * d);
            else memset(w->rows + j * d, 0, sizeof(float) * (size_t)d);
        }
        return k;
    }
    const int64_t kept = named_rows(idx + bb * s * k, 1, s, k, lo, lo + m, n, w->used, w->renumber);
    for (int64_t j = 0; j < kept; j++)
        bf16_row(row_at(runs, n_runs, bb, kept == n ? j : w->used[j], d, 1), d, w->rows + j * d);
    for (int64_t i = 0; i < m * k; i++) w->col[i] = slots[i] >= 0 ? w->renumber[slots[i]] : 0;
    return kept;
}

/* arg (below EXP_ZERO: 0, flagged in zero) into e */
static inline void exp_argument(float arg, float *e, uint8_t *zero) {
    *zero = arg < EXP_ZERO;
    *e = arg < EXP_ZERO ? 0.0f : arg;
}

/* One query head's arguments (`dsv4_rounded_attn_args`) from its unscaled logits (score [kept] at each slot's col;
 * the last partial block's from tail): per 64-slot block the reference's masked scaled logits, their maximum with
 * the running one (NaN propagates, as torch's amax and maximum), the shift (that maximum, or 0 where it is not
 * finite), then logit - shift for each slot, the block's rescale (previous maximum - shift) and the sink's share. */
static void rounded_head_args(const float *score, const int64_t *col, const int32_t *live, const float *tail,
                              int64_t k, float scale, float sink, float *e, uint8_t *zero) {
    const int64_t nb = (k + ATTN_BLOCK - 1) / ATTN_BLOCK, full = k / ATTN_BLOCK, tail_at = nb * ATTN_BLOCK;
    float running = -INFINITY, logit[ATTN_BLOCK];
    for (int64_t i = 0; i < nb; i++) {
        const int64_t lo = i * ATTN_BLOCK;
        if (i < full) {
            for (int64_t j = 0; j < ATTN_BLOCK; j++) logit[j] = score[col[lo + j]];
        } else {
            for (int64_t j = 0; j < ATTN_BLOCK; j++) logit[j] = lo + j < k ? tail[j] : 0.0f;
        }
        f32x16 top = splat16(-INFINITY);
        i32x16 nan = splati16(0);
        for (int64_t j = 0; j < ATTN_BLOCK; j += 16) {
            const f32x16 v = select16(loadi16(live + lo + j), load16(logit + j) * splat16(scale), splat16(-INFINITY));
            store16(logit + j, v);
            nan |= v != v;
            top = max16(v, top);
        }
        float best = -INFINITY;
        int any_nan = 0;
        for (int l = 0; l < 16; l++) {
            best = top[l] > best ? top[l] : best;
            any_nan |= nan[l] != 0;
        }
        if (any_nan) best = NAN;
        const float now = (best != best || running != running) ? NAN : (best > running ? best : running);
        const float shift = isfinite(now) ? now : 0.0f;
        if (i > 0) exp_argument(running - shift, e + tail_at + i, zero + tail_at + i);
        for (int64_t j = 0; j < ATTN_BLOCK; j += 16) {
            const f32x16 a = load16(logit + j) - splat16(shift);
            const i32x16 under = a < splat16(EXP_ZERO);
            store16(e + lo + j, select16(under, splat16(0.0f), a));
            for (int l = 0; l < 16; l++) zero[lo + j + l] = (uint8_t)(under[l] & 1);
        }
        running = now;
    }
    exp_argument(sink - (isfinite(running) ? running : sink), e + tail_at, zero + tail_at);
}

/* Phase one: args and zero [B, S, H, nb * 64 + nb] (see above) from q [B, S, H, D] (bf16, or fp32 holding bf16
 * values) over the bf16 rows of the runs, slots idx [B, S, K] (-1: unused) and the last partial block's unscaled
 * logits tail [B, S, H, K % 64] (torch's). D a multiple of 16. Returns 0, -1 for a slot past the rows, -2 without
 * scratch. */
int dsv4_rounded_attn_args(const void *q, int q_bf16, int64_t b, int64_t s, int64_t h, int64_t d,
                           const int64_t *run_desc, int64_t n_runs, const int64_t *idx, int64_t k, const float *tail,
                           const float *sink, float scale, int named, float *args, uint8_t *zero) {
    int64_t n = 0;
    for (int64_t r = 0; r < n_runs; r++) n += run_desc[5 * r + 1];
    for (int64_t i = 0; i < b * s * k; i++)
        if (idx[i] >= n) return -1;
    Run *runs = read_runs(run_desc, n_runs);
    if (!runs) return -2;
    const int64_t m_max = named ? CHUNK_QUERIES : 1, blocks = (s + m_max - 1) / m_max, rest = k % ATTN_BLOCK;
    const int64_t nb = (k + ATTN_BLOCK - 1) / ATTN_BLOCK, seg = nb * ATTN_BLOCK + nb;
    int bad = 0;
    #pragma omp parallel num_threads(split_threads(b * s * h * k * d)) reduction(|:bad)
    {
        RoundedScratch w;
        if (!rounded_scratch(&w, n, named ? n : k, h, d, k)) bad = 1;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < b * blocks; item++) {
            if (bad) continue;
            const int64_t bb = item / blocks, lo = item % blocks * m_max, m = s - lo < m_max ? s - lo : m_max;
            const int64_t kept = rounded_item_rows(runs, n_runs, idx, bb, s, k, lo, m, n, d, named, &w);
            const int64_t kp = (kept + PANEL - 1) / PANEL * PANEL;
            for (int64_t c = 0; c < kp; c += PANEL) { /* key panel c / 32: rows c .. c + 31 transposed */
                for (int64_t half = 0; half < PANEL; half += 16) {
                    const float *src[16];
                    for (int r = 0; r < 16; r++) src[r] = c + half + r < kept ? w.rows + (c + half + r) * d : w.zeros;
                    for (int64_t i = 0; i < d; i += 16) transpose16(src, i, w.keys + c * d + i * PANEL + half, PANEL);
                }
            }
            for (int64_t i = 0; i < m * h * d; i++) w.qf[i] = load(q, q_bf16, (bb * s + lo) * h * d + i);
            panels_product(w.qf, m * h, d, w.keys, kept, w.scores); /* [m H, kept] */
            for (int64_t t = 0; t < m; t++) {
                const int64_t query = bb * s + lo + t;
                for (int64_t hi = 0; hi < h; hi++)
                    rounded_head_args(w.scores + (t * h + hi) * kept, w.col + t * k, w.live + t * nb * ATTN_BLOCK,
                                      rest ? tail + (query * h + hi) * rest : NULL, k, scale, sink[hi],
                                      args + (query * h + hi) * seg, zero + (query * h + hi) * seg);
            }
        }
        rounded_scratch_free(&w);
    }
    free(runs);
    return bad ? -2 : 0;
}

/* out0/out1 [D] = the sums over a block's slots j, in order, of p0[j] / p1[j] times row j (rows[j] NULL: a slot
 * left out), with fused multiply-adds as BLAS's GEMM (the products of bf16 values are exact but for underflow) */
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((noinline, optimize("fp-contract=fast")))
#endif
static void rounded_values(const float *p0, const float *p1, const float *const *rows, int64_t width, int64_t d,
                           float *out0, float *out1) {
    int64_t x = 0;
    for (; x + 128 <= d; x += 128) { /* 128 outputs of both heads in sixteen vectors */
        f32x16 a[8] = {{0}}, c[8] = {{0}};
        for (int64_t j = 0; j < width; j++) {
            if (!rows[j]) continue;
            const f32x16 u = splat16(p0[j]), v = splat16(p1[j]);
            const float *r = rows[j] + x;
            for (int i = 0; i < 8; i++) {
                const f32x16 y = load16(r + 16 * i);
                a[i] += u * y;
                c[i] += v * y;
            }
        }
        for (int i = 0; i < 8; i++) {
            store16(out0 + x + 16 * i, a[i]);
            store16(out1 + x + 16 * i, c[i]);
        }
    }
    for (; x < d; x += 16) {
        f32x16 a = {0}, c = {0};
        for (int64_t j = 0; j < width; j++) {
            if (!rows[j]) continue;
            const f32x16 y = load16(rows[j] + x);
            a += splat16(p0[j]) * y;
            c += splat16(p1[j]) * y;
        }
        store16(out0 + x, a);
        store16(out1 + x, c);
    }
}

/* exps's value, or 0 where its argument was flagged */
static inline float exp_value(const float *e, const uint8_t *zero) { return *zero ? 0.0f : *e; }

/* Phase two, after torch's exponential of args in place: out [B, S, H, D] (q's dtype) from the blocks' probabilities
 * (summed in torch's order, `lanes`; rounded to bf16 for the value products), the rescales and the sink's share,
 * folded as the reference folds them (denominator and accumulator times the rescale, plus the block's). A masked
 * slot's probability is 0; the reference multiplies it by row 0 of the batch row, which matters only where that row
 * is not finite (then it is kept in the sums). Returns 0, -2 without scratch. */
int dsv4_rounded_attn_out(const float *exps, const uint8_t *zero, int64_t b, int64_t s, int64_t h, int64_t d,
                          const int64_t *run_desc, int64_t n_runs, const int64_t *idx, int64_t k, int lanes, int named,
                          void *out, int out_bf16) {
    int64_t n = 0;
    for (int64_t r = 0; r < n_runs; r++) n += run_desc[5 * r + 1];
    Run *runs = read_runs(run_desc, n_runs);
    if (!runs) return -2;
    const int64_t m_max = named ? CHUNK_QUERIES : 1, blocks = (s + m_max - 1) / m_max;
    const int64_t nb = (k + ATTN_BLOCK - 1) / ATTN_BLOCK, seg = nb * ATTN_BLOCK + nb, hp = h + (h & 1);
    int bad = 0;
    #pragma omp parallel num_threads(split_threads(b * s * h * k * d)) reduction(|:bad)
    {
        RoundedScratch w;
        float *acc = malloc(sizeof(float) * (size_t)(hp * d + 1)), *blk = malloc(sizeof(float) * (size_t)(hp * d + 1));
        float *pb = malloc(sizeof(float) * (size_t)(hp * ATTN_BLOCK + 1)), *row0 = malloc(sizeof(float) * (size_t)(d + 1));
        float *denom = malloc(sizeof(float) * (size_t)(2 * h + 1)), *rescale = denom + h;
        if (!rounded_scratch(&w, n, named ? n : k, h, d, k) || !acc || !blk || !pb || !row0 || !denom) bad = 1;
        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < b * blocks; item++) {
            if (bad) continue;
            const int64_t bb = item / blocks, lo = item % blocks * m_max, m = s - lo < m_max ? s - lo : m_max;
            rounded_item_rows(runs, n_runs, idx, bb, s, k, lo, m, n, d, named, &w);
            int poisoned = 0; /* row 0 not finite: the masked slots' 0 * row 0 are NaN in the reference's sums */
            bf16_row(row_at(runs, n_runs, bb, 0, d, 1), d, row0);
            for (int64_t i = 0; i < d; i++) poisoned |= !isfinite(row0[i]);
            for (int64_t t = 0; t < m; t++) {
                const int64_t query = bb * s + lo + t, *slots = idx + query * k, *col = w.col + t * k;
                const float *e = exps + query * h * seg;
                const uint8_t *z = zero + query * h * seg;
                memset(acc, 0, sizeof(float) * (size_t)(hp * d));
                memset(pb, 0, sizeof(float) * (size_t)(hp * ATTN_BLOCK));
                for (int64_t hi = 0; hi < h; hi++) denom[hi] = 0.0f;
                for (int64_t i = 0; i < nb; i++) {
                    const int64_t first = i * ATTN_BLOCK, width = k - first < ATTN_BLOCK ? k - first : ATTN_BLOCK;
                    for (int64_t hi = 0; hi < h; hi++) /* block 0's: exp(-inf - shift), 0 */
                        rescale[hi] = i == 0 ? 0.0f : exp_value(e + hi * seg + nb * ATTN_BLOCK + i,
                                                                z + hi * seg + nb * ATTN_BLOCK + i);
                    const float *rows[ATTN_BLOCK];
                    for (int64_t j = 0; j < width; j++)
                        rows[j] = slots[first + j] >= 0 ? w.rows + col[first + j] * d : (poisoned ? row0 : NULL);
                    for (int64_t hi = 0; hi < h; hi++) {
                        const float *eh = e + hi * seg + first;
                        const uint8_t *zh = z + hi * seg + first;
                        float p[ATTN_BLOCK];
                        for (int64_t j = 0; j < ATTN_BLOCK; j++) p[j] = zh[j] ? 0.0f : eh[j];
                        denom[hi] = denom[hi] * rescale[hi] + torch_row_sum(p, width, lanes);
                        for (int64_t j = 0; j < ATTN_BLOCK; j += 16)
                            store16(pb + hi * ATTN_BLOCK + j, round_bf16_16(load16(p + j)));
                    }
                    for (int64_t hi = 0; hi < h; hi += 2)
                        rounded_values(pb + hi * ATTN_BLOCK, pb + (hi + 1) * ATTN_BLOCK, rows, width, d, blk + hi * d,
                                       blk + (hi + 1) * d);
                    for (int64_t hi = 0; hi < h; hi++) {
                        float *a = acc + hi * d;
                        const float *v = blk + hi * d;
                        for (int64_t x = 0; x < d; x++) a[x] = a[x] * rescale[hi] + v[x];
                    }
                }
                for (int64_t hi = 0; hi < h; hi++) {
                    const float total = denom[hi] + exp_value(e + hi * seg + nb * ATTN_BLOCK, z + hi * seg + nb * ATTN_BLOCK);
                    float *o = acc + hi * d;
                    for (int64_t x = 0; x < d; x++) o[x] = o[x] / total;
                    if (out_bf16)
                        for (int64_t x = 0; x < d; x++) ((uint16_t *)out)[(query * h + hi) * d + x] = bf16_bits(o[x]);
                    else
                        memcpy((float *)out + (query * h + hi) * d, o, sizeof(float) * (size_t)d);
                }
            }
        }
        rounded_scratch_free(&w);
        free(acc);
        free(blk);
        free(pb);
        free(row0);
        free(denom);
    }
    free(runs);
    return bad ? -2 : 0;
}

/* ------------------------------------------------------------------------------------------ MoE router, fp32 */

/* The router of fp32 tokens x [T, d] over E experts whose gate weight is in panels [ceil(E / 32)][d][32]: scores
 * [T, E] = f(x W^T) (f: 0 softmax, 1 sigmoid, 2 sqrt(softplus), softplus being x past 20 as torch's), the experts
 * ids [T, k] as given (a hash layer's table, checked against E) or the top k of scores + bias [E] (descending, a
 * tie to the lower id, NaN first), weights [T, k] their scores over the chosen scores' sum (not for softmax)
 * times route_scale: `ReferenceBackend.moe_gate` in one call instead of about ten torch ops, plain fp32 (the panel
 * sums' order, libm's exp and log1p) within 1e-5 of it. Returns 0, -1 for an expert id out of range. */
int dsv4_moe_gate(const float *x, int64_t t, int64_t d, const float *panels, int64_t e, const float *bias,
                  const int64_t *given, int score_func, int64_t k, float route_scale, float *weights, int64_t *ids,
                  float *scores) {
    if (k < 1 || k > e) return -1;
    int bad = 0;
    #pragma omp parallel for schedule(static) num_threads(split_threads(t * d * e)) reduction(|:bad)
    for (int64_t lo = 0; lo < t; lo += 8) {
        const int64_t rows = t - lo < 8 ? t - lo : 8;
        panels_product(x + lo * d, rows, d, panels, e, scores + lo * e);
        for (int64_t r = lo; r < lo + rows; r++) {
            float *s = scores + r * e;
            float top = s[0], sum = 0.0f;
            if (score_func == 0)
                for (int64_t j = 1; j < e; j++) top = s[j] > top ? s[j] : top;
            for (int64_t j = 0; j < e; j += 16) { /* 16 lanes at a time, the last group padded */
                float lanes[16] = {0};
                const int64_t w = e - j < 16 ? e - j : 16;
                memcpy(lanes, s + j, sizeof(float) * (size_t)w);
                const f32x16 v = load16(lanes);
                store16(lanes, score_func == 0 ? exp16(v - splat16(top))
                                               : (score_func == 1 ? sigmoid16(v) : sqrt16(softplus16(v))));
                memcpy(s + j, lanes, sizeof(float) * (size_t)w);
            }
            if (score_func == 0) {
                for (int64_t j = 0; j < e; j++) sum += s[j];
                for (int64_t j = 0; j < e; j++) s[j] /= sum;
            }
            int64_t *id = ids + r * k;
            float *w = weights + r * k;
            for (int64_t i = 0; i < k; i++) {
                if (given) {
                    id[i] = given[r * k + i];
                    if (id[i] < 0 || id[i] >= e) {
                        bad = 1;
                        id[i] = 0;
                    }
                    continue;
                }
                int64_t best = -1;
                float best_v = 0.0f;
                for (int64_t j = 0; j < e; j++) {
                    int taken = 0;
                    for (int64_t c = 0; c < i; c++) taken |= id[c] == j;
                    if (taken) continue;
                    const float v = s[j] + bias[j];
                    if (best < 0 || ranks_before(v, j, best_v, best)) {
                        best = j;
                        best_v = v;
                    }
                }
                id[i] = best;
            }
            float chosen = 0.0f;
            for (int64_t i = 0; i < k; i++) {
                w[i] = s[id[i]];
                chosen += w[i];
            }
            for (int64_t i = 0; i < k; i++) w[i] = (score_func == 0 ? w[i] : w[i] / chosen) * route_scale;
        }
    }
    return bad ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------- compressor pooling, fp32 */

/* The compressor's pooling of fp32 rows: out [E, c] = for each entry and channel, the candidates' kv rows [N, c]
 * weighted by the softmax of their score rows over the entry's candidates [E, n] (-1: one that does not exist,
 * weight 0), 16 channels at a time with `exp16`: `ReferenceBackend.gated_pool` (two gathers, two masked fills, a
 * softmax, a product and a sum) in one call, plain fp32 within 1e-5 of it. Returns 0, -1 for a candidate past
 * the rows. */
/* the first w <= 16 floats at p in lanes 0 .. w-1, zeros after */
static inline f32x16 lanes16(const float *p, int64_t w) {
    if (w == 16) return load16(p);
    float lanes[16] = {0};
    memcpy(lanes, p, sizeof(float) * (size_t)w);
    return load16(lanes);
}

int dsv4_gated_pool(const float *kv, const float *score, int64_t n_rows, int64_t c, const int64_t *candidates,
                    int64_t e, int64_t n, float *out) {
    int bad = 0;
    #pragma omp parallel for schedule(static) num_threads(split_threads(e * n * c * 8)) reduction(|:bad)
    for (int64_t entry = 0; entry < e; entry++) {
        const int64_t *cand = candidates + entry * n;
        float *o = out + entry * c;
        int any = 0;
        for (int64_t i = 0; i < n; i++) {
            bad |= cand[i] >= n_rows;
            any |= cand[i] >= 0 && cand[i] < n_rows;
        }
        if (!any) { /* no candidate: the reference's softmax of -inf scores, NaN */
            for (int64_t ch = 0; ch < c; ch++) o[ch] = NAN;
            continue;
        }
        for (int64_t ch = 0; ch < c; ch += 16) {
            const int64_t w = c - ch < 16 ? c - ch : 16;
            f32x16 top = splat16(-INFINITY), sum = splat16(0.0f), acc = splat16(0.0f);
            for (int64_t i = 0; i < n; i++)
                if (cand[i] >= 0 && cand[i] < n_rows) top = max16(lanes16(score + cand[i] * c + ch, w), top);
            for (int64_t i = 0; i < n; i++) {
                if (cand[i] < 0 || cand[i] >= n_rows) continue;
                const f32x16 p = exp16(lanes16(score + cand[i] * c + ch, w) - top);
                sum += p;
                acc += p * lanes16(kv + cand[i] * c + ch, w);
            }
            float lanes[16];
            store16(lanes, acc / sum);
            memcpy(o + ch, lanes, sizeof(float) * (size_t)w);
        }
    }
    return bad ? -1 : 0;
}

/* The gradient of `dsv4_sinkhorn` (training): grad [T, h, h] of its output -> grad of its input comb0 [T, h, h]
 * (the exponentials), written to out. The forward is replayed, LANES tokens at a time, keeping every step's input
 * and divisors; each step y = c / s with s = sum(c) (+ eps) over a row or column passes back
 * dc = (g - sum(g * c / s)) / s over that row or column. */
int dsv4_sinkhorn_backward(const float *comb0, const float *grad, float *out, int64_t t, int64_t h, int64_t iters,
                           float eps) {
    if (h > 16) return -1;
    const int64_t hh = h * h, steps = 2 * iters;
    float *inputs = malloc(sizeof(float) * (size_t)(steps * hh * LANES));
    float *divisors = malloc(sizeof(float) * (size_t)(steps * h * LANES));
    float c[256 * LANES], g[256 * LANES];
    if (!inputs || !divisors) { free(inputs); free(divisors); return -1; }
    for (int64_t r0 = 0; r0 < t; r0 += LANES) {
        const int64_t n = t - r0 < LANES ? t - r0 : LANES;
        to_lanes(comb0, c, r0, n, hh);
        for (int64_t step = 0; step < steps; step++) {
            memcpy(inputs + step * hh * LANES, c, sizeof(float) * (size_t)(hh * LANES));
            sinkhorn_step(c, h, step, eps, divisors + step * h * LANES);
        }
        to_lanes(grad, g, r0, n, hh);
        for (int64_t step = steps - 1; step >= 0; step--) {
            const float *in = inputs + step * hh * LANES, *div = divisors + step * h * LANES;
            const int rows = step % 2 == 0;
            for (int64_t a = 0; a < h; a++) {
                float dot[LANES] = {0}; /* sum over the line of g * (c / s) */
                for (int64_t b = 0; b < h; b++) {
                    const int64_t at = (rows ? a * h + b : b * h + a) * LANES;
                    for (int l = 0; l < LANES; l++) dot[l] += g[at + l] * (in[at + l] / div[a * LANES + l]);
                }
                for (int64_t b = 0; b < h; b++) {
                    const int64_t at = (rows ? a * h + b : b * h + a) * LANES;
                    for (int l = 0; l < LANES; l++) g[at + l] = (g[at + l] - dot[l]) / div[a * LANES + l];
                }
            }
        }
        from_lanes(g, out, r0, n, hh);
    }
    free(inputs);
    free(divisors);
    return 0;
}

/* ------------------------------------------------------------------------------------------ training backwards */

/* The sum of a[i] * b[i] over n fp32 values in 16 interleaved lanes (which vectorise), then the lanes in order */
static float dot16(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; l++) acc[l] += a[i + l] * b[i + l];
    float sum = 0.0f;
    for (; i < n; i++) sum += a[i] * b[i];
    for (int l = 0; l < 16; l++) sum += acc[l];
    return sum;
}

/* The gradient of the fp32 RMSNorm y = w * (x * inv), inv = 1 / sqrt(mean(x^2) + eps) per row as the forward
 * computed it (x, g, dx [rows, n]; w [n]; inv [rows]): dx = inv * (g w) - x * (inv^3 / n) * sum(g w x), and, unless
 * dw is NULL, dw [n] = the sum over rows in order of g * (x * inv). scratch holds n floats. */
int dsv4_rms_norm_backward(const float *x, const float *g, const float *w, const float *inv, float *dx, float *dw,
                           int64_t rows, int64_t n) {
    float *gw = malloc(sizeof(float) * (size_t)(n ? n : 1));
    if (!gw) return -1;
    if (dw) memset(dw, 0, sizeof(float) * (size_t)n);
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n, *gr = g + r * n;
        float *dxr = dx + r * n;
        const float s = inv[r];
        for (int64_t i = 0; i < n; i++) gw[i] = gr[i] * w[i];
        const float c = s * s * s * dot16(gw, xr, n) / (float)n;
        for (int64_t i = 0; i < n; i++) dxr[i] = s * gw[i] - xr[i] * c;
        if (dw)
            for (int64_t i = 0; i < n; i++) dw[i] += gr[i] * (xr[i] * s);
    }
    free(gw);
    return 0;
}

/* The gradient of SwiGLU's fp32 activation h = w * (silu(a) * b), a = min(gate, L), b = clamp(up, -L, L) (gate, up,
 * sig = sigmoid(a) as torch computes it, dh, dgate, dup [rows, n]; w [rows], or NULL for no routing weight):
 * torch's clamp backward (the gradient passes where the input lies inside the bounds, bounds included) and silu's,
 * s (1 + a (1 - s)); dw [rows] (when w) = the sum over the row of dh * silu(a) * b, in 16 lanes. */
int dsv4_swiglu_backward(const float *gate, const float *up, const float *sig, const float *w, const float *dh,
                         float *dgate, float *dup, float *dw, int64_t rows, int64_t n, float limit) {
    for (int64_t r = 0; r < rows; r++) {
        const float *ga = gate + r * n, *u = up + r * n, *sg = sig + r * n, *d = dh + r * n;
        float *dga = dgate + r * n, *du = dup + r * n;
        const float wr = w ? w[r] : 1.0f;
        float acc[16] = {0};
        for (int64_t i0 = 0; i0 < n; i0 += 16) {
            const int64_t m = n - i0 < 16 ? n - i0 : 16;
            for (int64_t l = 0; l < m; l++) {
                const int64_t i = i0 + l;
                const float a = ga[i] > limit ? limit : ga[i];
                const float b = u[i] < -limit ? -limit : (u[i] > limit ? limit : u[i]);
                const float s = sg[i], act = a * s, gd = d[i] * wr;
                dga[i] = ga[i] <= limit ? gd * b * (s * (1.0f + a * (1.0f - s))) : 0.0f;
                du[i] = (u[i] >= -limit && u[i] <= limit) ? gd * act : 0.0f;
                acc[l] += d[i] * (act * b);
            }
        }
        if (dw) {
            float sum = 0.0f;
            for (int l = 0; l < 16; l++) sum += acc[l];
            dw[r] = sum;
        }
    }
    return 0;
}

/* The gradient of mHC's fp32 write-back new_k = post_k out + sum_j comb[j,k] x_j (out [T, d]; x, g, d_x [T, h, d];
 * post, d_post [T, h]; comb, d_comb [T, h, h]; d_out [T, d]): d_out = sum_k post_k g_k, d_x_j = sum_k comb[j,k] g_k,
 * d_post_k = g_k . out and d_comb[j,k] = x_j . g_k, the dot products in 16 lanes. */
int dsv4_hc_post_backward(const float *out, const float *x, const float *post, const float *comb, const float *g,
                          float *d_out, float *d_x, float *d_post, float *d_comb, int64_t t, int64_t h, int64_t d) {
    for (int64_t r = 0; r < t; r++) {
        const float *gr = g + r * h * d, *xr = x + r * h * d, *o = out + r * d, *c = comb + r * h * h;
        const float *p = post + r * h;
        float *dor = d_out + r * d, *dxr = d_x + r * h * d;
        for (int64_t i = 0; i < d; i++) dor[i] = p[0] * gr[i];
        for (int64_t k = 1; k < h; k++)
            for (int64_t i = 0; i < d; i++) dor[i] += p[k] * gr[k * d + i];
        for (int64_t j = 0; j < h; j++) {
            float *dx = dxr + j * d;
            for (int64_t i = 0; i < d; i++) dx[i] = c[j * h] * gr[i];
            for (int64_t k = 1; k < h; k++)
                for (int64_t i = 0; i < d; i++) dx[i] += c[j * h + k] * gr[k * d + i];
        }
        for (int64_t k = 0; k < h; k++) d_post[r * h + k] = dot16(gr + k * d, o, d);
        for (int64_t j = 0; j < h; j++)
            for (int64_t k = 0; k < h; k++) d_comb[r * h * h + j * h + k] = dot16(xr + j * d, gr + k * d, d);
    }
    return 0;
}

/* The gradient of mHC's fp32 read u = sum_k pre_k x_k (x, d_x [T, h, d]; pre, d_pre [T, h]; g [T, d]):
 * d_x_k = pre_k g and d_pre_k = x_k . g, the dot products in 16 lanes. */
int dsv4_hc_collapse_backward(const float *x, const float *pre, const float *g, float *d_x, float *d_pre, int64_t t,
                              int64_t h, int64_t d) {
    for (int64_t r = 0; r < t; r++) {
        const float *gr = g + r * d;
        for (int64_t k = 0; k < h; k++) {
            const float p = pre[r * h + k];
            float *dx = d_x + (r * h + k) * d;
            for (int64_t i = 0; i < d; i++) dx[i] = p * gr[i];
            d_pre[r * h + k] = dot16(x + (r * h + k) * d, gr, d);
        }
    }
    return 0;
}
