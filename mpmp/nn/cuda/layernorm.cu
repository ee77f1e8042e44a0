// Layer norm over the last dimension (d columns), one warp per row. Mirrors layernorm_forward /
// layernorm_backward of mpmp/nn/functional.py, whose cache is (xhat, rstd, w).
//
//   mean = sum(x) / d,  rstd = 1 / sqrt(sum((x - mean)^2) / d + eps),  xhat = (x - mean) rstd
//   y = xhat w + b
//   g = dy w,  dx = rstd (g - mean(g) - xhat mean(g xhat)),  dw += sum_rows(dy xhat),  db += sum_rows(dy)
#include "common.cuh"

using namespace mpmp;

// blockDim.x / 32 rows per block. The row is read three times (sum, centred sum of squares, output);
// the second and third reads come from L1/L2.
template <typename T>
__global__ void layernorm_forward(T* y, T* xhat, float* rstd_out, const T* x, const T* w, const T* b, int rows,
                                  int d, float eps) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long base = (long long)row * d;
    // mean = sum(x) / d
    float s = 0.0f;
    for (int i = lane; i < d; i += 32) s += to_float(x[base + i]);
    const float mean = warp_sum(s) / d;
    // var = sum((x - mean)^2) / d   (centred: no cancellation)
    float v = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float c = to_float(x[base + i]) - mean;
        v += c * c;
    }
    const float rstd = rsqrtf(warp_sum(v) / d + eps);
    // xhat = (x - mean) rstd,   y = xhat w + b
    for (int i = lane; i < d; i += 32) {
        const float xh = (to_float(x[base + i]) - mean) * rstd;
        xhat[base + i] = from_float<T>(xh);
        y[base + i] = from_float<T>(xh * to_float(w[i]) + to_float(b[i]));
    }
    if (lane == 0) rstd_out[row] = rstd;
}

// dx for one row per warp: g = dy w, dx = rstd (g - mean(g) - xhat mean(g xhat)).
template <typename T>
__global__ void layernorm_backward_input(T* dx, const T* dy, const T* xhat, const float* rstd, const T* w, int rows,
                                         int d) {
    const int lane = threadIdx.x % 32;
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const long long base = (long long)row * d;
    // mean(g) and mean(g xhat)
    float sg = 0.0f, sgx = 0.0f;
    for (int i = lane; i < d; i += 32) {
        const float g = to_float(dy[base + i]) * to_float(w[i]);
        sg += g;
        sgx += g * to_float(xhat[base + i]);
    }
    const float mean_g = warp_sum(sg) / d;
    const float mean_gx = warp_sum(sgx) / d;
    const float r = rstd[row];
    // dx = rstd (g - mean(g) - xhat mean(g xhat))
    for (int i = lane; i < d; i += 32) {
        const float g = to_float(dy[base + i]) * to_float(w[i]);
        dx[base + i] = from_float<T>(r * (g - mean_g - to_float(xhat[base + i]) * mean_gx));
    }
}

// The parameter gradients as column sums, deterministic like linear.cu's bias_grad_partial:
//   partial[0, part, c] = sum over this part's rows of dy xhat,   partial[1, part, c] = ... of dy
// column_sum_finish (linear.cu) then adds the parts into dw and db.
template <typename T>
__global__ void layernorm_param_grad_partial(float* partial, const T* dy, const T* xhat, int rows, int d) {
    __shared__ float tile_w[32][33];
    __shared__ float tile_b[32][33];
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int parts = gridDim.y, part = blockIdx.y;
    const int per_part = (rows + parts - 1) / parts;
    const int r0 = part * per_part;
    const int r1 = min(rows, r0 + per_part);
    float sw = 0.0f, sb = 0.0f;
    if (c < d) {
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
            const long long i = (long long)r * d + c;
            const float g = to_float(dy[i]);
            sw += g * to_float(xhat[i]);
            sb += g;
        }
    }
    tile_w[threadIdx.y][threadIdx.x] = sw;
    tile_b[threadIdx.y][threadIdx.x] = sb;
    __syncthreads();
    if (threadIdx.y == 0 && c < d) {
        for (int k = 1; k < (int)blockDim.y; ++k) {
            sw += tile_w[k][threadIdx.x];
            sb += tile_b[k][threadIdx.x];
        }
        partial[(long long)part * d + c] = sw;
        partial[(long long)(parts + part) * d + c] = sb;
    }
}
