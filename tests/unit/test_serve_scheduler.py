"""The scheduler: batching of compatible requests, isolation of adapters under concurrency, cancellation,
and a failing batch that must not take its neighbours down."""

from __future__ import annotations

import threading
import time

import pytest

from honellm.artifact import Artifact
from honellm.generation.params import SamplingParams
from honellm.models import load_tokenizer
from honellm.serve.errors import APIError
from honellm.serve.registry import Engine, ServedModel, load_models
from honellm.serve.scheduler import Job, Scheduler
from honellm.serve.testing import ScriptedGenerator, make_lora_artifact

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def scripted_models(tiny_model_dir):
    def make(generator: ScriptedGenerator) -> list[ServedModel]:
        engine = Engine("scripted", None, load_tokenizer(tiny_model_dir), generator, generator.max_length)
        artifact = Artifact.zero_shot(str(tiny_model_dir))
        return [ServedModel("m1", "m1", artifact, engine), ServedModel("m2", "m2", artifact, engine)]
    return make


def job(served, prompt: str, params=GREEDY, *, timeout: float = 30.0, n: int = 1) -> Job:
    return Job(served, [prompt] * n, params, deadline=time.monotonic() + timeout)


def wait_until(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


def test_waiting_compatible_requests_become_one_batch(scripted_models):
    gate = threading.Event()
    generator = ScriptedGenerator(gate=gate)
    m1, m2 = scripted_models(generator)
    scheduler = Scheduler(m1.engine, max_batch_size=4, batch_wait=0.0)
    scheduler.start()
    try:
        first = job(m1, "p0")
        scheduler.submit(first)
        wait_until(lambda: len(generator.calls) == 1)  # the worker is busy with p0 (the gate is closed)
        sampled = SamplingParams(max_new_tokens=8, temperature=0.7)
        jobs = [job(m1, "p1"), job(m1, "p2"), job(m2, "q1"), job(m1, "p3", sampled), job(m1, "p4", n=2),
                job(m1, "p5")]
        for j in jobs:
            scheduler.submit(j)
        gate.set()
        for j in [first, *jobs]:
            j.future.result(10)
    finally:
        scheduler.close()
    # Same model and parameters share a call, up to 4 sequences; other models and parameters wait their turn.
    assert generator.calls == [["p0"], ["p1", "p2", "p4", "p4"], ["q1"], ["p3"], ["p5"]]
    assert [c.text for c in jobs[4].future.result()] == ["ok2", "ok3"]  # its rows of the shared batch
    assert [c.text for c in jobs[1].future.result()] == ["ok1"]


def test_seeded_sampling_runs_alone(scripted_models):
    gate = threading.Event()
    generator = ScriptedGenerator(gate=gate)
    m1, _ = scripted_models(generator)
    scheduler = Scheduler(m1.engine, max_batch_size=8, batch_wait=0.0)
    scheduler.start()
    seeded = SamplingParams(max_new_tokens=8, temperature=0.8, seed=3)
    try:
        scheduler.submit(job(m1, "first"))
        wait_until(lambda: len(generator.calls) == 1)
        jobs = [job(m1, "s1", seeded), job(m1, "s2", seeded)]
        for j in jobs:
            scheduler.submit(j)
        gate.set()
        for j in jobs:
            j.future.result(10)
    finally:
        scheduler.close()
    assert generator.calls[1:] == [["s1"], ["s2"]]


def test_an_idle_worker_waits_for_requests_still_being_prepared(scripted_models):
    generator = ScriptedGenerator()
    m1, _ = scripted_models(generator)
    scheduler = Scheduler(m1.engine, max_batch_size=8, batch_wait=1.0)
    scheduler.start()
    jobs = [job(m1, f"p{i}") for i in range(3)]
    all_preparing = threading.Barrier(3)

    def request(i: int) -> None:  # as the app does: prepare (template, token count), then submit
        with scheduler.preparing():
            all_preparing.wait(10)
            time.sleep(0.05 * i)
            scheduler.submit(jobs[i])

    threads = [threading.Thread(target=request, args=(i,)) for i in range(3)]
    try:
        for t in threads:
            t.start()
        for j in jobs:
            j.future.result(10)
    finally:
        scheduler.close()
    assert generator.calls == [["p0", "p1", "p2"]]


def test_a_lone_request_does_not_wait_out_the_window(scripted_models):
    generator = ScriptedGenerator()
    m1, _ = scripted_models(generator)
    scheduler = Scheduler(m1.engine, batch_wait=5.0)
    scheduler.start()
    try:
        start = time.monotonic()
        lone = job(m1, "alone")
        scheduler.submit(lone)
        lone.future.result(10)
        assert time.monotonic() - start < 1.0
    finally:
        scheduler.close()


def test_cancelled_and_expired_jobs_are_dropped_from_the_queue(scripted_models):
    gate = threading.Event()
    generator = ScriptedGenerator(gate=gate)
    m1, m2 = scripted_models(generator)
    scheduler = Scheduler(m1.engine, batch_wait=0.0)
    scheduler.start()
    try:
        scheduler.submit(job(m1, "busy"))
        wait_until(lambda: len(generator.calls) == 1)
        cancelled, expired, kept = job(m2, "cancelled"), job(m2, "expired", timeout=0.01), job(m1, "kept",
                                                                                                SamplingParams(max_new_tokens=2))
        for j in (cancelled, expired, kept):
            scheduler.submit(j)
        cancelled.cancel()
        time.sleep(0.05)
        gate.set()
        kept.future.result(10)
        with pytest.raises(APIError) as err:
            expired.future.result(10)
        assert err.value.status == 504
    finally:
        scheduler.close()
    assert cancelled.future.cancelled()
    assert ["cancelled"] not in generator.calls and ["expired"] not in generator.calls


def test_a_failing_batch_is_retried_one_by_one(scripted_models):
    gate = threading.Event()
    generator = ScriptedGenerator(gate=gate, fail_on="bad")
    m1, _ = scripted_models(generator)
    scheduler = Scheduler(m1.engine, batch_wait=0.0)
    scheduler.start()
    try:
        scheduler.submit(job(m1, "busy"))
        wait_until(lambda: len(generator.calls) == 1)
        good, bad = job(m1, "good"), job(m1, "bad")
        scheduler.submit(good)
        scheduler.submit(bad)
        gate.set()
        assert good.future.result(10)[0].text == "ok0"
        with pytest.raises(APIError) as err:
            bad.future.result(10)
        assert err.value.status == 500
    finally:
        scheduler.close()
    assert generator.calls[1:] == [["good", "bad"], ["good"], ["bad"]]


def test_close_cancels_what_is_queued(scripted_models):
    gate = threading.Event()
    generator = ScriptedGenerator(gate=gate)
    m1, _ = scripted_models(generator)
    scheduler = Scheduler(m1.engine, batch_wait=0.0)
    scheduler.start()
    scheduler.submit(job(m1, "busy"))
    wait_until(lambda: len(generator.calls) == 1)
    queued = job(m1, "queued", SamplingParams(max_new_tokens=3))
    scheduler.submit(queued)
    scheduler.close()
    gate.set()
    assert queued.future.cancelled()
    with pytest.raises(APIError):
        scheduler.submit(job(m1, "late"))


# ------------------------------------------------------------------------------ adapters, on the real tiny model


@pytest.fixture(scope="module")
def lora_models(tiny_model_dir, tmp_path_factory):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("sched-adapters")
    a = make_lora_artifact(tiny_model_dir, root / "a", seed=11, name="a")
    b = make_lora_artifact(tiny_model_dir, root / "b", seed=12, name="b")
    yield load_models([str(a), str(b), f"base={tiny_model_dir}"], dtype="fp32", device="cpu", batch_size=4)
    torch.set_num_threads(before)


def test_concurrent_requests_never_see_another_adapter(lora_models):
    """Interleaved requests for two adapters and the base, submitted from many threads at once, get exactly the
    text each model gives when asked alone."""
    engine = lora_models[0].engine
    prompts = [engine.render([{"role": "user", "content": text}])
               for text in ("Review: dull, lifeless.", "What is 2 + 3?", "Classify: my card was charged twice.")]
    params = SamplingParams(max_new_tokens=10)
    alone = {}
    for served in lora_models:
        for prompt in prompts:
            with engine.use(served.adapter):
                alone[served.name, prompt] = engine.generator.generate([prompt], params)[0].text
    assert len({alone["a", p] for p in prompts} & {alone["b", p] for p in prompts}) == 0

    scheduler = Scheduler(engine, max_batch_size=4, batch_wait=0.01)
    scheduler.start()
    jobs = [job(served, prompt, params) for _ in range(3) for served in lora_models for prompt in prompts]
    threads = [threading.Thread(target=scheduler.submit, args=(j,)) for j in jobs]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        results = [j.future.result(60)[0].text for j in jobs]
    finally:
        scheduler.close()
    for j, text in zip(jobs, results, strict=True):
        assert text == alone[j.served.name, j.prompts[0]], (j.served.name, j.prompts[0])
    assert scheduler.batches < len(jobs)  # some requests were batched together


def test_stream_runs_under_its_adapter(lora_models):
    engine = lora_models[0].engine
    prompt = engine.render([{"role": "user", "content": "Review: a gripping film."}])
    params = SamplingParams(max_new_tokens=10)
    scheduler = Scheduler(engine, batch_wait=0.0)
    scheduler.start()
    try:
        for served in lora_models:
            events: list = []
            streamed = Job(served, [prompt], params, deadline=time.monotonic() + 30, sink=events.append)
            scheduler.submit(streamed)
            streamed.future.result(30)
            assert events[0] == ("start", None) and events[-1][0] == "end"
            text = "".join(v[1] for k, v in events if k == "delta")  # (prompt index, piece)
            assert {v[0] for k, v in events if k == "delta"} == {0}
            with engine.use(served.adapter):
                whole = engine.generator.generate([prompt], params)[0]
            assert text == whole.text
            (final,) = events[-1][1]  # the engine's Completions: exact usage and finish reason for the stream
            assert (final.completion_tokens, final.finish_reason) == (whole.completion_tokens, whole.finish_reason)
    finally:
        scheduler.close()
