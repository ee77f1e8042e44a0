// Shared by every kernel of mpmp.nn.cuda: storage types, fp32 conversions, warp and block reductions.
//
// Storage: float, __half (CuPy float16 arrays) and __nv_bfloat16 (CuPy uint16 arrays holding the bf16
// bit patterns, the same patterns mpmp.backend.to_wire writes). Every kernel loads its inputs into
// float, computes and accumulates in float, and rounds to the storage type only when it stores
// (round to nearest even, overflow to inf, as mpmp.backend.round_to does on the NumPy side).
//
// The loader (mpmp/nn/cuda/_loader.py) pastes this header into each source before NVRTC sees it,
// so CuPy's compile cache keys on its text; nvcc finds it by the #include.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mpmp {

// ---- fp32 <-> storage ------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// -inf and the finite test without <cmath>: NVRTC compiles these sources with no standard headers.
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ bool is_finite(float x) { return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u; }

// ---- reductions --------------------------------------------------------------------------------
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, offset));
    return x;
}

__device__ __forceinline__ double warp_sum(double x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
    return x;
}

// Sum over the block, returned to every thread. blockDim.x is a multiple of 32 (at most 1024).
// The leading __syncthreads lets one kernel call this more than once on the same scratch.
template <typename R>
__device__ __forceinline__ R block_sum(R x) {
    __shared__ R partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    x = warp_sum(x);
    __syncthreads();
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    x = lane < (int)(blockDim.x / 32) ? partial[lane] : R(0);
    return warp_sum(x);
}

__device__ __forceinline__ float block_max(float x) {
    __shared__ float partial[32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    x = warp_max(x);
    __syncthreads();
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    x = lane < (int)(blockDim.x / 32) ? partial[lane] : neg_inf();
    return warp_max(x);
}

// ---- grid-stride loop over n elements ------------------------------------------------------------
__device__ __forceinline__ long long first_index() { return (long long)blockIdx.x * blockDim.x + threadIdx.x; }
__device__ __forceinline__ long long grid_stride() { return (long long)gridDim.x * blockDim.x; }

}  // namespace mpmp
