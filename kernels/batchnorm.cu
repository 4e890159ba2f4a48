// Batch normalisation over (n, c, l) views (l = 1 for (N, F) inputs, H W for images): the batch's
// statistics per channel, their application, and the backward. Each reduction over a channel's
// n l values is one block of BN_THREADS threads that sum in a fixed order and combine in a fixed
// tree in shared memory: deterministic, no atomics on float sums. The kernels template on the
// storage type S of x, y, dy and dx (float, double or nna::bf16, see bfloat16.cuh); the statistics,
// gamma, beta and their gradients are in the compute type, and so are the sums.
#include "activations.cuh"
#include "bfloat16.cuh"

constexpr int BN_THREADS = 256;  // the loader launches blocks of this many threads for the reductions

namespace nna {

// The sum over one channel's values of f(value index k in [0, n l), its element offset), by a block.
template <typename T, typename F> __device__ T channel_sum(long long n, int c, long long l, int ch, F f) {
  __shared__ T part[BN_THREADS];
  const long long count = n * l;
  T acc = T(0);
  for (long long k = threadIdx.x; k < count; k += BN_THREADS) acc += f((k / l * c + ch) * l + k % l);
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = BN_THREADS / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  const T total = part[0];
  __syncthreads();  // before a sum with the same f (the same instantiation, the same part) writes part again
  return total;
}

}  // namespace nna

// One block per channel: mean and 1/sqrt(biased var + eps), then the running estimates move by
// momentum towards the mean and the unbiased variance (PyTorch's convention).
template <typename S>
__global__ void batchnorm_stats(const S* x, nna::compute_t<S>* mean, nna::compute_t<S>* invstd,
                                nna::compute_t<S>* running_mean, nna::compute_t<S>* running_var, long long n, int c,
                                long long l, double eps, double momentum) {
  using T = nna::compute_t<S>;
  const int ch = blockIdx.x;
  const T count = T(n * l);
  const T m = nna::channel_sum<T>(n, c, l, ch, [&](long long at) { return nna::load(x[at]); }) / count;
  const T var = nna::channel_sum<T>(n, c, l, ch, [&](long long at) {
    const T d = nna::load(x[at]) - m;
    return d * d;
  }) / count;
  if (threadIdx.x == 0) {
    mean[ch] = m;
    invstd[ch] = T(1) / nna::math::sqrt(var + T(eps));
    running_mean[ch] = running_mean[ch] * T(1.0 - momentum) + T(momentum) * m;
    running_var[ch] = running_var[ch] * T(1.0 - momentum) + T(momentum * (n * l) / (n * l - 1)) * var;
  }
}

// y = (x - mean) * (invstd * gamma) + beta, elementwise.
template <typename S>
__global__ void batchnorm_apply(const S* x, const nna::compute_t<S>* mean, const nna::compute_t<S>* invstd,
                                const nna::compute_t<S>* gamma, const nna::compute_t<S>* beta, S* y, long long n, int c,
                                long long l) {
  using T = nna::compute_t<S>;
  const long long total = n * c * l;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int ch = (int)(i / l % c);
    y[i] = nna::store<S>((nna::load(x[i]) - mean[ch]) * (invstd[ch] * gamma[ch]) + beta[ch]);
  }
}

// One block per channel: dbeta = sum(dy), dgamma = sum(dy xhat), xhat = (x - mean) invstd.
template <typename S>
__global__ void batchnorm_backward_reduce(const S* dy, const S* x, const nna::compute_t<S>* mean,
                                          const nna::compute_t<S>* invstd, nna::compute_t<S>* dgamma,
                                          nna::compute_t<S>* dbeta, long long n, int c, long long l) {
  using T = nna::compute_t<S>;
  const int ch = blockIdx.x;
  const T m = mean[ch], s = invstd[ch];
  const T db = nna::channel_sum<T>(n, c, l, ch, [&](long long at) { return nna::load(dy[at]); });
  const T dg = nna::channel_sum<T>(n, c, l, ch, [&](long long at) {
    return nna::load(dy[at]) * ((nna::load(x[at]) - m) * s);
  });
  if (threadIdx.x == 0) {
    dbeta[ch] = db;
    dgamma[ch] = dg;
  }
}

// Training: dx = (M dy - dbeta - xhat dgamma) gamma invstd / M over a channel's M values; eval: the
// statistics are constants, dx = dy gamma invstd.
template <typename S>
__global__ void batchnorm_backward_apply(const S* dy, const S* x, const nna::compute_t<S>* mean,
                                         const nna::compute_t<S>* invstd, const nna::compute_t<S>* gamma,
                                         const nna::compute_t<S>* dgamma, const nna::compute_t<S>* dbeta, S* dx,
                                         long long n, int c, long long l, int training) {
  using T = nna::compute_t<S>;
  const T count = T(n * l), inv_count = T(1.0 / (n * l));
  const long long total = n * c * l;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int ch = (int)(i / l % c);
    if (training) {
      const T xhat = (nna::load(x[i]) - mean[ch]) * invstd[ch];
      dx[i] = nna::store<S>((nna::load(dy[i]) * count - dbeta[ch] - xhat * dgamma[ch]) *
                            (gamma[ch] * invstd[ch] * inv_count));
    } else {
      dx[i] = nna::store<S>(nna::load(dy[i]) * (gamma[ch] * invstd[ch]));
    }
  }
}
