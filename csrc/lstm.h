// LSTM over a whole sequence on the CPU (reference: normrnn/reference/lstm.py), gate order i, f, g, o:
//   z_t = gamma_hh N_hh(h_{t-1} W_hh^T) + gamma_ih N_ih(wx_t) + b,   c_t = f c_{t-1} + i g,
//   h_t = o tanh(gamma_c N_c(c_t) + beta_c)         (with proj_size P: h_t = r_t W_hr^T, r_t that value)
// wx arrives projected (and, for layer norm and sequence-wise batch norm, normalized) by the caller.
// A step is one BLAS call, ATen's vectorized sigmoid/tanh in place on the gate buffer, and two
// fused row loops; the backward step is one fused row loop and one BLAS call (each normalization,
// when present, adds one loop of its own, csrc/norms.h).
#pragma once

#include "sequence.h"

namespace normrnn {

// c_t = f c_{t-1} + i g into c_next (rows past their length keep c_{t-1}).
template <typename scalar_t>
void lstm_cell_update(const at::Tensor& gates, const at::Tensor& c_prev, at::Tensor& c_next, const int64_t* lengths,
                      int64_t step) {
  const int64_t hidden = c_prev.size(1);
  const scalar_t* __restrict__ gate = gates.data_ptr<scalar_t>();
  const scalar_t* __restrict__ previous = c_prev.data_ptr<scalar_t>();
  scalar_t* __restrict__ next = c_next.data_ptr<scalar_t>();
  for_each_row(c_prev.size(0), 4 * hidden, [&](int64_t row) {
    const scalar_t* __restrict__ g_row = gate + row * 4 * hidden;
    const scalar_t* __restrict__ c_row = previous + row * hidden;
    scalar_t* __restrict__ out = next + row * hidden;
    if (!row_active(lengths, row, step)) {
      std::copy(c_row, c_row + hidden, out);
      return;
    }
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < hidden; ++j) {
      out[j] = g_row[hidden + j] * c_row[j] + g_row[j] * g_row[2 * hidden + j];
    }
  });
}

// Returns output (T, B, R), h_n (B, R), c_n (B, H), R = P with a projection (saved.w_hr) and H
// without; fills `saved` for the backward.
inline std::vector<at::Tensor> lstm_forward(Sequence& saved, const at::Tensor& wx, const at::Tensor& h0,
                                            const at::Tensor& c0, const at::Tensor& bias,
                                            const at::Tensor& cell_bias, const at::Tensor& lengths, bool training,
                                            double momentum, double eps, bool keep) {
  const int64_t steps = wx.size(0), batch = wx.size(1), hidden = c0.size(1), state = h0.size(1);
  saved.begin(lengths, steps, h0, 4 * hidden, keep, hidden);
  saved.cells = saved.per_state(hidden, wx.options());
  saved.cells[0].copy_(c0);
  saved.activations = saved.per_step(4 * hidden, wx.options());
  saved.extra = saved.per_step(hidden, wx.options());
  auto output = workspace().empty({steps, batch, state}, wx.options());
  const bool projects = saved.projects();
  if (projects) {
    saved.unprojected = saved.per_step(hidden, wx.options());
  }
  RecurrentProduct recurrent_product(saved.w_hh, batch, steps);
  RecurrentProduct projection = projects ? RecurrentProduct(saved.w_hr, batch, steps) : RecurrentProduct();
  // a step's input term: wx_t, which carries the bias; under a per-step normalization of wx the
  // norm's output (with the bias) in this buffer
  saved.check_input_bias(bias);
  auto input = saved.input_carries_bias() ? at::Tensor() : at::empty({batch, 4 * hidden}, wx.options());
  const int64_t* row_lengths = saved.lengths_data();
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t count = saved.step_count(t);
    const int64_t now = saved.state_slot(t), next = saved.state_slot(t + 1);
    auto h = saved.states[now], c = saved.cells[now], gates = saved.activations[saved.step_slot(t)];
    Normalized ih, hh, cn;
    at::Tensor step_input = wx[t];
    if (saved.ih.norm != kNone) {
      ih = saved.ih.forward(wx[t], saved.ih_weight, bias, input, row_lengths, count, t, training, momentum, eps);
      step_input = input;
    }
    // z_t (pre-activation): a product's own result, or the gate buffer that the norm wrote
    at::Tensor z = gates;
    if (saved.hh.norm == kNone) {
      z = recurrent_product(h, step_input);
    } else {
      hh = saved.hh.forward(recurrent_product(h), saved.hh_weight, step_input, gates, row_lengths, count, t, training,
                            momentum, eps);
    }
    auto input_forget = gates.narrow(1, 0, 2 * hidden), cell_gate = gates.narrow(1, 2 * hidden, hidden),
         output_gate = gates.narrow(1, 3 * hidden, hidden);
    at::sigmoid_out(input_forget, z.narrow(1, 0, 2 * hidden));
    at::tanh_out(cell_gate, z.narrow(1, 2 * hidden, hidden));
    at::sigmoid_out(output_gate, z.narrow(1, 3 * hidden, hidden));
    auto c_next = saved.cells[next], h_next = saved.states[next], tanh_y = saved.extra[saved.step_slot(t)];
    auto out = output[t];
    AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "lstm_cell_update",
                               [&] { lstm_cell_update<scalar_t>(gates, c, c_next, row_lengths, t); });
    // rows past their length carry c_{t-1} in c_next: outside the batch statistics and, with a
    // zero gradient, outside the backward too
    if (saved.cell.norm == kNone) {
      at::tanh_out(tanh_y, c_next);
    } else {
      cn = saved.cell.forward(c_next, saved.cell_weight, cell_bias, tanh_y, row_lengths, count, t, training,
                              momentum, eps);
      tanh_y.tanh_();
    }
    at::Tensor projected;
    if (projects) {  // r_t = o tanh(y_t) (a row past its length computes it too: its output is dropped)
      auto r = saved.unprojected[saved.step_slot(t)];
      at::mul_out(r, gates.narrow(1, 3 * hidden, hidden), tanh_y);
      projected = projection(r);
    }
    AT_DISPATCH_FLOATING_TYPES(wx.scalar_type(), "lstm_emit", [&] {  // h_t = o tanh(y_t), or r_t W_hr^T
      const scalar_t *gate = gates.data_ptr<scalar_t>(), *activation = tanh_y.data_ptr<scalar_t>();
      if (projects) {
        const scalar_t* value = projected.data_ptr<scalar_t>();
        emit_state<scalar_t>(h, out, h_next, row_lengths, t,
                             [&](int64_t row, int64_t j, scalar_t) { return value[row * state + j]; });
        return;
      }
      emit_state<scalar_t>(h, out, h_next, row_lengths, t, [&](int64_t row, int64_t j, scalar_t) {
        return gate[row * 4 * hidden + 3 * hidden + j] * activation[row * hidden + j];
      });
    });
    saved.record(ih, hh, cn);
  }
  // fresh final states: a returned tensor that the Sequence also held would tie the autograd node
  // that owns the Sequence to itself, a cycle Python's collector cannot see through C++
  const int64_t last = saved.state_slot(steps);
  return {workspace().lend(output), saved.states[last].clone(), saved.cells[last].clone()};
}

