"""FastDeploy personalities of the emulator: a FastDeploy API server instance
(``fastdeploy``, both PD modes: the v1 router mode and the v0 Redis "splitwise"
scheduler) and a stand-in for FastDeploy's router (``fd-router``), with HTTP/TCP standing
in for RDMA/IPC and real KV bytes moving from prefill to decode over TCP.

Modules: flags (argparse-style argv), common (timings, the connector, shared pieces),
scheduler (the v0 Redis protocol), instance, router. See ../README.md, section FastDeploy.
"""
