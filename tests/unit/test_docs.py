"""Every setting the code reads is documented."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_variable_is_documented() -> None:
    """Each CHAT_* variable read by a service appears in docs/configuration.md."""
    documented = set(re.findall(r"`(CHAT_[A-Z_]+)`", (ROOT / "docs/configuration.md").read_text()))
    read = set()
    for path in [*ROOT.glob("services/**/*.py"), *ROOT.glob("shared/**/*.py"), *ROOT.glob("devstack/*.py")]:
        read |= set(re.findall(r"\"(CHAT_[A-Z_]*[A-Z])\"", path.read_text()))  # not prefixes ("CHAT_OPENAI_")
    stream_names = {"CHAT_REQUESTS", "CHAT_GENERATED"}  # JetStream names, not settings
    assert read - stream_names - documented == set()


USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Words that only make sense inside the team: what the work started from, and its tickets.
INTERNAL = re.compile(
    r"\bthe seed\b|\bseed's\b|\bproject brief\b|\bbrief\b|\boriginal design\b"
    r"|\b(?:issue|ticket|PR|pull request)s? #?\d+\b|(?<![\w/.-])#\d+\b",
    re.IGNORECASE,
)


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_speak_to_users(path: Path) -> None:
    """README and docs/ use no internal words: no "the seed", "brief", "original design", issue numbers."""
    found = [(n, m.group()) for n, line in enumerate(path.read_text().splitlines(), 1) for m in INTERNAL.finditer(line)]
    assert found == [], f"{path.name}: {found}"


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", path.read_text(), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(path: Path) -> None:
    """Every relative link in README and docs/ names a file that exists, and a heading in it."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name}: {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{path.name}: {target}"


def test_health_under_make_run_is_documented() -> None:
    """README says how to turn on the worker's and buffer's /healthz, /readyz and /metrics under make run."""
    settings = (ROOT / "shared/settings.py").read_text()
    assert '"CHAT_HEALTH_PORT"' in settings and '"CHAT_HEALTH_HOST"' in settings
    assert '"CHAT_WORKERS"' in (ROOT / "devstack/__main__.py").read_text()
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Health and metrics") :]
    section = section[: section.index("\n## ", 1)]
    for needed in ("CHAT_HEALTH_PORT=9100 make run", ":9101", "/metrics", "/readyz"):
        assert needed in section, needed
    assert "README.md#health-and-metrics" in (ROOT / "docs/architecture.md").read_text()


async def test_every_metric_is_documented() -> None:
    """Each service's every Prometheus metric, with its labels, is in docs/architecture.md's table."""
    from services.buffer.metrics import BufferMetrics
    from services.gateway.metrics import GatewayMetrics
    from services.llm_worker.metrics import WorkerMetrics

    page = (ROOT / "docs/architecture.md").read_text()
    documented = set(re.findall(r"^  \| `(chat_[a-z_]+(?:\{[a-z,]+\})?)` \|", page, flags=re.MULTILINE))
    exported = set()
    for metrics in (GatewayMetrics(), WorkerMetrics(), BufferMetrics()):  # the gateway's task gauge needs a loop
        for collector in metrics.registry._collector_to_names:  # noqa: SLF001 - labels of a metric with no samples yet
            metric: Any = collector
            name = metric._name + ("_total" if metric._type == "counter" else "")  # noqa: SLF001
            labels = metric._labelnames  # noqa: SLF001
            exported.add(name + ("{" + ",".join(labels) + "}" if labels else ""))
    assert documented == exported
