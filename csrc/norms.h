// Normalizations of one timestep for the C++ CPU backend, forward and backward, with the
// semantics of normrnn/reference/norms.py: per-timestep batch norm over the active rows (running
// statistics where fewer than two rows are active, and in evaluation), layer norm per row.
//
// Each is fused with what the cell does with it: out = addend + gamma * hat in one pass over the
// step's values, hat kept in a (T, B, F) buffer so that d gamma = sum_t,b g * hat is one reduction
// after the backward loop.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "workspace.h"

namespace normrnn {

enum Norm : int64_t { kNone = 0, kLayer = 1, kBatch = 2 };

inline bool row_active(const int64_t* lengths, int64_t row, int64_t step) {
  return lengths == nullptr || lengths[row] > step;
}

// The sum over steps and rows of a (T, B, F) tensor. The dimensions are spelled as an IntArrayRef:
// torch 2.11's Tensor::sum also takes a DimnameList, and there a braced {0, 1} does not compile.
inline at::Tensor sum_over_steps_and_rows(const at::Tensor& values) {
  return values.sum(at::IntArrayRef{0, 1});
}

// Before a loop over features whose arrays meet, if at all, only element by element (out == addend,
// never out[j] == in[j + k]): the vectorizer may then take it as is. Without it GCC cannot prove
// the arrays apart (a __restrict__ on a pointer that a parallel lambda captures does not reach the
// loop), would need more run-time overlap checks than it makes, and runs the loop one float at a
// time: the LSTM's and GRU's gate gradients and the normalizations' apply loops had no packed
// arithmetic at all (objdump), and at B=64, 4H=2048 batch norm's apply loop was a tenth of a
// forward's samples under perf.
#if defined(__clang__)
#define NORMRNN_VECTORIZE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define NORMRNN_VECTORIZE _Pragma("GCC ivdep")
#else
#define NORMRNN_VECTORIZE
#endif

// Handing a chunk to another thread costs microseconds: below ~16K elements one thread is faster
// (measured on a 2-core EPYC; 128K-element chunks, i.e. no threads at B=32, H=256, were 5% slower).
constexpr int64_t kParallelGrain = 16384;

// body(b) for every row b, rows split over ATen's threads.
template <typename Body>
inline void for_each_row(int64_t rows, int64_t row_width, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(row_width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      body(row);
    }
  });
}

// body(begin, end) over blocks of columns, for reductions over rows (batch statistics).
template <typename Body>
inline void for_each_column_block(int64_t columns, int64_t rows, const Body& body) {
  const int64_t grain = std::max<int64_t>(8, kParallelGrain / std::max<int64_t>(rows, 1));
  at::parallel_for(0, columns, grain, body);
}

// sum_j term(j) for j < n in independent lanes: a single running sum is a chain of dependent adds
// that the compiler may not reorder (nor vectorize) without fast-math, several times slower.
template <typename scalar_t, typename Term>
inline scalar_t lane_sum(int64_t n, const Term& term) {
  constexpr int64_t kLanes = 16;
  scalar_t partial[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t lane = 0; lane < kLanes; ++lane) {
      partial[lane] += term(j + lane);
    }
  }
  scalar_t total = 0;
  for (; j < n; ++j) {
    total += term(j);
  }
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    total += partial[lane];
  }
  return total;
}

// sum over steps and rows of a * b, per feature, for (T, B, F) tensors: one pass that reads each
// once, where (a * b).sum({0, 1}) writes and reads a (T, B, F) product (at B=64, H=512, T=100 a
// 52 MB buffer, fresh memory every backward). Accumulated in double, each feature over the rows
// in order, so the result has the same bits whatever the number of threads.
template <typename scalar_t>
at::Tensor column_dot(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "normrnn (cpp backend): column_dot of tensors of different shapes");
  const at::Tensor left = a.contiguous(), right = b.contiguous();
  const int64_t width = left.size(-1), rows = width == 0 ? 0 : left.numel() / width;
  auto result = at::empty({width}, left.options());
  const scalar_t *x = left.data_ptr<scalar_t>(), *y = right.data_ptr<scalar_t>();
  scalar_t* out = result.data_ptr<scalar_t>();
  // blocks of at least 64 columns: whole cache lines of each row
  const int64_t grain = std::max<int64_t>(64, kParallelGrain / std::max<int64_t>(rows, 1));
  at::parallel_for(0, width, grain, [&](int64_t begin, int64_t end) {
    std::vector<double> total(end - begin, 0.0);
    double* __restrict__ sum = total.data();
    for (int64_t row = 0; row < rows; ++row) {
      const scalar_t* __restrict__ x_row = x + row * width + begin;
      const scalar_t* __restrict__ y_row = y + row * width + begin;
      for (int64_t j = 0; j < end - begin; ++j) {
        sum[j] += static_cast<double>(x_row[j]) * static_cast<double>(y_row[j]);
      }
    }
    for (int64_t j = begin; j < end; ++j) {
      out[j] = static_cast<scalar_t>(total[j - begin]);
    }
  });
  return result;
}

