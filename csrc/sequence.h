// What a forward over the whole sequence keeps for its backward, shared by the three cells.
//
// Every per-step value lives in one buffer for the whole sequence, (T, B, F), written in place:
// a step allocates nothing, and the weight gradient dW_hh = sum_t dwh_t^T h_{t-1} is one matmul
// over the buffers with no stacking. A forward that no backward follows (`keep` false: gradients
// off, or nothing that asks for one) keeps nothing: its buffers hold one step, reused, and h and c
// two slots (the previous and the new), so that inference on a long sequence needs memory for the
// projected input and the output only, not some 16 values a step and feature more.
#pragma once

#include <algorithm>
#include <vector>

#include "norms.h"
#include "recurrent_product.h"

namespace normrnn {

struct Sequence {
  int64_t steps = 0, batch = 0;
  bool keep = true;  // a backward will follow: every step's values are kept
  StepNorm ih, hh, cell;  // cell: the LSTM's normalization of c_t
  at::Tensor w_hh, ih_weight, hh_weight, cell_weight;
  at::Tensor w_hr;  // LSTM with proj_size P: (P, H), h_t = r_t W_hr^T; undefined without one
  at::Tensor lengths;  // (B,) int64; undefined when every sequence runs the whole length
  std::vector<int64_t> counts;  // active rows of each step
  std::vector<Normalized> ih_norm, hh_norm, cell_norm;  // empty entries where the norm is None
  // Indexed by state_slot and step_slot (the step itself when kept):
  at::Tensor states;       // (T + 1, B, H): [t] is h_{t-1} of step t (the state kept by each row)
  at::Tensor cells;        // LSTM (T + 1, B, H): c likewise
  at::Tensor activations;  // (T, B, F): each cell's gate values after their nonlinearity
  at::Tensor extra;        // LSTM tanh(y_t); GRU u_t (T, B, 3H); unused by the RNN
  at::Tensor unprojected;  // LSTM with proj_size: r_t = o_t tanh(y_t) (T, B, H), which W_hr projects
  int64_t activation = 0;  // RNN: 0 tanh, 1 relu, 2 identity
  bool padded = false;     // lengths given: rows end at different steps

  bool projects() const { return w_hr.defined(); }

  // Sets up the buffers common to every cell: h, and the hats of the normalizations of the
  // projections (width: their number of features, G) and of the cell (cell_width, H: the width of
  // h too, except in an LSTM that projects h to proj_size features).
  void begin(const at::Tensor& sequence_lengths, int64_t num_steps, const at::Tensor& h0, int64_t width,
             bool keep_steps, int64_t cell_width = -1) {
    steps = num_steps;
    batch = h0.size(0);
    keep = keep_steps;
    padded = sequence_lengths.defined() && sequence_lengths.numel() > 0;
    lengths = padded ? sequence_lengths.to(at::kLong).contiguous() : at::Tensor();
    states = per_state(h0.size(1), h0.options());
    states[0].copy_(h0);
    const int64_t slots = keep ? steps : 1;
    ih.begin(slots, batch, width, h0.options());
    hh.begin(slots, batch, width, h0.options());
    cell.begin(slots, batch, cell_width < 0 ? h0.size(1) : cell_width, h0.options());
  }

  // Where step t's values are in a buffer of per_step, and h_{t-1} (c_{t-1}) in one of per_state.
  int64_t step_slot(int64_t step) const { return keep ? step : 0; }
  int64_t state_slot(int64_t step) const { return keep ? step : step % 2; }

  // A buffer for a value of `width` features at every step (T, B, width), or at one (1, B, width).
  at::Tensor per_step(int64_t width, const at::TensorOptions& options) const {
    return workspace().empty({keep ? steps : 1, batch, width}, options);
  }

  // A buffer for a state carried from step to step: T + 1 slots, or 2 (the previous and the new).
  at::Tensor per_state(int64_t width, const at::TensorOptions& options) const {
    return workspace().empty({keep ? steps + 1 : 2, batch, width}, options);
  }

