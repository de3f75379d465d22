// Bindings for the embedded shm pool (kvdirect._core.ShmPool). Keys arrive as
// one Python sequence of str and are converted here once; scatter lists are
// uint64 arrays used in place; every data-moving call releases the GIL.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <vector>

#include "registry.h"
#include "shm/copy_hash.h"
#include "shm/shm_pool.h"

namespace py = pybind11;
using kvd::shm::Pool;

namespace {

[[noreturn]] void raise_config(const std::string& msg) {
  py::object cls = py::module_::import("kvdirect.errors").attr("ConfigError");
  PyErr_SetString(cls.ptr(), msg.c_str());
  throw py::error_already_set();
}

// Longest prefix of s[0, len) of at most max bytes that does not split a UTF-8 character.
size_t utf8_cut(const char* s, size_t len, size_t max) {
  size_t cut = std::min(len, max);
  while (cut > 0 && cut < len && (static_cast<unsigned char>(s[cut]) & 0xC0) == 0x80) --cut;
  return cut;
}

std::vector<std::string> keys_from(py::handle seq) {
  py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(seq.ptr(), "store keys must be a sequence of str"));
  if (!fast) throw py::error_already_set();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  std::vector<std::string> out;
  out.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyUnicode_Check(items[i]))
      raise_config(std::string("store keys must be str, got ") + Py_TYPE(items[i])->tp_name);
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(items[i], &len);
    if (!s) throw py::error_already_set();
    if (len == 0 || size_t(len) > kvd::shm::kMaxKeyBytes)
      raise_config("store key must be 1.." + std::to_string(kvd::shm::kMaxKeyBytes) + " bytes, got " +
                   std::to_string(len) + ": '" + std::string(s, utf8_cut(s, size_t(len), 40)) + "'");
    out.emplace_back(s, size_t(len));
  }
  return out;
}

// Keys read in place for a lookup: each str is held (a reference) while the
// GIL is released, so its UTF-8 bytes stay valid whatever other threads do.
struct HeldKeys {
  std::vector<py::object> refs;
  std::vector<kvd::shm::KeyView> views;
};

HeldKeys hold_keys(py::handle seq) {
  py::object fast = py::reinterpret_steal<py::object>(PySequence_Fast(seq.ptr(), "store keys must be a sequence of str"));
  if (!fast) throw py::error_already_set();
  Py_ssize_t n = PySequence_Fast_GET_SIZE(fast.ptr());
  PyObject** items = PySequence_Fast_ITEMS(fast.ptr());
  HeldKeys h;
  h.refs.reserve(size_t(n));
  h.views.reserve(size_t(n));
  for (Py_ssize_t i = 0; i < n; ++i) {
    if (!PyUnicode_Check(items[i]))
      raise_config(std::string("store keys must be str, got ") + Py_TYPE(items[i])->tp_name);
    Py_ssize_t len = 0;
    const char* s = PyUnicode_AsUTF8AndSize(items[i], &len);
    if (!s) throw py::error_already_set();
    if (len == 0 || size_t(len) > kvd::shm::kMaxKeyBytes)
      raise_config("store key must be 1.." + std::to_string(kvd::shm::kMaxKeyBytes) + " bytes, got " +
                   std::to_string(len) + ": '" + std::string(s, utf8_cut(s, size_t(len), 40)) + "'");
    h.refs.push_back(py::reinterpret_borrow<py::object>(items[i]));
    h.views.push_back({s, size_t(len)});
  }
  return h;
}

using U64Array = py::array_t<uint64_t, py::array::c_style>;

void check_scatter(const std::vector<std::string>& keys, const U64Array& addrs, const U64Array& sizes) {
  if (addrs.ndim() != 2 || sizes.ndim() != 2 || addrs.shape(0) != sizes.shape(0) ||
      addrs.shape(1) != sizes.shape(1))
    raise_config("scatter list addrs and sizes must be uint64 arrays of the same shape (keys, segments)");
  if (size_t(addrs.shape(0)) != keys.size())
    raise_config("scatter list has " + std::to_string(addrs.shape(0)) + " rows for " + std::to_string(keys.size()) +
                 " keys");
  const uint64_t* a = addrs.data();
  const uint64_t* z = sizes.data();
  for (py::ssize_t i = 0; i < addrs.size(); ++i)
    if (a[i] == 0 && z[i] != 0)
      raise_config("scatter list segment " + std::to_string(i % addrs.shape(1)) + " of key " +
                   std::to_string(i / addrs.shape(1)) + " has a null address");
}

