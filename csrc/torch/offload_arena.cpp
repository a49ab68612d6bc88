// offload_arena.cpp: the OffloadArena custom class and the offload ops' registrations (see offload_arena.h).
// CPU: offload_to_host returns -1 (the tensor stays where it is); CUDA: D2H into the pinned arena on a side stream.
// prefetch/fetch/release take no tensor, so one registration serves every device (the arena knows its device).
#include "offload_arena.h"

#include <stdexcept>

#ifdef FUSEDRL_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#endif

namespace fusedrl {
namespace {

// The book reports misuse as std::invalid_argument; Python sees a ValueError with the book's message.
template <typename F>
auto checked(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

#ifdef FUSEDRL_WITH_CUDA
void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "offload arena: ", what, " failed: ", cudaGetErrorString(err));
}
#endif

}  // namespace

OffloadArena::OffloadArena(int64_t device_index) : device_index_(device_index < 0 ? -1 : device_index) {
#ifdef FUSEDRL_WITH_CUDA
  if (device_index_ >= 0) {
    TORCH_CHECK_VALUE(device_index_ < c10::cuda::device_count(), "OffloadArena: device_index must be < ",
                      static_cast<int>(c10::cuda::device_count()), " (visible CUDA devices), got ", device_index_);
    d2h_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device_index_));
    h2d_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, static_cast<c10::DeviceIndex>(device_index_));
    copies_ = std::make_unique<OffloadCopies>();
  }
#else
  TORCH_CHECK_VALUE(device_index_ < 0, "OffloadArena: this fusedrl build has no CUDA (cuda=none); device_index must "
                    "be -1 (CPU, offload is a no-op), got ", device_index);
#endif
  if (device_index_ < 0) fallback_reason_ = "CPU arena: offload is a no-op on CPU";
}

bool OffloadArena::reserve(int64_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(bytes >= 0, "OffloadArena.reserve: bytes must be >= 0, got ", bytes);
  TORCH_CHECK_VALUE(book_.live_entries() == 0, "OffloadArena.reserve: ", book_.live_entries(),
                    " offloaded tensors are still live; reserve between steps or call reset() first");
  if (device_index_ < 0) return false;
#ifdef FUSEDRL_WITH_CUDA
  if (bytes == book_.capacity() && copies_->host() != nullptr) return true;
  std::string error;
  const bool ok = copies_->allocate_host(bytes, d2h_->stream(), h2d_->stream(), error);
  checked([&] { book_.set_capacity(ok ? bytes : 0); });
  fallback_reason_ = ok ? "" : error;
  return ok;
#else
  return false;
#endif
}

void OffloadArena::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
#ifdef FUSEDRL_WITH_CUDA
  if (device_index_ >= 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    const cudaStream_t compute = c10::cuda::getCurrentCUDAStream(device_index_).stream();
    for (int slot = 0; slot < kOffloadDeviceSlots; ++slot) check_cuda(copies_->release_slot(slot, compute), "reset");
    check_cuda(copies_->fence_host_reuse(d2h_->stream(), h2d_->stream()), "reset");
  }
#endif
  book_.reset();
  meta_.clear();
}

int64_t OffloadArena::capacity() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return book_.capacity();
}

int64_t OffloadArena::used() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return book_.used();
}

int64_t OffloadArena::live_entries() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return book_.live_entries();
}

int64_t OffloadArena::slot_owner(int64_t slot) const {
  std::lock_guard<std::mutex> lock(mutex_);
  return checked([&] { return book_.slot_owner(static_cast<int>(slot)); });
}

int64_t OffloadArena::slot_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = 0;
#ifdef FUSEDRL_WITH_CUDA
  for (const auto& s : slots_) total += s.defined() ? s.numel() : 0;
#endif
  return total;
}

std::string OffloadArena::fallback_reason() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return fallback_reason_;
}

const OffloadArena::Meta& OffloadArena::meta_of(int64_t handle) const {
  checked([&] { return book_.entry(handle).bytes; });  // rejects stale, unknown and released handles
  return meta_.at(handle);
}

