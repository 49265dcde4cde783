/* One-row products with MLX's affine-quantized weights, for decoding on the CPU.
 *
 * Layout (MLX's, mlx-lm's): a (M, N) weight is stored as uint32 words, 32/bits codes per word,
 * the first code in the lowest bits; on a little-endian machine that is, per row, N bytes for
 * 8 bits, and N/2 bytes for 4 bits with code 2i in the low nibble of byte i and 2i+1 in the high
 * one. scales and biases are (M, N/group) float32: w[r][j] = scale[r][j/group] * q[r][j] + bias[r][j/group].
 *
 *     out[r] = sum_g scale[r][g] * (q[r][g] . x[g]) + bias[r][g] * sum(x[g])
 *
 * The inner dot keeps 16 partial sums, one per vector lane (GCC/Clang vector extensions: uint8 ->
 * float conversion and multiply-adds in registers), reduced once per row. `work` holds N +
 * N/group floats: the group sums of x, and for 4 bits x with each 32-value block split into its
 * even and odd positions (the order the nibbles come in).
 *
 * Built at first use by mlx_gemma.cpu.native with the machine's C compiler; MLX's own
 * quantized_matmul is used where it is not available.
 */

#include <stdint.h>

/* 16-lane vectors in the GCC/Clang vector extension: one AVX-512 register, two AVX2 ones, four
   NEON ones; the compiler maps them to whatever this machine has. */
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint8_t u8x16 __attribute__((vector_size(16)));
/* the same, for loads from any address (aligned(1) / aligned(4): unaligned vector loads) */
typedef float f32x16_any __attribute__((vector_size(64), aligned(4)));
typedef uint8_t u8x16_any __attribute__((vector_size(16), aligned(1)));
#define LANES 16

/* An empty asm that says the loaded codes live in a vector register: without it GCC 12 splits a
   plain 16-byte load into general registers and converts byte by byte (5x slower, measured). */
#if defined(__x86_64__) || defined(__i386__)
#define IN_VECTOR_REGISTER(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define IN_VECTOR_REGISTER(v) __asm__("" : "+w"(v))
#else
#define IN_VECTOR_REGISTER(v) ((void)0)
#endif

static inline f32x16 load_f(const float *p) {
    return *(const f32x16_any *)p;
}

/* 16 codes as floats: nibble 0 = bytes, 1 = low nibbles, 2 = high nibbles */
static inline f32x16 load_codes(const uint8_t *p, int nibble) {
    u8x16 b = *(const u8x16_any *)p;
    IN_VECTOR_REGISTER(b);
    if (nibble == 1)
        b = b & 15;
    else if (nibble == 2)
        b = b >> 4;
    /* widen to int32 first: compilers turn a direct uint8 -> float conversion into scalar code */
    return __builtin_convertvector(__builtin_convertvector(b, i32x16), f32x16);
}

/* scale * (q . x) over one group, lane by lane; 8-bit codes, one byte each (n % 32 == 0) */
static inline f32x16 group8(const uint8_t *q, const float *x, int n) {
    f32x16 p0 = {0}, p1 = {0};
    for (int j = 0; j < n; j += 2 * LANES) {
        p0 += load_codes(q + j, 0) * load_f(x + j);
        p1 += load_codes(q + j + LANES, 0) * load_f(x + j + LANES);
    }
    return p0 + p1;
}

/* the same for 4-bit codes, n codes in n/2 bytes; xs: x of these n positions, each 32-block as
   16 even then 16 odd values (the order the low and high nibbles come in) */
static inline f32x16 group4(const uint8_t *q, const float *xs, int n) {
    f32x16 p0 = {0}, p1 = {0};
    for (int j = 0; j < n; j += 2 * LANES) {
        const uint8_t *b = q + j / 2;
        p0 += load_codes(b, 1) * load_f(xs + j);
        p1 += load_codes(b, 2) * load_f(xs + j + LANES);
    }
    return p0 + p1;
}

/* Returns 0, or -1 for a layout this kernel does not take (the caller checks first). */
int qgemv_affine(const uint8_t *w, const float *scales, const float *biases, const float *x, float *out,
                 int M, int N, int group, int bits, float *work) {
    if ((bits != 8 && bits != 4) || group % (2 * LANES) != 0 || N % group != 0)
        return -1;
    const int groups = N / group;
    float *xsum = work, *xs = work + groups;
    for (int g = 0; g < groups; g++) {
        float s = 0.0f;
        for (int j = 0; j < group; j++)
            s += x[g * group + j];
        xsum[g] = s;
    }
    if (bits == 4) {
        for (int j = 0; j < N; j += 2 * LANES)
            for (int k = 0; k < LANES; k++) {
                xs[j + k] = x[j + 2 * k];
                xs[j + LANES + k] = x[j + 2 * k + 1];
            }
    }
    const long row_bytes = (long)N * bits / 8;
    for (int r = 0; r < M; r++) {
        const uint8_t *q = w + r * row_bytes;
        const float *sc = scales + (long)r * groups, *bi = biases + (long)r * groups;
        f32x16 acc = {0};
        float offset = 0.0f;
        for (int g = 0; g < groups; g++) {
            f32x16 d = bits == 8 ? group8(q + g * group, x + g * group, group)
                                 : group4(q + g * group / 2, xs + g * group, group);
            acc += sc[g] * d;
            offset += bi[g] * xsum[g];
        }
        for (int k = 0; k < LANES; k++)
            offset += acc[k];
        out[r] = offset;
    }
    return 0;
}
