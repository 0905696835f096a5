// CPU kernels for moving KV between a serving engine's paged cache and lmcache's memory
// objects: one memcpy per row (a token's K or V, or a whole page), rows in any order,
// spread over torch's intra-op threads, with non-temporal stores so that writing to
// scattered destinations does not first read them into the cache.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <atomic>
#include <cstring>
#include <algorithm>
#include <tuple>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LMCACHE_STREAM 1
#endif

namespace {

inline void copy_row(char* dst, const char* src, size_t n, bool stream) {
#ifdef LMCACHE_STREAM
  if (stream) {
    size_t head = (64 - (reinterpret_cast<uintptr_t>(dst) & 63)) & 63;
    if (head > n) head = n;
    std::memcpy(dst, src, head);
    size_t i = head;
#if defined(__AVX512F__)
    for (; i + 64 <= n; i += 64)
      _mm512_stream_si512(reinterpret_cast<__m512i*>(dst + i),
                          _mm512_loadu_si512(reinterpret_cast<const void*>(src + i)));
#elif defined(__AVX__)
    for (; i + 32 <= n; i += 32)
      _mm256_stream_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i)));
#else
    for (; i + 16 <= n; i += 16)
      _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                       _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
#endif
    if (i < n) std::memcpy(dst + i, src + i, n - i);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Runs job(j) for j in [0, jobs) on torch's threads, handing out jobs one at a time so
// that a thread slowed by other work (disk readers, hashing) does not hold the rest up.
template <typename F>
void for_each_job(int64_t jobs, const F& job, bool stream) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), jobs));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t j = next.fetch_add(1); j < jobs; j = next.fetch_add(1)) job(j);
#ifdef LMCACHE_STREAM
    if (stream) _mm_sfence();
#endif
  });
}

void check_pairs(const std::vector<torch::Tensor>& paged, const std::vector<torch::Tensor>& dense,
                 const torch::Tensor& index) {
  TORCH_CHECK(paged.size() == dense.size(), "paged and dense lists differ in length");
  TORCH_CHECK(index.dim() == 1 && index.scalar_type() == torch::kInt64 && index.is_contiguous(),
              "index must be a contiguous 1-D int64 tensor");
  for (size_t j = 0; j < paged.size(); ++j) {
    const auto& p = paged[j];
    const auto& d = dense[j];
    TORCH_CHECK(p.device().is_cpu() && d.device().is_cpu(), "tensors must be on the CPU");
    TORCH_CHECK(p.dim() == 2 && d.dim() == 2 && p.is_contiguous() && d.is_contiguous(),
                "rows must be contiguous [rows, row_bytes] tensors");
    TORCH_CHECK(p.size(1) == d.size(1) && p.element_size() == d.element_size(),
                "row sizes differ");
    TORCH_CHECK(d.size(0) == index.numel(), "dense rows must match the index");
  }
}

// dense[j][r] -> paged[j][index[r]] (rows with index < 0 are skipped)
void scatter_rows(std::vector<torch::Tensor> paged, std::vector<torch::Tensor> dense,
                  torch::Tensor index, bool stream) {
  check_pairs(paged, dense, index);
  const int64_t* ix = index.data_ptr<int64_t>();
  const int64_t n = index.numel();
  for_each_job(static_cast<int64_t>(paged.size()), [&](int64_t j) {
    char* dst = static_cast<char*>(paged[j].data_ptr());
    const char* src = static_cast<const char*>(dense[j].data_ptr());
    const int64_t rows = paged[j].size(0);
    const size_t rb = paged[j].size(1) * paged[j].element_size();
    for (int64_t r = 0; r < n; ++r) {
      if (ix[r] < 0) continue;
      TORCH_CHECK(ix[r] < rows, "index out of range");
      copy_row(dst + ix[r] * rb, src + r * rb, rb, stream);
    }
  }, stream);
}

constexpr int64_t kRowBytes = 1024 * 8;  // a sum64 row: 1024 little-endian 64-bit words

