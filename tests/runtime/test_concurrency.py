"""Concurrent calls on one hooked model (issue 17.2).

A prefill's state lives in the calling thread and on the KV cache it fills, so threads that share one hooked model,
each with its own cache, must each get exactly what they get alone. Four threads run several generations at once
(different videos and prompts, batches with padding, prompts without video that run unpruned, forwards without a
cache), interleaved as much as CPython allows (a tiny switch interval), and every result must equal the same
request run alone, bit for bit.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from hieravid.plan import compile_plan
from hieravid.runtime import apply

ROOT = Path(__file__).resolve().parents[2]
HIERAVID_30 = ROOT / "policies" / "hieravid-30.yaml"
THREADS = 4
NEW_TOKENS = 4


def _jobs(case: Any, thread: int) -> list[tuple[str, Callable[[], Any]]]:
    """The requests one thread makes, in order: each returns tensors to compare."""
    model = case.model
    seed = 100 + 10 * thread
    frames = (8, 6) if case.is_qwen else None

    def generate(inputs: dict[str, Any]) -> Callable[[], Any]:
        def run() -> Any:
            out = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
            )
            return out.sequences, torch.stack(out.logits)

        return run

    def forward(inputs: dict[str, Any]) -> Callable[[], Any]:
        return lambda: model(**inputs, use_cache=False).logits

    jobs = [
        ("pruned video", generate(case.inputs(seed=seed))),
        ("no video (unpruned)", generate(case.inputs(seed=seed + 1, video=False))),
        ("padded batch", generate(case.inputs(batch=2, pads=(3 + thread, 0), frames=frames, seed=seed + 2))),
        ("forward without cache", forward(case.inputs(seed=seed + 3))),
    ]
    # Each thread starts with a different kind of request, so that every kind overlaps every other.
    return jobs[thread % len(jobs) :] + jobs[: thread % len(jobs)]


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b)


@pytest.mark.filterwarnings("ignore:hieravid. this prompt holds no video tokens")
def test_threads_sharing_one_hooked_model_each_get_what_they_get_alone(tiny_sdpa):
    case = tiny_sdpa
    plan = compile_plan(HIERAVID_30, case.spec())
    with apply(case.model, plan) as handle, torch.no_grad():
        jobs = [_jobs(case, thread) for thread in range(THREADS)]
        alone = [[run() for _, run in thread_jobs] for thread_jobs in jobs]
        assert handle.last_request is not None

        barrier = threading.Barrier(THREADS)
        results: list[list[Any]] = [[] for _ in range(THREADS)]
        errors: list[BaseException] = []

        def worker(thread: int) -> None:
            try:
                with torch.no_grad():
                    barrier.wait()
                    for _, run in jobs[thread]:
                        results[thread].append(run())
            except BaseException as error:  # reported below, with the thread's name
                errors.append(error)
                barrier.abort()

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)  # switch threads as often as CPython allows
        try:
            workers = [threading.Thread(target=worker, args=(t,), name=f"hieravid-{t}") for t in range(THREADS)]
            for thread in workers:
                thread.start()
            for thread in workers:
                thread.join(timeout=600)
        finally:
            sys.setswitchinterval(interval)
        assert not any(thread.is_alive() for thread in workers), "a thread hung"
        if errors:
            raise errors[0]
    for thread in range(THREADS):
        for (name, _), got, want in zip(jobs[thread], results[thread], alone[thread], strict=True):
            assert _equal(got, want), f"thread {thread}: {name} differs from the same request run alone"
