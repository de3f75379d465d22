// Python bindings of kvd::PrefixIndex as `kvdirect._core.PrefixIndex`.
//
// The index type is written against the CPython API (vectorcall-style
// METH_FASTCALL methods, a struct-sequence MatchResult) rather than pybind11
// classes: a match must cost well under a microsecond through Python, and
// pybind11's dispatcher alone costs a good part of that. pybind11 is used for
// registration and for numpy's C API table.
//
// Inputs: token ids from numpy arrays (read in place), any buffer-protocol
// object of int32/int64 ('i', 'l', 'q'), anything numpy.asarray accepts without
// copying (CPU torch tensors), or lists/tuples (converted). Errors are raised as
// kvdirect.errors.ConfigError with the argument name and the fix.
#include <Python.h>

#include <cstddef>
#include <cstring>
#include <string>
#include <vector>

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include "index/index.h"
#include "registry.h"

namespace py = pybind11;
using py::detail::npy_api;

namespace {

const npy_api* g_np = nullptr;
PyObject* g_int64_descr = nullptr;  // numpy int64 dtype (borrowed forever)
PyObject* g_empty_slots = nullptr;  // shared read-only int64[0]
PyObject* g_asarray = nullptr;      // numpy.asarray
PyTypeObject* g_match_type = nullptr;

PyObject* config_error() {
  static PyObject* cls = nullptr;
  if (!cls) {
    PyObject* mod = PyImport_ImportModule("kvdirect.errors");
    if (mod) {
      cls = PyObject_GetAttrString(mod, "ConfigError");
      Py_DECREF(mod);
    }
    if (!cls) {
      PyErr_Clear();
      cls = PyExc_ValueError;
      Py_INCREF(cls);
    }
  }
  return cls;
}

template <class... A>
std::nullptr_t fail(const char* fmt, A... a) {
  PyErr_Format(config_error(), fmt, a...);
  return nullptr;
}

// Replaces the pending exception by a ConfigError that carries its text.
void reraise_as_config(const char* what) {
  PyObject *t, *v, *tb;
  PyErr_Fetch(&t, &v, &tb);
  PyObject* s = v ? PyObject_Str(v) : nullptr;
  const char* msg = s ? PyUnicode_AsUTF8(s) : "?";
  PyErr_Format(config_error(),
               "%s: cannot be read as int32/int64 token ids (%s); pass a numpy array, "
               "array('q'/'i'), a CPU torch tensor or a list of ints",
               what, msg ? msg : "?");
  Py_XDECREF(s);
  Py_XDECREF(t);
  Py_XDECREF(v);
  Py_XDECREF(tb);
}

// One 1-D integer input held for the duration of a call.
struct IntArg {
  const void* data = nullptr;
  int64_t len = 0;
  int itemsize = 8;
  Py_buffer view{};
  bool has_view = false;
  PyObject* keep = nullptr;
  std::vector<int64_t> owned;  // converted from a list / tuple
  IntArg() = default;
  IntArg(const IntArg&) = delete;
  ~IntArg() {
    if (has_view) PyBuffer_Release(&view);
    Py_XDECREF(keep);
  }
};

bool read_numpy(PyObject* obj, IntArg* out, const char* what) {
  auto* a = py::detail::array_proxy(obj);
  auto* d = py::detail::array_descriptor_proxy(a->descr);
  if (a->nd != 1)
    return fail("%s: expected a 1-D array of token ids/slots, got %d dimensions", what, a->nd),
           false;
  int num = d->type_num;
  if (num >= 0 && num <= npy_api::NPY_VOID_) num = py::detail::normalized_dtype_num[num];
  int size;
  if (d->kind == 'i' && num == npy_api::NPY_INT64_)
    size = 8;
  else if (d->kind == 'i' && num == npy_api::NPY_INT32_)
    size = 4;
  else
    return fail("%s: dtype must be int32 or int64 (got numpy type number %d, kind '%c'); "
                "convert with .astype(numpy.int64)",
                what, d->type_num, d->kind),
           false;
  if (d->byteorder == '>')
    return fail("%s: big-endian arrays are not supported; use .astype('<i8')", what), false;
  const int64_t n = a->dimensions[0];
  if (n > 1 && a->strides[0] != size)
    return fail("%s: array must be contiguous (stride %zd bytes for %d-byte items); "
                "use numpy.ascontiguousarray",
                what, static_cast<Py_ssize_t>(a->strides[0]), size),
           false;
  out->data = a->data;
  out->len = n;
  out->itemsize = size;
  return true;
}

bool read_ints(PyObject* obj, IntArg* out, const char* what, bool allow_convert = true) {
  if (g_np->PyArray_Check_(obj)) return read_numpy(obj, out, what);
  if (PyObject_CheckBuffer(obj)) {
    if (PyObject_GetBuffer(obj, &out->view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) != 0) {
      reraise_as_config(what);
      return false;
    }
    out->has_view = true;
    const char* f = out->view.format ? out->view.format : "B";
    if (*f == '@' || *f == '=' || *f == '<') ++f;
    const bool sig = (*f == 'i' || *f == 'l' || *f == 'q') && f[1] == '\0';
    if (!sig || (out->view.itemsize != 4 && out->view.itemsize != 8))
      return fail("%s: buffer format '%s' is not int32/int64 ('i', 'l' or 'q')", what,
                  out->view.format ? out->view.format : "B"),
             false;
    if (out->view.ndim != 1)
      return fail("%s: expected a 1-D buffer, got %d dimensions", what, out->view.ndim), false;
    out->data = out->view.buf;
    out->itemsize = static_cast<int>(out->view.itemsize);
    out->len = out->view.len / out->view.itemsize;
    return true;
  }
  if (PyList_CheckExact(obj) || PyTuple_CheckExact(obj)) {
    // Lists are what serving engines often hold: convert them in one C loop
    // (several times faster than numpy.asarray's type discovery).
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
    PyObject** items = PySequence_Fast_ITEMS(obj);
    out->owned.resize(n);
    for (Py_ssize_t i = 0; i < n; ++i) {
      PyObject* it = items[i];
      if (!PyLong_Check(it) || PyBool_Check(it))
        return fail("%s: item %zd is %s, expected an int token id", what, i,
                    Py_TYPE(it)->tp_name),
               false;
      int overflow = 0;
      long long v = PyLong_AsLongLongAndOverflow(it, &overflow);
      if (overflow)
        return fail("%s: item %zd does not fit in int64 (int32 or int64 ids only)", what, i),
               false;
      out->owned[i] = v;
    }
    out->data = out->owned.data();
    out->len = n;
    out->itemsize = 8;
    return true;
  }
  if (!allow_convert) return fail("%s: unsupported type %s", what, Py_TYPE(obj)->tp_name), false;
  if (PyUnicode_Check(obj) || PyBytes_Check(obj))
    return fail("%s: expected integer ids, got %s", what, Py_TYPE(obj)->tp_name), false;
  PyObject* arr = PyObject_CallOneArg(g_asarray, obj);
  if (!arr) {
    reraise_as_config(what);
    return false;
  }
  out->keep = arr;
  if (!g_np->PyArray_Check_(arr))
    return fail("%s: numpy.asarray gave %s", what, Py_TYPE(arr)->tp_name), false;
  if (py::detail::array_proxy(arr)->nd == 1 && py::detail::array_proxy(arr)->dimensions[0] == 0) {
    out->len = 0;  // e.g. an empty torch tensor of any dtype
    return true;
  }
  return read_numpy(arr, out, what);
}

bool read_tokens(PyObject* obj, IntArg* holder, kvd::TokenSpan* span) {
  if (!read_ints(obj, holder, "tokens")) return false;
  span->data = holder->data;
  span->len = holder->len;
  span->is_int32 = holder->itemsize == 4;
  return true;
}

// Namespace: None / str. Returns false on a type error.
bool read_ns(PyObject* obj, std::string* s, const std::string** out) {
  *out = nullptr;
  if (obj == nullptr || obj == Py_None) return true;
  if (!PyUnicode_Check(obj))
    return fail("namespace must be None or a str, got %s", Py_TYPE(obj)->tp_name), false;
  Py_ssize_t n;
  const char* c = PyUnicode_AsUTF8AndSize(obj, &n);
  if (!c) return false;
  if (n == 0) return true;
  s->assign(c, n);
  *out = s;
  return true;
}

bool read_node(PyObject* obj, uint64_t* id) {
  if (!PyLong_Check(obj) || PyBool_Check(obj)) {
    PyObject* i = PyNumber_Index(obj);
    if (!i || PyBool_Check(obj)) {
      PyErr_Clear();
      Py_XDECREF(i);
      return fail("node must be an int handle from match(), got %s", Py_TYPE(obj)->tp_name),
             false;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(i);
    Py_DECREF(i);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return fail("node handle out of range"), false;
    }
    *id = v;
    return true;
  }
  unsigned long long v = PyLong_AsUnsignedLongLong(obj);
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return fail("node handle must be a non-negative int from match()"), false;
  }
  *id = v;
  return true;
}