Pool& live(Pool& p) {
  if (p.closed()) throw py::value_error("shm pool '" + p.name() + "' is closed");
  return p;
}

using BatchOp = void (Pool::*)(const std::string*, size_t, const uint64_t*, const uint64_t*, size_t, int32_t*);

// put and get: keys + scatter list in, one int32 status per key out, GIL released for the copy.
py::array_t<int32_t> batch_transfer(Pool& p, BatchOp op, py::handle keys, const U64Array& addrs,
                                    const U64Array& sizes) {
  auto k = keys_from(keys);
  check_scatter(k, addrs, sizes);
  py::array_t<int32_t> out(py::ssize_t(k.size()));
  int32_t* o = out.mutable_data();
  const uint64_t* a = addrs.data();
  const uint64_t* s = sizes.data();
  size_t nseg = size_t(addrs.shape(1));
  {
    py::gil_scoped_release nogil;
    (live(p).*op)(k.data(), k.size(), a, s, nseg, o);
  }
  return out;
}

}  // namespace

KVD_BINDINGS(50, shm) {
  py::class_<Pool::ReadSession, std::unique_ptr<Pool::ReadSession>>(m, "ShmReadSession",
                                                                     "Pinned objects being read piece by piece");
  py::class_<Pool>(m, "ShmPool", "Embedded shared-memory page pool (see csrc/shm/shm_pool.h)")
      .def_static(
          "open",
          [](const std::string& name, const std::string& mode, uint64_t size, uint64_t block_size,
             uint32_t pin_slots) {
            kvd::shm::OpenMode md = mode == "open"     ? kvd::shm::OpenMode::kOpen
                                    : mode == "create" ? kvd::shm::OpenMode::kCreate
                                                       : kvd::shm::OpenMode::kAuto;
            if (mode != "open" && mode != "create" && mode != "auto") raise_config("open mode must be open|create|auto");
            kvd::shm::CreateOptions opt;
            opt.size = size;
            opt.block_size = block_size;
            opt.pin_slots = pin_slots;
            std::unique_ptr<Pool> p;
            std::string err;
            bool created = false;
            kvd::Status st;
            {
              py::gil_scoped_release nogil;
              st = Pool::open(name, md, opt, &p, &err, &created);
            }
            py::object pool = p ? py::cast(std::move(p)) : py::none();
            return py::make_tuple(int(st), err, pool, created);
          },
          py::arg("name"), py::arg("mode") = "auto", py::arg("size") = 1ULL << 30,
          py::arg("block_size") = 64 << 10, py::arg("pin_slots") = 4096,
          "-> (status, message, ShmPool | None, created)")
      .def_static(
          "destroy",
          [](const std::string& name) {
            std::string err;
            kvd::Status st = Pool::destroy(name, &err);
            return py::make_tuple(int(st), err);
          },
          "-> (status, message)")
      .def_static("path_for", &Pool::path_for)
      .def_static("valid_name", &Pool::valid_name)
      .def_property_readonly("name", &Pool::name)
      .def_property_readonly("closed", &Pool::closed)
      .def("set_verify_checksum", &Pool::set_verify_checksum)
      .def("set_write_checksum", &Pool::set_write_checksum)
      .def(
          "set_copy_options",
          [](Pool& p, unsigned threads, uint64_t parallel_min_bytes, uint64_t stream_min_bytes) {
            kvd::shm::CopyOptions o;
            o.threads = threads;
            o.parallel_min_bytes = parallel_min_bytes;
            o.stream_min_bytes = stream_min_bytes;
            p.set_copy_options(o);
          },
          py::arg("threads") = 0, py::arg("parallel_min_bytes") = kvd::shm::CopyOptions().parallel_min_bytes,
          py::arg("stream_min_bytes") = kvd::shm::CopyOptions().stream_min_bytes,
          "copy threads for large batches (0: one per hardware thread, 1: the caller only), the batch "
          "size from which they are used, and from which stores are non-temporal (csrc/shm/shm_pool.h)")
      .def("copy_options",
           [](Pool& p) {
             auto o = p.copy_options();
             py::dict d;
             d["threads"] = o.threads;
             d["parallel_min_bytes"] = o.parallel_min_bytes;
             d["stream_min_bytes"] = o.stream_min_bytes;
             return d;
           })
      .def("exists",
           [](Pool& p, py::handle keys) {
             auto k = keys_from(keys);
             py::array_t<bool> out(py::ssize_t(k.size()));
             auto* o = reinterpret_cast<uint8_t*>(out.mutable_data());
             {
               py::gil_scoped_release nogil;
               live(p).exists(k.data(), k.size(), o);
             }
             return out;
           })
      .def("exists_prefix",
           [](Pool& p, py::handle keys) {
             HeldKeys k = hold_keys(keys);
             py::gil_scoped_release nogil;
             return live(p).exists_prefix(k.views.data(), k.views.size());
           },
           "-> how many leading keys are present (stops at the first absent one)")
      .def("put",
           [](Pool& p, py::handle keys, const U64Array& addrs, const U64Array& sizes) {
             return batch_transfer(p, &Pool::put, keys, addrs, sizes);
           })
      .def("get",
           [](Pool& p, py::handle keys, const U64Array& addrs, const U64Array& sizes) {
             return batch_transfer(p, &Pool::get, keys, addrs, sizes);
           })
      .def("read_begin",
           [](Pool& p, py::handle keys, const U64Array& total_sizes) {
             auto k = keys_from(keys);
             if (total_sizes.ndim() != 1 || size_t(total_sizes.shape(0)) != k.size())
               raise_config("read_begin needs one total size per key");
             py::array_t<int32_t> out(py::ssize_t(k.size()));
             std::unique_ptr<Pool::ReadSession> s;
             {
               py::gil_scoped_release nogil;
               s = live(p).read_begin(k.data(), k.size(), total_sizes.data(), out.mutable_data());
             }
             return py::make_tuple(py::cast(std::move(s)), out);
           },
           "-> (ReadSession, int32 status per key); then read_next(...) pieces, then read_end")
      .def("read_next",
           [](Pool& p, Pool::ReadSession& s, const U64Array& addrs, const U64Array& sizes) {
             if (addrs.ndim() != 2 || sizes.ndim() != 2 || addrs.shape(0) != sizes.shape(0) ||
                 addrs.shape(1) != sizes.shape(1))
               raise_config("scatter list addrs and sizes must be uint64 arrays of the same shape (keys, segments)");
             py::gil_scoped_release nogil;
             live(p).read_next(s, size_t(addrs.shape(0)), addrs.data(), sizes.data(), size_t(addrs.shape(1)));
           })
      .def("read_end",
           [](Pool& p, Pool::ReadSession& s) {
             std::vector<int32_t> st;
             {
               py::gil_scoped_release nogil;
               st.resize(live(p).read_session_size(s));
               live(p).read_end(s, st.data());
             }
             py::array_t<int32_t> r(py::ssize_t(st.size()));
             std::copy(st.begin(), st.end(), r.mutable_data());
             return r;
           })
      .def("remove",
           [](Pool& p, py::handle keys) {
             auto k = keys_from(keys);
             py::gil_scoped_release nogil;
             return live(p).remove(k.data(), k.size());
           })
      .def("put_bytes",
           [](Pool& p, py::handle key, py::buffer data) {
             auto k = keys_from(py::make_tuple(key));
             py::buffer_info bi = data.request();
             if (!PyBuffer_IsContiguous(bi.view(), 'C')) raise_config("put_bytes needs a contiguous buffer");
             size_t n = size_t(bi.size) * size_t(bi.itemsize);
             py::gil_scoped_release nogil;
             return int(live(p).put_one(k[0], bi.ptr, n));
           })
      .def("get_bytes",
           [](Pool& p, py::handle key) -> py::tuple {
             auto k = keys_from(py::make_tuple(key));
             uint32_t pin = 0;
             uint64_t size = 0;
             kvd::Status st;
             {
               py::gil_scoped_release nogil;
               st = live(p).pin_one(k[0], &pin, &size);
             }
             if (st != kvd::Status::kOk) return py::make_tuple(int(st), py::none());
             PyObject* b = PyBytes_FromStringAndSize(nullptr, Py_ssize_t(size));
             if (!b) {
               p.read_pinned(pin, nullptr, 0);  // unpin
               throw py::error_already_set();
             }
             py::object bytes = py::reinterpret_steal<py::object>(b);
             char* dst = PyBytes_AS_STRING(b);
             {
               py::gil_scoped_release nogil;
               st = p.read_pinned(pin, dst, size);
             }
             if (st != kvd::Status::kOk) return py::make_tuple(int(st), py::none());
             return py::make_tuple(0, bytes);
           },
           "-> (status, bytes | None)")
      .def("stats",
           [](Pool& p) {
             kvd::shm::PoolStats s;
             {
               py::gil_scoped_release nogil;
               s = live(p).stats();
             }
             py::dict d;
#define KVD_STAT(f) d[#f] = s.f
             KVD_STAT(size); KVD_STAT(capacity); KVD_STAT(used); KVD_STAT(object_bytes); KVD_STAT(block_size);
             KVD_STAT(blocks); KVD_STAT(free_blocks); KVD_STAT(objects); KVD_STAT(max_objects); KVD_STAT(writing);
             KVD_STAT(pins); KVD_STAT(hits); KVD_STAT(misses); KVD_STAT(evictions); KVD_STAT(puts);
             KVD_STAT(put_failures); KVD_STAT(corrupt); KVD_STAT(removes); KVD_STAT(recoveries);
             KVD_STAT(reaped_pins); KVD_STAT(reaped_writes);
#undef KVD_STAT
             return d;
           })
      .def(
          "list",
          [](Pool& p, uint64_t cursor, size_t max) {
            std::vector<kvd::shm::ObjectInfo> objs;
            uint64_t next;
            {
              py::gil_scoped_release nogil;
              next = live(p).list(cursor, max, &objs);
            }
            py::list out;
            for (auto& o : objs) out.append(py::make_tuple(py::str(o.key), o.size, o.has_checksum));
            return py::make_tuple(next, out);
          },
          py::arg("cursor") = 0, py::arg("max") = 4096,
          "-> (next cursor (0: done), [(key, size, has_checksum), ...]): one page of the published objects")
      .def(
          "verify",
          [](Pool& p, py::handle keys, bool drop_corrupt) {
            auto k = keys_from(keys);
            py::array_t<int32_t> st(py::ssize_t(k.size()));
            py::array_t<bool> checked(py::ssize_t(k.size()));
            py::array_t<uint64_t> sizes(py::ssize_t(k.size()));
            {
              py::gil_scoped_release nogil;
              live(p).verify(k.data(), k.size(), drop_corrupt, st.mutable_data(),
                             reinterpret_cast<uint8_t*>(checked.mutable_data()), sizes.mutable_data());
            }
            return py::make_tuple(st, checked, sizes);
          },
          py::arg("keys"), py::arg("drop_corrupt") = false,
          "-> (int32 status, bool checksum compared, uint64 size) per key; checksums recomputed in place")
      .def(
          "object_extents",
          [](Pool& p, py::handle key) {
            auto k = keys_from(py::make_tuple(key));
            std::vector<std::pair<uint64_t, uint64_t>> ext;
            kvd::Status st;
            {
              py::gil_scoped_release nogil;
              st = live(p).object_extents(k[0], &ext);
            }
            py::list out;
            for (auto& e : ext) out.append(py::make_tuple(e.first, e.second));
            return py::make_tuple(int(st), out);
          },
          "-> (status, [(file offset, length), ...]): where an object's bytes lie in the pool file")
      .def("prefault", &Pool::prefault, py::arg("offset"), py::arg("length"),
           py::call_guard<py::gil_scoped_release>(),
           "populate this process's page tables for [offset, offset + length) of the pool's data "
           "(see csrc/shm/shm_pool.h); -> bytes")
      .def_property_readonly("data_bytes", &Pool::data_bytes)
      .def("close",
           [](Pool& p) {
             py::gil_scoped_release nogil;
             p.close();
           })
      .def("debug_hold", &Pool::debug_hold, py::arg("phase"), py::arg("seconds"), py::arg("marker") = "",
           "test hook: at phase lock|alloc|put_copy|get_copy create `marker`, then sleep (once)");
  m.def("shm_checksum64", [](py::buffer b) {
    py::buffer_info bi = b.request();
    size_t n = size_t(bi.size) * size_t(bi.itemsize);
    py::gil_scoped_release nogil;
    return kvd::shm::checksum64(bi.ptr, n);
  });
  m.def("shm_copy_kernel", &kvd::shm::copy_hash_kernel);
}
