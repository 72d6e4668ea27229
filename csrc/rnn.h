// Vanilla RNN over a whole sequence on the CPU (reference: normrnn/reference/rnn.py):
//   h_t = act(gamma_ih N_ih(wx_t) + gamma_hh N_hh(h_{t-1} W_hh^T) + b),  act in {tanh, relu, identity}
#pragma once

#include "sequence.h"

namespace normrnn {

inline std::vector<at::Tensor> rnn_forward(Sequence& saved, const at::Tensor& wx, const at::Tensor& h0,
                                           const at::Tensor& bias, const at::Tensor& lengths, bool training,
                                           double momentum, double eps) {
  const int64_t steps = wx.size(0), batch = wx.size(1), hidden = h0.size(1);
  auto output = at::empty({steps, batch, hidden}, wx.options());
  auto h = h0;
  auto w_hh_t = saved.w_hh.t();
  for (int64_t t = 0; t < steps; ++t) {
    auto [mask, count] = step_mask(lengths, t, batch, wx.options());
    auto wh = at::mm(h, w_hh_t);
    auto ih = saved.ih.forward(wx[t], mask, count, t, training, momentum, eps);
    auto hh = saved.hh.forward(wh, mask, count, t, training, momentum, eps);
    auto pre = at::addcmul(at::addcmul(bias, ih.hat, saved.ih_weight), hh.hat, saved.hh_weight);
    at::Tensor h_new = saved.activation == 0 ? at::tanh(pre) : (saved.activation == 1 ? at::relu(pre) : pre);
    output[t].copy_(h_new * mask);
    saved.masks.push_back(mask);
    saved.counts.push_back(count);
    saved.ih_norm.push_back(ih);
    saved.hh_norm.push_back(hh);
    saved.values.push_back({h_new, pre});
    saved.h_prev.push_back(h);
    h = at::where(mask.gt(0.5), h_new, h);  // ended sequences keep their state
  }
  saved.steps = steps;
  return {output, h.clone()};  // fresh: see lstm.h
}

// Returns dwx, dh0, dW_hh, d bias, d gamma_ih, d gamma_hh.
inline std::vector<at::Tensor> rnn_backward(const Sequence& saved, const at::Tensor& grad_output,
                                            const at::Tensor& grad_h_n) {
  auto dh = grad_h_n.clone();
  const int64_t hidden = saved.w_hh.size(0);
  auto grad_wx = at::empty({saved.steps, dh.size(0), hidden}, dh.options());
  auto grad_bias = at::zeros({hidden}, dh.options()), grad_ih = at::zeros({hidden}, dh.options());
  auto grad_hh = at::zeros({hidden}, dh.options());
  std::vector<at::Tensor> grad_wh(saved.steps);
  for (int64_t t = saved.steps - 1; t >= 0; --t) {
    const auto& mask = saved.masks[t];
    const auto count = saved.counts[t];
    const auto &h_new = saved.values[t][0], &pre = saved.values[t][1];
    auto grad_h = (grad_output[t] + dh) * mask;
    at::Tensor grad_pre = saved.activation == 0   ? grad_h * (1.0 - h_new * h_new)
                          : saved.activation == 1 ? grad_h * pre.gt(0).to(grad_h.scalar_type())
                                                  : grad_h;
    const auto &ih = saved.ih_norm[t], &hh = saved.hh_norm[t];
    grad_bias += grad_pre.sum(0);
    grad_ih += (grad_pre * ih.hat).sum(0);
    grad_hh += (grad_pre * hh.hat).sum(0);
    grad_wx[t].copy_(saved.ih.backward(grad_pre * saved.ih_weight, ih, mask, count));
    grad_wh[t] = saved.hh.backward(grad_pre * saved.hh_weight, hh, mask, count);
    dh = dh * (1.0 - mask) + at::mm(grad_wh[t], saved.w_hh);
  }
  return {grad_wx, dh, recurrent_weight_grad(grad_wh, saved.h_prev), grad_bias, grad_ih, grad_hh};
}

}  // namespace normrnn