// Adds the sum64 terms of ``n`` bytes (a multiple of 8) that sit at byte ``offset`` of a
// payload, read from ``src``: each word counts with the weight of the 8 KiB row of the
// payload it falls in (row j weighs j + 1).
inline void add_sum64(const char* src, int64_t offset, int64_t n, uint64_t& a, uint64_t& b) {
  while (n > 0) {
    const int64_t row = offset / kRowBytes;
    const int64_t take = std::min<int64_t>(n, (row + 1) * kRowBytes - offset);
    const uint64_t* w = reinterpret_cast<const uint64_t*>(src);
    uint64_t r = 0;
    for (int64_t k = 0; k < take / 8; ++k) r += w[k];
    a += r;
    b += static_cast<uint64_t>(row + 1) * r;
    src += take;
    offset += take;
    n -= take;
  }
}

// paged[j][index[r]] -> dense[j][r]. With ``payload_base`` >= 0 (the address of the
// payload the dense rows are part of; rows a multiple of 8 bytes), also returns the
// payload's sum64 terms (A, B) computed from the rows as they are copied, so that the
// payload is not read a second time to checksum it; else (0, 0).
std::tuple<uint64_t, uint64_t> gather_rows(std::vector<torch::Tensor> paged,
                                           std::vector<torch::Tensor> dense,
                                           torch::Tensor index, bool stream,
                                           int64_t payload_base) {
  check_pairs(paged, dense, index);
  const int64_t* ix = index.data_ptr<int64_t>();
  const int64_t n = index.numel();
  const bool sum = payload_base >= 0;
  std::atomic<uint64_t> total_a{0}, total_b{0};
  for_each_job(static_cast<int64_t>(paged.size()), [&](int64_t j) {
    const char* src = static_cast<const char*>(paged[j].data_ptr());
    char* dst = static_cast<char*>(dense[j].data_ptr());
    const int64_t rows = paged[j].size(0);
    const size_t rb = paged[j].size(1) * paged[j].element_size();
    TORCH_CHECK(!sum || rb % 8 == 0, "rows must be a multiple of 8 bytes to checksum them");
    uint64_t a = 0, b = 0;
    for (int64_t r = 0; r < n; ++r) {
      TORCH_CHECK(ix[r] >= 0 && ix[r] < rows, "index out of range");
      const char* row = src + ix[r] * rb;
      char* out = dst + r * rb;
      copy_row(out, row, rb, stream);
      if (sum) {
        const int64_t offset = reinterpret_cast<intptr_t>(out) - payload_base;
        add_sum64(row, offset, static_cast<int64_t>(rb), a, b);
      }
    }
    total_a += a;  // wrapping sums: the order of the jobs does not matter
    total_b += b;
  }, stream);
  return {total_a.load(), total_b.load()};
}

// The "sum64" payload checksum over rows of 1024 little-endian 64-bit words (see
// lmcache/experimental/storage_backend/object_format.py): returns (sum of row sums,
// sum of (first_row + j + 1) * row sum j), both modulo 2**64.
std::tuple<uint64_t, uint64_t> sum64_rows(int64_t address, int64_t nbytes, int64_t first_row) {
  constexpr int64_t kRowWords = 1024;
  TORCH_CHECK(nbytes >= 0 && nbytes % (kRowWords * 8) == 0, "nbytes must be whole rows");
  const uint64_t* w = reinterpret_cast<const uint64_t*>(address);
  const int64_t rows = nbytes / (kRowWords * 8);
  uint64_t a = 0, b = 0;
  for (int64_t j = 0; j < rows; ++j) {
    const uint64_t* p = w + j * kRowWords;
    uint64_t r = 0;
    for (int64_t k = 0; k < kRowWords; ++k) r += p[k];
    a += r;
    b += static_cast<uint64_t>(first_row + j + 1) * r;
  }
  return {a, b};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("scatter_rows", &scatter_rows, py::call_guard<py::gil_scoped_release>(),
        "dense rows -> paged rows at index (index < 0 skipped)");
  m.def("gather_rows", &gather_rows, py::call_guard<py::gil_scoped_release>(),
        "paged rows at index -> dense rows; with payload_base >= 0 also the payload's "
        "sum64 terms (A, B) from the rows copied");
  m.def("sum64_rows", &sum64_rows, py::call_guard<py::gil_scoped_release>(),
        "sum64 checksum terms of whole 8 KiB rows at a CPU address");
}