bool read_int64(PyObject* obj, const char* what, int64_t* v) {
  if (PyBool_Check(obj) || !PyIndex_Check(obj))
    return fail("%s must be an int, got %s", what, Py_TYPE(obj)->tp_name), false;
  long long x = PyLong_AsLongLong(obj);
  if (x == -1 && PyErr_Occurred()) {
    PyErr_Clear();
    return fail("%s out of range", what), false;
  }
  *v = x;
  return true;
}

// Digests: None, or any C-contiguous byte buffer of rows x 32 bytes.
struct DigestArg {
  Py_buffer view{};
  bool has = false;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  ~DigestArg() {
    if (has) PyBuffer_Release(&view);
  }
};

bool read_digests(PyObject* obj, DigestArg* d) {
  if (obj == nullptr || obj == Py_None) return true;
  if (PyObject_GetBuffer(obj, &d->view, PyBUF_ND | PyBUF_C_CONTIGUOUS) != 0) {
    PyErr_Clear();
    return fail("digests must be a C-contiguous uint8 array of shape (pages, 32) or bytes, got %s",
                Py_TYPE(obj)->tp_name),
           false;
  }
  d->has = true;
  if (d->view.len % 32 != 0)
    return fail("digests: %zd bytes is not a whole number of 32-byte digests", d->view.len),
           false;
  if (d->view.ndim == 2 && d->view.shape[1] * d->view.itemsize != 32)
    return fail("digests: rows must be 32 bytes, got shape (%zd, %zd)", d->view.shape[0],
                d->view.shape[1]),
           false;
  if (d->view.ndim > 2) return fail("digests: expected shape (pages, 32)"), false;
  d->data = static_cast<const uint8_t*>(d->view.buf);
  d->rows = d->view.len / 32;
  return true;
}

