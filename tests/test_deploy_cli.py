"""`python -m r2ray.deploy serve-config`: a config a user can fix is one error line and exit 2."""

from __future__ import annotations

import pytest

from conftest import REPO
from r2ray import deploy


@pytest.mark.parametrize("case", ["missing", "folder", "malformed"])
def test_serve_config_that_cannot_be_read_is_a_user_error(tmp_path, capsys, case):
    path = {"missing": tmp_path / "nope.yaml", "folder": tmp_path,
            "malformed": tmp_path / "bad.yaml"}[case]
    (tmp_path / "bad.yaml").write_text("applications: [\n")
    assert deploy.main(["serve-config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r2ray.deploy: error:") and str(path) in err
    assert "Traceback" not in err


def test_set_value_that_is_not_yaml_names_the_setting(capsys):
    assert deploy.main(["serve-config", "--config", str(REPO / deploy.SERVE_CONFIG),
                        "--set", "applications.r2ray.args.manifest=[s3://b/"]) == 2
    err = capsys.readouterr().err
    assert "--set 'applications.r2ray.args.manifest=[s3://b/' is not valid YAML" in err


@pytest.mark.parametrize("overrides", ["- applications.r2ray.args.manifest: s3://b/\n",
                                       "1: s3://b/\n", "s3://b/\n"])
def test_serve_overrides_that_are_not_a_mapping_of_paths_are_a_user_error(tmp_path, capsys,
                                                                          overrides):
    """With the repository's own Serve config and RayService beside them, so the overrides
    reach the render (where a list or a number key raised AttributeError with a traceback),
    not an error about a missing file."""
    for path in (deploy.SERVE_CONFIG, deploy.RAYSERVICE):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text((REPO / path).read_text())
    (tmp_path / deploy.SERVE_OVERRIDES).write_text(overrides)
    assert deploy.main(["render", "--check", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("r2ray.deploy: error:") and str(deploy.SERVE_OVERRIDES) in err
    assert "Traceback" not in err
