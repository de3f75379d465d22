// Python bindings for page keys (kvdirect.keys). Token input is zero-copy via
// the buffer protocol; lists are converted in C++ (no Python loop). Errors
// are raised as kvdirect.errors.ConfigError.
#include <Python.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstring>
#include <string>
#include <string_view>
#include <vector>

#include "keys/page_keys.h"
#include "keys/sha256.h"
#include "registry.h"

namespace py = pybind11;
using kvd::keys::kDigestBytes;
using kvd::keys::kHexChars;
using kvd::keys::TokenType;

namespace {

// Hash this many tokens or more with the GIL released.
constexpr size_t kReleaseGilTokens = 16384;

[[noreturn]] void config_error(const std::string& msg) {
  py::object cls = py::module_::import("kvdirect.errors").attr("ConfigError");
  PyErr_SetString(cls.ptr(), msg.c_str());
  throw py::error_already_set();
}

// A contiguous, read-only view of a token sequence; owns what it must.
class TokenView {
 public:
  explicit TokenView(py::handle obj) { load(obj, true); }
  TokenView(const TokenView&) = delete;
  TokenView& operator=(const TokenView&) = delete;

  const void* data() const { return data_; }
  size_t size() const { return n_; }
  TokenType type() const { return type_; }
  // The original value of token i, for error messages.
  long long value_at(size_t i) const {
    switch (type_) {
      case TokenType::kInt32: return static_cast<const int32_t*>(data_)[i];
      case TokenType::kUInt32: return static_cast<const uint32_t*>(data_)[i];
      case TokenType::kInt64: return static_cast<const int64_t*>(data_)[i];
      case TokenType::kUInt64: return static_cast<long long>(static_cast<const uint64_t*>(data_)[i]);
    }
    return 0;
  }
  bool unsigned64() const { return type_ == TokenType::kUInt64; }

 private:
  void load(py::handle obj, bool allow_array_protocol) {
    if (PyList_Check(obj.ptr()) || PyTuple_Check(obj.ptr())) return load_sequence(obj);
    if (PyObject_CheckBuffer(obj.ptr())) {
      if (PyObject_GetBuffer(obj.ptr(), &buf_.v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        buf_.held = true;
        return load_view();
      }
      PyErr_Clear();  // e.g. a strided numpy view: copy it contiguous below
    }
    if (allow_array_protocol && PyObject_HasAttrString(obj.ptr(), "__array__")) {
      // CPU torch tensors and other array-likes: numpy makes a zero-copy view
      // when it can.
      py::object arr;
      try {
        arr = py::module_::import("numpy").attr("ascontiguousarray")(obj);
      } catch (py::error_already_set& e) {
        config_error(std::string("tokens could not be read as a CPU array: ") + e.what());
      }
      keep_ = arr;
      return load(arr, false);
    }
    config_error(std::string("tokens must be a 1-D int32/int64 buffer (array('i'/'q'), numpy, "
                             "CPU torch tensor) or a list of ints, got ") +
                 Py_TYPE(obj.ptr())->tp_name);
  }

  void load_view() {
    const Py_buffer& view_ = buf_.v;
    if (view_.ndim != 1) config_error("tokens must be one-dimensional, got ndim=" + std::to_string(view_.ndim));
    const char* f = view_.format ? view_.format : "B";
    if (*f == '@' || *f == '=' || *f == '<') ++f;
    if (*f == '>' || *f == '!') config_error("tokens must be little-endian (native) integers");
    const char c = *f;
    const bool one_char = f[0] != '\0' && f[1] == '\0';
    const bool is_signed = c == 'i' || c == 'l' || c == 'q' || c == 'n';
    const bool is_unsigned = c == 'I' || c == 'L' || c == 'Q' || c == 'N';
    if (!one_char || !(is_signed || is_unsigned) || (view_.itemsize != 4 && view_.itemsize != 8))
      config_error(std::string("tokens must be int32, int64, uint32 or uint64, got buffer format '") +
                   (view_.format ? view_.format : "B") + "' with itemsize " +
                   std::to_string(view_.itemsize));
    data_ = view_.buf;
    n_ = static_cast<size_t>(view_.len / view_.itemsize);
    if (view_.itemsize == 4) type_ = is_signed ? TokenType::kInt32 : TokenType::kUInt32;
    else type_ = is_signed ? TokenType::kInt64 : TokenType::kUInt64;
  }

  void load_sequence(py::handle obj) {
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj.ptr());
    PyObject** items = PySequence_Fast_ITEMS(obj.ptr());
    owned_.resize(static_cast<size_t>(n));
    for (Py_ssize_t i = 0; i < n; ++i) {
      int overflow = 0;
      const long long v = PyLong_Check(items[i]) ? PyLong_AsLongLongAndOverflow(items[i], &overflow) : -1;
      if (!PyLong_Check(items[i])) {
        PyErr_Clear();
        config_error("tokens[" + std::to_string(i) + "] is a " + Py_TYPE(items[i])->tp_name +
                     ", expected int");
      }
      if (overflow != 0) config_error("tokens[" + std::to_string(i) + "] does not fit in int64");
      owned_[static_cast<size_t>(i)] = v;
    }
    data_ = owned_.data();
    n_ = owned_.size();
    type_ = TokenType::kInt64;
  }

