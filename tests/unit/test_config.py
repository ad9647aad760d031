"""Settings: TOML file, DICOM_AI_* overrides, and every problem reported at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai.config import Settings, SettingsError, load_settings


def test_defaults_are_valid() -> None:
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.scp.bind_address == "127.0.0.1"
    assert settings.studies.quiet_period_s == 30.0


def test_toml_file_and_env_override(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[scp]\nae_title = "AIHOST"\nport = 11113\nallowed_calling_aets = ["PACS"]\n'
        '[[export.destinations]]\nname = "pacs"\nae_title = "ORTHANC"\nport = 4242\n'
    )
    settings = load_settings(path, env={"DICOM_AI_SCP_PORT": "104",
                                        "DICOM_AI_INFERENCE_DEVICE": "cpu",
                                        "DICOM_AI_SCP_TLS_ENABLED": "false"})
    assert settings.scp.ae_title == "AIHOST"
    assert settings.scp.port == 104
    assert settings.scp.allowed_calling_aets == ["PACS"]
    assert settings.inference.device == "cpu"
    assert settings.export.destinations[0].ae_title == "ORTHANC"
    assert settings.export.destinations[0].kind == "dimse"


def test_env_list_is_comma_separated() -> None:
    settings = load_settings(env={"DICOM_AI_SCP_ALLOWED_CALLING_AETS": "PACS, MODALITY"})
    assert settings.scp.allowed_calling_aets == ["PACS", "MODALITY"]


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[scp]\nport = "eleven"\nae_titel = "X"\nae_title = "A\\\\B"\n'
                    '[inference]\ndevice = "tpu"\n[output]\nuid_root = "1.2.x"\n'
                    '[[export.destinations]]\nname = "s"\nkind = "stow"\nurl = "ftp://x"\n')
    with pytest.raises(SettingsError) as info:
        load_settings(path, env={"DICOM_AI_NOPE": "1"})
    text = " | ".join(info.value.problems)
    for expected in ("scp.port: expected an integer", "scp.ae_titel: unknown setting",
                     "scp.ae_title: an AE title", "inference.device", "output.uid_root",
                     "export.destinations[0].url", "DICOM_AI_NOPE: unknown"):
        assert expected in text


@pytest.mark.parametrize("key", ["DICOM_AI_WORKER_JOB_TIMEOUT_S",
                                 "DICOM_AI_LIMITS_ISOLATED_DECODE_TIMEOUT_S"])
@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_time_limits_must_be_positive(key: str, value: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(env={key: value})
    setting = key.removeprefix("DICOM_AI_").lower().replace("_", ".", 1)
    assert info.value.problems == [f"{setting}: must be positive"]


def test_unreadable_and_invalid_toml(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read"):
        load_settings(tmp_path / "missing.toml", env={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[scp\n")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(broken, env={})


def test_tls_needs_files(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="certificate and private_key"):
        load_settings(env={"DICOM_AI_SCP_TLS_ENABLED": "true"})
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(env={"DICOM_AI_SCP_TLS_ENABLED": "true",
                           "DICOM_AI_SCP_TLS_CERTIFICATE": str(tmp_path / "c.pem"),
                           "DICOM_AI_SCP_TLS_PRIVATE_KEY": str(tmp_path / "k.pem")})
