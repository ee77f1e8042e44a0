// Elementwise steps that CuPy's own operators cannot do on bf16 storage (uint16 arrays to CuPy):
// format conversion, in-place add (residual connections), scaling.
#include "common.cuh"

using namespace mpmp;

// out = x converted to another storage type (fp32 masters <-> 16-bit model copies).
template <typename In, typename Out>
__global__ void cast(Out* out, const In* x, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) out[i] = from_float<Out>(to_float(x[i]));
}

// a += b, in place (the residual stream).
template <typename T>
__global__ void add_inplace(T* a, const T* b, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) a[i] = from_float<T>(to_float(a[i]) + to_float(b[i]));
}

// out = alpha * x (out may be x).
template <typename T>
__global__ void scale(T* out, const T* x, float alpha, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) out[i] = from_float<T>(alpha * to_float(x[i]));
}