void OffloadArena::after_release_locked() {
  if (book_.live_entries() != 0) return;  // the book started over: so do the metadata and the host bytes
  meta_.clear();
#ifdef FUSEDRL_WITH_CUDA
  if (device_index_ >= 0) check_cuda(copies_->fence_host_reuse(d2h_->stream(), h2d_->stream()), "release");
#endif
}

#ifdef FUSEDRL_WITH_CUDA
at::Tensor OffloadArena::slot_buffer(int slot, int64_t bytes) {
  at::Tensor& buffer = slots_[slot];
  if (!buffer.defined() || buffer.numel() < bytes) {
    buffer = at::Tensor();  // give the old one back first (its last reader is ordered on the compute stream)
    buffer = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_index_));
    // Written by the H2D stream; freed memory must not be reused before those copies finish.
    c10::cuda::CUDACachingAllocator::recordStream(buffer.storage().data_ptr(), *h2d_);
    // Fresh memory may still be read by earlier compute-stream work: the first copy into it waits for that.
    check_cuda(copies_->release_slot(slot, c10::cuda::getCurrentCUDAStream(device_index_).stream()), "slot");
  }
  return buffer;
}
#endif

int64_t OffloadArena::offload(const at::Tensor& src) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!src.is_cuda()) return -1;  // CPU tensors stay where they are
#ifdef FUSEDRL_WITH_CUDA
  TORCH_CHECK_VALUE(device_index_ >= 0, "offload_to_host: src is on ", src.device(),
                    " but the arena is a CPU arena (create it with the tensor's device index)");
  TORCH_CHECK_VALUE(src.get_device() == device_index_, "offload_to_host: src is on ", src.device(),
                    " but the arena belongs to cuda:", device_index_);
  TORCH_CHECK_VALUE(src.is_contiguous(), "offload_to_host: src must be contiguous, got strides ", src.strides(),
                    " for shape ", src.sizes());
  const int64_t bytes = static_cast<int64_t>(src.nbytes());
  if (bytes == 0 || copies_->host() == nullptr) return -1;
  const int64_t handle = checked([&] { return book_.begin_offload(bytes); });
  if (handle < 0) return -1;  // arena full: kept on the device
  const c10::cuda::CUDAGuard guard(src.device());
  const OffloadEntry& entry = book_.entry(handle);
  const cudaError_t err = copies_->to_host(handle & 0xffffffffLL, entry.offset, src.data_ptr(), bytes,
                                           c10::cuda::getCurrentCUDAStream(device_index_).stream(), d2h_->stream());
  if (err != cudaSuccess) {
    book_.release(handle);
    check_cuda(err, "device-to-host copy");
  }
  // The caching allocator must not hand src's memory out again before the D2H stream has read it.
  c10::cuda::CUDACachingAllocator::recordStream(src.storage().data_ptr(), *d2h_);
  meta_[handle] = Meta{src.sizes().vec(), src.scalar_type()};
  return handle;
#else
  TORCH_CHECK(false, "offload_to_host: this fusedrl build has no CUDA (cuda=none)");
#endif
}

void OffloadArena::prefetch(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  meta_of(handle);
#ifdef FUSEDRL_WITH_CUDA
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
  const SlotPlan plan = book_.begin_prefetch(handle);
  if (!plan.needs_copy) return;  // already there or on its way, or both slots in use (fetch copies it later)
  const OffloadEntry& entry = book_.entry(handle);
  at::Tensor buffer = slot_buffer(plan.slot, entry.bytes);
  check_cuda(copies_->to_device(handle & 0xffffffffLL, entry.offset, buffer.data_ptr(), entry.bytes, plan.slot,
                                h2d_->stream()),
             "host-to-device prefetch");
#endif
}

