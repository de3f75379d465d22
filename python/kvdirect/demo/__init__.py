"""The demo experiments behind ``kvdirect demo`` (the command line is ``kvdirect.cli.demo``).

* :mod:`kvdirect.demo.own` -- two instances of kvdirect's small reference engine
  share one KV pool (``kvdirect demo``);
* :mod:`kvdirect.demo.sglang` -- the same experiment on real SGLang servers on the
  CPU (``kvdirect demo --engine sglang``);
* :mod:`kvdirect.demo.report` -- what both write: machine description, TTFT
  statistics, the table (text or markdown), the chart and the JSON file;
* :mod:`kvdirect.demo.sglang_cpu` -- real SGLang servers on a CPU-only machine
  (launcher, HTTP client, local model folder), used by the SGLang experiment and
  by tests/e2e_sglang.

This module holds only names (no imports): the command line checks its arguments
against them before anything heavy is imported.
"""

#: modes of the own-engine experiment
OWN_MODES = ("baseline", "ideal", "kvdirect")
#: modes of the SGLang-server experiment (``kvdirect.demo.sglang`` documents each)
SGLANG_MODES = ("baseline", "ideal", "kvdirect", "kvdirect_mooncake", "linker", "linker_mooncake",
                "sglang_linker", "hicache")
#: ``--model-size small``: a tiny model for quick checks (either engine)
SMALL_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=128, vocab_size=512)
#: ``--model-size transfer``: KV large relative to compute (many layers and KV heads, wide heads,
#: small hidden size): 512 KiB of fp16 KV per token, 0.5 GiB for a 1024-token prompt
TRANSFER_MODEL = dict(hidden_size=256, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      explicit_head_dim=128, intermediate_size=512, vocab_size=8192)
#: the same shape as a Llama for SGLang (kvdirect.engine.model.ModelSpec.arch says why)
SGLANG_TRANSFER_MODEL = dict(TRANSFER_MODEL, arch="llama")
#: prompt length the transfer-bound shape is meant for (``--prompt-len`` default with it)
TRANSFER_PROMPT_LEN = 1024
