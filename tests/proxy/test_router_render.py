"""proxy_unit() in router mode: nginx in front of an engine's own PD router
(xllm-service, FastDeploy's router, KsanaLLM's simple_router). Rendering and
validation; the live behaviour is in test_router.py."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from pd_deploy.proxy_config import ProxyConfigError, options_of, proxy_unit
from tests.proxy.harness import NGINX, needs_nginx
from tests.proxy.test_render import BLOCK

ROUTER_BLOCK = {
    "listen": "127.0.1.9:7000",
    "mode": "router",
    "router": ["127.0.1.3:9000", "127.0.1.4:9000"],
    "served_model_name": "demo-model",
    # what pd_deploy.specs.proxy_block emits: the same options as in pd mode
    "options": dict(BLOCK["options"], admin_port=None),
}


def dirs(tmp_path) -> dict:
    return {k: str(tmp_path / k) for k in ("state", "log", "run")}


def block(**options) -> dict:
    b = json.loads(json.dumps(ROUTER_BLOCK))
    b["options"].update(options)
    return b


def files(unit) -> dict:
    return {os.path.basename(f["path"]): f for f in unit["files"]}


def test_contract_shape(tmp_path):
    d = dirs(tmp_path)
    u = proxy_unit(block(), d)
    assert set(u) == {"files", "pre_start", "processes", "checks", "logs"}
    fs = files(u)
    # no njs: no script, no module to load, nothing for the launcher to check
    assert set(fs) == {"nginx.conf", "pd_upstreams.conf", "proxy_agent.json"}
    conf = fs["nginx.conf"]["content"]
    assert "load_module" not in conf and "js_" not in conf
    assert u["checks"] == {"commands": ["nginx", "python3"], "paths": [], "devices": []}
    assert [p["name"] for p in u["processes"]] == ["proxy", "proxy-agent"]
    assert u["processes"][0]["ready"] == {"type": "http",
                                          "url": "http://127.0.1.9:7000/health"}
    assert u["processes"][1]["argv"][1:3] == ["-m", "pd_launcher.proxy_agent"]
    ups = fs["pd_upstreams.conf"]["content"]
    assert "upstream pd_router {" in ups and "pd_prefill" not in ups
    assert "    least_conn;\n" in ups
    assert "    server 127.0.1.3:9000 max_fails=1 fail_timeout=10s;\n" in ups
    assert "    server 127.0.1.4:9000 max_fails=1 fail_timeout=10s;\n" in ups
    cfg = json.loads(fs["proxy_agent.json"]["content"])
    assert cfg["mode"] == "router"
    assert list(cfg["pools"]) == ["router"]
    assert cfg["pools"]["router"]["servers"] == ROUTER_BLOCK["router"]
    assert cfg["health"]["path"] is None                 # TCP connect probe


def test_locations_and_shared_parts(tmp_path):
    conf = files(proxy_unit(block(api_key="sk-client", engine_api_key="sk-eng"),
                            dirs(tmp_path)))["nginx.conf"]
    assert conf["mode"] == "0600"
    c = conf["content"]
    for route in ("/v1/completions", "/v1/chat/completions"):
        loc = c.split(f"location = {route} {{", 1)[1].split("\n        }\n", 1)[0]
        assert "proxy_pass http://pd_router;" in loc
        assert "proxy_buffering off;" in loc
        assert "proxy_next_upstream error timeout;" in loc       # no non_idempotent
        assert "proxy_next_upstream_tries 2;" in loc             # decode_attempts
        assert "proxy_read_timeout 3600s;" in loc                # decode_timeout_s
        assert "return 401 " in loc and "return 405 " in loc
        assert "error_page 413 @pd_e413;" in loc                 # repeated in the location
    models = c.split("location = /v1/models {", 1)[1].split("\n        }\n", 1)[0]
    assert "proxy_pass http://pd_router;" in models and "return 401 " in models
    # the same front door as pd mode
    assert '"~^Bearer sk-client$" 1;' in c
    assert 'proxy_set_header Authorization "Bearer sk-eng";' in c
    assert "proxy_set_header X-Request-Id $pd_request_id;" in c
    assert "add_header X-Request-Id $pd_request_id always;" in c
    assert "client_max_body_size 8m;" in c
    assert "location = /health {" in c and "location = /metrics {" in c
    assert '"mode":"$pd_mode"' in c and '"upstream":"$upstream_addr"' in c
    assert "decode_upstream" not in c and "pd_prefill" not in c and "pd_decode" not in c


def test_router_options(tmp_path):
    u = proxy_unit(block(router_attempts=3, router_timeout_s=120,
                         router_balance="round_robin", router_health_path="/health",
                         decode_attempts=7, decode_timeout_s=99), dirs(tmp_path))
    fs = files(u)
    c = fs["nginx.conf"]["content"]
    assert "proxy_next_upstream_tries 3;" in c and "proxy_next_upstream_tries 7" not in c
    assert "proxy_read_timeout 120s;" in c and "99s" not in c
    assert "least_conn" not in fs["pd_upstreams.conf"]["content"]
    assert json.loads(fs["proxy_agent.json"]["content"])["health"]["path"] == "/health"
    # null and "" both mean TCP
    assert options_of({"options": {"router_health_path": ""}})["router_health_path"] is None
    o = options_of({"options": {"decode_balance": "round_robin", "decode_attempts": 5}})
    assert o["router_balance"] == "round_robin" and o["router_attempts"] == 5
    assert o["router_timeout_s"] == 3600


def test_pd_block_is_unaffected_by_router_options(tmp_path):
    a = proxy_unit(BLOCK, dirs(tmp_path))
    b = json.loads(json.dumps(BLOCK))
    b["options"].update(router_attempts=9, router_health_path="/x")
    assert proxy_unit(b, dirs(tmp_path)) == a


@pytest.mark.parametrize("mutate,field", [
    (lambda b: b.update(mode="sglang"), "proxy.mode"),
    (lambda b: b.update(mode=None), "proxy.mode"),
    (lambda b: b.update(router=[]), "proxy.router"),
    (lambda b: b.pop("router"), "proxy.router"),
    (lambda b: b.update(router="127.0.1.3:9000"), "proxy.router"),
    (lambda b: b.update(router=["127.0.1.3"]), "proxy.router[0]"),
    (lambda b: b.update(router=["127.0.1.3:9000", "http://x:1"]), "proxy.router[1]"),
    (lambda b: b.update(router=["127.0.1.3:70000"]), "proxy.router[0]"),
    (lambda b: b.update(router=["127.0.1.3:9000", "127.0.1.3:9000"]), "proxy.router[1]"),
    (lambda b: b.update(prefill=["127.0.1.1:7100"]), "proxy.prefill"),
    (lambda b: b.update(decode=["127.0.1.5:7100"]), "proxy.decode"),
    (lambda b: b.update(prefill=[]), "proxy.prefill"),
    (lambda b: b["options"].update(router_health_path="health"), "router_health_path"),
    (lambda b: b["options"].update(router_health_path="/a b"), "router_health_path"),
    (lambda b: b["options"].update(router_health_path=5), "router_health_path"),
    (lambda b: b["options"].update(router_attempts=0), "router_attempts"),
    (lambda b: b["options"].update(router_timeout_s="1h"), "router_timeout_s"),
    (lambda b: b["options"].update(router_balance="fastest"), "router_balance"),
])
def test_invalid_router_block_names_the_field(tmp_path, mutate, field):
    b = block()
    mutate(b)
    with pytest.raises(ProxyConfigError) as e:
        proxy_unit(b, dirs(tmp_path))
    assert field in str(e.value)


def test_pd_block_with_router_key_is_rejected(tmp_path):
    b = json.loads(json.dumps(BLOCK))
    b["router"] = ["127.0.1.3:9000"]
    with pytest.raises(ProxyConfigError, match=r"proxy\.router: .*mode: router"):
        proxy_unit(b, dirs(tmp_path))
    b = json.loads(json.dumps(BLOCK))
    b["mode"] = "pd"                         # explicit pd is the same as no mode
    assert proxy_unit(b, dirs(tmp_path)) == proxy_unit(BLOCK, dirs(tmp_path))


@needs_nginx
@pytest.mark.parametrize("opts", [
    {},
    {"api_key": "sk-1", "engine_api_key": "e-2", "keepalive": 0, "worker_processes": "auto",
     "router_balance": "random_two_least_conn", "router_attempts": 100,
     "njs_module": "/nonexistent/ngx_http_js_module.so"},
])
def test_rendered_config_passes_nginx_t_on_a_fresh_dir(tmp_path, opts):
    """As the launcher runs it; njs_module is ignored in router mode (nothing loaded)."""
    d = dirs(tmp_path)
    os.makedirs(d["log"])
    u = proxy_unit(block(**opts), d, nginx_bin=NGINX)
    for f in u["files"]:
        os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
        with open(f["path"], "w") as fh:
            fh.write(f["content"])
        os.chmod(f["path"], int(f["mode"], 8))
    for argv in u["pre_start"]:
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
