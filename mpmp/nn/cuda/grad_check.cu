// Gradient housekeeping on the flat fp32 gradient buffer, kept on the device so that a step needs no
// host synchronisation (the trainer reads the flag and the norm once, with the loss):
//
//   unscale_and_check:  grad *= inv_scale;  found_inf = 1 if any element is inf or NaN
//                       (torch's _amp_foreach_non_finite_check_and_unscale_)
//   sum_squares:        sum of grad^2 over the [lo, hi) runs that count for the global norm, in fp64
//                       (clip.local_sq_norm), deterministic: block partials added in order
#include "common.cuh"

using namespace mpmp;

// inv_scale_ptr (may be null) multiplies inv_scale: the scale can live on the device.
__global__ void unscale_and_check(float* grad, int* found_inf, long long n, float inv_scale,
                                  const float* inv_scale_ptr) {
    const float s = inv_scale_ptr != nullptr ? inv_scale * *inv_scale_ptr : inv_scale;
    bool bad = false;
    for (long long i = first_index(); i < n; i += grid_stride()) {
        const float g = grad[i];
        bad |= !is_finite(g);
        grad[i] = g * s;
    }
    // any thread that saw a non-finite value raises the flag (all writers write 1: no race on the value)
    if (__syncthreads_or(bad) && threadIdx.x == 0) *found_inf = 1;
}

// partial[block] = sum of grad[i]^2 over this block's share of the runs (runs = lo0, hi0, lo1, ...).
// The runs are walked in order and each block takes a grid-stride share of every run.
__global__ void sum_squares_partial(double* partial, const float* grad, const long long* runs, int n_runs) {
    double s = 0.0;
    for (int k = 0; k < n_runs; ++k) {
        for (long long i = runs[2 * k] + first_index(); i < runs[2 * k + 1]; i += grid_stride()) {
            const double g = grad[i];
            s += g * g;
        }
    }
    s = block_sum(s);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// out[0] = sum of the partials, in order, by one block.
__global__ void sum_squares_finish(double* out, const double* partial, int parts) {
    double s = 0.0;
    for (int k = threadIdx.x; k < parts; k += blockDim.x) s += partial[k];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}