// Minimal fastcall argument parser: positional then keywords, by name.
bool parse(const char* fn, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
           const char* const* names, int n_req, int n_all, PyObject** out) {
  for (int i = 0; i < n_all; ++i) out[i] = nullptr;
  if (nargs > n_all)
    return PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fn, n_all,
                        nargs),
           false;
  for (Py_ssize_t i = 0; i < nargs; ++i) out[i] = args[i];
  if (kwnames) {
    Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nk; ++k) {
      const char* key = PyUnicode_AsUTF8(PyTuple_GET_ITEM(kwnames, k));
      int slot = -1;
      for (int i = 0; i < n_all; ++i)
        if (std::strcmp(key, names[i]) == 0) slot = i;
      if (slot < 0)
        return PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%s'", fn,
                            key),
               false;
      if (out[slot])
        return PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fn,
                            key),
               false;
      out[slot] = args[nargs + k];
    }
  }
  for (int i = 0; i < n_req; ++i)
    if (!out[i])
      return PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fn, names[i]),
             false;
  return true;
}

PyObject* stale_node(uint64_t id) {
  return fail("node handle %llu is unknown or stale: handles die when the last page of their "
              "path leaves the index (eviction without a pool copy, dropping, reset()); "
              "use the node of a fresh match()",
              static_cast<unsigned long long>(id));
}

struct PyIndex {
  PyObject_HEAD kvd::PrefixIndex* idx;
};

kvd::PrefixIndex* get(PyObject* self) {
  auto* p = reinterpret_cast<PyIndex*>(self)->idx;
  if (!p) PyErr_SetString(PyExc_RuntimeError, "PrefixIndex.__init__ was not called");
  return p;
}

PyObject* new_int64_array(int64_t n) {
  Py_intptr_t dims[1] = {static_cast<Py_intptr_t>(n)};
  Py_INCREF(g_int64_descr);  // NewFromDescr steals it
  return g_np->PyArray_NewFromDescr_(reinterpret_cast<PyTypeObject*>(g_np->PyArray_Type_),
                                     g_int64_descr, 1, dims, nullptr, nullptr, 0, nullptr);
}

// ---- methods -----------------------------------------------------------------

PyObject* new_match_result(const kvd::MatchOut& out, const kvd::SlotRuns& runs);

PyObject* m_match(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  PyObject* a[2];
  static const char* const names[] = {"tokens", "namespace"};
  if (!kw && nargs >= 1 && nargs <= 2) {
    a[0] = args[0];
    a[1] = nargs == 2 ? args[1] : nullptr;
  } else if (!parse("match", args, nargs, kw, names, 1, 2, a)) {
    return nullptr;
  }
  IntArg th;
  kvd::TokenSpan span;
  if (!read_tokens(a[0], &th, &span)) return nullptr;
  std::string nsbuf;
  const std::string* ns;
  if (!read_ns(a[1], &nsbuf, &ns)) return nullptr;
  kvd::MatchOut out;
  // Reused between calls (the GIL serialises them): no allocation once warm.
  static kvd::SlotRuns runs;
  idx->match(span, ns, &out, &runs);
  return new_match_result(out, runs);
}

enum class InsertKind { kDevice, kPoolOnly, kPath };

