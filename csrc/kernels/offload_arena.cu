// offload_arena.cu: OffloadCopies, the pinned host buffer and the event-ordered copies of the activation offload
// (see offload_arena.h). No kernels: cudaMemcpyAsync on the caller's copy streams, ordered by events, so that the
// compute stream never waits for the host and waits on the GPU only for the one slot it is about to read.
#include "offload_arena.h"

#include <string>

namespace fusedrl {
namespace {

cudaError_t new_event(cudaEvent_t* event) {
  if (*event != nullptr) return cudaSuccess;
  return cudaEventCreateWithFlags(event, cudaEventDisableTiming);
}

}  // namespace

OffloadCopies::~OffloadCopies() {
  // Destructors must not throw; the streams' pending copies finish before the host buffer is unpinned
  // (cudaFreeHost synchronises the device).
  if (host_ != nullptr) cudaFreeHost(host_);
  for (cudaEvent_t e : on_host_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : slot_filled_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  for (cudaEvent_t e : slot_released_) {
    if (e != nullptr) cudaEventDestroy(e);
  }
  if (compute_ready_ != nullptr) cudaEventDestroy(compute_ready_);
  if (h2d_idle_ != nullptr) cudaEventDestroy(h2d_idle_);
}

bool OffloadCopies::allocate_host(int64_t bytes, cudaStream_t d2h, cudaStream_t h2d, std::string& error) {
  cudaError_t err = cudaStreamSynchronize(d2h);
  if (err == cudaSuccess) err = cudaStreamSynchronize(h2d);
  if (err != cudaSuccess) {
    error = std::string("waiting for the copy streams failed: ") + cudaGetErrorString(err);
    return false;
  }
  if (host_ != nullptr) {
    cudaFreeHost(host_);
    host_ = nullptr;
    host_bytes_ = 0;
  }
  if (bytes == 0) return true;
  void* ptr = nullptr;
  err = cudaHostAlloc(&ptr, static_cast<size_t>(bytes), cudaHostAllocDefault);
  if (err != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so later CUDA calls are not blamed for it
    error = "cudaHostAlloc(" + std::to_string(bytes) + " bytes) failed: " + cudaGetErrorString(err);
    return false;
  }
  host_ = static_cast<char*>(ptr);
  host_bytes_ = bytes;
  return true;
}

cudaError_t OffloadCopies::entry_event(int64_t index, cudaEvent_t* out) {
  if (static_cast<int64_t>(on_host_.size()) <= index) on_host_.resize(index + 1, nullptr);
  const cudaError_t err = new_event(&on_host_[index]);
  *out = on_host_[index];
  return err;
}

cudaError_t OffloadCopies::to_host(int64_t entry_index, int64_t offset, const void* src, int64_t bytes,
                                   cudaStream_t compute, cudaStream_t d2h) {
  if (offset < 0 || offset + bytes > host_bytes_) return cudaErrorInvalidValue;
  cudaEvent_t done = nullptr;
  cudaError_t err = entry_event(entry_index, &done);
  if (err == cudaSuccess) err = new_event(&compute_ready_);
  if (err == cudaSuccess) err = cudaEventRecord(compute_ready_, compute);  // the source is complete here
  if (err == cudaSuccess) err = cudaStreamWaitEvent(d2h, compute_ready_, 0);
  if (err == cudaSuccess) err = cudaMemcpyAsync(host_ + offset, src, bytes, cudaMemcpyDeviceToHost, d2h);
  if (err == cudaSuccess) err = cudaEventRecord(done, d2h);
  return err;
}

cudaError_t OffloadCopies::to_device(int64_t entry_index, int64_t offset, void* slot_ptr, int64_t bytes, int slot,
                                     cudaStream_t h2d) {
  if (offset < 0 || offset + bytes > host_bytes_ || entry_index >= static_cast<int64_t>(on_host_.size()) ||
      slot < 0 || slot >= kOffloadDeviceSlots) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaStreamWaitEvent(h2d, on_host_[entry_index], 0);  // the D2H of this entry finished
  if (err == cudaSuccess && slot_ever_released_[slot]) {
    err = cudaStreamWaitEvent(h2d, slot_released_[slot], 0);  // the compute stream no longer reads the slot
  }
  if (err == cudaSuccess) err = new_event(&slot_filled_[slot]);
  if (err == cudaSuccess) err = cudaMemcpyAsync(slot_ptr, host_ + offset, bytes, cudaMemcpyHostToDevice, h2d);
  if (err == cudaSuccess) err = cudaEventRecord(slot_filled_[slot], h2d);
  return err;
}

cudaError_t OffloadCopies::to_buffer(int64_t entry_index, int64_t offset, void* dst, int64_t bytes,
                                     cudaStream_t stream) {
  if (offset < 0 || offset + bytes > host_bytes_ || entry_index >= static_cast<int64_t>(on_host_.size())) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaStreamWaitEvent(stream, on_host_[entry_index], 0);
  if (err == cudaSuccess) err = cudaMemcpyAsync(dst, host_ + offset, bytes, cudaMemcpyHostToDevice, stream);
  return err;
}

cudaError_t OffloadCopies::wait_slot(int slot, cudaStream_t compute) {
  if (slot < 0 || slot >= kOffloadDeviceSlots || slot_filled_[slot] == nullptr) return cudaErrorInvalidValue;
  return cudaStreamWaitEvent(compute, slot_filled_[slot], 0);
}

cudaError_t OffloadCopies::release_slot(int slot, cudaStream_t compute) {
  if (slot < 0 || slot >= kOffloadDeviceSlots) return cudaErrorInvalidValue;
  cudaError_t err = new_event(&slot_released_[slot]);
  if (err == cudaSuccess) err = cudaEventRecord(slot_released_[slot], compute);
  if (err == cudaSuccess) slot_ever_released_[slot] = true;
  return err;
}

cudaError_t OffloadCopies::fence_host_reuse(cudaStream_t d2h, cudaStream_t h2d) {
  cudaError_t err = new_event(&h2d_idle_);
  if (err == cudaSuccess) err = cudaEventRecord(h2d_idle_, h2d);
  if (err == cudaSuccess) err = cudaStreamWaitEvent(d2h, h2d_idle_, 0);
  return err;
}

}  // namespace fusedrl
