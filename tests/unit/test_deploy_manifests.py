"""The systemd unit and the Kubernetes manifests in ``deploy/``, checked by their own tools.

``systemd-analyze verify`` parses the unit as systemd would (skipped where systemd's tools are not
installed); the manifests are validated against the Kubernetes JSON schemas shipped with
``kubernetes-validate`` (a dev dependency), strictly: an unknown field is an error.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from dicom_ai.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "dicom-ai.service"
K8S = DEPLOY / "k8s"
#: The oldest Kubernetes release still maintained when the manifests were written.
K8S_VERSION = "1.32"


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """Every resource the kustomization applies, with the file it comes from."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [(name, doc) for name in kustomization["resources"]
            for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that the programs of ExecStart/ExecStartPre exist: the unit as shipped, with
    # the documented install path (/opt/dicom-ai/venv) pointing at this interpreter's venv.
    venv = Path(sys.executable).parent.parent
    assert (venv / "bin/dicom-ai").exists(), f"{venv}: the project is not installed in this venv"
    text = UNIT.read_text()
    assert "/opt/dicom-ai/venv/bin/dicom-ai" in text
    unit = tmp_path / UNIT.name
    unit.write_text(text.replace("/opt/dicom-ai/venv/", f"{venv}/"))
    done = subprocess.run(["systemd-analyze", "verify", str(unit)],
                          capture_output=True, text=True, timeout=60, check=False)
    # Without systemd as PID 1 verify also says it cannot reach the bus; only lines naming the
    # unit are findings about it.
    findings = [line for line in (done.stdout + done.stderr).splitlines() if UNIT.name in line]
    assert findings == [], findings


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_exposure_score_stays_low() -> None:
    done = subprocess.run(["systemd-analyze", "security", "--offline=true", str(UNIT)],
                          capture_output=True, text=True, timeout=60, check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", done.stdout)
    assert match, done.stdout + done.stderr
    # docs/operations.md quotes the score; 10 is unhardened, below 2 is systemd's "OK".
    assert float(match.group(1)) <= 1.5, done.stdout


@pytest.mark.parametrize(("name", "doc"), manifests(),
                         ids=[f"{n}:{d['kind']}" for n, d in manifests()])
def test_manifest_is_valid_against_the_kubernetes_schema(name: str, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_validator_rejects_a_broken_deployment() -> None:
    deployment = next(d for _, d in manifests() if d["kind"] == "Deployment")
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_deployment_requests_a_gpu_and_mounts_spool_and_config() -> None:
    docs = {d["kind"]: d for _, d in manifests()}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    spool = volumes[mounts["/var/lib/dicom-ai"]]["persistentVolumeClaim"]["claimName"]
    assert spool == docs["PersistentVolumeClaim"]["metadata"]["name"]
    config = volumes[mounts["/etc/dicom-ai"]]["configMap"]["name"]
    assert config == docs["ConfigMap"]["metadata"]["name"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container
    port = docs["Service"]["spec"]["ports"][0]
    assert port["port"] == 11112 and port["targetPort"] == container["ports"][0]["name"]


def test_configmap_settings_load(tmp_path: Path) -> None:
    configmap = next(d for _, d in manifests() if d["kind"] == "ConfigMap")
    path = tmp_path / "dicom-ai.toml"
    path.write_text(configmap["data"]["dicom-ai.toml"])
    settings = load_settings(path, env={})
    assert settings.scp.port == 11112
    assert str(settings.storage.directory) == "/var/lib/dicom-ai"
