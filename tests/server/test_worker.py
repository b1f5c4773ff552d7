"""ModelWorker without HTTP: prefix reuse changes no answer, cancellation stops at once, the
queue is bounded. The reference is a plain Generation on a fresh cache."""

from __future__ import annotations

import threading
import time

import pytest

from llamactl.generate import Generation
from llamactl.sampling import SamplingParams
from llamactl.server.worker import Failed, Finished, Job, ModelWorker, Piece, QueueFullError, ShuttingDownError
from llamactl.tokenizer import load_tokenizer
from tests._chat_util import random_model, tiny_args

pytestmark = pytest.mark.timeout(60)

GREEDY = SamplingParams(temperature=0.0)


class Collector:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.done = threading.Event()

    def __call__(self, event: object) -> None:
        self.events.append(event)
        if not isinstance(event, Piece):
            self.done.set()

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, Piece))

    def finished(self) -> Finished:
        assert self.done.wait(30)
        last = self.events[-1]
        assert isinstance(last, Finished), last
        return last


@pytest.fixture
def setup(tiny_tokenizer):  # type: ignore[no-untyped-def]
    model = random_model(tiny_args(gqa=True, max_seq_len=128), seed=3)
    tok = load_tokenizer(tiny_tokenizer)
    worker = ModelWorker(model, tok, max_queue=1)
    yield model, tok, worker
    worker.close()


def run(worker: ModelWorker, prompt: list[int], n: int | None, **kw: object) -> tuple[str, Finished]:
    sink = Collector()
    worker.submit(Job(prompt, SamplingParams(temperature=0.0, max_new_tokens=n), emit=sink, **kw))  # type: ignore[arg-type]
    done = sink.finished()
    return sink.text(), done


def test_prefix_reuse_changes_no_answer(setup) -> None:  # type: ignore[no-untyped-def]
    _, tok, worker = setup
    first = tok.encode("Once upon a time there was", bos=True)
    longer = first + tok.encode(" a little robot", bos=False)
    _, done1 = run(worker, first, 10)
    text2, done2 = run(worker, longer, 10)
    assert done1.cached_tokens == 0 and done2.cached_tokens == len(first)
    assert done1.finish_reason == done2.finish_reason == "length" and done2.completion_tokens == 10
    fresh = random_model(tiny_args(gqa=True, max_seq_len=128), seed=3)
    fresh.setup_cache(1, 128)
    ids = list(Generation(fresh, longer, sampling=GREEDY, stop_ids=[tok.eos_id], max_new_tokens=10))
    assert text2 == tok.decode(ids)  # an answer starts a text (chat)...
    again, done3 = run(worker, longer, 10, continuation=True)
    assert (
        again == tok.decode_continuation(ids) and done3
    )  # ...a completion continues the prompt.cached_tokens == len(longer) - 1


def test_cancel_stops_before_the_next_step(setup) -> None:  # type: ignore[no-untyped-def]
    _, tok, worker = setup
    sink = Collector()
    job = Job(tok.encode("The cat", bos=True), SamplingParams(temperature=0.0), emit=sink)

    def cancel_on_first_piece(event: object) -> None:
        job.cancel()
        sink(event)

    job.emit = cancel_on_first_piece
    worker.submit(job)
    done = sink.finished()
    assert done.finish_reason == "cancelled" and done.completion_tokens <= 3  # the context allows ~120


def test_queue_is_bounded_and_closing_refuses(setup) -> None:  # type: ignore[no-untyped-def]
    _, tok, worker = setup
    gate = threading.Event()
    blocker = Collector()

    def hold(event: object) -> None:  # the running job waits here: the worker is busy
        gate.wait(30)
        blocker(event)

    prompt = tok.encode("The dog", bos=True)
    worker.submit(Job(prompt, SamplingParams(temperature=0.0, max_new_tokens=4), emit=hold))
    waiting = Collector()
    worker.submit(Job(prompt, SamplingParams(temperature=0.0, max_new_tokens=4), emit=waiting))  # max_queue=1
    with pytest.raises(QueueFullError, match="queue holds 1"):
        worker.submit(Job(prompt, GREEDY, emit=Collector()))
    assert worker.pending == 2
    gate.set()
    assert blocker.finished().completion_tokens == 4 and waiting.finished().completion_tokens == 4
    deadline = time.monotonic() + 10
    while worker.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.pending == 0
    worker.cancel_all()
    with pytest.raises(ShuttingDownError):
        worker.submit(Job(prompt, GREEDY, emit=Collector()))


def test_a_failing_request_leaves_the_worker_serving(setup) -> None:  # type: ignore[no-untyped-def]
    _, tok, worker = setup
    sink = Collector()
    worker.submit(Job([tok.bos_id] * 500, GREEDY, emit=sink))  # longer than the 128-token cache
    assert sink.done.wait(30) and isinstance(sink.events[-1], Failed)
    _, done = run(worker, tok.encode("Hello", bos=True), 3)
    assert done.finish_reason == "length" and done.completion_tokens == 3
