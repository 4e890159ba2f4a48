// Batch normalisation over (n, c, l) views (l = 1 for (N, F) inputs, H W for images): the batch's
// statistics per channel, their application, and the backward. The reductions run on a grid of
// (channel, chunk of images) blocks of BN_THREADS threads, so that a few channels still fill the
// GPU: each block sums its chunk's values in a fixed order and combines them in a fixed tree in
// shared memory; with more than one chunk a second kernel combines the chunks in their order.
// Deterministic, no atomics on float sums. The kernels template on the
// storage type S of x, y, dy and dx (float, double or nna::bf16, see bfloat16.cuh); the statistics,
// gamma, beta and their gradients are in the compute type, and so are the sums.
#include "activations.cuh"
#include "bfloat16.cuh"

constexpr int BN_THREADS = 256;  // the loader launches blocks of this many threads for the reductions

namespace nna {

// The images [first, end) of this block's chunk: blockIdx.y of chunk_images each.
struct ImageChunk {
  long long first, end;
  __device__ ImageChunk(long long n, long long chunk_images)
      : first(blockIdx.y * chunk_images), end(first + chunk_images < n ? first + chunk_images : n) {}
};

// The sum over one channel's values in a chunk of images of f(their element offset), by a block.
template <typename T, typename F>
__device__ T channel_sum(const ImageChunk& chunk, int c, long long l, int ch, F f) {
  __shared__ T part[BN_THREADS];
  const long long count = (chunk.end - chunk.first) * l;
  T acc = T(0);
  for (long long k = threadIdx.x; k < count; k += BN_THREADS)
    acc += f(((chunk.first + k / l) * c + ch) * l + k % l);
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

// A channel's statistics from its mean m and biased variance var over count values: mean and
// 1/sqrt(var + eps), and the running estimates moved by momentum towards the mean and the unbiased
// variance (PyTorch's convention).
template <typename T>
__device__ void store_stats(int ch, T m, T var, long long count, double eps, double momentum, T* mean, T* invstd,
                            T* running_mean, T* running_var) {
  mean[ch] = m;
  invstd[ch] = T(1) / math::sqrt(var + T(eps));
  running_mean[ch] = running_mean[ch] * T(1.0 - momentum) + T(momentum) * m;
  running_var[ch] = running_var[ch] * T(1.0 - momentum) + T(momentum * count / (count - 1)) * var;
}

}  // namespace nna

// Block (ch, chunk): the chunk's mean and sum of squared deviations from it (two passes over values a
// block reads twice from cache). One chunk: the channel's statistics (nna::store_stats); several:
// chunk_mean[chunk, ch] and chunk_m2[chunk, ch], which batchnorm_stats_merge combines.
template <typename S>
__global__ void batchnorm_stats(const S* x, nna::compute_t<S>* mean, nna::compute_t<S>* invstd,
                                nna::compute_t<S>* running_mean, nna::compute_t<S>* running_var,
                                nna::compute_t<S>* chunk_mean, nna::compute_t<S>* chunk_m2, long long n, int c,
                                long long l, long long chunk_images, double eps, double momentum) {
  using T = nna::compute_t<S>;
  const int ch = blockIdx.x;
  const nna::ImageChunk chunk(n, chunk_images);
  const T count = T((chunk.end - chunk.first) * l);
  const T m = nna::channel_sum<T>(chunk, c, l, ch, [&](long long at) { return nna::load(x[at]); }) / count;
  const T m2 = nna::channel_sum<T>(chunk, c, l, ch, [&](long long at) {
    const T d = nna::load(x[at]) - m;
    return d * d;
  });
  if (threadIdx.x != 0) return;
  if (gridDim.y == 1) {
    nna::store_stats(ch, m, m2 / count, n * l, eps, momentum, mean, invstd, running_mean, running_var);
  } else {
    chunk_mean[blockIdx.y * (long long)c + ch] = m;
    chunk_m2[blockIdx.y * (long long)c + ch] = m2;
  }
}

// Each channel's statistics from its chunks' (mean, squared deviations), merged in chunk order
// (Chan, Golub and LeVeque's pairwise update: stable, as the centred two passes are).
template <typename T>
__global__ void batchnorm_stats_merge(const T* chunk_mean, const T* chunk_m2, T* mean, T* invstd, T* running_mean,
                                      T* running_var, long long n, int c, long long l, long long chunk_images,
                                      double eps, double momentum) {
  const long long chunks = (n + chunk_images - 1) / chunk_images;
  for (long long ch = nna::grid_start(); ch < c; ch += nna::grid_stride()) {
    T m = chunk_mean[ch], m2 = chunk_m2[ch], seen = T(chunk_images * l);
    for (long long k = 1; k < chunks; ++k) {
      const long long images = (k + 1) * chunk_images < n ? chunk_images : n - k * chunk_images;
      const T count = T(images * l), total = seen + count, delta = chunk_mean[k * c + ch] - m;
      m += delta * (count / total);
      m2 += chunk_m2[k * c + ch] + delta * delta * (seen * count / total);
      seen = total;
    }
    nna::store_stats((int)ch, m, m2 / seen, n * l, eps, momentum, mean, invstd, running_mean, running_var);
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

// Block (ch, chunk): dbeta = sum(dy), dgamma = sum(dy xhat), xhat = (x - mean) invstd, over the
// chunk's values, into dbeta[chunk c + ch] and dgamma[chunk c + ch]: with one chunk the gradients,
// with several the rows that bias_grad_reduce (elementwise.cu) adds up in chunk order.
template <typename S>
__global__ void batchnorm_backward_reduce(const S* dy, const S* x, const nna::compute_t<S>* mean,
                                          const nna::compute_t<S>* invstd, nna::compute_t<S>* dgamma,
                                          nna::compute_t<S>* dbeta, long long n, int c, long long l,
                                          long long chunk_images) {
  using T = nna::compute_t<S>;
  const int ch = blockIdx.x;
  const nna::ImageChunk chunk(n, chunk_images);
  const T m = mean[ch], s = invstd[ch];
  const T db = nna::channel_sum<T>(chunk, c, l, ch, [&](long long at) { return nna::load(dy[at]); });
  const T dg = nna::channel_sum<T>(chunk, c, l, ch, [&](long long at) {
    return nna::load(dy[at]) * ((nna::load(x[at]) - m) * s);
  });
  if (threadIdx.x == 0) {
    dbeta[blockIdx.y * (long long)c + ch] = db;
    dgamma[blockIdx.y * (long long)c + ch] = dg;
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
