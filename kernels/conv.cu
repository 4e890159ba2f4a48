// Convolution and pooling over NCHW arrays: im2col (channel-major columns, (c kh kw, n oh ow)) and its
// adjoint col2im, the bias and activation of a convolution's matmul written in NCHW order and its
// backward (fused with the bias gradient), max and average pooling.
//
// Geometry: input (n, c, h, w); window kh x kw moved by (sh, sw) over the input padded by (ph, pw);
// (oh, ow) window positions. Every kernel is a grid-stride loop with one thread per output element.
// The adjoints (col2im, the pooling backwards) gather what each input position receives instead of
// scattering it, so they need no atomics and add in a fixed order: the window offsets (i, j) in
// increasing order, as the base backend's loops do.
//
// The kernels template on the storage type S (float, double or nna::bf16, see bfloat16.cuh) and
// compute in nna::compute_t<S>: sums and maxima in float for bf16, rounded once when stored; the
// bias and its gradient are master parameters, in the compute type.
#include "activations.cuh"
#include "bfloat16.cuh"

constexpr int CONV_THREADS = 256;  // act_backward_from_nchw's block: the loader launches this many threads

// Calls visit(di, j, oy, ox) for each window offset (di, j), in increasing order, whose window at position
// (oy, ox) covers input row y, column x: the gather every adjoint below makes.
template <typename Visit>
__device__ inline void windows_covering(int y, int x, int kh, int kw, int sh, int sw, int ph, int pw, int oh, int ow,
                                        Visit visit) {
  for (int di = 0; di < kh; ++di) {
    const int ty = y + ph - di;
    if (ty < 0 || ty % sh || ty / sh >= oh) continue;
    for (int j = 0; j < kw; ++j) {
      const int tx = x + pw - j;
      if (tx < 0 || tx % sw || tx / sw >= ow) continue;
      visit(di, j, ty / sh, tx / sw);
    }
  }
}

// columns[(ch, i, j), (img, oy, ox)] = x[img, ch, oy sh - ph + i, ox sw - pw + j], 0 in the padding.
template <typename S>
__global__ void im2col(const S* x, S* columns, int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph,
                       int pw, int oh, int ow) {
  const long long positions = (long long)n * oh * ow;
  const long long total = positions * c * kh * kw;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const long long k = i / positions, m = i % positions;
    const int j = (int)(k % kw), di = (int)(k / kw % kh), ch = (int)(k / ((long long)kw * kh));
    const int ox = (int)(m % ow), oy = (int)(m / ow % oh), img = (int)(m / ((long long)ow * oh));
    const int y = oy * sh - ph + di, xx = ox * sw - pw + j;
    columns[i] = (y >= 0 && y < h && xx >= 0 && xx < w) ? x[(((long long)img * c + ch) * h + y) * w + xx]
                                                         : nna::store<S>(0);
  }
}

// dx[img, ch, y, x] = the sum of every column entry im2col took from there.
template <typename S>
__global__ void col2im(const S* columns, S* dx, int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph,
                       int pw, int oh, int ow) {
  using T = nna::compute_t<S>;
  const long long total = (long long)n * c * h * w;
  const long long positions = (long long)n * oh * ow;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int xx = (int)(i % w), y = (int)(i / w % h), ch = (int)(i / ((long long)w * h) % c);
    const int img = (int)(i / ((long long)w * h * c));
    T acc = T(0);
    windows_covering(y, xx, kh, kw, sh, sw, ph, pw, oh, ow, [&](int di, int j, int oy, int ox) {
      const long long k = ((long long)ch * kh + di) * kw + j;
      acc += nna::load(columns[k * positions + ((long long)img * oh + oy) * ow + ox]);
    });
    dx[i] = nna::store<S>(acc);
  }
}

// A convolution's output from its matmul z (c, n l): rows = act(z + bias) with the bias per row
// (channel), and y[img, ch, l] the same values in NCHW order. rows may alias z; otherwise z keeps
// z + bias (gelu and silu's derivatives read it), rounded to z's type, and the activation is applied
// to what z keeps, as bias_act (elementwise.cu) does: forward and derivative see the same z.
template <typename S>
__global__ void bias_act_to_nchw(S* z, const nna::compute_t<S>* bias, S* rows, S* y, long long n, int c, long long l,
                                 int act, double param) {
  using T = nna::compute_t<S>;
  const T p = T(param);
  const long long total = n * c * l;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const long long pos = i % l, img = i / (l * c);
    const int ch = (int)(i / l % c);
    const long long at = ch * (n * l) + img * l + pos;
    T v = nna::load(z[at]) + bias[ch];
    if (rows != z) {
      const S kept = nna::store<S>(v);
      z[at] = kept;
      v = nna::load(kept);
    }
    const S out = nna::store<S>(nna::act_forward(act, p, v));
    rows[at] = out;
    y[i] = out;
  }
}

