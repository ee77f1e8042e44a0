// AdamW over a flat fp32 parameter buffer, exactly as mpmp/optim/adamw.py's adamw_update and
// torch.optim.AdamW (decoupled weight decay, bias correction), one fused pass per element:
//
//   g = grad * grad_scale                      (clipping and the loss scale, folded into one factor)
//   p <- p (1 - lr wd)                         (only inside the decay runs: matrices and embeddings)
//   m <- m + (1 - b1) (g - m)
//   v <- b2 v + (1 - b2) g^2
//   p <- p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps),   bc_k = 1 - b_k^step
//
// grad_scale can also come from the device (scale_ptr, e.g. a clip coefficient computed there), and
// a device flag (skip, e.g. from unscale_and_check) can veto the whole step: no host synchronisation.
#include "common.cuh"

using namespace mpmp;

// Whether element i lies in one of the sorted, disjoint [lo, hi) runs (runs = lo0, hi0, lo1, hi1, ...).
__device__ __forceinline__ bool in_runs(long long i, const long long* runs, int n_runs) {
    int a = 0, b = n_runs;  // binary search for the last run with lo <= i
    while (a < b) {
        const int mid = (a + b) / 2;
        if (runs[2 * mid] <= i) a = mid + 1;
        else b = mid;
    }
    return a > 0 && i < runs[2 * (a - 1) + 1];
}

// Scalars travel one by one (CuPy passes NumPy scalars by value, not structs): step_size = lr / bc1,
// bias2_sqrt = sqrt(bc2), computed on the host in double as the NumPy version does.
__global__ void adamw_update(float* param, const float* grad, float* m, float* v, long long n,
                             const long long* decay_runs, int n_runs, float lr, float beta1, float beta2, float eps,
                             float weight_decay, float step_size, float bias2_sqrt, float grad_scale,
                             const float* scale_ptr, const int* skip) {
    if (skip != nullptr && *skip != 0) return;
    const float gs = scale_ptr != nullptr ? grad_scale * *scale_ptr : grad_scale;
    const float keep = 1.0f - lr * weight_decay;
    for (long long i = first_index(); i < n; i += grid_stride()) {
        const float g = grad[i] * gs;
        float p = param[i];
        // decoupled weight decay, in torch's order: before the moments
        if (weight_decay != 0.0f && in_runs(i, decay_runs, n_runs)) p *= keep;
        // m <- m + (1 - b1)(g - m),  v <- b2 v + (1 - b2) g^2
        const float mi = m[i] + (1.0f - beta1) * (g - m[i]);
        const float vi = beta2 * v[i] + (1.0f - beta2) * (g * g);
        m[i] = mi;
        v[i] = vi;
        // p <- p - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)
        param[i] = p - step_size * (mi / (sqrtf(vi) / bias2_sqrt + eps));
    }
}
