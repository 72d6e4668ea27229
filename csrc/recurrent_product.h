// The product of each step with a weight fixed over the whole loop, y = addend + x W^T (W: (N, K),
// x: (B, K), the addend (B, N), (N) or none): h_{t-1} W_hh^T and r_t W_hr^T forward, dz_t W_hh and
// dh_t W_hr backward.
//
// Why two ways: ATen's mm on float32 calls the BLAS as is, while oneDNN's linear, given the weight
// reordered once into its blocked layout (torch's own mkldnn::_reorder_linear_weight and
// mkldnn::_linear_pointwise, the ops Inductor emits for a frozen CPU linear), is faster once the
// weight is large. Measured on a 2-core AMD EPYC, torch 2.13 (mm / oneDNN, per product):
// 32x256 by 256x1024 121 / 96 us, 64x512 by 512x2048 818 / 613 us, 4x512 by 512x2048 213 / 62 us;
// but for K N < 2^17 or a batch under 4 oneDNN's fixed cost loses (32x128 by 128x512: 34 / 37 us,
// 1x512 by 512x512: 1.8x faster only because mm is slow there too, 1x1024 by 1024x256: 0.89x).
// Reordering costs 130-650 us there, what 1.3 to 10.5 steps gain at those sizes: a loop of 16 steps
// or more repays it.
//
// Which way a product takes depends on shape and dtype only, never on timing, so that the same call
// gives the same bits every time. NORMRNN_CPU_MATMUL=aten or =onednn overrides the choice.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <cstdlib>
#include <string>
#include <vector>

namespace normrnn {

// Below these oneDNN's products were slower than mm on the machine above (see the header).
constexpr int64_t kOneDnnMinBatch = 4;
constexpr int64_t kOneDnnMinWeightElements = int64_t(1) << 17;
constexpr int64_t kOneDnnMinSteps = 16;

// torch's oneDNN linear ops, looked up once; null handles where this torch build lacks them.
struct OneDnnLinear {
  std::optional<c10::OperatorHandle> reorder, linear, linear_add;

  static const OneDnnLinear& get() {
    static const OneDnnLinear ops = [] {
      OneDnnLinear found;
      auto& dispatcher = c10::Dispatcher::singleton();
      found.reorder = dispatcher.findOp({"mkldnn::_reorder_linear_weight", ""});
      found.linear = dispatcher.findOp({"mkldnn::_linear_pointwise", ""});
      found.linear_add = dispatcher.findOp({"mkldnn::_linear_pointwise", "binary"});
      return found;
    }();
    return ops;
  }

  // Internal ops can change between torch versions: each must still take the arguments it is
  // called with here, or it counts as missing (mm then, with a warning) rather than failing a call.
  bool available() const {
    static const bool usable = at::hasMKLDNN() && takes(reorder, {"self", "batch_size"}) &&
                               takes(linear, {"X", "W", "B", "attr", "scalars", "algorithm"}) &&
                               takes(linear_add, {"X", "other", "W", "B", "attr"});
    return usable;
  }

 private:
  static bool takes(const std::optional<c10::OperatorHandle>& op, const std::vector<std::string>& names) {
    if (!op.has_value() || !op->hasSchema()) {
      return false;
    }
    const auto& arguments = op->schema().arguments();
    if (arguments.size() != names.size() || op->schema().returns().size() != 1) {
      return false;
    }
    for (size_t i = 0; i < names.size(); ++i) {
      if (arguments[i].name() != names[i]) {
        return false;
      }
    }
    return true;
  }
};

// "onednn" or "aten": how a loop of `steps` products of a (batch, K) input with a float `dtype`
// weight of shape (N, K) runs on this machine.
inline std::string recurrent_product_kind(at::ScalarType dtype, int64_t batch, int64_t in_features,
                                          int64_t out_features, int64_t steps) {
  const char* setting = std::getenv("NORMRNN_CPU_MATMUL");
  const std::string choice = setting == nullptr ? "auto" : setting;
  TORCH_CHECK(choice == "auto" || choice == "aten" || choice == "onednn",
              "NORMRNN_CPU_MATMUL: expected auto, aten or onednn, got '", choice, "'");
  // oneDNN's linear takes float32 (and 16-bit) operands: float64, the dtype of the checks against
  // the reference, stays on mm; so does a user's torch.backends.mkldnn.enabled = False
  if (choice == "aten" || dtype != at::kFloat || !at::globalContext().userEnabledMkldnn()) {
    return "aten";
  }
  const bool worth_it = batch >= kOneDnnMinBatch && in_features * out_features >= kOneDnnMinWeightElements &&
                        steps >= kOneDnnMinSteps;
  if (choice == "auto" && !worth_it) {
    return "aten";
  }
  if (!OneDnnLinear::get().available()) {
    TORCH_WARN_ONCE("normrnn (cpp backend): this torch build has no oneDNN linear (mkldnn::_linear_pointwise), so "
                    "the recurrent matrix products run on ATen's mm, up to 1.5x slower at large hidden sizes "
                    "on some CPUs");
    return "aten";
  }
  return "onednn";
}

class RecurrentProduct {
 public:
  RecurrentProduct() = default;

  // weight (N, K), the same for each of `steps` products with a (batch, K) input.
  RecurrentProduct(const at::Tensor& weight, int64_t batch, int64_t steps) {
    packs_ = recurrent_product_kind(weight.scalar_type(), batch, weight.size(1), weight.size(0), steps) == "onednn";
    if (packs_) {
      auto stack = torch::jit::Stack{weight.contiguous(), batch};
      OneDnnLinear::get().reorder->callBoxed(&stack);
      weight_ = stack[0].toTensor();
    } else {
      weight_ = weight.t();
      out_ = at::empty({batch, weight.size(0)}, weight.options());
    }
  }

  // addend + x W^T. On mm the result is a buffer this holds, overwritten by the next call; on
  // oneDNN a fresh tensor. Either way contiguous (batch, N).
  at::Tensor operator()(const at::Tensor& x, const at::Tensor& addend = at::Tensor()) {
    if (!packs_) {
      return addend.defined() ? at::addmm_out(out_, addend, x, weight_) : at::mm_out(out_, x, weight_);
    }
    const auto& ops = OneDnnLinear::get();
    torch::jit::Stack stack;
    if (addend.defined() && addend.dim() == 2) {
      stack = {x.contiguous(), addend.contiguous(), weight_, c10::IValue(), std::string("add")};
      ops.linear_add->callBoxed(&stack);
    } else {
      stack = {x.contiguous(), weight_, addend.defined() ? c10::IValue(addend) : c10::IValue(),
               std::string("none"), c10::List<std::optional<at::Scalar>>(), c10::IValue()};
      ops.linear->callBoxed(&stack);
    }
    return stack[0].toTensor();
  }

  // Into `out` (a view the loop keeps, such as a slot of the saved gate values).
  void into(at::Tensor out, const at::Tensor& x, const at::Tensor& addend = at::Tensor()) {
    if (!packs_) {
      addend.defined() ? at::addmm_out(out, addend, x, weight_) : at::mm_out(out, x, weight_);
      return;
    }
    out.copy_((*this)(x, addend));
  }

 private:
  bool packs_ = false;
  at::Tensor weight_;  // W^T (a view) for mm, or oneDNN's reordered copy of W
  at::Tensor out_;     // mm's result
};

}  // namespace normrnn
