"""Deterministic output UIDs: replaying a study gives every object the UID it had before.

A UID is a hash of (sorted source SOP Instance UIDs, model name, version and device UID,
object kind, content key) under the organization root. The same study analysed by the same model
always yields the same SR, SC and series UIDs, so a replay, a retry or a restart overwrites rather
than duplicates a result in the PACS; a retrained model (new device UID) or a new version yields
new objects. The content key (:func:`content_key`: a hash of what decides an instance's content —
findings, status, reason, language) makes sure two different contents never share one SOP
Instance UID: a re-analysis that concludes differently (a study that grew, a changed setting)
writes a new instance beside the old one instead of a different object under the same UID.
Series UIDs carry no content key, so every version of a result lands in the same series.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.uid import generate_uid

from dicom_ai import __version__
from dicom_ai.dicom.uid import require_uid
from dicom_ai.inference.findings import ModelInfo, ModelResult

#: Namespace of the name-based UUIDs behind "2.25." UIDs (uuid5 of the project's name).
_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:dicom-ai:output-uid")


def content_key(results: Sequence[ModelResult], *parts: Any) -> str:
    """A short hash of what decides an output's content: the dicom-ai version, the results'
    findings, status and reason (their ``findings.json`` form, without the file names), and
    any further ``parts``
    (JSON-serializable: the language, a picture's caption and marker boxes …).

    The analysis time is deliberately not part of it: a replay of the same study with the same
    model gives the same key, hence the same UIDs.
    """
    documents = []
    for result in results:
        document = result.to_json()
        document.pop("outputs", None)
        documents.append(document)
    # The software version too: the words and the layout of the objects come from this code.
    payload = json.dumps([__version__, documents, list(parts)], sort_keys=True,
                         separators=(",", ":"), default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def derive_uid(source_sop_instance_uids: Iterable[str], model: ModelInfo, kind: str, *,
               root: str = "", content: str = "") -> str:
    """Derive the UID of one output object from what it was made of.

    Parameters
    ----------
    source_sop_instance_uids:
        SOP Instance UIDs of the analysed instances; order and duplicates do not matter.
    model:
        The algorithm; name, version and device UID all enter the hash.
    kind:
        What the UID names, e.g. ``"sr"``, ``"sr-series"``, ``"sc:<source uid>:0"``,
        ``"tracking:<label>:<n>"``; distinct kinds give distinct UIDs.
    root:
        Organization UID root (dot-separated digits, at most 24 characters). Empty uses the
        ``2.25`` arc with a name-based UUID (ISO/IEC 9834-8), as PS3.5 B.2 allows.
    content:
        :func:`content_key` of the object's content, for SOP Instance UIDs; empty for UIDs
        that name no content (series, tracking UIDs).

    Returns
    -------
    str
        A valid UID of at most 64 characters.

    Raises
    ------
    ValueError
        When ``root`` is not a valid UID root.
    """
    identity: list[Any] = [sorted(set(source_sop_instance_uids)), model.name, model.version,
                           model.device_uid, kind]
    if content:
        identity.append(content)
    payload = json.dumps(identity, separators=(",", ":"))
    if not root:
        return f"2.25.{uuid.uuid5(_NAMESPACE, payload).int}"
    require_uid(root, "the organization UID root")
    # pydicom hashes the payload with SHA-512 and keeps as many decimal digits as fit in 64.
    return str(generate_uid(prefix=f"{root}.", entropy_srcs=[payload]))