// From dL/dr_t, r_t = o tanh(y_t) (the output's gradient plus the carried dh; or, with a
// projection, that sum times W_hr, given as grad_output with dh undefined): grad_h, dL/dr_t (zero
// past a row's length), and grad_y = grad_h o (1 - tanh(y)^2), the gradient of the (normalized)
// cell value y_t.
template <typename scalar_t>
void lstm_output_grad(const at::Tensor& grad_output, const at::Tensor& dh, const at::Tensor& gates,
                      const at::Tensor& tanh_y, at::Tensor& grad_h, at::Tensor& grad_y, const int64_t* lengths,
                      int64_t step) {
  const int64_t hidden = tanh_y.size(1);
  const scalar_t* __restrict__ go = grad_output.data_ptr<scalar_t>();
  const scalar_t* __restrict__ carried = dh.defined() ? dh.data_ptr<scalar_t>() : nullptr;
  const scalar_t* __restrict__ gate = gates.data_ptr<scalar_t>();
  const scalar_t* __restrict__ activation = tanh_y.data_ptr<scalar_t>();
  scalar_t* __restrict__ gh = grad_h.data_ptr<scalar_t>();
  scalar_t* __restrict__ gy = grad_y.data_ptr<scalar_t>();
  for_each_row(tanh_y.size(0), hidden, [&](int64_t row) {
    const int64_t at = row * hidden;
    if (!row_active(lengths, row, step)) {
      std::fill(gh + at, gh + at + hidden, scalar_t(0));
      std::fill(gy + at, gy + at + hidden, scalar_t(0));
      return;
    }
    const scalar_t* __restrict__ o = gate + row * 4 * hidden + 3 * hidden;
    const auto store = [&](int64_t j, scalar_t g) {
      const scalar_t y = activation[at + j];
      gh[at + j] = g;
      gy[at + j] = g * o[j] * (scalar_t(1) - y * y);
    };
    if (carried) {  // two loops, so that neither tests the pointer at every element
      NORMRNN_VECTORIZE
      for (int64_t j = 0; j < hidden; ++j) store(j, go[at + j] + carried[at + j]);
    } else {
      NORMRNN_VECTORIZE
      for (int64_t j = 0; j < hidden; ++j) store(j, go[at + j]);
    }
  });
}