PyObject* do_insert(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw,
                    InsertKind kind) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  static const char* const names_dev[] = {"tokens", "slots", "namespace", "digests", "in_pool_first"};
  static const char* const names_pool[] = {"tokens", "namespace", "digests"};
  PyObject* a[5] = {};
  const bool pool_only = kind == InsertKind::kPoolOnly;
  const char* fn = pool_only ? "insert_pool_only" : kind == InsertKind::kPath ? "insert_path" : "insert";
  if (pool_only) {
    if (!parse(fn, args, nargs, kw, names_pool, 1, 3, a)) return nullptr;
    a[3] = a[2];
    a[2] = a[1];
    a[1] = nullptr;
  } else if (!parse(fn, args, nargs, kw, names_dev, 2, kind == InsertKind::kPath ? 5 : 4, a)) {
    return nullptr;
  }
  int64_t in_pool_first = -1;
  if (a[4] && a[4] != Py_None) {
    if (!read_int64(a[4], "in_pool_first", &in_pool_first)) return nullptr;
    if (in_pool_first < 0)
      return fail("insert_path: in_pool_first must be >= 0 (or None), got %lld",
                  static_cast<long long>(in_pool_first));
  }
  IntArg th;
  kvd::TokenSpan span;
  if (!read_tokens(a[0], &th, &span)) return nullptr;
  std::string nsbuf;
  const std::string* ns;
  if (!read_ns(a[2], &nsbuf, &ns)) return nullptr;
  DigestArg dg;
  if (!read_digests(a[3], &dg)) return nullptr;
  const int64_t P = idx->page_size();
  const int64_t pages = span.len / P;
  if (dg.rows > pages)
    return fail("digests: %lld rows for %lld full pages", static_cast<long long>(dg.rows),
                static_cast<long long>(pages));
  int64_t r;
  if (pool_only) {
    r = idx->insert_pool_only(span, ns, dg.data, dg.rows);
  } else {
    IntArg sh;
    if (!read_ints(a[1], &sh, "slots")) return nullptr;
    const int64_t need = pages * P;
    if (sh.len < need)
      return fail("slots: %lld entries for %lld tokens in full pages (need >= %lld; entries past "
                  "the last full page are ignored)",
                  static_cast<long long>(sh.len), static_cast<long long>(need),
                  static_cast<long long>(need));
    std::vector<int64_t> widened;
    const int64_t* sp;
    if (sh.itemsize == 4) {
      widened.resize(need);
      const int32_t* s32 = static_cast<const int32_t*>(sh.data);
      for (int64_t i = 0; i < need; ++i) widened[i] = s32[i];
      sp = widened.data();
    } else {
      sp = static_cast<const int64_t*>(sh.data);
    }
    int64_t neg = 0;
    for (int64_t i = 0; i < need; ++i) neg |= sp[i];
    if (neg < 0) return fail("slots: device slot indices must be >= 0");
    if (kind == InsertKind::kPath) {
      kvd::MatchOut out;
      static kvd::SlotRuns runs;  // reused between calls (the GIL serialises them)
      r = idx->insert_path(span, sp, ns, dg.data, dg.rows, in_pool_first, &out, &runs);
      PyObject* m = new_match_result(out, runs);
      if (!m) return nullptr;
      PyObject* already = PyLong_FromLongLong(r);
      if (!already) {
        Py_DECREF(m);
        return nullptr;
      }
      PyObject* t = PyTuple_Pack(2, already, m);
      Py_DECREF(already);
      Py_DECREF(m);
      return t;
    }
    r = idx->insert(span, sp, ns, dg.data, dg.rows);
  }
  return PyLong_FromLongLong(r);
}

PyObject* m_insert(PyObject* self, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_insert(self, a, n, kw, InsertKind::kDevice);
}
PyObject* m_insert_pool_only(PyObject* self, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_insert(self, a, n, kw, InsertKind::kPoolOnly);
}
PyObject* m_insert_path(PyObject* self, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_insert(self, a, n, kw, InsertKind::kPath);
}

PyObject* do_lock(PyObject* self, PyObject* arg, bool lock) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  uint64_t id;
  if (!read_node(arg, &id)) return nullptr;
  kvd::Status st = lock ? idx->lock(id) : idx->unlock(id);
  if (st == kvd::Status::kNotFound) return stale_node(id);
  if (st == kvd::Status::kInvalidArgument)
    return fail("unlock(%llu): the node is not locked (each unlock needs an earlier lock)",
                static_cast<unsigned long long>(id));
  Py_RETURN_NONE;
}
PyObject* m_lock(PyObject* self, PyObject* arg) { return do_lock(self, arg, true); }
PyObject* m_unlock(PyObject* self, PyObject* arg) { return do_lock(self, arg, false); }

PyObject* do_mark(PyObject* self, PyObject* const* args, Py_ssize_t nargs, PyObject* kw,
                  kvd::MarkOp op, const char* fn) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  static const char* const names[] = {"tokens", "first_page", "n_pages", "namespace", "mask"};
  PyObject* a[5];
  if (!parse(fn, args, nargs, kw, names, 3, 5, a)) return nullptr;
  IntArg th;
  kvd::TokenSpan span;
  if (!read_tokens(a[0], &th, &span)) return nullptr;
  int64_t first, count;
  if (!read_int64(a[1], "first_page", &first) || !read_int64(a[2], "n_pages", &count))
    return nullptr;
  std::string nsbuf;
  const std::string* ns;
  if (!read_ns(a[3], &nsbuf, &ns)) return nullptr;
  Py_buffer mb{};
  const uint8_t* mask = nullptr;
  if (a[4] && a[4] != Py_None) {
    if (PyObject_GetBuffer(a[4], &mb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) return nullptr;
    bool ok_fmt = mb.itemsize == 1 && (!mb.format || std::strchr("?bB", mb.format[0]));
    if (!ok_fmt || mb.len != count) {
      PyBuffer_Release(&mb);
      return fail("%s: mask must be a bool/uint8 array of n_pages (%lld) entries", fn,
                  static_cast<long long>(count));
    }
    mask = static_cast<const uint8_t*>(mb.buf);
  }
  int64_t r = idx->mark(op, span, first, count, ns, mask);
  if (mask) PyBuffer_Release(&mb);
  if (r < 0)
    return fail("%s: pages [%lld, %lld) are not inside the %lld full pages of tokens", fn,
                static_cast<long long>(first), static_cast<long long>(first + count),
                static_cast<long long>(span.len / idx->page_size()));
  return PyLong_FromLongLong(r);
}

