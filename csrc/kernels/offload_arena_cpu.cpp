// offload_arena_cpu.cpp: OffloadBook, the host-arena arithmetic and the device-slot state machine of the activation
// offload (see offload_arena.h). Plain C++, no CUDA: the CPU build and the tests exercise it as is.
#include <stdexcept>
#include <string>

#include "offload_arena.h"

namespace fusedrl {
namespace {

const char* state_name(EntryState s) {
  switch (s) {
    case EntryState::kFree: return "released";
    case EntryState::kToHost: return "on host";
    case EntryState::kToDevice: return "prefetching";
    case EntryState::kOnDevice: return "fetched";
  }
  return "?";
}

}  // namespace

void OffloadBook::set_capacity(int64_t bytes) {
  if (bytes < 0) throw std::invalid_argument("offload arena: capacity must be >= 0 bytes, got " + std::to_string(bytes));
  if (live_ != 0) {
    throw std::invalid_argument("offload arena: cannot resize while " + std::to_string(live_) +
                                " offloaded tensors are live; call reset() first");
  }
  capacity_ = bytes;
}

int64_t OffloadBook::begin_offload(int64_t bytes) {
  if (bytes <= 0) throw std::invalid_argument("offload arena: an entry must have > 0 bytes, got " + std::to_string(bytes));
  const int64_t offset = top_;
  if (offset + bytes > capacity_) return -1;  // the caller keeps the tensor on the device
  top_ = offload_align_up(offset + bytes);
  OffloadEntry e;
  e.offset = offset;
  e.bytes = bytes;
  e.state = EntryState::kToHost;
  entries_.push_back(e);
  ++live_;
  return handle_of(static_cast<int64_t>(entries_.size()) - 1);
}

int64_t OffloadBook::index_of(int64_t handle) const {
  if (handle < 0) throw std::invalid_argument("offload arena: handle must be >= 0, got " + std::to_string(handle));
  const auto generation = static_cast<uint32_t>(static_cast<uint64_t>(handle) >> 32);
  const int64_t index = handle & 0xffffffffLL;
  if (generation != generation_) {
    throw std::invalid_argument("offload arena: handle " + std::to_string(handle) + " belongs to pass " +
                                std::to_string(generation) + " but the arena is at pass " +
                                std::to_string(generation_) + " (it was reset: the tensor is gone)");
  }
  if (index >= static_cast<int64_t>(entries_.size())) {
    throw std::invalid_argument("offload arena: handle " + std::to_string(handle) + " names entry " +
                                std::to_string(index) + " but only " + std::to_string(entries_.size()) + " exist");
  }
  if (entries_[index].state == EntryState::kFree) {
    throw std::invalid_argument("offload arena: handle " + std::to_string(handle) + " was already released");
  }
  return index;
}

const OffloadEntry& OffloadBook::entry(int64_t handle) const { return entries_[index_of(handle)]; }

SlotPlan OffloadBook::begin_prefetch(int64_t handle) {
  const int64_t index = index_of(handle);
  OffloadEntry& e = entries_[index];
  if (e.state != EntryState::kToHost) return SlotPlan{e.slot, false};  // already on its way or there
  int chosen = -1;
  for (int s = 0; s < kOffloadDeviceSlots && chosen < 0; ++s) {
    if (slot_owner_[s] < 0) chosen = s;
  }
  // Both slots taken: take back one that holds a prefetched entry nobody fetched yet (its host copy stays valid).
  for (int s = 0; s < kOffloadDeviceSlots && chosen < 0; ++s) {
    OffloadEntry& holder = entries_[slot_owner_[s]];
    if (holder.state == EntryState::kToDevice) {
      holder.state = EntryState::kToHost;
      holder.slot = -1;
      chosen = s;
    }
  }
  if (chosen < 0) return SlotPlan{-1, false};
  slot_owner_[chosen] = index;
  e.state = EntryState::kToDevice;
  e.slot = chosen;
  return SlotPlan{chosen, true};
}

SlotPlan OffloadBook::fetch(int64_t handle) {
  const int64_t index = index_of(handle);
  OffloadEntry& e = entries_[index];
  if (e.state == EntryState::kOnDevice) {
    throw std::invalid_argument("offload arena: handle " + std::to_string(handle) + " is " +
                                state_name(e.state) + "; release it before fetching it again");
  }
  SlotPlan plan{e.slot, false};
  if (e.state == EntryState::kToHost) {
    plan = begin_prefetch(handle);
    // Both slots hold fetched entries: the caller copies into a buffer of its own (plan.slot == -1).
    if (plan.slot < 0) plan.needs_copy = true;
  }
  e.state = EntryState::kOnDevice;
  return plan;
}

int OffloadBook::release(int64_t handle) {
  const int64_t index = index_of(handle);
  OffloadEntry& e = entries_[index];
  const int slot = e.slot;
  if (slot >= 0) slot_owner_[slot] = -1;
  e.state = EntryState::kFree;
  e.slot = -1;
  if (--live_ == 0) reset();  // every entry of the pass is back: the arena starts over
  return slot;
}

void OffloadBook::reset() {
  entries_.clear();
  slot_owner_.fill(-1);
  top_ = 0;
  live_ = 0;
  ++generation_;
  if (generation_ == 0) generation_ = 1;  // handles stay > 0 after a wrap
}

int64_t OffloadBook::slot_owner(int slot) const {
  if (slot < 0 || slot >= kOffloadDeviceSlots) {
    throw std::invalid_argument("offload arena: slot must be in [0, " + std::to_string(kOffloadDeviceSlots) +
                                "), got " + std::to_string(slot));
  }
  return slot_owner_[slot] < 0 ? -1 : handle_of(slot_owner_[slot]);
}

}  // namespace fusedrl