  // Member (not done in ~TokenView) so the buffer is released even when the
  // constructor throws.
  struct Held {
    Py_buffer v{};
    bool held = false;
    ~Held() {
      if (held) PyBuffer_Release(&v);
    }
  } buf_;
  py::object keep_;
  std::vector<int64_t> owned_;
  const void* data_ = nullptr;
  size_t n_ = 0;
  TokenType type_ = TokenType::kInt64;
};

size_t parse_page_size(py::handle h) {
  if (!PyLong_Check(h.ptr()) || PyBool_Check(h.ptr()))
    config_error(std::string("page_size must be an int, got ") + Py_TYPE(h.ptr())->tp_name);
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(h.ptr(), &overflow);
  if (overflow != 0 || v < 1) config_error("page_size must be a positive int, got " + std::string(py::str(h)));
  return static_cast<size_t>(v);
}

int hexval(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// Parses a prior digest: None, a 64-char hex str or 32 bytes. An empty str or
// bytes means "no prior" (SGLang treats a falsy prior_hash that way). Returns
// 0 for None, 1 for a digest written to out, 2 for empty.
int parse_digest(py::handle h, const char* what, uint8_t out[kDigestBytes]) {
  if (h.is_none()) return 0;
  if (PyUnicode_Check(h.ptr())) {
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(h.ptr(), &len);
    if (!s) throw py::error_already_set();
    if (len == 0) return 2;
    if (len != static_cast<Py_ssize_t>(kHexChars))
      config_error(std::string(what) + " must be 64 hex chars or 32 bytes, got a str of length " +
                   std::to_string(len));
    for (size_t i = 0; i < kDigestBytes; ++i) {
      const int hi = hexval(s[2 * i]), lo = hexval(s[2 * i + 1]);
      if (hi < 0 || lo < 0) config_error(std::string(what) + " is not a hex string: " + s);
      out[i] = static_cast<uint8_t>(hi * 16 + lo);
    }
    return 1;
  }
  if (PyObject_CheckBuffer(h.ptr())) {
    Py_buffer v;
    if (PyObject_GetBuffer(h.ptr(), &v, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    const Py_ssize_t len = v.len;
    if (len == static_cast<Py_ssize_t>(kDigestBytes)) std::memcpy(out, v.buf, kDigestBytes);
    PyBuffer_Release(&v);
    if (len == 0) return 2;
    if (len != static_cast<Py_ssize_t>(kDigestBytes))
      config_error(std::string(what) + " must be 32 bytes, got " + std::to_string(len));
    return 1;
  }
  config_error(std::string(what) + " must be None, a 64-char hex str or 32 bytes, got " +
               Py_TYPE(h.ptr())->tp_name);
}

// Optional str argument -> string_view (valid while the object lives).
bool opt_str(py::handle h, const char* what, std::string_view* out) {
  if (h.is_none()) return false;
  if (!PyUnicode_Check(h.ptr()))
    config_error(std::string(what) + " must be a str or None, got " + Py_TYPE(h.ptr())->tp_name);
  Py_ssize_t len = 0;
  const char* s = PyUnicode_AsUTF8AndSize(h.ptr(), &len);
  if (!s) throw py::error_already_set();
  *out = std::string_view(s, static_cast<size_t>(len));
  return true;
}

// Runs the chain hash; raises ConfigError on a bad token.
void digests_into(const TokenView& tv, size_t page_size, const uint8_t* prior, bool include_partial,
                  uint8_t* out) {
  size_t bad = 0;
  kvd::Status st;
  if (tv.size() >= kReleaseGilTokens) {
    py::gil_scoped_release release;
    st = kvd::keys::page_digests(tv.data(), tv.size(), tv.type(), page_size, prior, out,
                                 include_partial, &bad);
  } else {
    st = kvd::keys::page_digests(tv.data(), tv.size(), tv.type(), page_size, prior, out,
                                 include_partial, &bad);
  }
  if (st != kvd::Status::kOk) {
    const std::string v = tv.unsigned64()
        ? std::to_string(static_cast<const uint64_t*>(tv.data())[bad])
        : std::to_string(tv.value_at(bad));
    config_error("token id " + v + " at position " + std::to_string(bad) +
                 " is out of range: token ids must be non-negative (and fit in int64), "
                 "as SGLang requires");
  }
}

// list[str] of prefix + hex(digest) for n digests, built without Python-level work.
py::list hex_list(const uint8_t* digests, size_t n, std::string_view prefix) {
  PyObject* list = PyList_New(static_cast<Py_ssize_t>(n));
  if (!list) throw py::error_already_set();
  py::list result = py::reinterpret_steal<py::list>(list);
  const Py_ssize_t len = static_cast<Py_ssize_t>(prefix.size() + kHexChars);
  for (size_t i = 0; i < n; ++i) {
    PyObject* s = PyUnicode_New(len, 127);
    if (!s) throw py::error_already_set();
    char* dst = reinterpret_cast<char*>(PyUnicode_1BYTE_DATA(s));
    if (!prefix.empty()) std::memcpy(dst, prefix.data(), prefix.size());  // data() may be null
    kvd::keys::to_hex(digests + i * kDigestBytes, 1, dst + prefix.size());
    PyList_SET_ITEM(list, static_cast<Py_ssize_t>(i), s);
  }
  return result;
}

// A read-only view of n binary digests (uint8 buffer with a multiple of 32 bytes).
struct DigestView {
  Py_buffer v{};
  explicit DigestView(py::handle h) {
    if (!PyObject_CheckBuffer(h.ptr()) ||
        PyObject_GetBuffer(h.ptr(), &v, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) {
      PyErr_Clear();
      config_error(std::string("digests must be a contiguous uint8 array of shape [n, 32], got ") +
                   Py_TYPE(h.ptr())->tp_name);
    }
    const char* f = v.format ? v.format : "B";
    if (v.itemsize != 1 || !(std::strcmp(f, "B") == 0 || std::strcmp(f, "b") == 0 ||
                             std::strcmp(f, "c") == 0)) {
      PyBuffer_Release(&v);
      config_error(std::string("digests must be uint8, got buffer format '") + f + "'");
    }
    if (v.len % static_cast<Py_ssize_t>(kDigestBytes) != 0) {
      const auto len = v.len;
      PyBuffer_Release(&v);
      config_error("digests must hold a multiple of 32 bytes, got " + std::to_string(len));
    }
  }
  ~DigestView() { PyBuffer_Release(&v); }
  const uint8_t* data() const { return static_cast<const uint8_t*>(v.buf); }
  size_t count() const { return static_cast<size_t>(v.len) / kDigestBytes; }
};

constexpr size_t kMaxKeyBytes = 255;  // MemCache's key limit is 256 including the terminator

std::string_view checked_prefix(py::handle h) {
  std::string_view p;
  if (!opt_str(h, "prefix", &p)) config_error("prefix must be a str");
  for (char c : p)
    if (static_cast<unsigned char>(c) > 127 || c < 32) config_error("key prefix must be printable ASCII");
  if (p.size() + kHexChars > kMaxKeyBytes)
    config_error("key prefix is too long: keys must stay under 256 bytes");
  return p;
}

}  // namespace

KVD_BINDINGS(20, keys) {
  m.def(
      "keys_page_digests",
      [](py::handle tokens, py::handle page_size, py::handle prior, py::handle namespace_seed,
         bool include_partial) {
        const size_t ps = parse_page_size(page_size);
        uint8_t prior_buf[kDigestBytes], seed_buf[kDigestBytes];
        const int has_prior = parse_digest(prior, "prior", prior_buf);
        const int has_seed = parse_digest(namespace_seed, "namespace_seed", seed_buf);
        const uint8_t* start = has_prior == 1 ? prior_buf
                               : (has_prior == 0 && has_seed == 1) ? seed_buf
                                                                    : nullptr;
        TokenView tv(tokens);
        const size_t n = kvd::keys::num_pages(tv.size(), ps, include_partial);
        py::array_t<uint8_t> out({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(kDigestBytes)});
        digests_into(tv, ps, start, include_partial, out.mutable_data());
        return out;
      },
      py::arg("tokens"), py::arg("page_size"), py::arg("prior") = py::none(),
      py::arg("namespace_seed") = py::none(), py::arg("include_partial") = false,
      "page_digests(tokens, page_size, prior=None, namespace_seed=None, include_partial=False) -> numpy.ndarray\n"
      "\n"
      "Binary page hashes, uint8 [n_pages, 32]; a trailing partial page is ignored\n"
      "unless include_partial. prior: 32 bytes (or 64-char hex) of the page before\n"
      "tokens[0], to continue a chain; when None, namespace_seed (from\n"
      "namespace_seed()) starts the chain. Same digests as page_hashes().\n"
      "tokens: 1-D int32/int64/uint32/uint64 buffer (array('i'/'q'/'l'), numpy, CPU\n"
      "torch tensor) read without copying, or a list of ints. Negative ids raise\n"
      "ConfigError (as in SGLang); ids above 2**32-1 (64-bit input) hash their page\n"
      "in SGLang's wide encoding.");

  m.def(
      "keys_page_hashes",
      [](py::handle tokens, py::handle page_size, py::handle prior_hash, py::handle extra_key,
         py::handle cache_salt, bool include_partial) {
        const size_t ps = parse_page_size(page_size);
        uint8_t prior_buf[kDigestBytes];
        const int has_prior = parse_digest(prior_hash, "prior_hash", prior_buf);
        const uint8_t* start = has_prior == 1 ? prior_buf : nullptr;
        std::string_view ek, cs;
        const bool has_ek = opt_str(extra_key, "extra_key", &ek);
        // SGLang's RadixKey stores `cache_salt or None`: an empty salt is no salt.
        const bool has_cs = opt_str(cache_salt, "cache_salt", &cs) && !cs.empty();
        // SGLang seeds only a chain that has no prior at all (an empty prior
        // string is "given" there, and then ignored).
        if (has_prior == 0 &&
            kvd::keys::namespace_seed(has_ek ? &ek : nullptr, has_cs ? &cs : nullptr, prior_buf))
          start = prior_buf;
        TokenView tv(tokens);
        const size_t n = kvd::keys::num_pages(tv.size(), ps, include_partial);
        std::vector<uint8_t> digests(n * kDigestBytes);
        digests_into(tv, ps, start, include_partial, digests.data());
        return hex_list(digests.data(), n, {});
      },
      py::arg("tokens"), py::arg("page_size"), py::arg("prior_hash") = py::none(),
      py::arg("extra_key") = py::none(), py::arg("cache_salt") = py::none(),
      py::arg("include_partial") = false,
      "page_hashes(tokens, page_size, prior_hash=None, extra_key=None, cache_salt=None, include_partial=False) -> list[str]\n"
      "\n"
      "One lower-case hex SHA-256 per full page, bit-identical to SGLang 0.5.23's\n"
      "get_storage_hash_str(key, prior_hash, page_size) for a key carrying\n"
      "extra_key / cache_salt. A trailing partial page is ignored, as the cache\n"
      "stores full pages only; include_partial=True hashes it too, as SGLang does\n"
      "(its hash names no pool object). prior_hash: 64-char hex\n"
      "or 32 bytes; when None the chain starts from the namespace seed. An empty\n"
      "prior_hash means no prior and, as in SGLang, no namespace seed.");

  m.def(
      "keys_namespace_seed",
      [](py::handle extra_key, py::handle cache_salt) -> py::object {
        std::string_view ek, cs;
        const bool has_ek = opt_str(extra_key, "extra_key", &ek);
        // SGLang's RadixKey stores `cache_salt or None`: an empty salt is no salt.
        const bool has_cs = opt_str(cache_salt, "cache_salt", &cs) && !cs.empty();
        uint8_t seed[kDigestBytes];
        if (!kvd::keys::namespace_seed(has_ek ? &ek : nullptr, has_cs ? &cs : nullptr, seed))
          return py::none();
        return py::bytes(reinterpret_cast<const char*>(seed), kDigestBytes);
      },
      py::arg("extra_key") = py::none(), py::arg("cache_salt") = py::none(),
      "namespace_seed(extra_key=None, cache_salt=None) -> bytes | None\n"
      "\n"
      "SGLang's storage namespace seed (32 bytes): the prior of a namespaced chain's\n"
      "first page. None when both are None (no namespace). As in SGLang's\n"
      "RadixKey, an empty cache_salt counts as None (an empty extra_key does not).");

  m.def(
      "keys_hex_digests",
      [](py::handle digests) {
        DigestView dv(digests);
        return hex_list(dv.data(), dv.count(), {});
      },
      py::arg("digests"),
      "hex_digests(digests) -> list[str]: lower-case hex of a uint8 [n, 32] array.");

  m.def(
      "keys_pool_keys",
      [](py::handle digests, py::handle prefix) {
        const std::string_view p = checked_prefix(prefix);
        if (!PyList_Check(digests.ptr()) && !PyTuple_Check(digests.ptr())) {
          DigestView dv(digests);
          return hex_list(dv.data(), dv.count(), p);
        }
        // Hex strings (e.g. from page_hashes): validate, then prefix.
        const Py_ssize_t n = PySequence_Fast_GET_SIZE(digests.ptr());
        PyObject** items = PySequence_Fast_ITEMS(digests.ptr());
        PyObject* list = PyList_New(n);
        if (!list) throw py::error_already_set();
        py::list result = py::reinterpret_steal<py::list>(list);
        for (Py_ssize_t i = 0; i < n; ++i) {
          Py_ssize_t len = 0;
          const char* s = PyUnicode_Check(items[i]) ? PyUnicode_AsUTF8AndSize(items[i], &len) : nullptr;
          bool ok = s != nullptr && len == static_cast<Py_ssize_t>(kHexChars);
          for (Py_ssize_t j = 0; ok && j < len; ++j)
            ok = (s[j] >= '0' && s[j] <= '9') || (s[j] >= 'a' && s[j] <= 'f');
          if (!ok) {
            PyErr_Clear();
            config_error("digests[" + std::to_string(i) + "] is not a 64-char lower-case hex page hash");
          }
          PyObject* key = PyUnicode_New(static_cast<Py_ssize_t>(p.size() + kHexChars), 127);
          if (!key) throw py::error_already_set();
          char* dst = reinterpret_cast<char*>(PyUnicode_1BYTE_DATA(key));
          std::memcpy(dst, p.data(), p.size());
          std::memcpy(dst + p.size(), s, kHexChars);
          PyList_SET_ITEM(list, i, key);
        }
        return result;
      },
      py::arg("digests"), py::arg("prefix"),
      "pool_keys(digests, prefix) -> list[str]: prefix + hex for a uint8 [n, 32] array or a list of hex hashes.");

  m.def(
      "keys_sha256",
      [](py::buffer data) {
        py::buffer_info info = data.request();
        if (info.ndim > 1 && info.strides.back() != info.itemsize)
          config_error("data must be contiguous");
        uint8_t out[kDigestBytes];
        kvd::sha256::digest(info.ptr, static_cast<size_t>(info.size * info.itemsize), out);
        return py::bytes(reinterpret_cast<const char*>(out), kDigestBytes);
      },
      py::arg("data"), "SHA-256 of a contiguous buffer with kvdirect's own implementation.");
  m.def("keys_sha256_kernel", [] { return std::string(kvd::sha256::kernel_name()); });
  m.def("keys_cpu_has_shani", [] { return kvd::sha256::cpu_has_shani(); });
  m.def("keys_select_sha256_kernel",
        [](const std::string& name) { return kvd::sha256::select_kernel(name.c_str()); },
        py::arg("name"));
}
