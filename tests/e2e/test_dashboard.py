"""The chart's Grafana dashboard against a real gateway and its embedded Triton: every metric a
panel (or a template variable) queries is one of theirs, with the labels the panel groups by.

A renamed metric would leave a panel empty without any error in Grafana; this catches it. The names
come out of the PromQL with a regex; a name with a histogram or counter suffix (_bucket, _sum,
_count, _total) must be a sample the scrape has, or a declared family of the matching type.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from skimage import data as skdata

from bgremove.v1 import bgremove_pb2 as pb
from bgremove.v1 import bgremove_pb2_grpc as pb_grpc
from e2e_helpers import jpeg_bytes, stream_remove
from service_harness import GatewayProcess, free_port

DASHBOARD = Path(__file__).resolve().parents[2] / "helm" / "bgremove" / "dashboards" / "bgremove.json"
# Labels Prometheus adds to every target (ServiceMonitor/PodMonitor), not the applications.
TARGET_LABELS = {"namespace", "pod"}
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
}
SUFFIX_TYPES = {
    "_total": {"counter"},
    "_bucket": {"histogram"},
    "_sum": {"histogram", "summary"},
    "_count": {"histogram", "summary"},
}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads: identifiers outside label matchers, ranges and
    grouping clauses that are not followed by "(" (functions, aggregations) or a keyword."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", text):
        if text[match.end() :].lstrip().startswith("(") or match.group() in PROMQL_KEYWORDS:
            continue
        names.add(match.group())
    return names


def grouping_labels(expr: str, legend: str) -> set[str]:
    """Labels a panel needs on its series: those grouped by, and those its legend shows."""
    labels = {
        label.strip()
        for clause in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr)
        for label in clause.split(",")
        if label.strip()
    }
    return labels | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        "histogram_quantile(0.95, sum by (le, step) (rate(bgremove_step_duration_seconds_bucket"
        '{namespace=~"$ns"}[$__rate_interval]))) / on (pod) group_left up_metric * 1e6'
        " + sum without (x) (other_total offset 5m)"
    )
    assert metric_names(expr) == {"bgremove_step_duration_seconds_bucket", "up_metric", "other_total"}
    assert grouping_labels(expr, "{{step}} {{ code }}") == {"le", "step", "x", "code"}


@dataclass
class Scraped:
    """Sample names as the exposition text has them (what Prometheus stores) and declared types."""

    types: dict[str, str]  # family name (# TYPE line) -> counter, gauge, histogram, ...
    samples: dict[str, set[str]]  # sample name -> the labels its series carry

    def add(self, text: str) -> None:
        for line in text.splitlines():
            if declared := re.fullmatch(r"# TYPE (\S+) (\S+)", line):
                self.types[declared[1]] = declared[2]
            elif line and not line.startswith("#"):
                sample = re.match(r"([A-Za-z_:][\w:]*)(\{.*\})?\s", line)
                assert sample, line
                labels = set(re.findall(r'(\w+)="', sample[2] or ""))
                self.samples.setdefault(sample[1], set()).update(labels)

    def resolve(self, name: str) -> str:
        """The type of the metric `name` reads; AssertionError when nobody serves it."""
        for suffix, types in SUFFIX_TYPES.items():
            base = name.removesuffix(suffix)
            if base != name and base in self.types:
                # Declared, maybe without series yet (a labelled counter nothing has counted).
                assert self.types[base] in types, (
                    f"{name}: {base} is a {self.types[base]}, not {'/'.join(types)}"
                )
                return self.types[base]
        if name in self.types:
            return self.types[name]
        raise AssertionError(f"{name} is served by neither the gateway nor Triton")


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as reply:
        text: str = reply.read().decode()
        return text


def wait_every_worker_ready(target: str, timeout_s: float = 60.0) -> None:
    """Until 8 fresh connections in a row (the kernel spreads them over the workers) find the model
    ready: each worker notices Triton on its own probe, up to a second after the first one."""
    deadline = time.monotonic() + timeout_s
    ready = 0
    while ready < 8:
        assert time.monotonic() < deadline, "a worker never saw Triton ready"
        with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
            info = pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(
                pb.GetServiceInfoRequest(), timeout=30
            )
        ready = ready + 1 if all(m.ready for m in info.models) else 0
        if not ready:
            time.sleep(0.2)


def scrape_gateway(workers: int) -> Scraped:
    """Both scrapes of a gateway with `workers` processes and its own embedded Triton, after a few
    real calls."""
    metrics, triton_metrics = free_port(), free_port()
    gw = GatewayProcess(
        args=[
            "--metrics-listen",
            f"127.0.0.1:{metrics}",
            "--triton-metrics-port",
            str(triton_metrics),
            "--workers",
            str(workers),
        ]
    )
    found = Scraped({}, {})
    with gw.serving():
        wait_every_worker_ready(gw.target)
        image = jpeg_bytes(skdata.chelsea())
        for output in (pb.OUTPUT_FORMAT_PNG, pb.OUTPUT_FORMAT_WEBP):
            header, data, _ = stream_remove(gw.target, image, options=pb.Options(format=output))
            assert data and header.model
        with grpc.insecure_channel(gw.target) as channel:
            pb_grpc.BackgroundRemovalStub(channel).GetServiceInfo(pb.GetServiceInfoRequest(), timeout=30)
        found.add(scrape(f"http://127.0.0.1:{metrics}/metrics"))
        found.add(scrape(f"http://127.0.0.1:{triton_metrics}/metrics"))
    return found


@pytest.fixture(scope="module")
def scraped(prepared_repo: Path) -> Scraped:
    """One gateway process: every metric is declared, with series or not."""
    return scrape_gateway(1)


@pytest.fixture(scope="module")
def scraped_workers(prepared_repo: Path) -> Scraped:
    """Two processes (the chart sets --workers from the CPU request), whose metrics the parent serves
    as totals; a metric with no series yet is not declared there."""
    return scrape_gateway(2)


def _targets() -> list[tuple[str, str, str]]:
    """(panel title, expression, legend) of every query, template variables included."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = [
        (panel["title"], target["expr"], target.get("legendFormat", ""))
        for top in dashboard["panels"]
        for panel in [top, *top.get("panels", [])]
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query["query"])
            assert match, query
            metric, label = match.groups()
            found.append((f"${variable['name']}", metric, f"{{{{{label}}}}}"))
    return found


