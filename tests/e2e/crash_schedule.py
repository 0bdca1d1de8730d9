"""A trainrun plugin for the sweep tests (``run.plugins=[tests.e2e.crash_schedule]``): an LR schedule
``crash_at_2`` that raises inside the training loop at step 2, after step 1 has trained and logged.

It is a crash no configuration check can see coming, as a bug in a component would be. The tests
only name this module on the command line; they never import it themselves.
"""

from trainrun.registry import LR_SCHEDULES


@LR_SCHEDULES.register("crash_at_2")
def build_crash_at_2(cfg, max_steps):
    """A constant LR factor until the scheduler reaches step 2, where it raises."""

    def factor(step: int) -> float:
        if step >= 2:
            raise RuntimeError("crash_at_2: injected crash at step 2")
        return 1.0

    return factor
