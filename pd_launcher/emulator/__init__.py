"""Engine emulator: a drop-in for `vllm serve` that really moves KV from prefill to decode.

Modules: args (argv), kvconfig (--kv-transfer-config checks), settings (PD_EMU_* env),
textgen (deterministic text and token counts), kvstore/kvnet (held KV blocks and the TCP
transfer protocol), engine (one DP rank), dp (rendezvous), openai/server (HTTP API),
metrics, runtime (lifecycle). See README.md.
"""
