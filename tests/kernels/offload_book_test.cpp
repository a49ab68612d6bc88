// offload_book_test.cpp: the activation offload's slot book (csrc/kernels/offload_arena_cpu.cpp), torch-free.
// Built and run by tests/kernels/test_offload_book.py with the system C++ compiler; prints "ok" or the failed check.
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "offload_arena.h"

using fusedrl::EntryState;
using fusedrl::OffloadBook;

#define CHECK(cond)                                                      \
  do {                                                                   \
    if (!(cond)) {                                                       \
      std::printf("FAILED line %d: %s\n", __LINE__, #cond);              \
      std::exit(1);                                                      \
    }                                                                    \
  } while (0)

template <typename F>
bool throws_with(F f, const std::string& needle) {
  try {
    f();
  } catch (const std::invalid_argument& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

int main() {
  OffloadBook book;
  book.set_capacity(2000);
  // Exact sizes, aligned offsets; a too-large entry is refused (-1), not rounded.
  const int64_t a = book.begin_offload(300), b = book.begin_offload(257), c = book.begin_offload(100);
  CHECK(a >= 0 && b >= 0 && c >= 0);
  CHECK(book.entry(a).offset == 0 && book.entry(b).offset == 512 && book.entry(b).bytes == 257);
  CHECK(book.entry(c).offset == 1024 && book.used() == 1280);
  CHECK(book.begin_offload(721) == -1);  // 1280 + 721 > 2000: full
  CHECK(book.live_entries() == 3);
  const int64_t fits_exactly = book.begin_offload(720);  // 1280 + 720 == 2000: no rounding beyond the alignment
  CHECK(fits_exactly >= 0);
  CHECK(book.release(fits_exactly) == -1);  // never fetched: no slot to free
  CHECK(book.live_entries() == 3);
  CHECK(throws_with([&] { book.set_capacity(5); }, "live"));

  // Backward order c, b, a: prefetch c and b, fetch c (slot 0), the prefetched b sits in slot 1.
  const auto pc = book.begin_prefetch(c);
  CHECK(pc.slot == 0 && pc.needs_copy && book.entry(c).state == EntryState::kToDevice);
  CHECK(book.begin_prefetch(c).needs_copy == false);  // already on its way
  const auto pb = book.begin_prefetch(b);
  CHECK(pb.slot == 1 && pb.needs_copy);
  // a wants a slot while both hold prefetched, unfetched entries: the first is taken back.
  const auto pa = book.begin_prefetch(a);
  CHECK(pa.slot == 0 && pa.needs_copy && book.entry(c).state == EntryState::kToHost && book.entry(c).slot == -1);
  CHECK(book.slot_owner(0) == a && book.slot_owner(1) == b);
  // fetch b (already prefetched: no copy), fetch a (prefetched), then c finds both slots fetched: own buffer.
  const auto fb = book.fetch(b);
  CHECK(fb.slot == 1 && !fb.needs_copy && book.entry(b).state == EntryState::kOnDevice);
  const auto fa = book.fetch(a);
  CHECK(fa.slot == 0 && !fa.needs_copy);
  const auto fc = book.fetch(c);
  CHECK(fc.slot == -1 && fc.needs_copy);
  CHECK(throws_with([&] { book.fetch(c); }, "fetched"));
  CHECK(book.release(b) == 1 && book.slot_owner(1) == -1);
  CHECK(throws_with([&] { book.release(b); }, "already released"));
  CHECK(book.release(c) == -1);
  const uint32_t generation = book.generation();
  CHECK(book.release(a) == 0);  // the last one: the arena starts over
  CHECK(book.live_entries() == 0 && book.used() == 0 && book.generation() == generation + 1);
  CHECK(throws_with([&] { book.entry(a); }, "belongs to pass"));

  // reset() with live entries (an interrupted backward): everything forgotten, old handles refused.
  const int64_t d = book.begin_offload(10);
  book.fetch(d);
  book.reset();
  CHECK(book.live_entries() == 0 && book.slot_owner(0) == -1 && book.used() == 0);
  CHECK(throws_with([&] { book.release(d); }, "belongs to pass"));
  CHECK(throws_with([&] { book.begin_offload(0); }, "> 0 bytes"));
  CHECK(throws_with([&] { book.slot_owner(2); }, "slot must be in"));
  CHECK(throws_with([&] { book.entry(-4); }, "handle must be >= 0"));
  CHECK(fusedrl::offload_align_up(1) == 256 && fusedrl::offload_align_up(256) == 256);
  std::printf("ok\n");
  return 0;
}
