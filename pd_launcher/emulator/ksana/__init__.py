"""KsanaLLM personalities of the emulator: a serving node (``ksana``, the argv of
``serving_server.py`` and its YAML) and a stand-in for KsanaLLM's simple_router
(``ksana-router``: the same argv, ini, sqlite tables, endpoints and fan-out).

Modules: node and its helpers (nodeconfig, nodegroup, noderouter, kvlink) for the serving
node; routerdb (the router's ini and its sqlite state) and router (the router's HTTP
side) for the stand-in. See ../README.md, section KsanaLLM.
"""
