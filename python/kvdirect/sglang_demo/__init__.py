"""Real SGLang servers on a CPU-only machine: start/stop (server.py), HTTP client
(client.py), a local model folder (model.py) and ``kvdirect demo --engine sglang``
(demo.py, cli.py). Used by the demo and by tests/e2e_sglang/. Importing it imports
neither SGLang nor torch."""
