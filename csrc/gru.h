// GRU over a whole sequence on the CPU (reference: normrnn/reference/gru.py), gate order r, z, n and
// torch's bias placement:
//   a = gamma_ih N_ih(wx_t) + b_ih,  u = gamma_hh N_hh(h_{t-1} W_hh^T) + b_hh,
//   r, z = sigmoid(a + u),  n = tanh(a_n + r u_n),  h_t = (1 - z) n + z h_{t-1}
// A step is one BLAS call, three fused row loops and ATen's vectorized sigmoid and tanh in place;
// the backward step one fused row loop and one BLAS call.
#pragma once

#include "sequence.h"

namespace normrnn {

// The pre-activations of r and z (first_two) or of n (otherwise) into gates, from a and u (B, 3H).
template <typename scalar_t>
void gru_preactivation(const at::Tensor& a, const at::Tensor& u, at::Tensor& gates, bool first_two) {
  const int64_t width = a.size(1), hidden = width / 3;
  const scalar_t* __restrict__ a_data = a.data_ptr<scalar_t>();
  const scalar_t* __restrict__ u_data = u.data_ptr<scalar_t>();
  scalar_t* __restrict__ gate = gates.data_ptr<scalar_t>();
  for_each_row(a.size(0), width, [&](int64_t row) {
    const scalar_t* __restrict__ a_row = a_data + row * width, *u_row = u_data + row * width;
    scalar_t* __restrict__ g_row = gate + row * width;
    if (first_two) {
      for (int64_t j = 0; j < 2 * hidden; ++j) {
        g_row[j] = a_row[j] + u_row[j];
      }
    } else {
      for (int64_t j = 2 * hidden; j < width; ++j) {
        g_row[j] = a_row[j] + g_row[j - 2 * hidden] * u_row[j];
      }
    }
  });
}

inline std::vector<at::Tensor> gru_forward(Sequence& saved, const at::Tensor& wx, const at::Tensor& h0,
                                           const at::Tensor& bias_ih, const at::Tensor& bias_hh,
                                           const at::Tensor& lengths, bool training, double momentum, double eps,
                                           bool keep) {
  const int64_t steps = wx.size(0), batch = wx.size(1), hidden = h0.size(1);
  saved.begin(lengths, steps, h0, 3 * hidden, keep);
  saved.activations = saved.per_step(3 * hidden, wx.options());
  saved.extra = saved.per_step(3 * hidden, wx.options());
  auto output = workspace().empty({steps, batch, hidden}, wx.options());
  RecurrentProduct recurrent_product(saved.w_hh, batch, steps);
  // a: wx_t, which carries b_ih; under a per-step normalization of wx the norm's output (with b_ih)
  // in this buffer
  saved.check_input_bias(bias_ih);
  auto normalized_input = saved.input_carries_bias() ? at::Tensor() : at::empty({batch, 3 * hidden}, wx.options());
  const int64_t* row_lengths = saved.lengths_data();
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t count = saved.step_count(t);
    const int64_t slot = saved.step_slot(t);
    auto h = saved.states[saved.state_slot(t)], gates = saved.activations[slot], u = saved.extra[slot];
    Normalized ih, hh;
    at::Tensor a = wx[t];
    if (saved.ih.norm != kNone) {
      ih = saved.ih.forward(wx[t], saved.ih_weight, bias_ih, normalized_input, row_lengths, count, t, training,
                            momentum, eps);
      a = normalized_input;
    }
    if (saved.hh.norm == kNone) {
      recurrent_product.into(u, h, bias_hh);
    } else {
      hh = saved.hh.forward(recurrent_product(h), saved.hh_weight, bias_hh, u, row_lengths, count, t, training,
                            momentum, eps);
    }
    auto h_next = saved.states[saved.state_slot(t + 1)], out = output[t];
    AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "gru_step", [&] {
      gru_preactivation<scalar_t>(a, u, gates, true);
      gates.narrow(1, 0, 2 * hidden).sigmoid_();
      gru_preactivation<scalar_t>(a, u, gates, false);
      gates.narrow(1, 2 * hidden, hidden).tanh_();
      const scalar_t* gate = gates.data_ptr<scalar_t>();
      emit_state<scalar_t>(h, out, h_next, row_lengths, t, [&](int64_t row, int64_t j, scalar_t previous) {
        const scalar_t z = gate[row * 3 * hidden + hidden + j], n = gate[row * 3 * hidden + 2 * hidden + j];
        return n + z * (previous - n);  // h_t = (1 - z) n + z h_{t-1}
      });
    });
    saved.record(ih, hh);
  }
  return {workspace().lend(output), saved.states[saved.state_slot(steps)].clone()};  // fresh: see lstm.h
}

