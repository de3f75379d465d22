"""Real SGLang servers on a CPU-only machine: start/stop (server.py), HTTP client
(client.py) and a local model folder (model.py). Used by ``kvdirect demo --engine
sglang`` (``kvdirect.demo.sglang``) and by tests/e2e_sglang/. Importing it imports
neither SGLang nor torch."""