PyObject* m_mark_writing(PyObject* s, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_mark(s, a, n, kw, kvd::MarkOp::kWriting, "mark_writing");
}
PyObject* m_mark_in_pool(PyObject* s, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_mark(s, a, n, kw, kvd::MarkOp::kInPool, "mark_in_pool");
}
PyObject* m_mark_write_failed(PyObject* s, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_mark(s, a, n, kw, kvd::MarkOp::kWriteFailed, "mark_write_failed");
}
PyObject* m_mark_not_in_pool(PyObject* s, PyObject* const* a, Py_ssize_t n, PyObject* kw) {
  return do_mark(s, a, n, kw, kvd::MarkOp::kNotInPool, "mark_not_in_pool");
}

PyObject* m_evict(PyObject* self, PyObject* arg) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  int64_t n;
  if (!read_int64(arg, "num_tokens", &n)) return nullptr;
  if (n < 0) return fail("evict: num_tokens must be >= 0, got %lld", static_cast<long long>(n));
  std::vector<int64_t> freed;
  idx->evict(n, &freed);
  PyObject* a = new_int64_array(static_cast<int64_t>(freed.size()));
  if (!a) return nullptr;
  if (!freed.empty())
    std::memcpy(py::detail::array_proxy(a)->data, freed.data(), freed.size() * sizeof(int64_t));
  return a;
}

PyObject* m_path_digests(PyObject* self, PyObject* arg) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  uint64_t id;
  if (!read_node(arg, &id)) return nullptr;
  std::vector<uint8_t> d, m;
  if (idx->path_digests(id, &d, &m) != kvd::Status::kOk) return stale_node(id);
  const py::ssize_t pages = static_cast<py::ssize_t>(m.size());
  py::array_t<uint8_t> da({pages, static_cast<py::ssize_t>(32)});
  py::array_t<bool> ma(pages);
  if (pages) {
    std::memcpy(da.mutable_data(), d.data(), d.size());
    std::memcpy(ma.mutable_data(), m.data(), m.size());
  }
  return py::make_tuple(da, ma).release().ptr();
}

PyObject* m_set_path_digests(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kw) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  static const char* const names[] = {"node", "digests", "first_page"};
  PyObject* a[3];
  if (!parse("set_path_digests", args, nargs, kw, names, 2, 3, a)) return nullptr;
  uint64_t id;
  if (!read_node(a[0], &id)) return nullptr;
  DigestArg dg;
  if (a[1] == Py_None) return fail("set_path_digests: digests must not be None");
  if (!read_digests(a[1], &dg)) return nullptr;
  int64_t first = 0;
  if (a[2] && !read_int64(a[2], "first_page", &first)) return nullptr;
  kvd::Status st = idx->set_path_digests(id, dg.data, dg.rows, first);
  if (st == kvd::Status::kNotFound) return stale_node(id);
  if (st != kvd::Status::kOk)
    return fail("set_path_digests: rows [%lld, %lld) exceed the node's path",
                static_cast<long long>(first), static_cast<long long>(first + dg.rows));
  Py_RETURN_NONE;
}

PyObject* m_path_states(PyObject* self, PyObject* arg) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  uint64_t id;
  if (!read_node(arg, &id)) return nullptr;
  std::vector<uint8_t> s;
  int64_t dev = 0;
  if (idx->path_states(id, &s, &dev) != kvd::Status::kOk) return stale_node(id);
  py::array_t<uint8_t> sa(static_cast<py::ssize_t>(s.size()));
  if (!s.empty()) std::memcpy(sa.mutable_data(), s.data(), s.size());
  return py::make_tuple(sa, dev).release().ptr();
}

PyObject* m_reset(PyObject* self, PyObject*) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  idx->reset();
  Py_RETURN_NONE;
}

PyObject* m_check(PyObject* self, PyObject*) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  std::string e = idx->check();
  return PyUnicode_FromStringAndSize(e.data(), static_cast<Py_ssize_t>(e.size()));
}

