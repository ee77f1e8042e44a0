// Causal softmax over attention scores [B, H, T, T], one warp per row, for the attention core of
// mpmp/nn/functional.py (attention_forward / attention_backward). The scores arrive already scaled
// (q was multiplied by 1 / sqrt(hd)) and in fp32 (cuBLAS writes them so from 16-bit q and k).
// Row r is query position i = r mod T; its columns j > i are masked: they get probability 0.
//
//   p_j = exp(s_j - m) / sum_{k <= i} exp(s_k - m),   m = max_{k <= i} s_k
//   ds_j = p_j (dp_j - sum_k p_k dp_k)
#include "common.cuh"

using namespace mpmp;

// Merge a running (max m, sum s of exp(x - m)) with another: the online softmax of Milakov and
// Gimelshein (arXiv 1805.02867). An empty side has m = -inf and s = 0.
__device__ __forceinline__ void online_merge(float& m, float& s, float m2, float s2) {
    const float mn = fmaxf(m, m2);
    if (mn == neg_inf()) return;  // both empty
    s = s * expf(m - mn) + s2 * expf(m2 - mn);
    m = mn;
}

template <typename T>
__global__ void causal_softmax_forward(T* p, const float* scores, long long rows, int t) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int valid = (int)(row % t) + 1;  // columns 0 .. i
    const float* s = scores + row * t;
    T* out = p + row * t;
    // one pass: running max and sum of exponentials per lane, then merged across the warp
    float m = neg_inf(), sum = 0.0f;
    for (int j = lane; j < valid; j += 32) online_merge(m, sum, s[j], 1.0f);
    for (int offset = 16; offset > 0; offset >>= 1) {
        const float m2 = __shfl_xor_sync(kFullMask, m, offset);
        const float s2 = __shfl_xor_sync(kFullMask, sum, offset);
        online_merge(m, sum, m2, s2);
    }
    // p_j = exp(s_j - m) / sum, and 0 above the diagonal
    const float inv = 1.0f / sum;
    for (int j = lane; j < t; j += 32) out[j] = from_float<T>(j < valid ? expf(s[j] - m) * inv : 0.0f);
}

// ds = p (dp - sum(p dp)) row by row; ds may be written over an fp32 dp only when T is float.
template <typename T>
__global__ void causal_softmax_backward(T* ds, const T* p, const float* dp, long long rows, int t) {
    const int lane = threadIdx.x % 32;
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (row >= rows) return;
    const int valid = (int)(row % t) + 1;
    const T* pr = p + row * t;
    const float* dpr = dp + row * t;
    T* out = ds + row * t;
    // rowdot = sum_j p_j dp_j (p is 0 above the diagonal)
    float dot = 0.0f;
    for (int j = lane; j < valid; j += 32) dot += to_float(pr[j]) * dpr[j];
    dot = warp_sum(dot);
    // ds_j = p_j (dp_j - rowdot)
    for (int j = lane; j < t; j += 32) out[j] = from_float<T>(j < valid ? to_float(pr[j]) * (dpr[j] - dot) : 0.0f);
}
