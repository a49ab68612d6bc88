// offload_arena (torch binding): torch.classes.fusedrl.OffloadArena, the object that owns the activation offload's
// pinned host arena, its two copy streams and its two device slots, plus the ops that move tensors through it
// (schemas in bindings.cpp). The bookkeeping and the copies are torch-free (csrc/kernels/offload_arena.h).
//
// Why a torch custom class and not pybind11: the op library is loaded with torch.ops.load_library and has no Python
// module of its own; a custom class lives in that same library, is passed to the ops as a schema-typed argument
// (`__torch__.torch.classes.fusedrl.OffloadArena`), so the copies are ordinary dispatcher ops (CPU no-op, CUDA copy,
// chosen by the source tensor's device), and the autograd wrapper holds it like any other Python object.
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "../kernels/offload_arena.h"

#ifdef FUSEDRL_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace fusedrl {

class OffloadArena : public torch::CustomClassHolder {
 public:
  // device_index < 0: a CPU arena (every offload is a no-op); otherwise the CUDA device whose tensors it offloads.
  explicit OffloadArena(int64_t device_index);

  // Pinned host arena of exactly `bytes` (replaces the previous one; only while nothing is offloaded). False when
  // pinned memory cannot be had (fallback_reason() says why): offloads then keep tensors on the device.
  bool reserve(int64_t bytes);
  void reset();  // forget every entry, free both slots (after an interrupted backward, or between steps)
  int64_t capacity() const;
  int64_t used() const;
  int64_t live_entries() const;
  int64_t slot_owner(int64_t slot) const;
  int64_t device_index() const { return device_index_; }
  int64_t slot_bytes() const;  // device memory held by the two slots
  std::string fallback_reason() const;

  // The op bodies (see bindings.cpp).
  int64_t offload(const at::Tensor& src);  // -> handle, or -1 when the tensor stays on the device
  void prefetch(int64_t handle);
  at::Tensor fetch(int64_t handle);
  void release(int64_t handle);

 private:
  struct Meta {
    std::vector<int64_t> sizes;
    at::ScalarType dtype;
  };
  const Meta& meta_of(int64_t handle) const;
  void after_release_locked();

  const int64_t device_index_;
  mutable std::mutex mutex_;  // the forward runs on the caller's thread, the backward on autograd's device thread
  OffloadBook book_;
  std::unordered_map<int64_t, Meta> meta_;
  std::string fallback_reason_;
#ifdef FUSEDRL_WITH_CUDA
  at::Tensor slot_buffer(int slot, int64_t bytes);
  std::optional<c10::cuda::CUDAStream> d2h_, h2d_;
  std::unique_ptr<OffloadCopies> copies_;
  std::array<at::Tensor, kOffloadDeviceSlots> slots_;
#endif
};

// Called inside TORCH_LIBRARY before the schemas that name the class.
void register_offload_arena_class(torch::Library& m);

}  // namespace fusedrl