PyObject* m_stats(PyObject* self, PyObject*) {
  auto* idx = get(self);
  if (!idx) return nullptr;
  kvd::IndexStats s = idx->stats();
  py::dict d;
  d["page_size"] = idx->page_size();
  d["total_size"] = s.total_tokens;
  d["protected_size"] = s.protected_tokens;
  d["evictable_size"] = s.evictable_tokens;
  d["device_pages"] = s.device_pages;
  d["pool_only_pages"] = s.pool_only_pages;
  d["max_pool_only_pages"] = idx->max_pool_only_pages();
  d["nodes"] = s.nodes;
  d["namespaces"] = s.namespaces;
  d["clock"] = s.clock;
  return d.release().ptr();
}

#define FC(f) reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(f))
PyMethodDef index_methods[] = {
    {"match", FC(m_match), METH_FASTCALL | METH_KEYWORDS,
     "match(tokens, namespace=None) -> MatchResult(device_len, device_slots, pool_len, node, "
     "last_digest)"},
    {"insert", FC(m_insert), METH_FASTCALL | METH_KEYWORDS,
     "insert(tokens, slots, namespace=None, digests=None) -> int: leading tokens already on "
     "device"},
    {"insert_path", FC(m_insert_path), METH_FASTCALL | METH_KEYWORDS,
     "insert_path(tokens, slots, namespace=None, digests=None, in_pool_first=None) -> (int, "
     "MatchResult): insert, mark pages from in_pool_first on IN_POOL, and the inserted path as "
     "a match of tokens would now return it, in one call"},
    {"insert_pool_only", FC(m_insert_pool_only), METH_FASTCALL | METH_KEYWORDS,
     "insert_pool_only(tokens, namespace=None, digests=None) -> int: pages that became IN_POOL"},
    {"lock", m_lock, METH_O, "lock(node): pin the path root..node against eviction"},
    {"unlock", m_unlock, METH_O, "unlock(node): undo one lock(node)"},
    {"mark_writing", FC(m_mark_writing), METH_FASTCALL | METH_KEYWORDS,
     "mark_writing(tokens, first_page, n_pages, namespace=None, mask=None) -> int"},
    {"mark_in_pool", FC(m_mark_in_pool), METH_FASTCALL | METH_KEYWORDS,
     "mark_in_pool(tokens, first_page, n_pages, namespace=None, mask=None) -> int"},
    {"mark_write_failed", FC(m_mark_write_failed), METH_FASTCALL | METH_KEYWORDS,
     "mark_write_failed(tokens, first_page, n_pages, namespace=None, mask=None) -> int"},
    {"mark_not_in_pool", FC(m_mark_not_in_pool), METH_FASTCALL | METH_KEYWORDS,
     "mark_not_in_pool(tokens, first_page, n_pages, namespace=None, mask=None) -> int"},
    {"evict", m_evict, METH_O, "evict(num_tokens) -> numpy.int64 array of freed slots"},
    {"path_digests", m_path_digests, METH_O,
     "path_digests(node) -> (uint8[pages, 32], bool[pages])"},
    {"set_path_digests", FC(m_set_path_digests), METH_FASTCALL | METH_KEYWORDS,
     "set_path_digests(node, digests, first_page=0)"},
    {"path_states", m_path_states, METH_O,
     "path_states(node) -> (uint8[pages] pool states, device_pages)"},
    {"reset", m_reset, METH_NOARGS, "reset(): drop everything; old handles become stale"},
    {"stats", m_stats, METH_NOARGS, "stats() -> dict"},
    {"_check", m_check, METH_NOARGS, "_check() -> str: '' when every internal invariant holds"},
    {nullptr, nullptr, 0, nullptr}};
#undef FC

#define GETTER(name, expr)                                         \
  PyObject* g_##name(PyObject* self, void*) {                      \
    auto* idx = get(self);                                         \
    if (!idx) return nullptr;                                      \
    return PyLong_FromLongLong(static_cast<long long>(idx->expr)); \
  }
GETTER(page_size, page_size())
GETTER(max_pool_only_pages, max_pool_only_pages())
GETTER(total_size, total_size())
GETTER(protected_size, protected_size())
GETTER(evictable_size, evictable_size())
GETTER(pool_only_pages, pool_only_pages())
GETTER(num_pages, num_pages())
#undef GETTER

