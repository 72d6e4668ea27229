// Python bindings of the C++ CPU backend (normrnn/cpp_backend.py builds and calls them): the
// forward of each cell returns its outputs and an opaque Sequence, which its backward consumes
// (`keep`: whether a backward will; without one the Sequence holds no step's values).
#include <memory>

#include "gru.h"
#include "lstm.h"
#include "rnn.h"

namespace py = pybind11;
using normrnn::Sequence;

namespace {

std::shared_ptr<Sequence> make_sequence(const at::Tensor& w_hh, const at::Tensor& ih_weight,
                                        const at::Tensor& hh_weight, const at::Tensor& cell_weight,
                                        const std::vector<at::Tensor>& running, int64_t ih_norm, int64_t hh_norm,
                                        int64_t cell_norm) {
  TORCH_CHECK(running.size() == 6, "running: expected 6 tensors (ih, hh, cell mean and variance), got ",
              running.size());
  auto sequence = std::make_shared<Sequence>();
  sequence->w_hh = w_hh;
  sequence->ih_weight = ih_weight;
  sequence->hh_weight = hh_weight;
  sequence->cell_weight = cell_weight;
  // the running statistics share storage with the caller's buffers: updated in place
  sequence->ih = {ih_norm, running[0], running[1]};
  sequence->hh = {hh_norm, running[2], running[3]};
  sequence->cell = {cell_norm, running[4], running[5]};
  return sequence;
}

py::tuple lstm_forward(const at::Tensor& wx, const at::Tensor& h0, const at::Tensor& c0, const at::Tensor& w_hh,
                       const at::Tensor& bias, const at::Tensor& ih_weight, const at::Tensor& hh_weight,
                       const at::Tensor& cell_weight, const at::Tensor& cell_bias,
                       const std::vector<at::Tensor>& running, const at::Tensor& lengths, int64_t ih_norm,
                       int64_t hh_norm, int64_t cell_norm, bool training, double momentum, double eps, bool keep,
                       const at::Tensor& w_hr) {
  auto sequence = make_sequence(w_hh, ih_weight, hh_weight, cell_weight, running, ih_norm, hh_norm, cell_norm);
  if (w_hr.numel() > 0) {  // empty: no projection
    TORCH_CHECK(w_hr.dim() == 2 && w_hr.size(0) == h0.size(1) && w_hr.size(1) == c0.size(1),
                "w_hr: expected shape (", h0.size(1), ", ", c0.size(1), ") (proj_size, hidden_size), got ",
                w_hr.sizes());
    sequence->w_hr = w_hr.contiguous();
  }
  auto out = normrnn::lstm_forward(*sequence, wx, h0, c0, bias, cell_bias, lengths, training, momentum, eps, keep);
  return py::make_tuple(out[0], out[1], out[2], sequence);
}

py::tuple gru_forward(const at::Tensor& wx, const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& bias_ih,
                      const at::Tensor& bias_hh, const at::Tensor& ih_weight, const at::Tensor& hh_weight,
                      const std::vector<at::Tensor>& running, const at::Tensor& lengths, int64_t ih_norm,
                      int64_t hh_norm, bool training, double momentum, double eps, bool keep) {
  auto sequence = make_sequence(w_hh, ih_weight, hh_weight, at::Tensor(), running, ih_norm, hh_norm, 0);
  auto out = normrnn::gru_forward(*sequence, wx, h0, bias_ih, bias_hh, lengths, training, momentum, eps, keep);
  return py::make_tuple(out[0], out[1], sequence);
}

py::tuple rnn_forward(const at::Tensor& wx, const at::Tensor& h0, const at::Tensor& w_hh, const at::Tensor& bias,
                      const at::Tensor& ih_weight, const at::Tensor& hh_weight, const std::vector<at::Tensor>& running,
                      const at::Tensor& lengths, int64_t ih_norm, int64_t hh_norm, int64_t activation, bool training,
                      double momentum, double eps, bool keep) {
  auto sequence = make_sequence(w_hh, ih_weight, hh_weight, at::Tensor(), running, ih_norm, hh_norm, 0);
  sequence->activation = activation;
  auto out = normrnn::rnn_forward(*sequence, wx, h0, bias, lengths, training, momentum, eps, keep);
  return py::make_tuple(out[0], out[1], sequence);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Sequence, std::shared_ptr<Sequence>>(m, "Sequence",
                                                 "What a forward keeps for its backward (opaque).");
  m.def("lstm_forward", &lstm_forward,
        "LSTM over the whole sequence (w_hr: its output projection, or empty): output, h_n, c_n, saved");
  m.def("lstm_backward", [](const Sequence& s, const at::Tensor& g, const at::Tensor& gh, const at::Tensor& gc) {
    return normrnn::lstm_backward(s, g, gh, gc);
  }, "dwx, dh0, dc0, dW_hh, d bias, d gamma_ih, d gamma_hh, d gamma_c, d beta_c, dW_hr (None without one)");
  m.def("gru_forward", &gru_forward, "GRU over the whole sequence: output, h_n, saved");
  m.def("gru_backward", [](const Sequence& s, const at::Tensor& g, const at::Tensor& gh) {
    return normrnn::gru_backward(s, g, gh);
  }, "dwx, dh0, dW_hh, d b_ih, d b_hh, d gamma_ih, d gamma_hh");
  m.def("rnn_forward", &rnn_forward, "vanilla RNN over the whole sequence: output, h_n, saved");
  m.def("recurrent_product_kind", [](at::ScalarType dtype, int64_t batch, int64_t in_features, int64_t out_features,
                                     int64_t steps) {
    return normrnn::recurrent_product_kind(dtype, batch, in_features, out_features, steps);
  }, "'onednn' or 'aten': how the loops multiply a (batch, in_features) step by a weight (out_features, "
     "in_features) of this dtype over `steps` steps (csrc/recurrent_product.h)");
  m.def("release_workspace", [] { normrnn::workspace().clear(); },
        "frees the pooled internal buffers that later calls would reuse");
  m.def("workspace_bytes", [] { return normrnn::workspace().pooled_bytes(); }, "bytes held by the pool");
  m.def("rnn_backward", [](const Sequence& s, const at::Tensor& g, const at::Tensor& gh) {
    return normrnn::rnn_backward(s, g, gh);
  }, "dwx, dh0, dW_hh, d bias, d gamma_ih, d gamma_hh");
}