  // Without a per-step norm of wx, wx carries the input's bias (added to the whole projection before
  // the loop, by the ops that make it): the loop adds none, returns no gradient for it, and takes an
  // empty one. A per-step norm of wx adds the bias after it.
  bool input_carries_bias() const { return ih.norm == kNone; }

  void check_input_bias(const at::Tensor& bias) const {
    TORCH_CHECK((bias.numel() == 0) == input_carries_bias(), "bias: expected ",
                input_carries_bias() ? "an empty tensor (without a per-step norm of wx, wx carries the bias)"
                                     : "the bias that the per-step norm of wx adds",
                ", got ", bias.sizes());
  }

  // The normalizations of step t, for its backward (nothing when none follows).
  void record(const Normalized& input, const Normalized& recurrent, const Normalized& of_cell = Normalized()) {
    if (keep) {
      ih_norm.push_back(input);
      hh_norm.push_back(recurrent);
      cell_norm.push_back(of_cell);
    }
  }

  // A backward needs every step's values: it is only reached after a forward that kept them.
  void check_kept(const char* cell_name) const {
    TORCH_CHECK(keep, "normrnn (cpp backend): ", cell_name, " backward after a forward that kept nothing for it "
                "(it ran with gradients disabled, or with no input that requires one)");
  }

  // The number of rows active at step t, recorded for the backward.
  int64_t step_count(int64_t step) {
    int64_t count = states.size(1);
    if (padded) {
      const int64_t* row_lengths = lengths_data();
      count = std::count_if(row_lengths, row_lengths + count, [&](int64_t length) { return length > step; });
    }
    counts.push_back(count);
    return count;
  }

  // The rows' lengths (row b takes part in step t while t < lengths[b]); null when all always do.
  const int64_t* lengths_data() const { return padded ? lengths.data_ptr<int64_t>() : nullptr; }

  // The buffers go back to the workspace when the autograd node that owns this is freed.
  ~Sequence() {
    ih_norm.clear();  // views of the hats
    hh_norm.clear();
    cell_norm.clear();
    for (auto* buffer : {&states, &cells, &activations, &extra, &unprojected, &ih.hats, &hh.hats, &cell.hats}) {
      workspace().recycle(*buffer);
    }
  }

  // dW_hh = sum_t dwh_t^T h_{t-1}, dwh (T, B, G): one matmul over all timesteps.
  at::Tensor recurrent_weight_grad(const at::Tensor& grad_wh) const {
    auto previous = states.narrow(0, 0, steps);
    return at::mm(grad_wh.reshape({-1, grad_wh.size(2)}).t(), previous.reshape({-1, previous.size(2)}));
  }
};

// h_t = new_value(row, j, h_{t-1}[row, j]) into output[t] and the kept state h_next; a row past its
// length emits zero and keeps h_{t-1}.
template <typename scalar_t, typename NewValue>
void emit_state(const at::Tensor& h_prev, at::Tensor& output, at::Tensor& h_next, const int64_t* lengths,
                int64_t step, const NewValue& new_value) {
  const int64_t hidden = h_prev.size(1);
  const scalar_t* __restrict__ previous = h_prev.data_ptr<scalar_t>();
  scalar_t* __restrict__ out = output.data_ptr<scalar_t>();
  scalar_t* __restrict__ next = h_next.data_ptr<scalar_t>();
  for_each_row(h_prev.size(0), hidden, [&](int64_t row) {
    const int64_t at = row * hidden;
    if (!row_active(lengths, row, step)) {
      std::fill(out + at, out + at + hidden, scalar_t(0));
      std::copy(previous + at, previous + at + hidden, next + at);
      return;
    }
    NORMRNN_VECTORIZE
    for (int64_t j = 0; j < hidden; ++j) {
      out[at + j] = next[at + j] = new_value(row, j, previous[at + j]);
    }
  });
}

}  // namespace normrnn
