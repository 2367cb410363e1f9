"""Where a chat template renders: on the event loop when it is known to be quick and the input is
small (no thread hop before the first token), on the prompt pool otherwise, and always on the pool
once a template has run past the loop's budget."""

from __future__ import annotations

import asyncio
import threading

import pytest

from myllm.errors import Overloaded
from myllm.registry.chat_templates import Deadline
from myllm.runtime.request.prompt import INLINE_CHARS, PreparePool


@pytest.fixture
def pool() -> PreparePool:
    return PreparePool(1, 1, timeout=10)


def _here(deadline: Deadline) -> str:
    return threading.current_thread().name


async def test_a_quick_template_renders_on_the_loop_once_the_pool_has_rendered_it(pool: PreparePool) -> None:
    loop = threading.current_thread().name
    assert await pool.render(_here, "quick", 10) == "prompt-0"  # compiled and timed there first
    assert await pool.render(_here, "quick", 10) == loop
    assert await pool.render(_here, "quick", INLINE_CHARS + 1) == "prompt-0"  # large input: the pool
    assert await pool.render(_here, "other", 10) == "prompt-0"  # each template on its own
    pool.close()


async def test_a_template_past_the_loops_budget_moves_to_the_pool_for_good(pool: PreparePool) -> None:
    loop = threading.current_thread().name
    ran: list[str] = []

    def slow_on_the_loop(deadline: Deadline) -> str:
        ran.append(threading.current_thread().name)
        while ran[-1] == loop:  # until the loop's budget stops it
            deadline.check()
        return ran[-1]

    assert await pool.render(slow_on_the_loop, "slow", 10) == "prompt-0"
    assert await pool.render(slow_on_the_loop, "slow", 10) == "prompt-0"  # tried on the loop, cut off, redone
    assert await pool.render(slow_on_the_loop, "slow", 10) == "prompt-0"
    assert ran == ["prompt-0", loop, "prompt-0", "prompt-0"]
    pool.close()


async def test_a_full_pool_still_refuses(pool: PreparePool) -> None:
    """Rendering on the loop never lets a request past a full pool: it is refused as before."""
    assert await pool.render(_here, "quick", 10) == "prompt-0"
    release = threading.Event()
    # One job on the worker and one waiting: the pool is full.
    tasks = [asyncio.ensure_future(pool.run(lambda deadline: release.wait(10))) for _ in range(2)]
    await asyncio.sleep(0)
    assert pool.full
    with pytest.raises(Overloaded):
        await pool.render(_here, "quick", 10)
    release.set()
    await asyncio.gather(*tasks)
    pool.close()