PyGetSetDef index_getset[] = {
    {"page_size", g_page_size, nullptr, "tokens per page", nullptr},
    {"max_pool_only_pages", g_max_pool_only_pages, nullptr, "bound on pool-only pages", nullptr},
    {"total_size", g_total_size, nullptr, "device-resident tokens", nullptr},
    {"protected_size", g_protected_size, nullptr,
     "device-resident tokens that are locked or pinned by a write in flight", nullptr},
    {"evictable_size", g_evictable_size, nullptr,
     "device-resident tokens evict() can free now (total_size - protected_size)", nullptr},
    {"pool_only_pages", g_pool_only_pages, nullptr, "pages held without device slots", nullptr},
    {"num_pages", g_num_pages, nullptr, "pages in the index (device + pool-only)", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

PyObject* index_new(PyTypeObject* t, PyObject*, PyObject*) {
  PyObject* self = t->tp_alloc(t, 0);
  if (self) reinterpret_cast<PyIndex*>(self)->idx = nullptr;
  return self;
}

int index_init(PyObject* self, PyObject* args, PyObject* kwds) {
  static const char* kw[] = {"page_size", "max_pool_only_pages", nullptr};
  long long page = 0, maxp = 65536;
  if (!PyArg_ParseTupleAndKeywords(args, kwds, "L|L:PrefixIndex", const_cast<char**>(kw), &page,
                                   &maxp))
    return -1;
  if (page < 1 || page > (1 << 24)) {
    fail("page_size must be in [1, 2**24], got %lld", page);
    return -1;
  }
  if (maxp < 0) {
    fail("max_pool_only_pages must be >= 0, got %lld", maxp);
    return -1;
  }
  auto* p = reinterpret_cast<PyIndex*>(self);
  delete p->idx;
  p->idx = new kvd::PrefixIndex(page, maxp);
  return 0;
}

void index_dealloc(PyObject* self) {
  auto* p = reinterpret_cast<PyIndex*>(self);
  delete p->idx;
  p->idx = nullptr;
  PyTypeObject* tp = Py_TYPE(self);
  tp->tp_free(self);
  Py_DECREF(tp);  // heap type: instances own a reference to it
}

Py_ssize_t index_len(PyObject* self) {
  auto* idx = get(self);
  if (!idx) return -1;
  return static_cast<Py_ssize_t>(idx->num_pages());
}

// ---- MatchResult ---------------------------------------------------------------
//
// What a match returns: lengths, the node handle, the last page's digest and
// the device slots. The slots are kept as the runs the index handed over (a
// page or a stretch of consecutive pages each) and expanded into a numpy array
// on first access of device_slots: a match that only needs lengths and the
// node (SGLang's match_prefix returns no indices) writes nothing per token.
// The runs are a snapshot taken under the index lock, so the array is exactly
// what an eager copy would have been. It reads like the named tuple it was:
// five fields by name, index or unpacking.

struct PyMatch {
  PyObject_VAR_HEAD  // ob_size: number of slot runs
  int64_t device_len, pool_len;
  uint64_t node;
  PyObject* slots;  // expanded device slots, once asked for
  bool has_digest;
  uint8_t digest[32];
  kvd::SlotRun runs[1];
};

PyObject* new_match_result(const kvd::MatchOut& out, const kvd::SlotRuns& runs) {
  const Py_ssize_t n = static_cast<Py_ssize_t>(runs.size());
  auto* r = PyObject_NewVar(PyMatch, g_match_type, n);
  if (!r) return nullptr;
  r->device_len = out.device_len;
  r->pool_len = out.pool_len;
  r->node = out.node;
  r->slots = nullptr;
  r->has_digest = out.has_last_digest;
  if (out.has_last_digest) std::memcpy(r->digest, out.last_digest, 32);
  if (n) std::memcpy(r->runs, runs.data(), runs.size() * sizeof(kvd::SlotRun));
  return reinterpret_cast<PyObject*>(r);
}

void match_dealloc(PyObject* self) {
  auto* r = reinterpret_cast<PyMatch*>(self);
  Py_XDECREF(r->slots);
  PyTypeObject* tp = Py_TYPE(self);
  PyObject_Free(self);
  Py_DECREF(tp);  // heap type: instances own a reference to it
}

PyObject* match_device_len(PyObject* self, void*) {
  return PyLong_FromLongLong(reinterpret_cast<PyMatch*>(self)->device_len);
}
PyObject* match_pool_len(PyObject* self, void*) {
  return PyLong_FromLongLong(reinterpret_cast<PyMatch*>(self)->pool_len);
}
PyObject* match_node(PyObject* self, void*) {
  return PyLong_FromUnsignedLongLong(reinterpret_cast<PyMatch*>(self)->node);
}
PyObject* match_last_digest(PyObject* self, void*) {
  auto* r = reinterpret_cast<PyMatch*>(self);
  if (!r->has_digest) Py_RETURN_NONE;
  return PyBytes_FromStringAndSize(reinterpret_cast<const char*>(r->digest), 32);
}
PyObject* match_device_slots(PyObject* self, void*) {
  auto* r = reinterpret_cast<PyMatch*>(self);
  if (!r->slots) {
    if (r->device_len == 0) {
      r->slots = g_empty_slots;
      Py_INCREF(r->slots);
    } else {
      PyObject* a = new_int64_array(r->device_len);
      if (!a) return nullptr;
      kvd::expand_slot_runs(r->runs, static_cast<size_t>(Py_SIZE(r)),
                            reinterpret_cast<int64_t*>(py::detail::array_proxy(a)->data));
      r->slots = a;
    }
  }
  Py_INCREF(r->slots);
  return r->slots;
}

using MatchGetter = PyObject* (*)(PyObject*, void*);
constexpr MatchGetter kMatchFields[] = {match_device_len, match_device_slots, match_pool_len,
                                        match_node, match_last_digest};
constexpr Py_ssize_t kMatchLen = 5;

Py_ssize_t match_len(PyObject*) { return kMatchLen; }
PyObject* match_item(PyObject* self, Py_ssize_t i) {
  if (i < 0 || i >= kMatchLen) {
    PyErr_SetString(PyExc_IndexError, "MatchResult index out of range");
    return nullptr;
  }
  return kMatchFields[i](self, nullptr);
}

PyObject* match_repr(PyObject* self) {
  auto* r = reinterpret_cast<PyMatch*>(self);
  return PyUnicode_FromFormat("MatchResult(device_len=%lld, pool_len=%lld, node=%llu, slot_runs=%zd%s)",
                              static_cast<long long>(r->device_len),
                              static_cast<long long>(r->pool_len),
                              static_cast<unsigned long long>(r->node), Py_SIZE(r),
                              r->has_digest ? ", last_digest=<32 bytes>" : "");
}

PyGetSetDef match_getset[] = {
    {"device_len", match_device_len, nullptr,
     "tokens (page aligned) resident on device from the start of the key", nullptr},
    {"device_slots", match_device_slots, nullptr,
     "numpy int64[device_len]: their device slots in token order (built on first access, then "
     "the same array; the caller owns it)",
     nullptr},
    {"pool_len", match_pool_len, nullptr,
     "tokens after device_len known to be in the pool (no device slots)", nullptr},
    {"node", match_node, nullptr,
     "handle (int) of the matched path's end, for lock/unlock/path_*; 0 = nothing", nullptr},
    {"last_digest", match_last_digest, nullptr,
     "32-byte digest of the last matched page if known, else None", nullptr},
    {nullptr, nullptr, nullptr, nullptr, nullptr}};

#ifdef Py_TPFLAGS_DISALLOW_INSTANTIATION
constexpr unsigned kMatchFlags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION;
#else
constexpr unsigned kMatchFlags = Py_TPFLAGS_DEFAULT;
#endif

PyTypeObject* make_match_type() {
  static PyType_Slot slots[] = {
      {Py_tp_doc, const_cast<char*>(
                      "Result of PrefixIndex.match: (device_len, device_slots, pool_len, node, "
                      "last_digest), by name, index or unpacking.")},
      {Py_tp_dealloc, reinterpret_cast<void*>(match_dealloc)},
      {Py_tp_getset, match_getset},
      {Py_tp_repr, reinterpret_cast<void*>(match_repr)},
      {Py_sq_length, reinterpret_cast<void*>(match_len)},
      {Py_sq_item, reinterpret_cast<void*>(match_item)},
      {0, nullptr}};
  static PyType_Spec spec = {"kvdirect._core.MatchResult",
                             static_cast<int>(offsetof(PyMatch, runs)),
                             static_cast<int>(sizeof(kvd::SlotRun)), kMatchFlags, slots};
  PyObject* t = PyType_FromSpec(&spec);
  if (!t) throw py::error_already_set();
  return reinterpret_cast<PyTypeObject*>(t);
}

PyObject* make_index_type() {
  static PyType_Slot slots[] = {
      {Py_tp_doc, const_cast<char*>(
                      "PrefixIndex(page_size, max_pool_only_pages=65536): page-granular radix "
                      "tree of device-resident and pool-resident KV pages (see "
                      "csrc/index/index.h).")},
      {Py_tp_new, reinterpret_cast<void*>(index_new)},
      {Py_tp_init, reinterpret_cast<void*>(index_init)},
      {Py_tp_dealloc, reinterpret_cast<void*>(index_dealloc)},
      {Py_tp_methods, index_methods},
      {Py_tp_getset, index_getset},
      {Py_sq_length, reinterpret_cast<void*>(index_len)},
      {0, nullptr}};
  static PyType_Spec spec = {"kvdirect._core.PrefixIndex", static_cast<int>(sizeof(PyIndex)), 0,
                             Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, slots};
  PyObject* t = PyType_FromSpec(&spec);
  if (!t) throw py::error_already_set();
  return t;
}

}  // namespace

KVD_BINDINGS(10, index) {
  g_np = &npy_api::get();
  g_int64_descr = g_np->PyArray_DescrFromType_(npy_api::NPY_INT64_);
  if (!g_int64_descr) throw py::error_already_set();
  py::module_ np = py::module_::import("numpy");
  g_asarray = py::object(np.attr("asarray")).release().ptr();
  {
    py::array_t<int64_t> e(0);
    e.attr("flags").attr("writeable") = false;
    g_empty_slots = e.release().ptr();
  }
  g_match_type = make_match_type();  // kept for the life of the process
  m.attr("MatchResult") = py::handle(reinterpret_cast<PyObject*>(g_match_type));
  m.attr("PrefixIndex") = py::reinterpret_steal<py::object>(make_index_type());
  m.attr("POOL_UNKNOWN") = 0;
  m.attr("POOL_IN_POOL") = 1;
  m.attr("POOL_WRITING") = 2;
}
