"""proxy_unit(): the contract with the node spec, validation, and nginx -t."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from pd_deploy.proxy_config import ProxyConfigError, options_of, proxy_unit
from pd_launcher.proxy_agent import render_upstreams
from tests.proxy.harness import NGINX, needs_nginx

BLOCK = {
    "listen": "127.0.1.9:7000",
    "prefill": ["127.0.1.1:7100", "127.0.1.1:7101", "127.0.1.2:7100"],
    "decode": ["127.0.1.5:7100", "127.0.1.6:7100"],
    "served_model_name": "demo-model",
    "options": {
        "prefill_balance": "least_conn", "decode_balance": "least_conn", "keepalive": 64,
        "max_fails": 1, "fail_timeout_s": 10, "prefill_attempts": 3, "decode_attempts": 2,
        "fallback": True, "max_body_size": "8m", "api_key": None, "engine_api_key": None,
        "min_prefill_chars": 0, "connect_timeout_s": 3, "prefill_timeout_s": 600,
        "decode_timeout_s": 3600, "worker_processes": 1,
    },
}


def dirs(tmp_path) -> dict:
    return {k: str(tmp_path / k) for k in ("state", "log", "run")}


def block(**options) -> dict:
    b = json.loads(json.dumps(BLOCK))
    b["options"].update(options)
    return b


def files(unit) -> dict:
    return {os.path.basename(f["path"]): f for f in unit["files"]}


def test_contract_shape(tmp_path):
    d = dirs(tmp_path)
    u = proxy_unit(BLOCK, d)
    assert set(u) == {"files", "pre_start", "processes", "checks", "logs"}
    fs = files(u)
    assert set(fs) == {"nginx.conf", "pd_router.js", "pd_upstreams.conf", "proxy_agent.json"}
    for f in u["files"]:
        assert set(f) == {"path", "content", "mode"}
        assert f["path"].startswith(d["run"] + "/")
        assert f["mode"] == "0644"
    conf = d["run"] + "/nginx.conf"
    assert u["pre_start"] == [["nginx", "-t", "-q", "-p", d["run"] + "/", "-c", conf]]
    proxy, agent = u["processes"]
    assert proxy == {
        "name": "proxy", "argv": ["nginx", "-p", d["run"] + "/", "-c", conf], "env": {},
        "ports": [{"host": "127.0.1.9", "port": 7000, "use": "proxy"}],
        "ready": {"type": "http", "url": "http://127.0.1.9:7000/health"},
    }
    assert agent["name"] == "proxy-agent"
    assert agent["argv"] == ["python3", "-m", "pd_launcher.proxy_agent",
                             d["run"] + "/proxy_agent.json"]
    assert agent["ports"] == [{"host": "127.0.1.9", "port": 7001, "use": "admin"}]
    assert agent["ready"] == {"type": "http", "url": "http://127.0.1.9:7000/health/agent"}
    assert u["checks"] == {"commands": ["nginx", "python3"],
                           "paths": ["/usr/lib/nginx/modules/ngx_http_js_module.so"],
                           "devices": []}
    text = fs["nginx.conf"]["content"]
    assert "daemon off;" in text and "worker_processes 1;" in text
    assert f"access_log {d['log']}/proxy_access.log pd_json;" in text
    assert "error_log stderr" in text
    assert "\nuser " not in text            # see docs/proxy.md: workers need no files
    # decode locations stream (nginx in buffered mode may still hold bytes back)
    for loc in ("location @pd_decode {", "location @pd_decode_usage {"):
        block_text = text.split(loc, 1)[1].split("}", 1)[0]
        assert "proxy_buffering off;" in block_text
        assert "proxy_next_upstream error timeout;" in block_text   # never non_idempotent
    cfg = json.loads(fs["proxy_agent.json"]["content"])
    assert cfg["listen"] == "127.0.1.9:7001"
    assert cfg["pools"]["prefill"]["servers"] == BLOCK["prefill"]


def test_policies_and_limits_rendered(tmp_path):
    u = proxy_unit(block(prefill_balance="random_two_least_conn", decode_balance="round_robin",
                         keepalive=16, max_fails=3, fail_timeout_s=20, decode_attempts=4,
                         prefill_attempts=5, max_body_size="1m", worker_processes=4,
                         connect_timeout_s=7, min_prefill_chars=100, fallback=False),
                   dirs(tmp_path), nginx_bin="/opt/nginx/sbin/nginx",
                   modules_dir="/opt/nginx/modules")
    ups = files(u)["pd_upstreams.conf"]["content"]
    pre, dec = ups.split("upstream pd_decode")
    assert "random two least_conn;" in pre and "least_conn" not in dec
    assert "server 127.0.1.1:7101 max_fails=3 fail_timeout=20s;" in pre
    assert "keepalive 16;" in pre and "keepalive 16;" in dec
    conf = files(u)["nginx.conf"]["content"]
    assert "load_module /opt/nginx/modules/ngx_http_js_module.so;" in conf
    assert "worker_processes 4;" in conf
    assert conf.count("proxy_next_upstream_tries 4;") == 3     # models + 2 decode
    assert "proxy_next_upstream_tries 5;" in conf
    assert "client_max_body_size 1m;" in conf and "client_body_buffer_size 1m;" in conf
    assert "proxy_connect_timeout 7s;" in conf
    assert "js_var $pd_min_prefill_chars 100;" in conf
    assert "js_var $pd_fallback_enabled 0;" in conf
    assert u["pre_start"][0][0] == "/opt/nginx/sbin/nginx"
    assert u["checks"]["paths"] == ["/opt/nginx/modules/ngx_http_js_module.so"]
    # njs built in (or loaded elsewhere): no load_module
    u2 = proxy_unit(block(njs_module=""), dirs(tmp_path))
    assert "load_module" not in files(u2)["nginx.conf"]["content"]
    assert u2["checks"]["paths"] == []


def test_upstreams_down_marks():
    pools = {"prefill": {"name": "pd_prefill", "balance": "", "servers": ["a:1", "b:2"],
                         "params": "max_fails=1 fail_timeout=10s", "keepalive": 0,
                         "keepalive_timeout_s": 4, "zone_kb": 64}}
    text = render_upstreams(pools, {"prefill": {"b:2"}})
    assert "server a:1 max_fails=1 fail_timeout=10s;" in text
    assert "server b:2 max_fails=1 fail_timeout=10s down;" in text
    assert "keepalive" not in text


def test_secrets_only_in_0600_config(tmp_path):
    u = proxy_unit(block(api_key="sk-client-XYZ", engine_api_key="eng-ABC"), dirs(tmp_path))
    fs = files(u)
    assert fs["nginx.conf"]["mode"] == "0600"
    assert '"~^Bearer sk-client-XYZ$" 1;' in fs["nginx.conf"]["content"]
    assert 'proxy_set_header Authorization "Bearer eng-ABC";' in fs["nginx.conf"]["content"]
    rest = json.dumps({k: v for k, v in u.items() if k != "files"}) + "".join(
        f["content"] for n, f in fs.items() if n != "nginx.conf")
    assert "sk-client-XYZ" not in rest and "eng-ABC" not in rest


@pytest.mark.parametrize("opts, field", [
    ({"prefill_balance": "fastest"}, "proxy.options.prefill_balance"),
    ({"max_body_size": "8 MB"}, "proxy.options.max_body_size"),
    ({"keepalive": -1}, "proxy.options.keepalive"),
    ({"decode_attempts": 0}, "proxy.options.decode_attempts"),
    ({"fallback": "yes"}, "proxy.options.fallback"),
    ({"api_key": "has space"}, "proxy.options.api_key"),
    ({"api_key": "quote\"inside"}, "proxy.options.api_key"),
    ({"engine_api_key": "dollar$var"}, "proxy.options.engine_api_key"),
    ({"worker_processes": 0}, "proxy.options.worker_processes"),
    ({"no_such_option": 1}, "no_such_option"),
])
def test_invalid_options_name_the_field(tmp_path, opts, field):
    with pytest.raises(ProxyConfigError) as e:
        proxy_unit(block(**opts), dirs(tmp_path))
    assert field in str(e.value)
    for v in opts.values():      # secrets are never echoed
        if isinstance(v, str) and "key" in field:
            assert v not in str(e.value)


@pytest.mark.parametrize("mutate, field", [
    (lambda b: b.update(listen="127.0.1.9"), "proxy.listen"),
    (lambda b: b.update(prefill=[]), "proxy.prefill"),
    (lambda b: b.update(decode=["127.0.1.5:7100", "127.0.1.5:7100"]), "proxy.decode[1]"),
    (lambda b: b.update(decode=["127.0.1.5:99999"]), "proxy.decode[0]"),
])
def test_invalid_block_names_the_field(tmp_path, mutate, field):
    b = block()
    mutate(b)
    with pytest.raises(ProxyConfigError) as e:
        proxy_unit(b, dirs(tmp_path))
    assert field in str(e.value)


def test_defaults_fill_none():
    o = options_of({"options": {"keepalive": None, "fallback": None}})
    assert o["keepalive"] == 64 and o["fallback"] is True and o["max_body_size"] == "8m"


def test_wildcard_listen(tmp_path):
    u = proxy_unit(block() | {"listen": "0.0.0.0:7000"}, dirs(tmp_path))
    proxy, agent = u["processes"]
    assert proxy["ready"]["url"] == "http://127.0.0.1:7000/health"
    assert agent["ports"][0]["host"] == "127.0.0.1"


@needs_nginx
@pytest.mark.parametrize("opts", [
    {},
    {"prefill_balance": "random_two_least_conn", "decode_balance": "round_robin",
     "api_key": "sk-1", "engine_api_key": "e-2", "keepalive": 0, "worker_processes": "auto",
     "prefill_attempts": 100, "decode_attempts": 100, "user": "nobody nogroup"},
])
def test_rendered_config_passes_nginx_t_on_a_fresh_dir(tmp_path, opts):
    """What the launcher does: write the files into an empty run dir, run pre_start."""
    d = dirs(tmp_path)
    os.makedirs(d["log"])            # the launcher owns the log dir; run/ comes from files
    u = proxy_unit(block(**opts), d, nginx_bin=NGINX)
    for f in u["files"]:
        os.makedirs(os.path.dirname(f["path"]), exist_ok=True)
        with open(f["path"], "w") as fh:
            fh.write(f["content"])
        os.chmod(f["path"], int(f["mode"], 8))
    for argv in u["pre_start"]:
        r = subprocess.run(argv, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    # and a broken config is caught
    conf = u["files"][0]["path"]
    with open(conf, "a") as fh:
        fh.write("this is not nginx;\n")
    r = subprocess.run(u["pre_start"][0], capture_output=True, text=True)
    assert r.returncode != 0
