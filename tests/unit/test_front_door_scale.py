"""The front door's config grows linearly with its upstreams, 256 + 256 pass `nginx -t`,
and the scale benchmark's smoke run (a reload with streams in flight) keeps every
stream whole (issue 16, item 4; figures: bench/README.md)."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from pd_deploy.proxy_config import proxy_unit
from tests.proxy.harness import NGINX, needs_nginx

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_proxy_scale",
                                               REPO / "bench" / "proxy_scale" / "run.py")
assert _spec and _spec.loader
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _conf_bytes(n: int, tmp: Path) -> int:
    dirs = {k: str(tmp / f"n{n}" / k) for k in ("state", "log", "run")}
    unit = proxy_unit(bench.block(bench.addresses(n, "127.0.71"), bench.addresses(n, "127.0.72")),
                      dirs)
    return sum(len(f["content"].encode()) for f in unit["files"] if f["path"].endswith(".conf"))


def test_rendered_config_is_linear_in_upstreams(tmp_path):
    sizes = [32, 64, 128, 256, 512]
    total = [_conf_bytes(n, tmp_path) for n in sizes]
    slopes = [(b - a) / (2 * (m - n)) for (n, a), (m, b)
              in zip(zip(sizes, total), zip(sizes[1:], total[1:]))]
    # one `server host:port max_fails=.. fail_timeout=..;` line per upstream, plus the
    # zone size's digits: the same number of bytes per added upstream at every size
    assert max(slopes) - min(slopes) < 2, slopes
    assert 40 < slopes[-1] < 90, slopes


@needs_nginx
def test_256_prefill_and_256_decode_upstreams_pass_nginx_t(tmp_path):
    dirs = {k: str(tmp_path / k) for k in ("state", "log", "run")}
    for d in dirs.values():
        Path(d).mkdir()
    unit = proxy_unit(bench.block(bench.addresses(256, "127.0.71"),
                                  bench.addresses(256, "127.0.72")), dirs, nginx_bin=NGINX)
    for f in unit["files"]:
        Path(f["path"]).write_text(f["content"])
    upstreams = Path(dirs["run"], "pd_upstreams.conf").read_text()
    assert upstreams.count("server 127.0.71.") == 256
    assert upstreams.count("server 127.0.72.") == 256
    res = subprocess.run(unit["pre_start"][0], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@needs_nginx
def test_reload_with_streams_in_flight_smoke(capsys):
    assert bench.main(["--smoke", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "**4/4 streams whole**" in out
