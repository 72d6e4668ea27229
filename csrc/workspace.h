// A pool of the large internal buffers of the sequence loops (saved activations, gradient
// buffers), handed back when a forward's saved sequence or a backward is done with them and handed
// out again by the next call of the same shape.
//
// Why: torch's CPU allocator returns large blocks to the OS, so every call's fresh buffers are
// zero-filled by the kernel page by page on first touch. Measured on a 2-core EPYC (B=32, H=256,
// T=100 LSTM forward): ~4,000 page faults, about a fifth of the forward's time. A buffer is only
// pooled when nothing else refers to its storage, so nothing handed to Python is ever reused.
#pragma once

#include <torch/extension.h>

#include <mutex>
#include <vector>

namespace normrnn {

class Workspace {
 public:
  // What the pool may hold at once; beyond it, returned buffers are freed. A training step takes
  // back every buffer it used (the backward frees the forward's unless the graph is retained), so
  // this is what the largest step's forward and backward use together, up to the bound: a BN-LSTM
  // at B=64, I=H=512, T=100 uses 312 MiB, each further layer 200 MiB more.
  static constexpr int64_t kMaxPooledBytes = int64_t(1024) << 20;

  // An uninitialized tensor of this shape, recycled when one of its size and dtype is pooled.
  at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
    const int64_t elements = c10::multiply_integers(sizes);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = pool_.begin(); it != pool_.end(); ++it) {
        if (it->numel() == elements && it->scalar_type() == options.dtype().toScalarType() &&
            it->device() == options.device()) {
          at::Tensor buffer = std::move(*it);
          pool_.erase(it);
          pooled_bytes_ -= buffer.nbytes();
          // Below autograd's view tracking: a tracked view would keep `buffer` alive as its base, a
          // second owner of the storage, and recycle() would then refuse the buffer for good (every
          // other call of a shape got fresh memory that way).
          at::AutoDispatchBelowADInplaceOrView untracked;
          return buffer.view(sizes);
        }
      }
    }
    return at::empty(sizes, options);
  }

  // Takes the buffer back if no other tensor shares its storage (the caller drops its handle).
  void recycle(at::Tensor& buffer) {
    if (!buffer.defined() || !buffer.is_contiguous() || buffer.storage_offset() != 0 ||
        buffer.use_count() != 1 || buffer.storage().use_count() != 1 ||
        buffer.nbytes() != buffer.storage().nbytes()) {
      buffer.reset();
      return;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    if (pooled_bytes_ + static_cast<int64_t>(buffer.nbytes()) <= kMaxPooledBytes) {
      pooled_bytes_ += buffer.nbytes();
      pool_.push_back(std::move(buffer));
    }
    buffer.reset();
  }

  // A tensor on `buffer`'s memory that may be handed to Python: the buffer comes back to the pool
  // when that tensor's storage is freed (by autograd, once the gradient it carries is consumed, or
  // by the caller dropping an output), where returning `buffer` itself would free it to the OS and
  // the next call would take fresh memory (at B=64, I=H=512, T=100 an LSTM's gradient of x W_ih^T
  // is 52 MB: 12,800 page faults a step). The caller drops its own handle. Its storage cannot be
  // resized, as for any tensor on memory it does not own.
  at::Tensor lend(at::Tensor& buffer) {
    auto* held = new at::Tensor(std::move(buffer));  // leaves `buffer` undefined
    return at::from_blob(
        held->data_ptr(), held->sizes(), held->strides(),
        [this, held](void*) {  // the pool is never destroyed (see workspace())
          recycle(*held);
          delete held;
        },
        held->options());
  }

  // How a backward hands over its results: `grads` with their first entry (the gradient of
  // x W_ih^T) lent on `grad_wx`, and the loop's `scratch` buffers back to the pool, where no
  // returned gradient shares their storage (recycle() checks).
  std::vector<at::Tensor> hand_over(std::vector<at::Tensor> grads, at::Tensor& grad_wx,
                                    std::initializer_list<at::Tensor*> scratch) {
    grads[0] = lend(grad_wx);
    for (auto* buffer : scratch) {
      recycle(*buffer);
    }
    return grads;
  }

  // Frees every pooled buffer.
  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    pool_.clear();
    pooled_bytes_ = 0;
  }

  int64_t pooled_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return pooled_bytes_;
  }

 private:
  std::mutex mutex_;
  std::vector<at::Tensor> pool_;
  int64_t pooled_bytes_ = 0;
};

inline Workspace& workspace() {
  static Workspace* pool = new Workspace();  // never destroyed: no teardown order at exit
  return *pool;
}

}  // namespace normrnn
