"""Configuration: the example file loads, every bad key or value is named, env overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import ConfigError, load_settings


def test_defaults_and_example_file_load() -> None:
    s = load_settings(Path(__file__).parent.parent / "dicomnode.example.yaml")
    assert s.node.ae_title == "DICOMNODE" and s.assemble.level == "study"
    assert s.database_url.startswith("sqlite:///")


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node:\n  prot: 104\nassemble:\n  level: patient\n")
    with pytest.raises(ConfigError) as e:
        load_settings(f)
    msg = str(e.value)
    assert "node.prot: unknown key (did you mean 'port'?)" in msg
    assert "assemble.level" in msg and "'study' or 'series'" in msg


@pytest.mark.parametrize("text,key", [
    ("node: {ae_title: 'WAY_TOO_LONG_AE_TITLE'}", "node.ae_title"),
    ("node: {port: 70000}", "node.port"),
    ("access: {allowed_calling_aets: ['A\\\\B']}", "access.allowed_calling_aets"),
    ("storage: {duplicate_policy: overwrite}", "storage.duplicate_policy"),
    ("[1, 2]", "top level"),
    ("node: {port: [}", "not valid YAML"),
])
def test_each_bad_value_is_reported(tmp_path: Path, text: str, key: str) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_settings(f)


def test_env_overrides_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("node: {port: 104, ae_title: FROMFILE}\n")
    monkeypatch.setenv("DICOMNODE_NODE__PORT", "11113")
    monkeypatch.setenv("DICOMNODE_ACCESS__ALLOWED_CALLING_AETS", '["CT1", "MR1"]')
    s = load_settings(f)
    assert s.node.port == 11113 and s.node.ae_title == "FROMFILE"
    assert s.access.allowed_calling_aets == ["CT1", "MR1"]