// What the backward of one normalization needs besides hat.
struct Normalized {
  at::Tensor hat;   // (B, F): (v - mean) * rstd, a view of the StepNorm's buffer
  at::Tensor rstd;  // (F,) for batch norm, (B,) for layer norm
  bool batch_statistics = false;  // the statistics came from v (and so depend on it)
};

// out = addend + weight * hat, hat = (v - mean_b) * rstd_b over each row's F features.
template <typename scalar_t>
void layer_norm_forward(const at::Tensor& v, const at::Tensor& weight, const at::Tensor& addend, at::Tensor& hat,
                        at::Tensor& rstd, at::Tensor& out, double eps) {
  const int64_t rows = v.size(0), width = v.size(1);
  const int64_t addend_stride = addend.dim() == 1 ? 0 : width;  // a bias broadcast over rows
  const scalar_t *value = v.data_ptr<scalar_t>(), *gain = weight.data_ptr<scalar_t>();
  const scalar_t* add = addend.data_ptr<scalar_t>();
  scalar_t *normalized = hat.data_ptr<scalar_t>(), *result = out.data_ptr<scalar_t>();
  scalar_t* inverse = rstd.data_ptr<scalar_t>();
  for_each_row(rows, width, [&](int64_t row) {
    const scalar_t* x = value + row * width;
    const scalar_t* a = add + row * addend_stride;
    scalar_t *n = normalized + row * width, *o = result + row * width;
    const scalar_t mean = lane_sum<scalar_t>(width, [&](int64_t j) { return x[j]; }) / width;
    // two passes: no cancellation of E[x^2] - E[x]^2
    const scalar_t squares = lane_sum<scalar_t>(width, [&](int64_t j) { return (x[j] - mean) * (x[j] - mean); });
    const scalar_t r = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(squares) / width + eps));
    inverse[row] = r;
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < width; ++j) {
      n[j] = (x[j] - mean) * r;
      o[j] = a[j] + gain[j] * n[j];
    }
  });
}

// dL/dv = rstd (gw - mean(gw) - hat mean(gw hat)) per row, gw = g * weight.
template <typename scalar_t>
void layer_norm_backward(const at::Tensor& g, const at::Tensor& weight, const Normalized& n, at::Tensor& grad_input) {
  const int64_t rows = g.size(0), width = g.size(1);
  const scalar_t *grad = g.data_ptr<scalar_t>(), *gain = weight.data_ptr<scalar_t>();
  const scalar_t *normalized = n.hat.data_ptr<scalar_t>(), *inverse = n.rstd.data_ptr<scalar_t>();
  scalar_t* result = grad_input.data_ptr<scalar_t>();
  for_each_row(rows, width, [&](int64_t row) {
    const scalar_t *gr = grad + row * width, *h = normalized + row * width;
    scalar_t* d = result + row * width;
    const scalar_t mean_g = lane_sum<scalar_t>(width, [&](int64_t j) { return gr[j] * gain[j]; }) / width;
    const scalar_t mean_gh = lane_sum<scalar_t>(width, [&](int64_t j) { return gr[j] * gain[j] * h[j]; }) / width;
    const scalar_t r = inverse[row];
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < width; ++j) {
      d[j] = r * (gr[j] * gain[j] - mean_g - h[j] * mean_gh);
    }
  });
}

