"""Which Ray dashboard belongs to a search: ``--review`` prints the search's only if it is that cluster.

A port is not an identity: once a search's Ray has stopped, another cluster on the machine may answer on the
same port (8265 by default). So the search records its cluster's session name and GCS address when it starts
(``ray_cluster.json``, see tuning/session.py), and ``--review`` asks the dashboard that answers there for its
session name (``/api/version``). That endpoint needs the cluster's token when token authentication is on
(Ray 2.60 turns it on by default for a local Ray); the token is read where Ray's own tools read it
(``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` names, ``~/.ray/auth_token``), sent only to the recorded
address, and never printed. Pure Python: no Ray is started or joined here.
"""
from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmtard_ray.tuning.settings import CLUSTER_FILE

DEFAULT_RAY_DASHBOARD = "http://127.0.0.1:8265"
SAME, OTHER, UNVERIFIED, ENDED = "same", "other", "unverified", "ended"


@dataclass
class RayDashboard:
    """What answers for a folder. ``status``: SAME (the search's cluster, verified), OTHER (another cluster
    listens where the search's was), UNVERIFIED (a dashboard answers, its identity cannot be checked),
    ENDED (the search's recorded dashboard no longer answers; ``url`` is None)."""
    url: str | None
    mode: str
    status: str
    session: str | None = None      # the session the search recorded
    found: str | None = None        # the session the dashboard reported


def recorded(folder: Path) -> dict[str, Any]:
    """What the search wrote into ``ray_cluster.json`` (empty when it wrote nothing readable)."""
    try:
        record = json.loads((folder / CLUSTER_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def candidates(folder: Path) -> list[str]:
    """Where a Ray dashboard may answer, most specific first."""
    url = recorded(folder).get("dashboard_url")
    out = [url] if isinstance(url, str) and url else []
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):   # `ray job submit` style: the dashboard itself
        out.append(env.rstrip("/"))
    out.append(DEFAULT_RAY_DASHBOARD)
    return list(dict.fromkeys(out))


def find_token() -> str | None:
    """The Ray token, where Ray's own tools look for it (never printed)."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path:
            try:
                token = Path(path).read_text().strip()
            except OSError:
                continue
            if token:
                return token
    return None


def _get(url: str, token: str | None = None) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(request, timeout=2.0) as resp:
        return json.loads(resp.read().decode())


def auth_mode(url: str) -> str | None:
    """The dashboard's authentication mode (a public endpoint), or None when nothing answers there."""
    try:
        return str(_get(f"{url}/api/authentication_mode").get("authentication_mode", "unknown"))
    except (OSError, ValueError, AttributeError):
        return None


def session_of(url: str, mode: str) -> str | None:
    """The session name the dashboard at ``url`` reports, or None when it cannot be read (no token, refused)."""
    token = find_token() if mode == "token" else None
    if mode == "token" and token is None:
        return None
    try:
        name = _get(f"{url}/api/version", token).get("session_name")
    except (OSError, ValueError, AttributeError):  # urllib's HTTPError (401/403) is an OSError
        return None
    return name if isinstance(name, str) and name else None


def locate(folder: Path, urls: Sequence[str]) -> RayDashboard | None:
    """The search's dashboard, checked against the session it recorded; without a record (a run folder, or
    an experiment from before records held the session), the first that answers, unverified."""
    record = recorded(folder)
    session, url = record.get("session_name"), record.get("dashboard_url")
    if isinstance(session, str) and session and isinstance(url, str) and url:
        mode = auth_mode(url)
        if mode is None:
            return RayDashboard(None, "", ENDED, session)
        found = session_of(url, mode)
        status = UNVERIFIED if found is None else SAME if found == session else OTHER
        return RayDashboard(url, mode, status, session, found)
    for candidate in urls:
        mode = auth_mode(candidate)
        if mode is not None:
            return RayDashboard(candidate, mode, UNVERIFIED)
    return None
