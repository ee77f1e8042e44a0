// Softmax cross-entropy over a vocabulary split across tensor-parallel ranks (Megatron's
// vocab-parallel cross-entropy, arXiv 1909.08053 §3), in the pieces of cross_entropy_forward /
// cross_entropy_backward of mpmp/nn/functional.py. The two all-reduces between the pieces (the row
// max; the target logit with the sum of exponentials) stay in Python.
//
// This rank holds columns [vocab_start, vocab_start + v_local) of logits [n, v_local]; columns at or
// beyond vocab_valid are padding and never take probability. One block per row.
//
//   m = max_j l_j                                   (then all-reduced: max)
//   e_j = exp(l_j - m),  S = sum_j e_j,  z = l_t - m (0 where another rank owns t)   (all-reduced: sum)
//   loss_row = log S - z
//   dl_j = scale (e_j / S - [j == t])
#include "common.cuh"

using namespace mpmp;

// row_max[r] = max over the valid columns of row r.
template <typename T>
__global__ void cross_entropy_row_max(float* row_max, const T* logits, int v_local, int vocab_valid) {
    const long long base = (long long)blockIdx.x * v_local;
    float m = neg_inf();
    for (int j = threadIdx.x; j < vocab_valid; j += blockDim.x) m = fmaxf(m, to_float(logits[base + j]));
    m = block_max(m);
    if (threadIdx.x == 0) row_max[blockIdx.x] = m;
}

// In place: logits <- e = exp(logits - m) (0 on padding), kept for the backward as on the NumPy side.
// both[0, r] = z (the target logit minus m, or 0), both[1, r] = S; safe_t[r] = the local column of
// the target (0 when not owned) and own[r] = whether this rank holds it.
template <typename T>
__global__ void cross_entropy_exp_sum(T* logits, float* both, int* safe_t, bool* own, const float* row_max,
                                      const long long* targets, long long vocab_start, int n, int v_local,
                                      int vocab_valid) {
    const int r = blockIdx.x;
    const long long base = (long long)r * v_local;
    const float m = row_max[r];
    const long long local_t = targets[r] - vocab_start;
    const bool owned = local_t >= 0 && local_t < v_local;
    // z is read before the exponentials overwrite the row
    float z = 0.0f;
    if (owned) z = to_float(logits[base + local_t]) - m;
    __syncthreads();
    // e_j = exp(l_j - m), S = sum_j e_j
    float s = 0.0f;
    for (int j = threadIdx.x; j < v_local; j += blockDim.x) {
        const float e = j < vocab_valid ? expf(to_float(logits[base + j]) - m) : 0.0f;
        const T stored = from_float<T>(e);
        logits[base + j] = stored;
        s += to_float(stored);  // S sums what the backward will divide
    }
    s = block_sum(s);
    if (threadIdx.x == 0) {
        both[r] = z;
        both[n + r] = s;
        safe_t[r] = owned ? (int)local_t : 0;
        own[r] = owned;
    }
}

// dl_j = scale (e_j / S - [own and j == t]), in place over the exponentials.
template <typename T>
__global__ void cross_entropy_backward(T* dlogits, const float* sum_exp, const int* safe_t, const bool* own,
                                       float scale, int v_local) {
    const int r = blockIdx.x;
    const long long base = (long long)r * v_local;
    const float inv = 1.0f / sum_exp[r];
    const int t = own[r] ? safe_t[r] : -1;
    for (int j = threadIdx.x; j < v_local; j += blockDim.x) {
        const float onehot = j == t ? 1.0f : 0.0f;
        dlogits[base + j] = from_float<T>(scale * (to_float(dlogits[base + j]) * inv - onehot));
    }
}