// Per-timestep batch norm of v (B, F) in one parallel region. For each block of columns:
//   mean, var = the biased statistics over the active rows (two passes: no cancellation), and
//   running <- (1 - momentum) running + momentum (mean, var count / (count - 1))   if batch_stats;
//   mean, var = the running statistics                                            otherwise;
//   rstd = 1 / sqrt(var + eps),  hat = (v - mean) rstd,  out = addend + weight * hat  (every row).
// One region where statistics, their running update and the normalization were each a region or a
// few small ATen ops: at B=64, H=512 a step had ~15 such ops per norm, each a few microseconds in
// which the other threads spin. running_mean / running_var point at the step's slot, `running_stride`
// apart.
template <typename scalar_t, typename running_t>
void batch_norm_forward(const at::Tensor& v, const int64_t* lengths, int64_t step, int64_t count, bool batch_stats,
                        running_t* running_mean, running_t* running_var, int64_t running_stride, double momentum,
                        double eps, const at::Tensor& weight, const at::Tensor& addend, at::Tensor& hat,
                        at::Tensor& rstd, at::Tensor& out) {
  const int64_t rows = v.size(0), width = v.size(1);
  const int64_t addend_stride = addend.dim() == 1 ? 0 : width;  // a bias broadcast over rows
  const scalar_t *value = v.data_ptr<scalar_t>(), *gain = weight.data_ptr<scalar_t>();
  const scalar_t* add = addend.data_ptr<scalar_t>();
  scalar_t *normalized = hat.data_ptr<scalar_t>(), *result = out.data_ptr<scalar_t>();
  scalar_t* inverse = rstd.data_ptr<scalar_t>();
  for_each_column_block(width, rows, [&](int64_t begin, int64_t end) {
    const int64_t columns = end - begin;
    std::vector<scalar_t> mean(columns, scalar_t(0)), var(columns, scalar_t(0));
    scalar_t* m = mean.data();
    scalar_t* s = var.data();
    if (batch_stats) {
      for (int64_t row = 0; row < rows; ++row) {
        if (row_active(lengths, row, step)) {
          const scalar_t* x = value + row * width + begin;
          NORMRNN_VECTORIZE
          for (int64_t j = 0; j < columns; ++j) {
            m[j] += x[j];
          }
        }
      }
      for (int64_t j = 0; j < columns; ++j) {
        m[j] /= static_cast<scalar_t>(count);
      }
      for (int64_t row = 0; row < rows; ++row) {
        if (row_active(lengths, row, step)) {
          const scalar_t* x = value + row * width + begin;
          NORMRNN_VECTORIZE
          for (int64_t j = 0; j < columns; ++j) {
            const scalar_t centered = x[j] - m[j];
            s[j] += centered * centered;
          }
        }
      }
      const double unbiased = static_cast<double>(count) / static_cast<double>(count - 1);
      for (int64_t j = 0; j < columns; ++j) {
        s[j] /= static_cast<scalar_t>(count);
        running_t& running_m = running_mean[(begin + j) * running_stride];
        running_t& running_v = running_var[(begin + j) * running_stride];
        running_m = static_cast<running_t>((1.0 - momentum) * static_cast<double>(running_m) +
                                           momentum * static_cast<double>(m[j]));
        running_v = static_cast<running_t>((1.0 - momentum) * static_cast<double>(running_v) +
                                           momentum * static_cast<double>(s[j]) * unbiased);
      }
    } else {
      for (int64_t j = 0; j < columns; ++j) {
        m[j] = static_cast<scalar_t>(running_mean[(begin + j) * running_stride]);
        s[j] = static_cast<scalar_t>(running_var[(begin + j) * running_stride]);
      }
    }
    scalar_t* r = inverse + begin;
    for (int64_t j = 0; j < columns; ++j) {
      r[j] = static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(s[j]) + eps));
    }
    const scalar_t* gamma = gain + begin;
    for (int64_t row = 0; row < rows; ++row) {
      const scalar_t* x = value + row * width + begin;
      const scalar_t* a = add + row * addend_stride + begin;
      scalar_t *n = normalized + row * width + begin, *o = result + row * width + begin;
      NORMRNN_VECTORIZE
      for (int64_t j = 0; j < columns; ++j) {
        const scalar_t normalized_value = (x[j] - m[j]) * r[j];
        n[j] = normalized_value;
        o[j] = a[j] + gamma[j] * normalized_value;
      }
    }
  });
}

// dL/dv given g = dL/dout (zero on inactive rows). Batch statistics couple the active rows:
// dv = rstd (gw - mean(gw) - hat mean(gw hat)) over them, gw = g * weight; inactive rows get none.
template <typename scalar_t>
void batch_norm_backward(const at::Tensor& g, const at::Tensor& weight, const Normalized& n, const int64_t* lengths,
                         int64_t step, int64_t count, at::Tensor& grad_input) {
  const int64_t rows = g.size(0), width = g.size(1);
  const scalar_t *grad = g.data_ptr<scalar_t>(), *gain = weight.data_ptr<scalar_t>();
  const scalar_t *normalized = n.hat.data_ptr<scalar_t>(), *r = n.rstd.data_ptr<scalar_t>();
  scalar_t* result = grad_input.data_ptr<scalar_t>();
  for_each_column_block(width, rows, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> mean_g(end - begin, 0), mean_gh(end - begin, 0);
    if (n.batch_statistics) {
      for (int64_t row = 0; row < rows; ++row) {
        if (row_active(lengths, row, step)) {
          const scalar_t *gr = grad + row * width, *h = normalized + row * width;
          NORMRNN_VECTORIZE
          for (int64_t j = begin; j < end; ++j) {
            const scalar_t gw = gr[j] * gain[j];
            mean_g[j - begin] += gw;
            mean_gh[j - begin] += gw * h[j];
          }
        }
      }
      for (int64_t j = 0; j < end - begin; ++j) {
        mean_g[j] /= static_cast<scalar_t>(count);
        mean_gh[j] /= static_cast<scalar_t>(count);
      }
    }
    for (int64_t row = 0; row < rows; ++row) {
      const scalar_t *gr = grad + row * width, *h = normalized + row * width;
      scalar_t* d = result + row * width;
      if (n.batch_statistics && !row_active(lengths, row, step)) {
        std::fill(d + begin, d + end, scalar_t(0));
        continue;
      }
      NORMRNN_VECTORIZE
      for (int64_t j = begin; j < end; ++j) {
        d[j] = r[j] * (gr[j] * gain[j] - mean_g[j - begin] - h[j] * mean_gh[j - begin]);
      }
    }
  });
}

