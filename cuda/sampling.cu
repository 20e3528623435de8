// Seeded pixel sampling on the GPU. The draw itself is floyd_sampler.hpp, as on the host: one thread
// per repeat runs Floyd's algorithm into its own open-addressing table in device memory. Floyd is
// sequential, but a draw of 10^4 pixels is ~10^4 probes, and the repeats run side by side.
//
//   valid_flag_kernel + cub::DeviceScan   position of every valid pixel among the valid ones (in place)
//   compact_kernel                        the valid pixels' indices, ascending
//   floyd_kernel                          the chosen positions of each repeat, in its table
//   cub::DeviceSegmentedSort              each table sorted (empty slots, -1, first)
//   gather_kernel                         position -> pixel index, (repeats, n), ascending
#include <cub/device/device_scan.cuh>
#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <limits>
#include <string>
#include <vector>

#include "floyd_sampler.hpp"
#include "runtime.cuh"
#include "sampling.hpp"

namespace segtransfer::cuda {
namespace {

__global__ void valid_flag_kernel(const int32_t* __restrict__ code, int64_t num_pixels, int64_t* __restrict__ flag) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < num_pixels; p += int64_t(gridDim.x) * blockDim.x)
    flag[p] = code[p] >= 0 ? 1 : 0;
}

__global__ void compact_kernel(const int32_t* __restrict__ code, int64_t num_pixels, const int64_t* __restrict__ pos,
                               int64_t* __restrict__ valid) {
  for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < num_pixels; p += int64_t(gridDim.x) * blockDim.x)
    if (code[p] >= 0) valid[pos[p]] = p;
}

__global__ void floyd_kernel(uint64_t seed, int64_t repeats, int64_t nv, int64_t n, int bits, int64_t* slots) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k < repeats; k += int64_t(gridDim.x) * blockDim.x)
    floyd::draw(floyd::repeat_state(seed, k), nv, n, slots + (k << bits), bits);
}

__global__ void segment_offsets_kernel(int64_t repeats, int bits, int64_t* offsets) {
  for (int64_t k = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; k <= repeats; k += int64_t(gridDim.x) * blockDim.x)
    offsets[k] = k << bits;
}

// After the sort, the n chosen positions of repeat k are the last n entries of its table.
__global__ void gather_kernel(const int64_t* __restrict__ sorted, int64_t repeats, int bits, int64_t n,
                              const int64_t* __restrict__ valid, int64_t* __restrict__ out) {
  const int64_t total = repeats * n;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t k = e / n, i = e % n;
    out[e] = valid[sorted[(k << bits) + (int64_t(1) << bits) - n + i]];
  }
}

}  // namespace