// dL/da and dL/du (B, 3H) of one step from dL/dh_t = grad_output + dh, and dh_direct, the part of
// dL/dh_{t-1} that does not pass through W_hh: z dL/dh_t, or all of dh on a row past its length.
template <typename scalar_t>
void gru_step_grad(const at::Tensor& grad_output, const at::Tensor& dh, const at::Tensor& gates, const at::Tensor& u,
                   const at::Tensor& h_prev, at::Tensor& grad_a, at::Tensor& grad_u, at::Tensor& dh_direct,
                   const int64_t* lengths, int64_t step) {
  const int64_t hidden = dh.size(1), width = 3 * hidden;
  const scalar_t* __restrict__ go = grad_output.data_ptr<scalar_t>();
  const scalar_t* __restrict__ carried = dh.data_ptr<scalar_t>();
  const scalar_t* __restrict__ gate = gates.data_ptr<scalar_t>();
  const scalar_t* __restrict__ u_data = u.data_ptr<scalar_t>();
  const scalar_t* __restrict__ previous = h_prev.data_ptr<scalar_t>();
  scalar_t* __restrict__ da = grad_a.data_ptr<scalar_t>();
  scalar_t* __restrict__ du = grad_u.data_ptr<scalar_t>();
  scalar_t* __restrict__ direct = dh_direct.data_ptr<scalar_t>();
  for_each_row(dh.size(0), width, [&](int64_t row) {
    const int64_t at = row * hidden;
    scalar_t* __restrict__ da_row = da + row * width, *du_row = du + row * width;
    if (!row_active(lengths, row, step)) {
      std::fill(da_row, da_row + width, scalar_t(0));
      std::fill(du_row, du_row + width, scalar_t(0));
      std::copy(carried + at, carried + at + hidden, direct + at);
      return;
    }
    const scalar_t* __restrict__ r = gate + row * width, *z = r + hidden, *n = r + 2 * hidden;
    const scalar_t* __restrict__ u_n = u_data + row * width + 2 * hidden;
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < hidden; ++j) {
      const scalar_t gh = go[at + j] + carried[at + j];
      const scalar_t gn = gh * (scalar_t(1) - z[j]) * (scalar_t(1) - n[j] * n[j]);
      const scalar_t gr = gn * u_n[j] * r[j] * (scalar_t(1) - r[j]);
      const scalar_t gz = gh * (previous[at + j] - n[j]) * z[j] * (scalar_t(1) - z[j]);
      da_row[j] = du_row[j] = gr;
      da_row[hidden + j] = du_row[hidden + j] = gz;
      da_row[2 * hidden + j] = gn;
      du_row[2 * hidden + j] = gn * r[j];
      direct[at + j] = gh * z[j];
    }
  });
}

// Returns dwx, dh0, dW_hh, d b_ih (undefined where the input carried it), d b_hh, d gamma_ih, d gamma_hh.
inline std::vector<at::Tensor> gru_backward(const Sequence& saved, const at::Tensor& grad_output,
                                            const at::Tensor& grad_h_n) {
  saved.check_kept("GRU");
  const int64_t steps = saved.steps, gates = saved.w_hh.size(0), batch = grad_h_n.size(0);
  auto options = grad_h_n.options();
  auto dh = grad_h_n.clone(), dh_direct = at::empty_like(dh);
  // dL/da, dL/du (T, B, 3H); without a normalization also the gradients of wx and of h W_hh^T
  auto grad_a = workspace().empty({steps, batch, gates}, options);
  auto grad_u = workspace().empty({steps, batch, gates}, options);
  auto grad_wx = saved.ih.norm == kNone ? grad_a : workspace().empty({steps, batch, gates}, options);
  auto grad_wh = saved.hh.norm == kNone ? grad_u : workspace().empty({steps, batch, gates}, options);
  RecurrentProduct recurrent_product(saved.w_hh.t(), batch, steps);  // dz_t W_hh
  const int64_t* row_lengths = saved.lengths_data();
  for (int64_t t = steps - 1; t >= 0; --t) {
    const auto count = saved.counts[t];
    auto da = grad_a[t], du = grad_u[t];
    AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "gru_step_grad", [&] {
      gru_step_grad<scalar_t>(grad_output[t], dh, saved.activations[t], saved.extra[t], saved.states[t], da, du,
                              dh_direct, row_lengths, t);
    });
    if (saved.ih.norm != kNone) {
      saved.ih.backward(da, saved.ih_weight, saved.ih_norm[t], row_lengths, t, count, grad_wx[t]);
    }
    if (saved.hh.norm != kNone) {
      saved.hh.backward(du, saved.hh_weight, saved.hh_norm[t], row_lengths, t, count, grad_wh[t]);
    }
    // h_{t-1} reaches h_t directly (z h_{t-1}) and through W_hh
    dh = recurrent_product(grad_wh[t], dh_direct);
  }
  std::vector<at::Tensor> grads = {at::Tensor(), dh, saved.recurrent_weight_grad(grad_wh),
                                   saved.input_carries_bias() ? at::Tensor() : sum_over_steps_and_rows(grad_a),
                                   sum_over_steps_and_rows(grad_u),
                                   saved.ih.gain_grad(grad_a), saved.hh.gain_grad(grad_u)};
  return workspace().hand_over(std::move(grads), grad_wx, {&grad_a, &grad_u, &grad_wh});
}

}  // namespace normrnn
