// LSTM over a whole sequence on the CPU (reference: normrnn/reference/lstm.py), gate order i, f, g, o:
//   z_t = gamma_hh N_hh(h_{t-1} W_hh^T) + gamma_ih N_ih(wx_t) + b,   c_t = f c_{t-1} + i g,
//   h_t = o tanh(gamma_c N_c(c_t) + beta_c)
// wx arrives projected (and, for layer norm and sequence-wise batch norm, normalized) by the caller.
#pragma once

#include "sequence.h"

namespace normrnn {

// Returns output (T, B, H), h_n, c_n; fills `saved` for the backward.
inline std::vector<at::Tensor> lstm_forward(Sequence& saved, const at::Tensor& wx, const at::Tensor& h0,
                                            const at::Tensor& c0, const at::Tensor& bias,
                                            const at::Tensor& cell_bias, const at::Tensor& lengths, bool training,
                                            double momentum, double eps) {
  const int64_t steps = wx.size(0), batch = wx.size(1), hidden = h0.size(1);
  auto output = at::empty({steps, batch, hidden}, wx.options());
  auto h = h0, c = c0;
  auto w_hh_t = saved.w_hh.t();
  saved.padded = lengths.defined() && lengths.numel() > 0;
  for (int64_t t = 0; t < steps; ++t) {
    auto [mask, count] = step_mask(lengths, t, batch, wx.options());
    auto ih = saved.ih.forward(wx[t], mask, count, t, training, momentum, eps);
    auto input_part = saved.ih.scale(ih.hat, saved.ih_weight) + bias;
    Normalized hh;
    at::Tensor z;
    if (saved.hh.norm == kNone) {  // one BLAS call adds the recurrent product to the rest
      z = at::addmm(input_part, h, w_hh_t);
      hh.hat = at::Tensor();
    } else {
      hh = saved.hh.forward(at::mm(h, w_hh_t), mask, count, t, training, momentum, eps);
      z = at::addcmul(input_part, hh.hat, saved.hh_weight);
    }
    auto parts = z.chunk(4, 1);
    auto gate_i = at::sigmoid(parts[0]), gate_f = at::sigmoid(parts[1]);
    auto gate_g = at::tanh(parts[2]), gate_o = at::sigmoid(parts[3]);
    auto c_new = gate_f * c + gate_i * gate_g;
    auto cn = saved.cell.forward(c_new, mask, count, t, training, momentum, eps);
    auto tanh_y = saved.cell.norm == kNone ? at::tanh(c_new) : at::tanh(at::addcmul(cell_bias, cn.hat, saved.cell_weight));
    auto h_new = gate_o * tanh_y;
    output[t].copy_(saved.padded ? h_new * mask : h_new);
    saved.masks.push_back(mask);
    saved.counts.push_back(count);
    saved.ih_norm.push_back(ih);
    saved.hh_norm.push_back(hh);
    saved.cell_norm.push_back(cn);
    saved.values.push_back({gate_i, gate_f, gate_g, gate_o, tanh_y, c});
    saved.h_prev.push_back(h);
    if (saved.padded) {
      auto active = mask.gt(0.5);
      h = at::where(active, h_new, h);  // ended sequences keep their state
      c = at::where(active, c_new, c);
    } else {
      h = h_new;
      c = c_new;
    }
  }
  saved.steps = steps;
  // fresh final states: a returned tensor that the Sequence also held would tie the autograd node
  // that owns the Sequence to itself, a cycle Python's collector cannot see through C++
  return {output, h.clone(), c.clone()};
}

// Returns dwx, dh0, dc0, dW_hh, d bias, d gamma_ih, d gamma_hh, d gamma_c, d beta_c.
inline std::vector<at::Tensor> lstm_backward(const Sequence& saved, const at::Tensor& grad_output,
                                             const at::Tensor& grad_h_n, const at::Tensor& grad_c_n) {
  auto dh = grad_h_n.clone(), dc = grad_c_n.clone();
  const int64_t gates = saved.w_hh.size(0), hidden = saved.w_hh.size(1);
  auto grad_wx = at::empty({saved.steps, dh.size(0), gates}, dh.options());
  auto grad_bias = at::zeros({gates}, dh.options()), grad_ih = at::zeros({gates}, dh.options());
  auto grad_hh = at::zeros({gates}, dh.options());
  auto grad_cell_w = at::zeros({hidden}, dh.options()), grad_cell_b = at::zeros({hidden}, dh.options());
  std::vector<at::Tensor> grad_wh(saved.steps);
  for (int64_t t = saved.steps - 1; t >= 0; --t) {
    const auto& mask = saved.masks[t];
    const auto count = saved.counts[t];
    const auto& v = saved.values[t];
    const auto &gate_i = v[0], &gate_f = v[1], &gate_g = v[2], &gate_o = v[3], &tanh_y = v[4], &c_prev = v[5];
    auto grad_h = saved.padded ? (grad_output[t] + dh) * mask : grad_output[t] + dh;
    auto grad_y = grad_h * gate_o * (1.0 - tanh_y * tanh_y);
    const auto& cn = saved.cell_norm[t];
    if (saved.cell.norm != kNone) {
      grad_cell_w += (grad_y * cn.hat).sum(0);
      grad_cell_b += grad_y.sum(0);
    }
    auto grad_c = saved.cell.backward(saved.cell.scale(grad_y, saved.cell_weight), cn, mask, count) +
                  (saved.padded ? dc * mask : dc);
    auto grad_z = at::cat({grad_c * gate_g * gate_i * (1.0 - gate_i), grad_c * c_prev * gate_f * (1.0 - gate_f),
                           grad_c * gate_i * (1.0 - gate_g * gate_g), grad_h * tanh_y * gate_o * (1.0 - gate_o)},
                          1);
    const auto &ih = saved.ih_norm[t], &hh = saved.hh_norm[t];
    grad_bias += grad_z.sum(0);
    if (saved.ih.norm != kNone) {
      grad_ih += (grad_z * ih.hat).sum(0);
    }
    if (saved.hh.norm != kNone) {
      grad_hh += (grad_z * hh.hat).sum(0);
    }
    grad_wx[t].copy_(saved.ih.backward(saved.ih.scale(grad_z, saved.ih_weight), ih, mask, count));
    grad_wh[t] = saved.hh.backward(saved.hh.scale(grad_z, saved.hh_weight), hh, mask, count);
    if (saved.padded) {  // ended sequences pass their gradient through unchanged
      auto keep = 1.0 - mask;
      dh = at::addmm(dh * keep, grad_wh[t], saved.w_hh);
      dc = dc * keep + grad_c * gate_f;
    } else {
      dh = at::mm(grad_wh[t], saved.w_hh);
      dc = grad_c * gate_f;
    }
  }
  return {grad_wx, dh, dc, recurrent_weight_grad(grad_wh, saved.h_prev), grad_bias, grad_ih, grad_hh, grad_cell_w,
          grad_cell_b};
}

}  // namespace normrnn
