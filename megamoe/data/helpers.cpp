// Index builders for the GPT and blended datasets (pybind11). megamoe/data/helpers.py holds the
// numpy versions, which give identical arrays; tests/data/test_helpers.py compares the two.
// Built by setup.py as the optional extension megamoe.data._helpers_cpp.

#include <cstdint>
#include <stdexcept>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace {

// Sample i starts seq_length tokens after sample i-1 (samples hold seq_length + 1 tokens, so
// consecutive samples share one token) in the concatenation of the documents listed by
// document_index. Row i is (position in document_index, token offset in that document); a start
// never rests at the end of a document, it moves to the next non-empty one. Row 0 is (0, 0).
template <typename T>
py::array_t<T> sample_index(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes_,
                            const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& doc_index_,
                            int64_t seq_length, int64_t num_samples) {
  auto sizes = sizes_.unchecked<1>();
  auto doc_index = doc_index_.unchecked<1>();
  const int64_t num_docs = doc_index.shape(0);
  py::array_t<T> out({num_samples + 1, static_cast<int64_t>(2)});
  auto rows = out.template mutable_unchecked<2>();
  int64_t d = 0, offset = 0;
  rows(0, 0) = 0;
  rows(0, 1) = 0;
  for (int64_t i = 1; i <= num_samples; ++i) {
    int64_t need = seq_length;
    while (true) {
      if (d >= num_docs) throw std::runtime_error("sample index: ran past the last document");
      const int64_t left = static_cast<int64_t>(sizes(doc_index(d))) - offset;
      if (need < left) {
        offset += need;
        break;
      }
      need -= left;
      ++d;
      offset = 0;
    }
    rows(i, 0) = static_cast<T>(d);
    rows(i, 1) = static_cast<T>(offset);
  }
  return out;
}

py::array build_sample_index(const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& sizes,
                             const py::array_t<int32_t, py::array::c_style | py::array::forcecast>& doc_index,
                             int64_t seq_length, int64_t num_samples, bool use_int64) {
  if (seq_length < 1) throw std::invalid_argument("seq_length must be positive");
  if (use_int64) return sample_index<int64_t>(sizes, doc_index, seq_length, num_samples);
  return sample_index<int32_t>(sizes, doc_index, seq_length, num_samples);
}

// Megatron's greedy blending: sample s goes to the dataset whose share lags its weight most,
// weights[i] * max(s, 1) - drawn[i] (the first such dataset on ties).
py::tuple build_blending_indices(const py::array_t<double, py::array::c_style | py::array::forcecast>& weights_,
                                 int64_t size) {
  auto weights = weights_.unchecked<1>();
  const int64_t n = weights.shape(0);
  if (n < 1 || n > 32767) throw std::invalid_argument("between 1 and 32767 datasets");
  py::array_t<int16_t> dataset_index(size);
  py::array_t<int64_t> dataset_sample_index(size);
  auto which = dataset_index.mutable_unchecked<1>();
  auto nth = dataset_sample_index.mutable_unchecked<1>();
  std::vector<int64_t> drawn(n, 0);
  for (int64_t s = 0; s < size; ++s) {
    const double x = s > 1 ? static_cast<double>(s) : 1.0;
    int64_t best = 0;
    double best_error = weights(0) * x - static_cast<double>(drawn[0]);
    for (int64_t i = 1; i < n; ++i) {
      const double error = weights(i) * x - static_cast<double>(drawn[i]);
      if (error > best_error) {
        best_error = error;
        best = i;
      }
    }
    which(s) = static_cast<int16_t>(best);
    nth(s) = drawn[best]++;
  }
  return py::make_tuple(dataset_index, dataset_sample_index);
}

}  // namespace

PYBIND11_MODULE(_helpers_cpp, m) {
  m.doc() = "C++ index builders for megamoe.data (see helpers.py for the numpy equivalents)";
  m.def("build_sample_index", &build_sample_index, py::arg("sizes"), py::arg("doc_index"),
        py::arg("seq_length"), py::arg("num_samples"), py::arg("use_int64"));
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"));
}