// The normalization `norm` of one projection (or of the LSTM's cell) over a whole sequence.
struct StepNorm {
  int64_t norm = kNone;
  at::Tensor running_mean, running_var;  // (S, F), batch norm only: slot min(t, S - 1)
  at::Tensor hats;                       // (T, B, F): hat of every step (or (1, B, F), see begin)

  // slots: the steps whose hats are kept (T), or 1 when no backward follows and every step reuses it.
  void begin(int64_t slots, int64_t batch, int64_t width, const at::TensorOptions& options) {
    if (norm != kNone) {
      hats = workspace().empty({slots, batch, width}, options);
    }
  }

  // out = addend + weight * N(v) at step t; count active rows (lengths: null when all are).
  Normalized forward(const at::Tensor& v, const at::Tensor& weight, const at::Tensor& addend, at::Tensor out,
                     const int64_t* lengths, int64_t count, int64_t step, bool training, double momentum,
                     double eps) {
    Normalized result;
    result.hat = hats[std::min<int64_t>(step, hats.size(0) - 1)];  // one slot: a forward that keeps nothing
    const auto type = v.scalar_type();
    if (norm == kLayer) {
      result.rstd = at::empty({v.size(0)}, v.options());
      result.batch_statistics = true;
      AT_DISPATCH_FLOATING_TYPES(type, "layer_norm_forward", [&] {
        layer_norm_forward<scalar_t>(v, weight, addend, result.hat, result.rstd, out, eps);
      });
      return result;
    }
    const int64_t slot = std::min<int64_t>(step, running_mean.size(0) - 1);
    auto slot_mean = running_mean[slot], slot_var = running_var[slot];
    TORCH_CHECK(slot_mean.stride(0) == slot_var.stride(0), "normrnn (cpp backend): running mean and variance of ",
                "different layouts");
    // fewer than two active rows have no variance: the running statistics normalize them
    result.batch_statistics = training && count >= 2;
    result.rstd = at::empty({v.size(1)}, v.options());
    AT_DISPATCH_FLOATING_TYPES(type, "batch_norm_forward", [&] {
      using value_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(slot_mean.scalar_type(), "batch_norm_forward_running", [&] {
        batch_norm_forward<value_t, scalar_t>(v, lengths, step, count, result.batch_statistics,
                                              slot_mean.data_ptr<scalar_t>(), slot_var.data_ptr<scalar_t>(),
                                              slot_mean.stride(0), momentum, eps, weight, addend, result.hat,
                                              result.rstd, out);
      });
    });
    if (result.batch_statistics) {  // written through pointers: autograd's version counter is told here
      slot_mean.unsafeGetTensorImpl()->bump_version();
      slot_var.unsafeGetTensorImpl()->bump_version();
    }
    return result;
  }

  // dL/dv into grad_input given g = dL/dout of forward (zero on inactive rows).
  void backward(const at::Tensor& g, const at::Tensor& weight, const Normalized& n, const int64_t* lengths,
                int64_t step, int64_t count, at::Tensor grad_input) const {
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "norm_backward", [&] {
      if (norm == kLayer) {
        layer_norm_backward<scalar_t>(g, weight, n, grad_input);
      } else {
        batch_norm_backward<scalar_t>(g, weight, n, lengths, step, count, grad_input);
      }
    });
  }

  // d gamma = sum over steps and rows of g * hat, g (T, B, F) the gradients of every step's out.
  at::Tensor gain_grad(const at::Tensor& g) const {
    if (norm == kNone) {
      return at::zeros({g.size(-1)}, g.options());
    }
    at::Tensor result;
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "gain_grad", [&] { result = column_dot<scalar_t>(g, hats); });
    return result;
  }
};

}  // namespace normrnn
