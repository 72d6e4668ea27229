// Normalizations of one timestep for the C++ CPU backend, forward and backward, with the
// semantics of normrnn/reference/norms.py: per-timestep batch norm over the active rows (running
// statistics where fewer than two rows are active, and in evaluation), layer norm per row.
#pragma once

#include <torch/extension.h>

namespace normrnn {

enum Norm : int64_t { kNone = 0, kLayer = 1, kBatch = 2 };

// What the backward of one normalization needs: the normalized value and its rstd, and whether
// the statistics came from the batch (and so depend on the input) or were fixed.
struct Normalized {
  at::Tensor hat;   // (B, F): (v - mean) * rstd
  at::Tensor rstd;  // (F,) for batch norm, (B, 1) for layer norm
  bool batch_statistics = false;
  // set when ATen's fused kernels computed it (every row active): their backward needs these
  bool native = false;
  at::Tensor input, mean;
};

// Batch norm of v (B, F) at one step. mask (B, 1) is 1 for active rows; count their number.
// Training with at least two active rows: statistics of the active rows (biased variance), and
// running[slot] <- (1 - momentum) running + momentum batch (unbiased variance). Otherwise the
// running statistics of slot.
inline Normalized batch_norm_step(const at::Tensor& v, const at::Tensor& mask, int64_t count, at::Tensor& running_mean,
                                  at::Tensor& running_var, int64_t slot, bool training, double momentum,
                                  double eps) {
  Normalized result;
  if (training && count == v.size(0) && count >= 2) {
    // every row active: ATen's fused batch norm computes the statistics, updates the running ones
    // (unbiased variance, momentum) and normalizes in one pass
    auto mean_slot = running_mean[slot], var_slot = running_var[slot];
    auto out = at::native_batch_norm(v, {}, {}, mean_slot, var_slot, true, momentum, eps);
    result.hat = std::get<0>(out);
    result.mean = std::get<1>(out);
    result.rstd = std::get<2>(out);
    result.input = v;
    result.batch_statistics = true;
    result.native = true;
    return result;
  }
  at::Tensor mean, var;
  if (training && count >= 2) {
    mean = (v * mask).sum(0) / static_cast<double>(count);
    auto centered = (v - mean) * mask;
    var = (centered * centered).sum(0) / static_cast<double>(count);
    at::NoGradGuard no_grad;
    auto unbiased = var * (static_cast<double>(count) / static_cast<double>(count - 1));
    running_mean[slot].mul_(1.0 - momentum).add_(mean.to(running_mean.scalar_type()), momentum);
    running_var[slot].mul_(1.0 - momentum).add_(unbiased.to(running_var.scalar_type()), momentum);
    result.batch_statistics = true;
  } else {
    mean = running_mean[slot].to(v.scalar_type());
    var = running_var[slot].to(v.scalar_type());
  }
  result.rstd = at::rsqrt(var + eps);
  result.hat = (v - mean) * result.rstd;
  return result;
}

// dL/dv of hat = (v - mean) * rstd given g = dL/dhat (zero on inactive rows). Batch statistics
// couple the active rows; inactive rows did not enter them and get no gradient.
inline at::Tensor batch_norm_backward(const at::Tensor& g, const Normalized& n, const at::Tensor& mask,
                                      int64_t count) {
  if (!n.batch_statistics) {
    return g * n.rstd;
  }
  if (n.native) {
    return std::get<0>(at::native_batch_norm_backward(g, n.input, {}, {}, {}, n.mean, n.rstd, true, 0.0,
                                                      {true, false, false}));
  }
  auto mean_g = (g * mask).sum(0) / static_cast<double>(count);
  auto mean_g_hat = (g * n.hat * mask).sum(0) / static_cast<double>(count);
  return (g - mean_g - n.hat * mean_g_hat) * n.rstd * mask;
}

// Layer norm of each row of v (B, F): (v - mean) * rstd over its F features (biased variance).
inline Normalized layer_norm_step(const at::Tensor& v, double eps) {
  Normalized result;
  auto out = at::native_layer_norm(v, {v.size(1)}, {}, {}, eps);  // ATen's fused kernel
  result.hat = std::get<0>(out);
  result.mean = std::get<1>(out);
  result.rstd = std::get<2>(out);
  result.input = v;
  result.batch_statistics = true;
  result.native = true;
  return result;
}

inline at::Tensor layer_norm_backward(const at::Tensor& g, const Normalized& n) {
  return std::get<0>(at::native_layer_norm_backward(g, n.input, {n.input.size(1)}, n.mean, n.rstd, {}, {},
                                                    {true, false, false}));
}

// The normalization `norm` of one projection (or of the cell), by name of its running statistics.
struct StepNorm {
  int64_t norm;
  at::Tensor running_mean, running_var;  // (S, F), used by batch norm only

  Normalized forward(const at::Tensor& v, const at::Tensor& mask, int64_t count, int64_t step, bool training,
                     double momentum, double eps) {
    if (norm == kBatch) {
      int64_t slot = std::min<int64_t>(step, running_mean.size(0) - 1);
      return batch_norm_step(v, mask, count, running_mean, running_var, slot, training, momentum, eps);
    }
    if (norm == kLayer) {
      return layer_norm_step(v, eps);
    }
    Normalized identity;
    identity.hat = v;
    return identity;
  }

  // gamma * hat, or the value itself when there is no normalization (and no gain)
  at::Tensor scale(const at::Tensor& hat, const at::Tensor& weight) const {
    return norm == kNone ? hat : hat * weight;
  }

  at::Tensor backward(const at::Tensor& g, const Normalized& n, const at::Tensor& mask, int64_t count) const {
    if (norm == kBatch) {
      return batch_norm_backward(g, n, mask, count);
    }
    if (norm == kLayer) {
      return layer_norm_backward(g, n);
    }
    return g;
  }
};

// The (B, 1) activity mask of step t from lengths (empty: every row is active) and its count.
inline std::pair<at::Tensor, int64_t> step_mask(const at::Tensor& lengths, int64_t step, int64_t batch,
                                                const at::TensorOptions& options) {
  if (!lengths.defined() || lengths.numel() == 0) {
    return {at::ones({batch, 1}, options), batch};
  }
  auto active = lengths.gt(step);
  int64_t count = active.sum().item<int64_t>();
  return {active.to(options.dtype()).unsqueeze(1), count};
}

}  // namespace normrnn
