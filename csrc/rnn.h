// Vanilla RNN over a whole sequence on the CPU (reference: normrnn/reference/rnn.py):
//   h_t = act(gamma_ih N_ih(wx_t) + gamma_hh N_hh(h_{t-1} W_hh^T) + b),  act in {tanh, relu, identity}
// The backward needs only act(pre): tanh' = 1 - h^2, relu' = [h > 0], identity' = 1.
#pragma once

#include "sequence.h"

namespace normrnn {

inline std::vector<at::Tensor> rnn_forward(Sequence& saved, const at::Tensor& wx, const at::Tensor& h0,
                                           const at::Tensor& bias, const at::Tensor& lengths, bool training,
                                           double momentum, double eps, bool keep) {
  const int64_t steps = wx.size(0), batch = wx.size(1), hidden = h0.size(1);
  saved.begin(lengths, steps, h0, hidden, keep);
  saved.activations = saved.per_step(hidden, wx.options());
  auto output = workspace().empty({steps, batch, hidden}, wx.options());
  RecurrentProduct recurrent_product(saved.w_hh, batch, steps);
  // a step's input term: wx_t, which carries the bias; under a per-step normalization of wx the
  // norm's output (with the bias) in this buffer
  saved.check_input_bias(bias);
  auto input = saved.input_carries_bias() ? at::Tensor() : at::empty({batch, hidden}, wx.options());
  const int64_t* row_lengths = saved.lengths_data();
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t count = saved.step_count(t);
    auto h = saved.states[saved.state_slot(t)], h_new = saved.activations[saved.step_slot(t)];
    Normalized ih, hh;
    at::Tensor step_input = wx[t];
    if (saved.ih.norm != kNone) {
      ih = saved.ih.forward(wx[t], saved.ih_weight, bias, input, row_lengths, count, t, training, momentum,
                            eps);
      step_input = input;
    }
    // the pre-activation: a product's own result, or h_new where the norm wrote it
    at::Tensor pre = h_new;
    if (saved.hh.norm == kNone) {
      pre = recurrent_product(h, step_input);
    } else {
      hh = saved.hh.forward(recurrent_product(h), saved.hh_weight, step_input, h_new, row_lengths, count, t, training,
                            momentum, eps);
    }
    if (saved.activation == 0) {
      at::tanh_out(h_new, pre);
    } else if (saved.activation == 1) {
      at::clamp_min_out(h_new, pre, 0);
    } else if (!pre.is_same(h_new)) {
      h_new.copy_(pre);
    }
    auto h_next = saved.states[saved.state_slot(t + 1)], out = output[t];
    AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "rnn_emit", [&] {
      const scalar_t* value = h_new.data_ptr<scalar_t>();
      emit_state<scalar_t>(h, out, h_next, row_lengths, t,
                           [&](int64_t row, int64_t j, scalar_t) { return value[row * hidden + j]; });
    });
    saved.record(ih, hh);
  }
  return {workspace().lend(output), saved.states[saved.state_slot(steps)].clone()};  // fresh: see lstm.h
}

// dL/dpre of one step from dL/dh_t = grad_output + dh, and dh_direct: dh on rows past their length.
template <typename scalar_t>
void rnn_step_grad(const at::Tensor& grad_output, const at::Tensor& dh, const at::Tensor& h_new,
                   at::Tensor& grad_pre, at::Tensor& dh_direct, int64_t activation, const int64_t* lengths,
                   int64_t step) {
  const int64_t hidden = dh.size(1);
  const scalar_t* __restrict__ go = grad_output.data_ptr<scalar_t>();
  const scalar_t* __restrict__ carried = dh.data_ptr<scalar_t>();
  const scalar_t* __restrict__ value = h_new.data_ptr<scalar_t>();
  scalar_t* __restrict__ grad = grad_pre.data_ptr<scalar_t>();
  scalar_t* __restrict__ direct = dh_direct.data_ptr<scalar_t>();
  for_each_row(dh.size(0), hidden, [&](int64_t row) {
    const int64_t at = row * hidden;
    if (!row_active(lengths, row, step)) {
      std::fill(grad + at, grad + at + hidden, scalar_t(0));
      std::copy(carried + at, carried + at + hidden, direct + at);
      return;
    }
    std::fill(direct + at, direct + at + hidden, scalar_t(0));
    NORMRNN_VECTORIZE
    for (int64_t j = at; j < at + hidden; ++j) {
      const scalar_t gh = go[j] + carried[j];
      grad[j] = activation == 0   ? gh * (scalar_t(1) - value[j] * value[j])
                : activation == 1 ? (value[j] > scalar_t(0) ? gh : scalar_t(0))
                                  : gh;
    }
  });
}

// Returns dwx, dh0, dW_hh, d bias (undefined where the input carried the bias), d gamma_ih, d gamma_hh.
inline std::vector<at::Tensor> rnn_backward(const Sequence& saved, const at::Tensor& grad_output,
                                            const at::Tensor& grad_h_n) {
  saved.check_kept("RNN");
  const int64_t steps = saved.steps, hidden = saved.w_hh.size(0), batch = grad_h_n.size(0);
  auto options = grad_h_n.options();
  auto dh = grad_h_n.clone(), dh_direct = at::empty_like(dh);
  // dL/dpre (T, B, H); without a normalization also the gradient of wx and of h W_hh^T
  auto grad_pre = workspace().empty({steps, batch, hidden}, options);
  auto grad_wx = saved.ih.norm == kNone ? grad_pre : workspace().empty({steps, batch, hidden}, options);
  auto grad_wh = saved.hh.norm == kNone ? grad_pre : workspace().empty({steps, batch, hidden}, options);
  RecurrentProduct recurrent_product(saved.w_hh.t(), batch, steps);  // dz_t W_hh
  const int64_t* row_lengths = saved.lengths_data();
  for (int64_t t = steps - 1; t >= 0; --t) {
    const auto count = saved.counts[t];
    auto grad = grad_pre[t];
    AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "rnn_step_grad", [&] {
      rnn_step_grad<scalar_t>(grad_output[t], dh, saved.activations[t], grad, dh_direct, saved.activation,
                              row_lengths, t);
    });
    if (saved.ih.norm != kNone) {
      saved.ih.backward(grad, saved.ih_weight, saved.ih_norm[t], row_lengths, t, count, grad_wx[t]);
    }
    if (saved.hh.norm != kNone) {
      saved.hh.backward(grad, saved.hh_weight, saved.hh_norm[t], row_lengths, t, count, grad_wh[t]);
    }
    dh = recurrent_product(grad_wh[t], saved.padded ? dh_direct : at::Tensor());
  }
  std::vector<at::Tensor> grads = {at::Tensor(), dh, saved.recurrent_weight_grad(grad_wh),
                                   saved.input_carries_bias() ? at::Tensor() : sum_over_steps_and_rows(grad_pre),
                                   saved.ih.gain_grad(grad_pre),
                                   saved.hh.gain_grad(grad_pre)};
  return workspace().hand_over(std::move(grads), grad_wx, {&grad_pre, &grad_wh});
}

}  // namespace normrnn
