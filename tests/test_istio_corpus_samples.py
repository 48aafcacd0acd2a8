"""Istio's own samples (``tests/istio_corpus/istio-samples``, see SOURCES there) load unchanged.

Each file alone, and bookinfo's networking folder the way Istio's docs apply it (the Services,
the Gateway, ``destination-rule-all.yaml``, then one ``virtual-service-*.yaml``), loads with
``load_config``: warnings allowed, errors not, unless the file is in ``EXPECTED_FAILURES`` with
the reason and who fixes it. An entry that starts to load fails the test too, so the dict is
cleared as the fixes land.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config import ConfigError
from proxy.istio import load_config

CORPUS = Path(__file__).resolve().parent / "istio_corpus" / "istio-samples"
BOOKINFO = CORPUS / "bookinfo"
FILES = sorted(str(p.relative_to(CORPUS)) for p in CORPUS.rglob("*.y*ml"))

# file (relative to CORPUS) -> "<helper that fixes it>: <why it fails today>"
EXPECTED_FAILURES: dict[str, str] = {
    "multicluster/expose-istiod-https.yaml": (
        "template: hosts ISTIOD-HOST.DOMAIN and credentialName $CREDENTIAL_NAME are "
        "placeholders the docs replace before applying"
    ),
}


def _load(*paths: Path) -> str | None:
    """None when the files load, else the first error."""
    try:
        load_config([str(p) for p in paths])
    except ConfigError as exc:
        return exc.errors[0]
    return None


def test_the_corpus_is_what_sources_lists() -> None:
    listed = [
        line.split()[0]
        for line in (CORPUS / "SOURCES").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert listed == FILES
    assert "Apache License" in (CORPUS / "LICENSE").read_text()
    assert set(EXPECTED_FAILURES) <= set(FILES)


@pytest.mark.parametrize("name", FILES)
def test_each_sample_file_loads(name: str) -> None:
    error = _load(CORPUS / name)
    expected = EXPECTED_FAILURES.get(name)
    if expected is None:
        assert error is None, error
    else:
        assert error is not None, f"{name} loads now: remove it from EXPECTED_FAILURES"


VIRTUAL_SERVICES = sorted(p.name for p in (BOOKINFO / "networking").glob("virtual-service-*.yaml"))


@pytest.mark.parametrize("name", VIRTUAL_SERVICES)
def test_bookinfo_as_the_docs_apply_it(name: str) -> None:
    """``kubectl apply`` of bookinfo.yaml, bookinfo-gateway.yaml, destination-rule-all.yaml,
    then one virtual-service file (Istio's traffic-management tasks)."""
    networking = BOOKINFO / "networking"
    error = _load(
        BOOKINFO / "platform" / "kube" / "bookinfo.yaml",
        networking / "bookinfo-gateway.yaml",
        networking / "destination-rule-all.yaml",
        networking / name,
    )
    assert error is None, error


def test_the_whole_bookinfo_folder_loads_as_kubectl_apply_would_leave_it() -> None:
    """``kubectl apply -f networking/``: files in name order, and a later object of the same
    name replaces the earlier one (the folder holds alternatives of ``reviews``)."""
    config = load_config(
        [str(BOOKINFO / "platform" / "kube" / "bookinfo.yaml"), str(BOOKINFO / "networking")]
    )
    replaced = [w for w in config.warnings if "replaces VirtualService default/reviews" in w]
    assert replaced, config.warnings
    # The last file defining reviews (by name) is the one kept.
    [reviews] = [vs for vs in config.virtual_services if vs.name == "reviews"]
    assert reviews.source.endswith("virtual-service-reviews-v3.yaml")
