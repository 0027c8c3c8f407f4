"""Batch jobs through RQ: a real RQ worker runs the job, the echo worker answers it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from rq import Queue, SimpleWorker

from services.gateway.jobs import run_requests
from shared.keys import Keys
from shared.queue import WorkerQueue
from shared.schemas import GenerationRequest, SamplingParams
from tests.gateway.conftest import RunningGateway
from tests.gateway.echo_worker import EchoWorker


@pytest.fixture
def rq_queue(redis_client: redis.Redis, keys: Keys) -> Iterator[Queue]:
    queue = Queue(keys.rq_queue, connection=redis_client)
    yield queue
    for registry in (queue.finished_job_registry, queue.failed_job_registry):
        for job_id in registry.get_job_ids():
            registry.remove(job_id, delete_job=True)
    queue.delete(delete_jobs=True)


def _work(queue: Queue) -> None:
    """Run every queued job in this thread (RQ's timeouts need the main thread)."""
    SimpleWorker([queue], connection=queue.connection).work(burst=True, logging_level="WARNING")


def test_a_job_runs_its_requests_and_reports_openai_results(
    gateway: RunningGateway, rq_queue: Queue
) -> None:
    body = {
        "requests": [
            {"prompt": "abc", "max_tokens": 2},
            {"prompt": ["xy", "z"], "max_tokens": 5, "model": "whatever"},
            {"prompt": "please FAIL"},
        ]
    }
    created = gateway.http.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["status"] == "queued"

    queued = gateway.http.get(f"/v1/jobs/{job_id}").json()
    assert (queued["status"], queued["progress"], queued["results"]) == (
        "queued",
        {"done": 0, "total": 4},
        None,
    )
    _work(rq_queue)
    done = gateway.http.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "finished"
    assert done["progress"] == {"done": 4, "total": 4}
    first, second, failed = done["results"]
    assert first["object"] == "text_completion" and first["model"] == "synthetic:tiny"
    assert [c["text"] for c in first["choices"]] == ["cb"]
    assert first["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}
    assert [(c["index"], c["text"]) for c in second["choices"]] == [(0, "yx"), (1, "z")]
    # One failed request does not fail the job: its choice says so.
    assert failed["choices"][0]["finish_reason"] == "error"


def test_a_single_completion_body_is_a_job_of_one(gateway: RunningGateway, rq_queue: Queue) -> None:
    job_id = gateway.http.post("/v1/jobs", json={"prompt": "hello", "n": 2}).json()["id"]
    _work(rq_queue)
    job = gateway.http.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "finished"
    assert [c["text"] for c in job["results"][0]["choices"]] == ["olleh", "olleh"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"requests": []}, "requests"),
        ({"requests": [{"prompt": "a", "stream": True}]}, "requests[0]: stream is not supported"),
        ({"requests": [{"prompt": "a"}, {"prompt": ""}]}, "requests[1]: prompt must not be empty"),
        ({"requests": [{"prompt": "a"}] * 1001}, "at most 1000 requests"),
    ],
)
def test_bad_job_bodies_get_400(gateway: RunningGateway, body: dict, message: str) -> None:
    response = gateway.http.post("/v1/jobs", json=body)
    assert response.status_code == 400
    assert message in response.json()["error"]["message"]


def test_an_unknown_job_is_404(gateway: RunningGateway) -> None:
    response = gateway.http.get("/v1/jobs/job-nope")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"


def test_run_requests_keeps_a_window_and_reports_progress(
    redis_client: redis.Redis, keys: Keys, echo: EchoWorker
) -> None:
    queue = WorkerQueue(redis_client, keys, "rq-jobs")
    requests = [
        GenerationRequest(
            id=f"j{i}",
            prompt=f"p{i}",
            prompt_token_ids=[0, 1, 2],
            params=SamplingParams(max_tokens=4),
        )
        for i in range(5)
    ]
    reports: list[int] = []
    results = run_requests(queue, requests, timeout_s=5, window=2, report=reports.append)
    assert [r.request_id for r in results] == [f"j{i}" for i in range(5)]
    assert [r.text for r in results] == [f"{i}p" for i in range(5)]
    assert reports == [1, 2, 3, 4, 5]


def test_an_unanswered_request_becomes_an_error_result(
    redis_client: redis.Redis, keys: Keys
) -> None:
    queue = WorkerQueue(redis_client, keys, "rq-jobs")
    request = GenerationRequest(id="lonely", prompt="p", prompt_token_ids=[0, 1])
    [result] = run_requests(queue, [request], timeout_s=0.2, window=4, report=lambda _: None)
    assert (result.finish_reason, result.error) == ("error", "no answer within 0.2s")


def test_a_job_id_rq_could_never_make_is_404_not_500(gateway: RunningGateway) -> None:
    response = gateway.http.get("/v1/jobs/a.b%20c")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "job_not_found"
