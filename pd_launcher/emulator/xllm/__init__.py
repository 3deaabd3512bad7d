"""xLLM personalities of the emulator: an xLLM device process (``xllm``) and
xllm-service (``xllm_master_serving``), registering in and watching a real etcd, with
HTTP standing in for brpc and real KV bytes moving from prefill to decode over TCP.

Modules: flags (gflags argv), etcd (v3 JSON gateway client), common (instance JSON,
OpenAI responses, metrics), instance, service. See ../README.md, section xLLM.
"""
