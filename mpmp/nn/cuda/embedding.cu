// The backward of an embedding lookup (embedding_backward of mpmp/nn/functional.py): scatter-add
// the rows of dout into the fp32 gradient rows that ids selected. The forward is a gather, which
// CuPy's indexing does on any storage (it moves bit patterns only).
//
//   dweight[ids[k], :] += dout[k, :]
//
// Repeated ids add from several warps: atomicAdd, so the order of the additions (and the last bits
// of dweight) can differ between runs.
#include "common.cuh"

using namespace mpmp;

// One warp per looked-up row.
template <typename T>
__global__ void embedding_backward(float* dweight, const T* dout, const long long* ids, long long n, int d) {
    const int lane = threadIdx.x % 32;
    const long long k = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (k >= n) return;
    float* row = dweight + ids[k] * d;
    const T* src = dout + k * d;
    for (int i = lane; i < d; i += 32) atomicAdd(row + i, to_float(src[i]));
}
