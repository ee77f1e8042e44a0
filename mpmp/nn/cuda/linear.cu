// The bias of a linear layer y = x @ W + b (the products themselves go to cuBLAS, see gemm.py):
// adding it in forward, and db += sum over rows of dy in backward.
//
// The column sums are deterministic (no atomics): a first kernel writes one partial sum per
// (part of the rows, column), a second adds the parts in a fixed order into the fp32 gradient.
#include "common.cuh"

using namespace mpmp;

// y[r, c] += b[c] over rows of `cols` columns, in place.
template <typename T>
__global__ void bias_add(T* y, const T* b, long long n, int cols) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        y[i] = from_float<T>(to_float(y[i]) + to_float(b[i % cols]));
    }
}

// Tiles of 32 columns (threadIdx.x) by blockDim.y row lanes; blockIdx.y is the part of the rows.
//   partial[part, c] = sum over rows r of this part of dy[r, c]
template <typename T>
__global__ void bias_grad_partial(float* partial, const T* dy, int rows, int cols) {
    __shared__ float tile[32][33];  // [row lane][column], padded against bank conflicts
    const int c = blockIdx.x * 32 + threadIdx.x;
    const int parts = gridDim.y, part = blockIdx.y;
    const int per_part = (rows + parts - 1) / parts;
    const int r0 = part * per_part;
    const int r1 = min(rows, r0 + per_part);
    float s = 0.0f;
    if (c < cols) {
        for (int r = r0 + threadIdx.y; r < r1; r += blockDim.y) s += to_float(dy[(long long)r * cols + c]);
    }
    tile[threadIdx.y][threadIdx.x] = s;
    __syncthreads();
    // the first row lane adds the others in order
    if (threadIdx.y == 0 && c < cols) {
        for (int k = 1; k < (int)blockDim.y; ++k) s += tile[k][threadIdx.x];
        partial[(long long)part * cols + c] = s;
    }
}

// out[c] += sum over parts p of partial[p, c] (in order: the same bits every run).
__global__ void column_sum_finish(float* out, const float* partial, int parts, int cols) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    float s = 0.0f;
    for (int p = 0; p < parts; ++p) s += partial[(long long)p * cols + c];
    out[c] += s;
}
