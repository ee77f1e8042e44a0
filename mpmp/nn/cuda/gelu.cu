// GELU with the tanh approximation (GPT-2's "gelu_new"), alone and fused with the bias of the linear
// before it. Mirrors gelu_forward / gelu_backward of mpmp/nn/functional.py.
//
//   y = 0.5 x (1 + t),   t = tanh(c (x + a x^3)),   c = sqrt(2 / pi),   a = 0.044715
//   dy/dx = 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)
#include "common.cuh"

using namespace mpmp;

constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

__device__ __forceinline__ float gelu_tanh(float x) { return tanhf(kGeluC * (x + kGeluA * x * x * x)); }

__device__ __forceinline__ float gelu_grad(float x, float t) {
    // 0.5 (1 + t) + 0.5 x (1 - t^2) c (1 + 3 a x^2)
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kGeluC * (1.0f + 3.0f * kGeluA * x * x);
}

// y = 0.5 x (1 + t); t is stored too: functional.gelu_forward's cache is (x, t).
template <typename T>
__global__ void gelu_forward(T* y, T* t_out, const T* x, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        const float xi = to_float(x[i]);
        const float t = gelu_tanh(xi);
        t_out[i] = from_float<T>(t);
        y[i] = from_float<T>(0.5f * xi * (1.0f + t));
    }
}

// dx = dy * dgelu/dx(x, t), with the t kept by the forward.
template <typename T>
__global__ void gelu_backward(T* dx, const T* dy, const T* x, const T* t, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        dx[i] = from_float<T>(to_float(dy[i]) * gelu_grad(to_float(x[i]), to_float(t[i])));
    }
}

// Fused bias + GELU over rows of `cols` columns: x = h + b[col] is written back into h (the cache,
// rounded to the storage type), and y = gelu(x) is computed from that rounded x so that forward and
// backward see the same x.
template <typename T>
__global__ void bias_gelu_forward(T* y, T* h, const T* b, long long n, int cols) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        const T x_stored = from_float<T>(to_float(h[i]) + to_float(b[i % cols]));
        const float x = to_float(x_stored);
        h[i] = x_stored;
        y[i] = from_float<T>(0.5f * x * (1.0f + gelu_tanh(x)));
    }
}

// dh = dy * dgelu/dx(x), t recomputed from the cached x (one tanh instead of a stored tensor). The
// bias gradient, the column sums of dh, is reduced afterwards by bias_grad_partial/column_sum_finish.
template <typename T>
__global__ void bias_gelu_backward(T* dh, const T* dy, const T* x, long long n) {
    for (long long i = first_index(); i < n; i += grid_stride()) {
        const float xi = to_float(x[i]);
        dh[i] = from_float<T>(to_float(dy[i]) * gelu_grad(xi, gelu_tanh(xi)));
    }
}
