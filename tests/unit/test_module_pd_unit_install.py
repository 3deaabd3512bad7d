"""plugins/modules/pd_unit_install.py with a mocked AnsibleModule: first install,
converged re-run, spec change, check mode, bad bundles and specs."""
from __future__ import annotations

import io
import json
import tarfile

import pytest

from .modharness import failed, load, ok


@pytest.fixture(scope="module")
def mod():
    return load("pd_unit_install")


def tarball(files: dict) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


BUNDLE = {"pd_launcher/__init__.py": b"", "pd_launcher/__main__.py": b"print('hi')\n"}


@pytest.fixture
def unit(tmp_path):
    bundle = tmp_path / "pd_launcher.tar.gz"
    bundle.write_bytes(tarball(BUNDLE))
    base = tmp_path / "base"
    spec = {"node": "n1", "role": "P", "api_key": "s3cret",
            "dirs": {k: str(base / k / "P") for k in ("run", "state", "log")}}
    args = {"spec_json": json.dumps(spec), "bundle": str(bundle), "lib_dir": str(base / "lib")}
    return base, spec, args


def test_first_install_then_converged(mod, unit):
    base, spec, args = unit
    r = ok(mod, args)
    assert r["changed"] and r["lib_changed"] and r["spec_changed"]
    assert r["created"] == [str(base / "lib")] + [spec["dirs"][k] for k in ("run", "state", "log")]
    spec_file = base / "run" / "P" / "spec.json"
    assert r["spec_path"] == str(spec_file)
    assert json.loads(spec_file.read_text()) == spec
    assert spec_file.stat().st_mode & 0o777 == 0o600  # it may carry API keys
    assert (base / "lib" / "pd_launcher" / "__main__.py").read_bytes() == b"print('hi')\n"
    assert len((base / "lib" / ".bundle.sha256").read_text().strip()) == 64
    again = ok(mod, args)
    assert not again["changed"] and not again["lib_changed"] and not again["spec_changed"]
    assert again["created"] == []
    assert not [p for p in base.rglob(".*.tmp")]  # no temp files left by atomic writes


def test_only_what_changed_is_rewritten(mod, unit):
    base, spec, args = unit
    ok(mod, args)
    spec["api_key"] = "n3w"
    r = ok(mod, dict(args, spec_json=json.dumps(spec)))
    assert r["changed"] and r["spec_changed"] and not r["lib_changed"]
    assert json.loads((base / "run" / "P" / "spec.json").read_text())["api_key"] == "n3w"
    (base / "lib" / "pd_launcher" / "__main__.py").unlink()  # a damaged lib is re-unpacked
    r = ok(mod, dict(args, spec_json=json.dumps(spec)))
    assert r["lib_changed"] and not r["spec_changed"]
    assert (base / "lib" / "pd_launcher" / "__main__.py").exists()


def test_check_mode_changes_nothing(mod, unit, tmp_path):
    base, _, args = unit
    r = ok(mod, args, check_mode=True)
    assert r["changed"] and r["lib_changed"] and r["spec_changed"]
    assert not base.exists()
    # without the bundle yet (it would be copied by an earlier task in a real run)
    r = ok(mod, dict(args, bundle=str(tmp_path / "missing.tar.gz")), check_mode=True)
    assert r["changed"] and not base.exists()


def test_a_missing_bundle_fails(mod, unit, tmp_path):
    missing = tmp_path / "missing.tar.gz"
    r = failed(mod, dict(unit[2], bundle=str(missing)))
    assert r["msg"] == f"launcher bundle {missing} is missing on the node"


@pytest.mark.parametrize("name", ["../evil.py", "/etc/evil.py", "pd_launcher/../../evil.py"])
def test_a_bundle_escaping_the_lib_dir_is_refused(mod, unit, tmp_path, name):
    base, _, args = unit
    (tmp_path / "pd_launcher.tar.gz").write_bytes(tarball({**BUNDLE, name: b"x"}))
    r = failed(mod, args)
    assert r["msg"].startswith("refusing a bundle with") and name in r["msg"]
    assert not (tmp_path / "evil.py").exists() and not (base / "evil.py").exists()


def test_a_bundle_with_a_link_is_refused(mod, unit, tmp_path):
    _, _, args = unit
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("pd_launcher/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    (tmp_path / "pd_launcher.tar.gz").write_bytes(raw.getvalue())
    assert failed(mod, args)["msg"].startswith("refusing a bundle with 'pd_launcher/link'")


def test_a_corrupt_bundle_fails_with_a_message(mod, unit, tmp_path):
    _, _, args = unit
    (tmp_path / "pd_launcher.tar.gz").write_bytes(b"not a tarball")
    assert failed(mod, args)["msg"].startswith("cannot unpack the launcher bundle into ")


@pytest.mark.parametrize("spec_json", ["{", "[]", json.dumps({"dirs": {"run": "/x"}})])
def test_a_bad_spec_fails_without_echoing_it(mod, unit, spec_json):
    r = failed(mod, dict(unit[2], spec_json=spec_json))
    assert r["msg"].startswith("spec_json is not a node spec with dirs.run, dirs.state and "
                               "dirs.log")