at::Tensor OffloadArena::fetch(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  const Meta& meta = meta_of(handle);
#ifdef FUSEDRL_WITH_CUDA
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
  const cudaStream_t compute = c10::cuda::getCurrentCUDAStream(device_index_).stream();
  const SlotPlan plan = book_.fetch(handle);
  const OffloadEntry& entry = book_.entry(handle);
  const int64_t index = handle & 0xffffffffLL;
  at::Tensor bytes;
  if (plan.slot >= 0) {
    bytes = slot_buffer(plan.slot, entry.bytes);
    if (plan.needs_copy) {
      check_cuda(copies_->to_device(index, entry.offset, bytes.data_ptr(), entry.bytes, plan.slot, h2d_->stream()),
                 "host-to-device copy");
    }
    check_cuda(copies_->wait_slot(plan.slot, compute), "waiting for the prefetch");  // only this slot's copy
  } else {
    bytes = at::empty({entry.bytes}, at::TensorOptions().dtype(at::kByte).device(at::kCUDA, device_index_));
    check_cuda(copies_->to_buffer(index, entry.offset, bytes.data_ptr(), entry.bytes, compute), "host-to-device copy");
  }
  return bytes.narrow(0, 0, entry.bytes).view(meta.dtype).view(meta.sizes);
#else
  (void)meta;
  TORCH_CHECK(false, "fetch_to_device: this fusedrl build has no CUDA (cuda=none)");
#endif
}

void OffloadArena::release(int64_t handle) {
  std::lock_guard<std::mutex> lock(mutex_);
  meta_of(handle);
  const int slot = book_.release(handle);
  meta_.erase(handle);
#ifdef FUSEDRL_WITH_CUDA
  if (slot >= 0) {
    const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device_index_));
    check_cuda(copies_->release_slot(slot, c10::cuda::getCurrentCUDAStream(device_index_).stream()), "release");
  }
#else
  (void)slot;
#endif
  after_release_locked();
}

// ---------------------------------------------------------------------------------------------------------------
// registration
// ---------------------------------------------------------------------------------------------------------------
namespace {

using Arena = c10::intrusive_ptr<OffloadArena>;

int64_t offload_to_host_cpu(const Arena& arena, const at::Tensor& src) {
  TORCH_CHECK_VALUE(arena, "offload_to_host: arena must be an OffloadArena, got None");
  return -1;  // nothing to do on CPU: the caller keeps src
}

#ifdef FUSEDRL_WITH_CUDA
int64_t offload_to_host_cuda(const Arena& arena, const at::Tensor& src) {
  TORCH_CHECK_VALUE(arena, "offload_to_host: arena must be an OffloadArena, got None");
  return arena->offload(src);
}
#endif

void prefetch_to_device(const Arena& arena, int64_t handle) {
  TORCH_CHECK_VALUE(arena, "prefetch_to_device: arena must be an OffloadArena, got None");
  arena->prefetch(handle);
}

at::Tensor fetch_to_device(const Arena& arena, int64_t handle) {
  TORCH_CHECK_VALUE(arena, "fetch_to_device: arena must be an OffloadArena, got None");
  return arena->fetch(handle);
}

void release_offloaded(const Arena& arena, int64_t handle) {
  TORCH_CHECK_VALUE(arena, "release_offloaded: arena must be an OffloadArena, got None");
  arena->release(handle);
}

}  // namespace

void register_offload_arena_class(torch::Library& m) {
  m.class_<OffloadArena>("OffloadArena")
      .def(torch::init<int64_t>())
      .def("reserve", &OffloadArena::reserve)
      .def("reset", &OffloadArena::reset)
      .def("capacity", &OffloadArena::capacity)
      .def("used", &OffloadArena::used)
      .def("live_entries", &OffloadArena::live_entries)
      .def("slot_owner", &OffloadArena::slot_owner)
      .def("slot_bytes", &OffloadArena::slot_bytes)
      .def("device_index", &OffloadArena::device_index)
      .def("fallback_reason", &OffloadArena::fallback_reason);
}

TORCH_LIBRARY_IMPL(fusedrl, CPU, m) { m.impl("offload_to_host", &offload_to_host_cpu); }

#ifdef FUSEDRL_WITH_CUDA
TORCH_LIBRARY_IMPL(fusedrl, CUDA, m) { m.impl("offload_to_host", &offload_to_host_cuda); }
#endif

// No tensor argument: one kernel for every device (the arena knows its device).
TORCH_LIBRARY_IMPL(fusedrl, CompositeImplicitAutograd, m) {
  m.impl("prefetch_to_device", &prefetch_to_device);
  m.impl("fetch_to_device", &fetch_to_device);
  m.impl("release_offloaded", &release_offloaded);
}

}  // namespace fusedrl