// dL/dz of the four gates (pre-activation) into grad_gates, and the carried gradients of the
// previous step: dc <- grad_c f (kept as is past a row's length), dh_direct = dh on ended rows.
// grad_h is dL/dr_t (H wide); dh and dh_direct have the width of h (P with a projection).
template <typename scalar_t>
void lstm_gate_grad(const at::Tensor& grad_h, const at::Tensor& grad_cell, const at::Tensor& gates,
                    const at::Tensor& tanh_y, const at::Tensor& c_prev, at::Tensor& dc, const at::Tensor& dh,
                    at::Tensor& dh_direct, at::Tensor& grad_gates, const int64_t* lengths, int64_t step) {
  const int64_t hidden = c_prev.size(1), state = dh.size(1);
  const scalar_t* __restrict__ gh = grad_h.data_ptr<scalar_t>();
  const scalar_t* __restrict__ gcell = grad_cell.data_ptr<scalar_t>();
  const scalar_t* __restrict__ gate = gates.data_ptr<scalar_t>();
  const scalar_t* __restrict__ activation = tanh_y.data_ptr<scalar_t>();
  const scalar_t* __restrict__ previous = c_prev.data_ptr<scalar_t>();
  const scalar_t* __restrict__ carried_h = dh.data_ptr<scalar_t>();
  scalar_t* __restrict__ carried_c = dc.data_ptr<scalar_t>();
  scalar_t* __restrict__ direct = dh_direct.data_ptr<scalar_t>();
  scalar_t* __restrict__ dz = grad_gates.data_ptr<scalar_t>();
  for_each_row(dh.size(0), 4 * hidden, [&](int64_t row) {
    const int64_t at = row * hidden, state_at = row * state;
    scalar_t* __restrict__ dz_row = dz + row * 4 * hidden;
    if (!row_active(lengths, row, step)) {
      std::fill(dz_row, dz_row + 4 * hidden, scalar_t(0));
      std::copy(carried_h + state_at, carried_h + state_at + state, direct + state_at);
      return;  // dc passes through unchanged
    }
    std::fill(direct + state_at, direct + state_at + state, scalar_t(0));
    const scalar_t* __restrict__ i = gate + row * 4 * hidden, *f = i + hidden, *g = i + 2 * hidden, *o = i + 3 * hidden;
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < hidden; ++j) {
      const scalar_t gc = gcell[at + j] + carried_c[at + j];
      dz_row[j] = gc * g[j] * i[j] * (scalar_t(1) - i[j]);
      dz_row[hidden + j] = gc * previous[at + j] * f[j] * (scalar_t(1) - f[j]);
      dz_row[2 * hidden + j] = gc * i[j] * (scalar_t(1) - g[j] * g[j]);
      dz_row[3 * hidden + j] = gh[at + j] * activation[at + j] * o[j] * (scalar_t(1) - o[j]);
      carried_c[at + j] = gc * f[j];
    }
  });
}

// With a projection: dL/dh_t = the output's gradient plus the carried dh, zero past a row's length,
// into grad_projected (its rows feed dW_hr = sum_t dL/dh_t^T r_t and dL/dr_t = dL/dh_t W_hr).
template <typename scalar_t>
void lstm_projected_grad(const at::Tensor& grad_output, const at::Tensor& dh, at::Tensor& grad_projected,
                         const int64_t* lengths, int64_t step) {
  const int64_t state = dh.size(1);
  const scalar_t* __restrict__ go = grad_output.data_ptr<scalar_t>();
  const scalar_t* __restrict__ carried = dh.data_ptr<scalar_t>();
  scalar_t* __restrict__ out = grad_projected.data_ptr<scalar_t>();
  for_each_row(dh.size(0), state, [&](int64_t row) {
    const int64_t at = row * state;
    if (!row_active(lengths, row, step)) {
      std::fill(out + at, out + at + state, scalar_t(0));
      return;
    }
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < state; ++j) {
      out[at + j] = go[at + j] + carried[at + j];
    }
  });
}

