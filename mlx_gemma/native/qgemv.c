/* One-row products with MLX's affine-quantized weights, for decoding on the CPU.
 *
 * Layout (MLX's, mlx-lm's): a (M, N) weight is stored as uint32 words, 32/bits codes per word,
 * the first code in the lowest bits; on a little-endian machine that is, per row, N bytes for
 * 8 bits, and N/2 bytes for 4 bits with code 2i in the low nibble of byte i and 2i+1 in the high
 * one. scales and biases are (M, N/group) float32: w[r][j] = scale[r][j/group] * q[r][j] + bias[r][j/group].
 *
 *     out[r] = sum_g scale[r][g] * (q[r][g] . x[g]) + bias[r][g] * sum(x[g])
 *
 * The inner dot keeps 16 partial sums, one per lane, so a compiler vectorises it (uint8 ->
 * float conversion and fused multiply-adds) without reassociating a reduction. `work` holds N +
 * N/group floats: the group sums of x, and for 4 bits x with each 32-value block split into its
 * even and odd positions (the order the nibbles come in).
 *
 * Built at first use by mlx_gemma.native with the machine's C compiler; MLX's own
 * quantized_matmul is used where it is not available.
 */

#include <stdint.h>

#define LANES 16

/* acc[k] += scale * (q . x over one group), lane by lane; codes one byte each */
static void group8(const uint8_t *q, const float *x, int n, float scale, float *acc) {
    float part[LANES] = {0};
    for (int j = 0; j < n; j += LANES)
        for (int k = 0; k < LANES; k++)
            part[k] += (float)q[j + k] * x[j + k];
    for (int k = 0; k < LANES; k++)
        acc[k] += scale * part[k];
}

/* the same for n codes in n/2 bytes; xs: x of these n positions, each 32-block as 16 even then
   16 odd values (the order the low and high nibbles come in) */
static void group4(const uint8_t *q, const float *xs, int n, float scale, float *acc) {
    float part[LANES] = {0};
    for (int j = 0; j < n; j += 2 * LANES) {
        const uint8_t *b = q + j / 2;
        for (int k = 0; k < LANES; k++)
            part[k] += (float)(b[k] & 15) * xs[j + k] + (float)(b[k] >> 4) * xs[j + LANES + k];
    }
    for (int k = 0; k < LANES; k++)
        acc[k] += scale * part[k];
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
        float acc[LANES] = {0}, offset = 0.0f;
        for (int g = 0; g < groups; g++) {
            if (bits == 8)
                group8(q + g * group, x + g * group, group, sc[g], acc);
            else
                group4(q + g * group / 2, xs + g * group, group, sc[g], acc);
            offset += bi[g] * xsum[g];
        }
        for (int k = 0; k < LANES; k++)
            offset += acc[k];
        out[r] = offset;
    }
    return 0;
}
