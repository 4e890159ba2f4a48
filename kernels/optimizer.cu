// SGD and Adam/AdamW steps over one contiguous flat buffer of parameters,
// following PyTorch's update rules (and nnaccel's NumPy backend, operation for
// operation). The per-element steps are host-callable
// (NNA_HD); the kernels need a CUDA compiler.
#include "activations.cuh"

namespace nna {

// PyTorch's SGD: g += wd p; v = momentum v + g; g = nesterov ? g + momentum v : v;
// p -= lr g. v is only touched when momentum != 0.
template <typename T>
NNA_HD inline void sgd_step(T& p, T g, T* v, T lr, T momentum, T weight_decay, bool nesterov) {
  if (weight_decay != T(0)) g = g + weight_decay * p;
  if (momentum != T(0)) {
    *v = *v * momentum + g;
    g = nesterov ? g + momentum * *v : *v;
  }
  p = p - lr * g;
}

// Adam's scalars for one step, rounded to T once; the host computes the bias
// corrections bc1 = 1 - beta1^t and bc2 = 1 - beta2^t.
template <typename T> struct AdamScalars {
  T weight_decay, decay, beta1, one_minus_beta1, beta2, one_minus_beta2, inv_sqrt_bc2, eps, step_size;
  bool decoupled;
  NNA_HD AdamScalars(double lr, double b1, double b2, double eps_, double wd, int decoupled_, double bc1,
                     double bc2)
      : weight_decay(T(wd)), decay(T(1.0 - lr * wd)), beta1(T(b1)), one_minus_beta1(T(1.0 - b1)), beta2(T(b2)),
        one_minus_beta2(T(1.0 - b2)), inv_sqrt_bc2(T(1.0 / math::sqrt(bc2))), eps(T(eps_)),
        step_size(T(lr / bc1)), decoupled(decoupled_ != 0) {}
};

// PyTorch's Adam (L2 weight decay added to g) or AdamW (decoupled: p shrinks
// by 1 - lr wd first); p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
template <typename T> NNA_HD inline void adam_step(T& p, T g, T& m, T& v, const AdamScalars<T>& s) {
  if (s.weight_decay != T(0)) {
    if (s.decoupled)
      p = p * s.decay;
    else
      g = g + s.weight_decay * p;
  }
  m = m * s.beta1 + s.one_minus_beta1 * g;
  v = v * s.beta2 + s.one_minus_beta2 * (g * g);
  const T denom = math::sqrt(v) * s.inv_sqrt_bc2 + s.eps;
  p = p - s.step_size * (m / denom);
}

}  // namespace nna

#ifdef __CUDACC__
template <typename T>
__global__ void sgd_update(T* p, const T* g, T* v, long long n, double lr, double momentum, double weight_decay,
                           int nesterov) {
  for (long long i = nna::grid_start(); i < n; i += nna::grid_stride())
    nna::sgd_step(p[i], g[i], v + i, T(lr), T(momentum), T(weight_decay), nesterov != 0);
}

template <typename T>
__global__ void adam_update(T* p, const T* g, T* m, T* v, long long n, double lr, double beta1, double beta2,
                            double eps, double weight_decay, int decoupled, double bias_correction1,
                            double bias_correction2) {
  const nna::AdamScalars<T> s(lr, beta1, beta2, eps, weight_decay, decoupled, bias_correction1, bias_correction2);
  for (long long i = nna::grid_start(); i < n; i += nna::grid_stride()) nna::adam_step(p[i], g[i], m[i], v[i], s);
}
#endif  // __CUDACC__