// Block (ch, chunk) over the images [chunk chunk_images, (chunk + 1) chunk_images): dz[ch, img l + pos] =
// dy[img, ch, pos] * act'(x), x being rows (y) or z as the activation needs (both (c, n l); null for
// linear), and db[chunk c + ch] = the sum of the chunk's dz, in a fixed order (deterministic): with one
// chunk the bias gradient, with several the rows that bias_grad_reduce (elementwise.cu) adds up in chunk
// order, so that a few channels still fill the GPU.
template <typename S>
__global__ void act_backward_from_nchw(const S* dy, const S* rows, const S* z, S* dz, nna::compute_t<S>* db,
                                       long long n, int c, long long l, long long chunk_images, int act,
                                       double param) {
  using T = nna::compute_t<S>;
  __shared__ T part[CONV_THREADS];
  const T p = T(param);
  const int ch = blockIdx.x;
  const S* x = nna::act_grad_uses_z(act) ? z : rows;
  const long long first = blockIdx.y * chunk_images * l;
  const long long end = first + chunk_images * l < n * l ? first + chunk_images * l : n * l;
  T acc = T(0);
  for (long long m = first + threadIdx.x; m < end; m += CONV_THREADS) {
    const long long at = ch * n * l + m;
    const S d = nna::store<S>(nna::load(dy[(m / l * c + ch) * l + m % l]) *
                              nna::act_derivative(act, p, x ? nna::load(x[at]) : T(0)));
    dz[at] = d;
    acc += nna::load(d);
  }
  part[threadIdx.x] = acc;
  __syncthreads();
  for (int half = CONV_THREADS / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) part[threadIdx.x] += part[threadIdx.x + half];
    __syncthreads();
  }
  if (threadIdx.x == 0 && db) db[blockIdx.y * (long long)c + ch] = part[0];
}

// y = the maximum of each window, idx = where it is in the input plane (y w + x), PyTorch CPU's choice: ties go to
// the first in row-major order, a NaN counts as the maximum (each NaN replaces the maximum so far: the last NaN
// wins), and the padding never wins (a window of -inf has its first real input).
template <typename S>
__global__ void maxpool_forward(const S* x, S* out, int* idx, int n, int c, int h, int w, int kh, int kw, int sh,
                                int sw, int ph, int pw, int oh, int ow) {
  const long long total = (long long)n * c * oh * ow;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int ox = (int)(i % ow), oy = (int)(i / ow % oh);
    const long long plane = i / ((long long)ow * oh);
    const S* xp = x + plane * h * w;
    const int y0 = oy * sh - ph, x0 = ox * sw - pw;
    using T = nna::compute_t<S>;
    T best = -nna::math::infinity<T>();
    int at = (y0 > 0 ? y0 : 0) * w + (x0 > 0 ? x0 : 0);  // the first real input
    for (int di = 0; di < kh; ++di) {
      const int y = y0 + di;
      if (y < 0 || y >= h) continue;
      for (int j = 0; j < kw; ++j) {
        const int xx = x0 + j;
        if (xx < 0 || xx >= w) continue;
        const T v = nna::load(xp[y * w + xx]);
        if (v > best || v != v) {
          best = v;
          at = y * w + xx;
        }
      }
    }
    out[i] = nna::store<S>(best);  // exact: best is a stored value
    idx[i] = at;
  }
}

// dx[img, ch, y, x] = the sum of dy over the windows whose maximum came from (y, x).
template <typename S>
__global__ void maxpool_backward(const S* dy, const int* idx, S* dx, int n, int c, int h, int w, int kh, int kw,
                                 int sh, int sw, int ph, int pw, int oh, int ow) {
  const long long total = (long long)n * c * h * w;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int xx = (int)(i % w), y = (int)(i / w % h);
    const long long plane = i / ((long long)w * h);
    const int self = y * w + xx;
    nna::compute_t<S> acc = 0;
    windows_covering(y, xx, kh, kw, sh, sw, ph, pw, oh, ow, [&](int, int, int oy, int ox) {
      const long long o = (plane * oh + oy) * ow + ox;
      if (idx[o] == self) acc += nna::load(dy[o]);
    });
    dx[i] = nna::store<S>(acc);
  }
}

// y = the mean of each window, the padding counted as zeros (PyTorch's count_include_pad).
template <typename S>
__global__ void avgpool_forward(const S* x, S* out, int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph,
                                int pw, int oh, int ow) {
  using T = nna::compute_t<S>;
  const T scale = T(1.0 / (kh * kw));
  const long long total = (long long)n * c * oh * ow;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int ox = (int)(i % ow), oy = (int)(i / ow % oh);
    const S* xp = x + i / ((long long)ow * oh) * h * w;
    T acc = T(0);
    for (int di = 0; di < kh; ++di) {
      const int y = oy * sh - ph + di;
      for (int j = 0; j < kw; ++j) {
        const int xx = ox * sw - pw + j;
        if (y >= 0 && y < h && xx >= 0 && xx < w) acc += nna::load(xp[y * w + xx]);
      }
    }
    out[i] = nna::store<S>(acc * scale);
  }
}

// dx[img, ch, y, x] = the sum over the windows covering (y, x) of dy / (kh kw).
template <typename S>
__global__ void avgpool_backward(const S* dy, S* dx, int n, int c, int h, int w, int kh, int kw, int sh, int sw, int ph,
                                 int pw, int oh, int ow) {
  using T = nna::compute_t<S>;
  const T scale = T(1.0 / (kh * kw));
  const long long total = (long long)n * c * h * w;
  for (long long i = nna::grid_start(); i < total; i += nna::grid_stride()) {
    const int xx = (int)(i % w), y = (int)(i / w % h);
    const long long plane = i / ((long long)w * h);
    T acc = T(0);
    windows_covering(y, xx, kh, kw, sh, sw, ph, pw, oh, ow,
                     [&](int, int, int oy, int ox) { acc += nna::load(dy[(plane * oh + oy) * ow + ox]) * scale; });
    dx[i] = nna::store<S>(acc);
  }
}
