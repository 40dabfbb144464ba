"""SessionLock: the per-session FIFO lock that a batch can take for all its sessions at once."""

from __future__ import annotations

import asyncio

import pytest

from mouse_serve.sessions import SessionLock


def test_try_acquire_fails_while_held_and_while_handed_over() -> None:
    async def main() -> None:
        lock = SessionLock()
        assert lock.try_acquire() and lock.locked()
        assert not lock.try_acquire()
        order: list[str] = []

        async def waiter(name: str) -> None:
            async with lock:
                order.append(name)

        tasks = [asyncio.create_task(waiter(n)) for n in ("first", "second")]
        await asyncio.sleep(0)  # both wait now
        lock.release()  # handed to "first", which has not run yet
        assert lock.locked() and not lock.try_acquire()
        await asyncio.gather(*tasks)
        assert order == ["first", "second"]
        assert not lock.locked() and lock.try_acquire()

    asyncio.run(main())


@pytest.mark.parametrize("handed_over", [False, True])
def test_a_cancelled_waiter_never_keeps_the_lock(handed_over: bool) -> None:
    async def main() -> None:
        lock = SessionLock()
        await lock.acquire()
        cancelled = asyncio.create_task(lock.acquire())
        after = asyncio.create_task(lock.acquire())
        await asyncio.sleep(0)
        if handed_over:
            lock.release()  # the lock goes to `cancelled`, which is cancelled before it runs
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        if not handed_over:
            lock.release()
        await asyncio.wait_for(after, 1.0)  # the next waiter gets it either way
        assert lock.locked()
        lock.release()
        assert not lock.locked()

    asyncio.run(main())
