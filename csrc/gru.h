// GRU over a whole sequence on the CPU (reference: normrnn/reference/gru.py), gate order r, z, n and
// torch's bias placement:
//   a = gamma_ih N_ih(wx_t) + b_ih,  u = gamma_hh N_hh(h_{t-1} W_hh^T) + b_hh,
//   r, z = sigmoid(a + u),  n = tanh(a_n + r u_n),  h_t = (1 - z) n + z h_{t-1}
#pragma once

#include "sequence.h"

namespace normrnn {

inline std::vector<at::Tensor> gru_forward(Sequence& saved, const at::Tensor& wx, const at::Tensor& h0,
                                           const at::Tensor& bias_ih, const at::Tensor& bias_hh,
                                           const at::Tensor& lengths, bool training, double momentum, double eps) {
  const int64_t steps = wx.size(0), batch = wx.size(1), hidden = h0.size(1);
  auto output = at::empty({steps, batch, hidden}, wx.options());
  auto h = h0;
  auto w_hh_t = saved.w_hh.t();
  for (int64_t t = 0; t < steps; ++t) {
    auto [mask, count] = step_mask(lengths, t, batch, wx.options());
    auto wh = at::mm(h, w_hh_t);
    auto ih = saved.ih.forward(wx[t], mask, count, t, training, momentum, eps);
    auto hh = saved.hh.forward(wh, mask, count, t, training, momentum, eps);
    auto a = at::addcmul(bias_ih, ih.hat, saved.ih_weight).chunk(3, 1);
    auto u = at::addcmul(bias_hh, hh.hat, saved.hh_weight).chunk(3, 1);
    auto gate_r = at::sigmoid(a[0] + u[0]);
    auto gate_z = at::sigmoid(a[1] + u[1]);
    auto candidate = at::tanh(at::addcmul(a[2], gate_r, u[2]));
    auto h_new = candidate + gate_z * (h - candidate);
    output[t].copy_(h_new * mask);
    saved.masks.push_back(mask);
    saved.counts.push_back(count);
    saved.ih_norm.push_back(ih);
    saved.hh_norm.push_back(hh);
    saved.values.push_back({gate_r, gate_z, candidate, u[2]});
    saved.h_prev.push_back(h);
    h = at::where(mask.gt(0.5), h_new, h);  // ended sequences keep their state
  }
  saved.steps = steps;
  return {output, h.clone()};  // fresh: see lstm.h
}

// Returns dwx, dh0, dW_hh, d b_ih, d b_hh, d gamma_ih, d gamma_hh.
inline std::vector<at::Tensor> gru_backward(const Sequence& saved, const at::Tensor& grad_output,
                                            const at::Tensor& grad_h_n) {
  auto dh = grad_h_n.clone();
  const int64_t gates = saved.w_hh.size(0);
  auto grad_wx = at::empty({saved.steps, dh.size(0), gates}, dh.options());
  auto grad_bias_ih = at::zeros({gates}, dh.options()), grad_bias_hh = at::zeros({gates}, dh.options());
  auto grad_ih = at::zeros({gates}, dh.options()), grad_hh = at::zeros({gates}, dh.options());
  std::vector<at::Tensor> grad_wh(saved.steps);
  for (int64_t t = saved.steps - 1; t >= 0; --t) {
    const auto& mask = saved.masks[t];
    const auto count = saved.counts[t];
    const auto& v = saved.values[t];
    const auto &gate_r = v[0], &gate_z = v[1], &candidate = v[2], &u_n = v[3];
    const auto& h_prev = saved.h_prev[t];
    auto grad_h = (grad_output[t] + dh) * mask;
    auto grad_n = grad_h * (1.0 - gate_z) * (1.0 - candidate * candidate);
    auto grad_r = grad_n * u_n * gate_r * (1.0 - gate_r);
    auto grad_zp = grad_h * (h_prev - candidate) * gate_z * (1.0 - gate_z);
    auto grad_a = at::cat({grad_r, grad_zp, grad_n}, 1);
    auto grad_u = at::cat({grad_r, grad_zp, grad_n * gate_r}, 1);
    const auto &ih = saved.ih_norm[t], &hh = saved.hh_norm[t];
    grad_bias_ih += grad_a.sum(0);
    grad_bias_hh += grad_u.sum(0);
    grad_ih += (grad_a * ih.hat).sum(0);
    grad_hh += (grad_u * hh.hat).sum(0);
    grad_wx[t].copy_(saved.ih.backward(grad_a * saved.ih_weight, ih, mask, count));
    grad_wh[t] = saved.hh.backward(grad_u * saved.hh_weight, hh, mask, count);
    // h_{t-1} reaches h_t directly (z h_{t-1}) and through W_hh; ended sequences pass dh through
    dh = dh * (1.0 - mask) + grad_h * gate_z + at::mm(grad_wh[t], saved.w_hh);
  }
  return {grad_wx, dh, recurrent_weight_grad(grad_wh, saved.h_prev), grad_bias_ih, grad_bias_hh, grad_ih, grad_hh};
}

}  // namespace normrnn
