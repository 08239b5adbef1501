"""The soak benchmark's verdict logic (the 10-minute run itself is not part of CI)."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtests.soak import REPLICA_TITLE, Sample, judge, read_locust_totals, rss_growth

MIB = 1024 * 1024
TOTALS = {"requests": 100, "failures": 0, "rps": 3.0, "p50_ms": 50.0, "p95_ms": 90.0, "p99_ms": 120.0}


def samples(
    totals_mib: list[int], pids: list[tuple[int, ...]] | None = None, every_s: float = 10
) -> list[Sample]:
    pids = pids or [(1, 2)] * len(totals_mib)
    return [
        Sample(i * every_s, {pid: total * MIB // len(ps) for pid in ps}, {pid: f"app/d{pid}" for pid in ps})
        for i, (total, ps) in enumerate(zip(totals_mib, pids))
    ]


def test_growth_is_measured_after_the_warmup() -> None:
    run = samples([500, 900, 1000, 1000, 1000, 1040, 1050, 1060])  # the warm-up climb does not count
    start, end, growth = rss_growth(run, warmup_s=20)
    assert start == pytest.approx(1000 * MIB) and end == pytest.approx(1050 * MIB)
    assert growth == pytest.approx(0.05)
    assert judge(run, TOTALS, 20, 0.10).passed


@pytest.mark.parametrize(
    "run,totals,reason",
    [
        (samples([1000, 1000, 1000, 1150, 1150, 1150]), TOTALS, "memory grew 15%"),
        (samples([1000] * 6), {**TOTALS, "failures": 1}, "one request failed"),
        (samples([1000] * 6), {**TOTALS, "requests": 0}, "no load at all"),
        (samples([1000] * 6, [(1, 2)] * 3 + [(1, 3)] * 3), TOTALS, "a replica process was replaced"),
    ],
    ids=["growth", "failure", "no-requests", "replaced"],
)
def test_soak_fails_for(run: list[Sample], totals: dict[str, float], reason: str) -> None:
    assert not judge(run, totals, 0, 0.10).passed, reason


def test_too_few_samples_is_an_error_not_a_pass() -> None:
    with pytest.raises(ValueError, match="samples"):
        rss_growth(samples([1000, 1000, 1000]), warmup_s=0)


def test_locust_totals_come_from_the_aggregated_row(tmp_path: Path) -> None:
    csv_file = tmp_path / "locust_stats.csv"
    header = "Type,Name,Request Count,Failure Count,Requests/s,50%,95%,99%"
    csv_file.write_text(f"{header}\nPOST,/classify,10,0,1.0,40,80,90\n,Aggregated,25,2,2.5,45,85,95\n")
    assert read_locust_totals(csv_file) == {
        "requests": 25,
        "failures": 2,
        "rps": 2.5,
        "p50_ms": 45.0,
        "p95_ms": 85.0,
        "p99_ms": 95.0,
    }


def test_replica_titles_ignore_the_running_method() -> None:
    assert (
        REPLICA_TITLE.match("ray::ServeReplica:cvserve:classifier.handle_request_with_rejection")[2]
        == "classifier"
    )
    assert REPLICA_TITLE.match("ray::ServeReplica:cvserve:Gateway").groups() == ("cvserve", "Gateway")
    assert REPLICA_TITLE.match("ray::ServeController") is None