def test_dashboard_queries_what_the_gateway_and_triton_serve(scraped: Scraped) -> None:
    targets = _targets()
    assert len(targets) >= 20
    queried: set[str] = set()
    for title, expr, legend in targets:
        names = metric_names(expr)
        assert names, f"{title}: no metric in {expr}"
        queried |= names
        for name in names:
            scraped.resolve(name)
        # The labels the panel groups by must be on the series it reads (where there are series).
        carried = set().union(*(scraped.samples.get(name, set()) for name in names))
        if all(name in scraped.samples for name in names):
            missing = grouping_labels(expr, legend) - carried - TARGET_LABELS
            assert not missing, f"{title}: {sorted(missing)} not on {sorted(names)}"
    # The topics the dashboard exists for, from both sides.
    assert {n for n in queried if n.startswith("nv_inference_")} >= {
        "nv_inference_queue_duration_us",
        "nv_inference_count",
        "nv_inference_exec_count",
    }
    assert {"bgremove_calls_total", "bgremove_step_duration_seconds_bucket"} <= queried
    assert {"bgremove_admission_refusals_total", "bgremove_access_refusals_total"} <= queried
    assert "bgremove_triton_replica_ready" in queried


def test_the_check_fails_for_a_metric_nobody_serves(scraped: Scraped) -> None:
    with pytest.raises(AssertionError, match="bgremove_calls_count"):
        scraped.resolve("bgremove_calls_count")  # a counter has no _count
    with pytest.raises(AssertionError, match="nv_inference_queue_time_us"):
        scraped.resolve("nv_inference_queue_time_us")
    assert scraped.resolve("bgremove_step_duration_seconds_bucket") == "histogram"
    assert scraped.resolve("bgremove_triton_retries_total") == "counter"  # declared, no series yet


def test_dashboard_reads_the_same_series_from_several_processes(
    scraped: Scraped, scraped_workers: Scraped
) -> None:
    """Whatever a panel finds with one gateway process, it finds with two."""
    for title, expr, _ in _targets():
        for name in metric_names(expr):
            if name in scraped.samples:
                assert name in scraped_workers.samples, f"{title}: {name} missing with --workers 2"
                lost = scraped.samples[name] - scraped_workers.samples[name]
                assert not lost, f"{title}: {name} lost labels {sorted(lost)} with --workers 2"
