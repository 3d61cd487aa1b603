"""cancel_and_wait: a task's own clean-up is not cut short; a swallowed cancel is repeated."""

from __future__ import annotations

import asyncio
import contextlib

from servetune.cluster.tasks import cancel_and_wait, raise_if_cancelled


def test_a_task_cleaning_up_after_its_cancel_is_not_cancelled_again_within_the_grace() -> None:
    cleaned: list[str] = []

    async def body() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # e.g. recording its trials as cancelled
            cleaned.append("done")
            raise

    async def main() -> bool:
        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        return await cancel_and_wait({task}, timeout_s=5, grace_s=2)

    assert asyncio.run(main()) is True
    assert cleaned == ["done"]


def test_a_swallowed_cancel_is_repeated_after_the_grace_until_the_task_ends() -> None:
    swallowed: list[int] = []

    async def body() -> None:
        while True:  # a loop around a call that swallows the first cancellation
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                if not swallowed:
                    swallowed.append(1)
                    asyncio.current_task().uncancel()  # type: ignore[union-attr]
                    continue
                raise

    async def main() -> tuple[bool, float]:
        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ended = await cancel_and_wait({task}, timeout_s=5, grace_s=0.3)
        return ended, loop.time() - t0

    ended, took_s = asyncio.run(main())
    assert ended and swallowed == [1]
    assert 0.3 <= took_s < 2.0


def test_raise_if_cancelled_re_raises_a_cancel_that_a_call_returned_from() -> None:
    async def body() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as Redis calls may
            await asyncio.sleep(60)
        try:
            raise_if_cancelled()
        except asyncio.CancelledError:
            return "re-raised"
        return "lost"

    async def main() -> str:
        task = asyncio.create_task(body())
        await asyncio.sleep(0)
        task.cancel()
        return await task

    assert asyncio.run(main()) == "re-raised"
