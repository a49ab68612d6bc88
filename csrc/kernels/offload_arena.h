// offload_arena: bookkeeping and copies of the activation offload (checkpointed layer inputs sent to pinned host
// memory during the forward pass and brought back, one layer ahead, during the backward pass).
//
// Torch-free. Two parts:
//   OffloadBook (always built, offload_arena_cpu.cpp): the arena arithmetic and the slot state machine.
//     Host arena: one buffer of `capacity` bytes; entries are carved from it by a bump pointer, each aligned to
//     kOffloadAlignment bytes, exactly as large as asked (no power-of-two rounding). The pointer returns to 0 when
//     no entry is live. Entry states:
//         kToHost (D2H queued) -> [kToDevice (H2D into a device slot queued)] -> kOnDevice (compute waited) -> free
//     Two device slots receive prefetched entries; a slot holding a prefetched entry that nobody fetched yet may be
//     taken back (the entry returns to kToHost: its host copy is still valid). A handle is (generation << 32 |
//     index); reset() bumps the generation, so a handle from an abandoned pass is rejected instead of reading
//     another pass's bytes.
//   OffloadCopies (CUDA builds, offload_arena.cu): a pinned host buffer (cudaHostAlloc: no caching-allocator
//     rounding) and the three event-ordered copies: D2H after the compute stream's work on the source, H2D after
//     the entry's D2H and after the compute stream released the slot, and the compute stream waiting only on the
//     H2D event of the slot it needs. Never a host-side synchronisation outside reserve()/the destructor.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#ifdef FUSEDRL_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace fusedrl {

constexpr int64_t kOffloadAlignment = 256;  // bytes; keeps every entry 16-byte (vector-copy) aligned and more
constexpr int kOffloadDeviceSlots = 2;      // one in use by the layer being recomputed, one being prefetched

inline int64_t offload_align_up(int64_t bytes) {
  return (bytes + kOffloadAlignment - 1) / kOffloadAlignment * kOffloadAlignment;
}

enum class EntryState : int { kFree, kToHost, kToDevice, kOnDevice };

struct OffloadEntry {
  int64_t offset = 0;  // into the host arena
  int64_t bytes = 0;
  EntryState state = EntryState::kFree;
  int slot = -1;  // device slot while kToDevice / kOnDevice
};

// What a prefetch or fetch must do; the book has already moved the entry to its new state.
struct SlotPlan {
  int slot = -1;             // device slot that holds (or will hold) the entry
  bool needs_copy = false;   // an H2D copy must be queued into `slot`
};

// Errors are reported by throwing std::invalid_argument (bad handle, wrong state) with a message that names the
// handle and what was expected.
class OffloadBook {
 public:
  void set_capacity(int64_t bytes);      // only while no entry is live
  int64_t capacity() const { return capacity_; }
  int64_t used() const { return top_; }  // bytes carved from the arena in the current pass
  int live_entries() const { return live_; }
  uint32_t generation() const { return generation_; }

  // Carve `bytes` for a new entry in state kToHost. Returns the handle, or -1 when the arena cannot hold it.
  int64_t begin_offload(int64_t bytes);
  const OffloadEntry& entry(int64_t handle) const;  // throws for a stale or unknown handle
  // Plan the H2D of `handle` into a device slot. Returns slot -1 when both slots are in use by fetched entries.
  SlotPlan begin_prefetch(int64_t handle);
  // The entry is about to be used by the compute stream: prefetches if needed, then marks it kOnDevice.
  SlotPlan fetch(int64_t handle);
  // The compute stream is done with the entry; its slot (if any) is free again. Returns that slot or -1.
  int release(int64_t handle);
  // Forget every entry (end of a pass, or an interrupted one): slots free, arena pointer at 0, generation + 1.
  void reset();
  int64_t slot_owner(int slot) const;  // handle held by a device slot, or -1

 private:
  int64_t index_of(int64_t handle) const;
  int64_t handle_of(int64_t index) const { return (static_cast<int64_t>(generation_) << 32) | index; }

  int64_t capacity_ = 0;
  int64_t top_ = 0;
  int live_ = 0;
  uint32_t generation_ = 1;
  std::vector<OffloadEntry> entries_;
  std::array<int64_t, kOffloadDeviceSlots> slot_owner_{-1, -1};  // entry index per slot
};

#ifdef FUSEDRL_WITH_CUDA
// Pinned host buffer + the event-ordered copies. Streams belong to the caller (torch's stream pool); events are
// created here, one per entry index (D2H done) and per device slot (H2D done, slot released by compute).
class OffloadCopies {
 public:
  OffloadCopies() = default;
  OffloadCopies(const OffloadCopies&) = delete;
  OffloadCopies& operator=(const OffloadCopies&) = delete;
  ~OffloadCopies();

  // Replace the pinned buffer by one of exactly `bytes` (after both copy streams drained). On failure the buffer
  // is empty and `error` says why; returns false.
  bool allocate_host(int64_t bytes, cudaStream_t d2h, cudaStream_t h2d, std::string& error);
  char* host() const { return host_; }

  // D2H of `bytes` from device `src` into host + offset, after the compute stream's work so far; records the
  // entry's "on host" event.
  cudaError_t to_host(int64_t entry_index, int64_t offset, const void* src, int64_t bytes, cudaStream_t compute,
                      cudaStream_t d2h);
  // H2D of the entry into `slot_ptr`, after its D2H and after the compute stream released the slot.
  cudaError_t to_device(int64_t entry_index, int64_t offset, void* slot_ptr, int64_t bytes, int slot,
                        cudaStream_t h2d);
  // H2D of the entry into a buffer of the caller's on `stream` (both slots busy), after the entry's D2H.
  cudaError_t to_buffer(int64_t entry_index, int64_t offset, void* dst, int64_t bytes, cudaStream_t stream);
  // The compute stream waits for the H2D into `slot` (and nothing else).
  cudaError_t wait_slot(int slot, cudaStream_t compute);
  // The compute stream is done with `slot`: later H2D copies into it wait for this point.
  cudaError_t release_slot(int slot, cudaStream_t compute);
  // A new pass may overwrite host bytes that an abandoned prefetch could still be reading: D2H waits for H2D.
  cudaError_t fence_host_reuse(cudaStream_t d2h, cudaStream_t h2d);

 private:
  cudaError_t entry_event(int64_t index, cudaEvent_t* out);

  char* host_ = nullptr;
  int64_t host_bytes_ = 0;
  cudaEvent_t compute_ready_ = nullptr;  // re-recorded per D2H: a wait binds to the latest record
  cudaEvent_t h2d_idle_ = nullptr;
  std::vector<cudaEvent_t> on_host_;  // per entry index
  std::array<cudaEvent_t, kOffloadDeviceSlots> slot_filled_{nullptr, nullptr};
  std::array<cudaEvent_t, kOffloadDeviceSlots> slot_released_{nullptr, nullptr};
  std::array<bool, kOffloadDeviceSlots> slot_ever_released_{false, false};
};
#endif  // FUSEDRL_WITH_CUDA

}  // namespace fusedrl
