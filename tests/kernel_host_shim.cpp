// Host entry points over the host-callable math of kernels/ (activations,
// cross-entropy, maxout argmax, optimizer steps), built with plain g++ and
// loaded with ctypes by tests/test_kernels_host.py. Each loops over arrays
// with the same per-element functions the CUDA kernels call.
#include "activations.cuh"
#include "loss.cu"
#include "maxout.cu"
#include "optimizer.cu"

namespace {

template <typename T> void act_forward(int act, double param, const T* z, T* y, long long n) {
  for (long long i = 0; i < n; ++i) y[i] = nna::act_forward(act, T(param), z[i]);
}

// x is y or z, as nna::act_grad_uses_z(act) says.
template <typename T> void act_backward(int act, double param, const T* dy, const T* x, T* dz, long long n) {
  for (long long i = 0; i < n; ++i) dz[i] = dy[i] * nna::act_derivative(act, T(param), x[i]);
}

// The softmax_cross_entropy kernel's row loop, sequential instead of by warp.
template <typename T>
void cross_entropy(const T* logits, const long long* labels, T* grad, T* row_loss, long long rows, long long cols,
                   double inv_batch) {
  for (long long r = 0; r < rows; ++r) {
    const T* x = logits + r * cols;
    const long long label = labels[r];
    const bool valid = label >= 0 && label < cols;
    T max = x[0], sum = T(0);
    for (long long c = 0; c < cols; ++c) max = x[c] > max ? x[c] : max;
    for (long long c = 0; c < cols; ++c) sum += nna::math::exp(x[c] - max);
    if (!valid) sum = nna::math::quiet_nan<T>();
    for (long long c = 0; c < cols; ++c) grad[r * cols + c] = nna::ce_grad(x[c], max, sum, c == label, T(inv_batch));
    row_loss[r] = nna::ce_row_loss(valid ? x[label] : T(0), max, sum);
  }
}

template <typename T> void maxout_forward(const T* z, T* y, int* idx, long long n_out, int pieces) {
  for (long long k = 0; k < n_out; ++k) {
    idx[k] = nna::maxout_argmax(z + k * pieces, pieces);
    y[k] = z[k * pieces + idx[k]];
  }
}

template <typename T>
void sgd_update(T* p, const T* g, T* v, long long n, double lr, double momentum, double weight_decay, int nesterov) {
  for (long long i = 0; i < n; ++i) nna::sgd_step(p[i], g[i], v + i, T(lr), T(momentum), T(weight_decay), nesterov != 0);
}

template <typename T>
void adam_update(T* p, const T* g, T* m, T* v, long long n, double lr, double beta1, double beta2, double eps,
                 double weight_decay, int decoupled, double bc1, double bc2) {
  const nna::AdamScalars<T> s(lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2);
  for (long long i = 0; i < n; ++i) nna::adam_step(p[i], g[i], m[i], v[i], s);
}

}  // namespace

// extern "C" names with a dtype suffix: act_forward_f32, act_forward_f64, ...
#define NNA_SHIM_EXPORTS(T, suffix)                                                                           \
  extern "C" void act_forward_##suffix(int act, double param, const T* z, T* y, long long n) {               \
    act_forward(act, param, z, y, n);                                                                         \
  }                                                                                                           \
  extern "C" void act_backward_##suffix(int act, double param, const T* dy, const T* x, T* dz, long long n) { \
    act_backward(act, param, dy, x, dz, n);                                                                   \
  }                                                                                                           \
  extern "C" void cross_entropy_##suffix(const T* logits, const long long* labels, T* grad, T* row_loss,      \
                                         long long rows, long long cols, double inv_batch) {                  \
    cross_entropy(logits, labels, grad, row_loss, rows, cols, inv_batch);                                     \
  }                                                                                                           \
  extern "C" void maxout_forward_##suffix(const T* z, T* y, int* idx, long long n_out, int pieces) {         \
    maxout_forward(z, y, idx, n_out, pieces);                                                                 \
  }                                                                                                           \
  extern "C" void sgd_update_##suffix(T* p, const T* g, T* v, long long n, double lr, double momentum,       \
                                      double weight_decay, int nesterov) {                                    \
    sgd_update(p, g, v, n, lr, momentum, weight_decay, nesterov);                                             \
  }                                                                                                           \
  extern "C" void adam_update_##suffix(T* p, const T* g, T* m, T* v, long long n, double lr, double beta1,   \
                                       double beta2, double eps, double weight_decay, int decoupled,          \
                                       double bc1, double bc2) {                                              \
    adam_update(p, g, m, v, n, lr, beta1, beta2, eps, weight_decay, decoupled, bc1, bc2);                     \
  }

NNA_SHIM_EXPORTS(float, f32)
NNA_SHIM_EXPORTS(double, f64)
