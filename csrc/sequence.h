// What a forward over the whole sequence keeps for its backward, shared by the three cells.
#pragma once

#include <vector>

#include "norms.h"

namespace normrnn {

struct Sequence {
  int64_t steps = 0;
  StepNorm ih, hh, cell;  // cell: the LSTM's normalization of c_t
  at::Tensor w_hh, ih_weight, hh_weight, cell_weight;
  std::vector<at::Tensor> masks;  // (B, 1) per step
  std::vector<int64_t> counts;
  std::vector<Normalized> ih_norm, hh_norm, cell_norm;
  std::vector<std::vector<at::Tensor>> values;  // per step, the cell's activations (see each cell)
  std::vector<at::Tensor> h_prev;               // h_{t-1} of every step, for dW_hh
  int64_t activation = 0;                       // RNN: 0 tanh, 1 relu, 2 identity
  bool padded = false;                          // lengths given: masks matter
};

// dW_hh = sum_t dwh_t^T h_{t-1}: one matmul over all timesteps.
inline at::Tensor recurrent_weight_grad(const std::vector<at::Tensor>& grad_wh, const std::vector<at::Tensor>& h_prev) {
  auto grads = at::stack(grad_wh);
  auto states = at::stack(h_prev);
  return at::mm(grads.reshape({-1, grads.size(2)}).t(), states.reshape({-1, states.size(2)}));
}

}  // namespace normrnn