std::vector<int64_t> sample_pixels(const int32_t* code, int64_t num_pixels, int64_t n, int64_t repeats,
                                   uint64_t seed, const char* arg_name, int device) {
  floyd::check_draw_arguments(n, repeats);
  if (num_pixels < 1) floyd::check_enough_valid(0, n, arg_name);  // throws (n >= 1); code[P - 1] is read below
  const int bits = floyd::table_bits(n);
  if (repeats > (std::numeric_limits<int64_t>::max() >> (bits + 4)))
    throw OutOfMemory("repeats=" + std::to_string(repeats) + " draws of n_pixels=" + std::to_string(n) +
                      " do not fit in device memory; lower repeats");
  DeviceGuard guard(device);
  Stream stream;
  Queue q(stream.get());
  const size_t P = static_cast<size_t>(num_pixels);
  DeviceBuffer<int32_t> d_code(P, "class codes");
  DeviceBuffer<int64_t> d_pos(P, "valid-pixel positions");  // flags, then their exclusive sums in place
  DrainOnExit drain(stream.get());
  q.upload(d_code.get(), code, P, "cudaMemcpyAsync (class codes)");
  valid_flag_kernel<<<flat_grid(num_pixels), kFlatThreads, 0, q.stream()>>>(d_code.get(), num_pixels, d_pos.get());
  q.launched("valid_flag_kernel");
  size_t scan_bytes = 0;
  check(cub::DeviceScan::ExclusiveSum(nullptr, scan_bytes, d_pos.get(), d_pos.get(), num_pixels, q.stream()),
        "cub::DeviceScan::ExclusiveSum (size query)");
  {
    DeviceBuffer<unsigned char> scratch(std::max<size_t>(scan_bytes, 1), "scan workspace");
    DrainOnExit drain_scan(stream.get());
    check(cub::DeviceScan::ExclusiveSum(scratch.get(), scan_bytes, d_pos.get(), d_pos.get(), num_pixels,
                                        q.stream()),
          "cub::DeviceScan::ExclusiveSum");
    q.launched("cub::DeviceScan::ExclusiveSum");
    int64_t last = 0;
    q.download(&last, d_pos.get() + (P - 1), 1, "cudaMemcpyAsync (valid-pixel count)");
    q.sync("the count of valid pixels");
    const int64_t nv = last + (code[P - 1] >= 0 ? 1 : 0);
    floyd::check_enough_valid(nv, n, arg_name);
    DeviceBuffer<int64_t> d_valid(static_cast<size_t>(nv), "valid-pixel indices");
    DrainOnExit drain_valid(stream.get());  // kernels finish before the buffers above are freed
    compact_kernel<<<flat_grid(num_pixels), kFlatThreads, 0, q.stream()>>>(d_code.get(), num_pixels, d_pos.get(),
                                                                         d_valid.get());
    q.launched("compact_kernel");
    std::vector<int64_t> out(static_cast<size_t>(n * repeats));
    if (n == nv) {  // every valid pixel, in every repeat (as on the host)
      q.download(out.data(), d_valid.get(), static_cast<size_t>(n), "cudaMemcpyAsync (sampled pixels)");
      q.sync("the gather of valid pixels");
      for (int64_t k = 1; k < repeats; ++k) std::copy(out.begin(), out.begin() + n, out.begin() + k * n);
      return out;
    }
    const size_t table = size_t(1) << bits, slots_count = table * static_cast<size_t>(repeats);
    DeviceBuffer<int64_t> d_slots(slots_count, "sampler tables"), d_sorted(slots_count, "sorted sampler tables");
    DeviceBuffer<int64_t> d_offsets(static_cast<size_t>(repeats) + 1, "sampler table offsets");
    DeviceBuffer<int64_t> d_out(out.size(), "sampled pixels");
    DrainOnExit drain_tables(stream.get());
    check(cudaMemsetAsync(d_slots.get(), 0xff, slots_count * sizeof(int64_t), q.stream()),
          "cudaMemsetAsync (sampler tables)");  // all bytes 0xff: every slot is -1 (floyd::kEmpty)
    floyd_kernel<<<flat_grid(repeats), kFlatThreads, 0, q.stream()>>>(seed, repeats, nv, n, bits, d_slots.get());
    q.launched("floyd_kernel");
    segment_offsets_kernel<<<flat_grid(repeats + 1), kFlatThreads, 0, q.stream()>>>(repeats, bits, d_offsets.get());
    q.launched("segment_offsets_kernel");
    size_t sort_bytes = 0;
    const auto num_items = static_cast<int64_t>(slots_count);
    check(cub::DeviceSegmentedSort::SortKeys(nullptr, sort_bytes, d_slots.get(), d_sorted.get(), num_items, repeats,
                                             d_offsets.get(), d_offsets.get() + 1, q.stream()),
          "cub::DeviceSegmentedSort::SortKeys (size query)");
    DeviceBuffer<unsigned char> sort_scratch(std::max<size_t>(sort_bytes, 1), "sort workspace");
    DrainOnExit drain_sort(stream.get());
    check(cub::DeviceSegmentedSort::SortKeys(sort_scratch.get(), sort_bytes, d_slots.get(), d_sorted.get(), num_items,
                                             repeats, d_offsets.get(), d_offsets.get() + 1, q.stream()),
          "cub::DeviceSegmentedSort::SortKeys");
    q.launched("cub::DeviceSegmentedSort::SortKeys");
    gather_kernel<<<flat_grid(repeats * n), kFlatThreads, 0, q.stream()>>>(d_sorted.get(), repeats, bits, n,
                                                                     d_valid.get(), d_out.get());
    q.launched("gather_kernel");
    q.download(out.data(), d_out.get(), out.size(), "cudaMemcpyAsync (sampled pixels)");
    q.sync("the sampled pixels");
    return out;
  }
}

}  // namespace segtransfer::cuda
