"""The relay's shared deadline check: fires armed deadlines once, never disarmed ones, and stops
ticking when nothing is watched."""

import asyncio

from portway.link.deadlines import NEVER, Deadline, DeadlineSweeper, resolution_for


def test_resolution_is_a_quarter_of_the_shortest_timeout_within_bounds():
    assert resolution_for(75, 15, 120) == 1.0
    assert resolution_for(2, 15) == 0.5
    assert resolution_for(0.01) == 0.05


async def _until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, "condition not reached"
        await asyncio.sleep(0.01)


def test_armed_deadline_fires_once_and_disarmed_one_never():
    async def main():
        loop = asyncio.get_running_loop()
        sweeper = DeadlineSweeper(loop, 0.05)
        fired: list[str] = []
        armed, disarmed, rearmed = Deadline(loop), Deadline(loop), Deadline(loop)
        for deadline in (armed, disarmed, rearmed):
            sweeper.watch(deadline)
        armed.arm(0.1, lambda: fired.append("armed"))
        disarmed.arm(0.1, lambda: fired.append("disarmed"))
        disarmed.disarm()
        rearmed.arm(0.1, lambda: fired.append("first action"))
        rearmed.arm(60, lambda: fired.append("second action"))
        started = loop.time()
        await _until(lambda: fired)
        assert loop.time() - started >= 0.1
        await _until(lambda: sweeper._timer is not None and loop.time() - started > 0.4)
        assert fired == ["armed"]
        assert armed.expires_at == NEVER
        sweeper.close()

    asyncio.run(main())


def test_sweeper_stops_ticking_when_nothing_is_watched():
    async def main():
        loop = asyncio.get_running_loop()
        sweeper = DeadlineSweeper(loop, 0.05)
        deadline = Deadline(loop)
        sweeper.watch(deadline)
        sweeper.unwatch(deadline)
        await _until(lambda: sweeper._timer is None)
        sweeper.watch(deadline)
        assert sweeper._timer is not None  # watching again restarts it
        sweeper.close()

    asyncio.run(main())


def test_a_failing_action_is_reported_and_the_others_still_fire_then_and_later():
    async def main():
        loop = asyncio.get_running_loop()
        reported: list[str] = []
        loop.set_exception_handler(lambda loop, context: reported.append(context["message"]))
        sweeper = DeadlineSweeper(loop, 0.05)
        fired: list[str] = []

        def fail() -> None:
            raise RuntimeError("bug in an action")

        failing, together, later = Deadline(loop), Deadline(loop), Deadline(loop)
        for deadline in (failing, together, later):
            sweeper.watch(deadline)
        failing.arm(0.1, fail)
        together.arm(0.1, lambda: fired.append("together"))
        await _until(lambda: fired and reported)
        later.arm(0.1, lambda: fired.append("later"))  # the sweeper kept ticking past the failure
        await _until(lambda: fired == ["together", "later"])
        assert reported == ["a deadline's action failed"]
        sweeper.close()

    asyncio.run(main())