// Returns dwx, dh0, dc0, dW_hh, d bias, d gamma_ih, d gamma_hh, d gamma_c, d beta_c, and dW_hr
// (undefined without a projection; d bias undefined where the input carried the bias).
inline std::vector<at::Tensor> lstm_backward(const Sequence& saved, const at::Tensor& grad_output,
                                             const at::Tensor& grad_h_n, const at::Tensor& grad_c_n) {
  saved.check_kept("LSTM");
  const int64_t steps = saved.steps, gates = saved.w_hh.size(0), hidden = grad_c_n.size(1);
  const int64_t batch = grad_h_n.size(0);
  auto options = grad_h_n.options();
  auto dh = grad_h_n.clone(), dc = grad_c_n.clone();
  // grad_h: dL/dr_t, r_t = o tanh(y_t) (dL/dh_t itself without a projection)
  auto dh_direct = at::empty_like(dh), grad_h = at::empty_like(dc);
  const bool cell_norm = saved.cell.norm != kNone, projects = saved.projects();
  // dL/dy of every step where y is normalized (its gains' gradients are reductions over it)
  auto grad_y_steps = workspace().empty({cell_norm ? steps : 1, batch, hidden}, options);
  auto grad_cell = cell_norm ? at::empty_like(dc) : at::Tensor();
  // with a projection: dL/dh_t of every step (T, B, P), for dW_hr, and dL/dr_t of one
  auto grad_projected = projects ? workspace().empty({steps, batch, dh.size(1)}, options) : at::Tensor();
  at::Tensor grad_unprojected;
  // dL/dz (T, B, 4H); without a normalization it is also the gradient of wx and of h W_hh^T
  auto grad_gates = workspace().empty({steps, batch, gates}, options);
  auto grad_wx = saved.ih.norm == kNone ? grad_gates : workspace().empty({steps, batch, gates}, options);
  auto grad_wh = saved.hh.norm == kNone ? grad_gates : workspace().empty({steps, batch, gates}, options);
  // dh_{t-1} = dz_t W_hh (+ dh_direct), and with a projection dL/dr_t = dL/dh_t W_hr
  RecurrentProduct recurrent_product(saved.w_hh.t(), batch, steps);
  RecurrentProduct projection = projects ? RecurrentProduct(saved.w_hr.t(), batch, steps) : RecurrentProduct();
  const int64_t* row_lengths = saved.lengths_data();
  for (int64_t t = steps - 1; t >= 0; --t) {
    const auto count = saved.counts[t];
    auto gate_values = saved.activations[t], tanh_y = saved.extra[t], c_prev = saved.cells[t];
    auto dz = grad_gates[t], grad_y = grad_y_steps[cell_norm ? t : 0];
    AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "lstm_output_grad", [&] {
      if (projects) {
        auto grad_projected_t = grad_projected[t];
        lstm_projected_grad<scalar_t>(grad_output[t], dh, grad_projected_t, row_lengths, t);
        grad_unprojected = projection(grad_projected_t);
        lstm_output_grad<scalar_t>(grad_unprojected, at::Tensor(), gate_values, tanh_y, grad_h, grad_y, row_lengths,
                                   t);
      } else {
        lstm_output_grad<scalar_t>(grad_output[t], dh, gate_values, tanh_y, grad_h, grad_y, row_lengths, t);
      }
    });
    if (cell_norm) {
      saved.cell.backward(grad_y, saved.cell_weight, saved.cell_norm[t], row_lengths, t, count, grad_cell);
    }
    AT_DISPATCH_FLOATING_TYPES(options.dtype().toScalarType(), "lstm_gate_grad", [&] {
      lstm_gate_grad<scalar_t>(grad_h, cell_norm ? grad_cell : grad_y, gate_values, tanh_y, c_prev, dc, dh,
                               dh_direct, dz, row_lengths, t);
    });
    if (saved.ih.norm != kNone) {
      saved.ih.backward(dz, saved.ih_weight, saved.ih_norm[t], row_lengths, t, count, grad_wx[t]);
    }
    if (saved.hh.norm != kNone) {
      saved.hh.backward(dz, saved.hh_weight, saved.hh_norm[t], row_lengths, t, count, grad_wh[t]);
    }
    dh = recurrent_product(grad_wh[t], saved.padded ? dh_direct : at::Tensor());
  }
  auto grad_cell_b = cell_norm ? sum_over_steps_and_rows(grad_y_steps) : at::zeros({hidden}, options);
  std::vector<at::Tensor> grads = {at::Tensor(), dh, dc, saved.recurrent_weight_grad(grad_wh),
                                   saved.input_carries_bias() ? at::Tensor() : sum_over_steps_and_rows(grad_gates),
                                   saved.ih.gain_grad(grad_gates), saved.hh.gain_grad(grad_gates),
                                   saved.cell.gain_grad(grad_y_steps), grad_cell_b,
                                   projects ? at::mm(grad_projected.reshape({-1, dh.size(1)}).t(),
                                                     saved.unprojected.reshape({-1, hidden}))
                                            : at::Tensor()};
  return workspace().hand_over(std::move(grads), grad_wx, {&grad_gates, &grad_wh, &grad_y_steps, &grad_projected});
}

}  // namespace normrnn
