"""The pipelined decode: launch step N+1 before reading step N's tokens, on the same three calls.

A decode step whose rows the device samples alone leaves its tokens there (`PendingOutput`). The next
step of the same sequences is scheduled (`Scheduler.schedule_pipelined`) and launched fed with those
tokens straight from the device, and only then are they read back and updated, and the step launched
sampled: the host's work for one step (detokenizing, stop checks, grammar masks, the server's
streaming) runs while the device computes the next, and the host never idles the GPU.
"""

from __future__ import annotations

from collections.abc import Callable

from .messages import PendingOutput, RunnerOutput, SchedulerOutput
from .runner import ModelRunner
from .scheduler import Scheduler
from .sequence import RequestOutput

Update = Callable[[SchedulerOutput, RunnerOutput], list[RequestOutput]]


class PipelinedDecode:
    def __init__(self, scheduler: Scheduler, runner: ModelRunner):
        self.scheduler, self.runner = scheduler, runner
        self.in_flight: PendingOutput | None = None  # the launched step whose tokens are not read yet

    def hold(self, result: RunnerOutput | PendingOutput) -> RunnerOutput:
        """What to update now from a step's result: nothing for tokens left on the device (they are read
        with the next step, which starts before), the result itself otherwise."""
        if isinstance(result, PendingOutput):
            self.in_flight = result
            return RunnerOutput()
        return result

    def step(self, update: Update) -> tuple[SchedulerOutput | None, list[RequestOutput]]:
        """Launch the next decode step of the in-flight sequences, read the in-flight tokens and `update`
        with them, then sample the step launched: its grammar rows' masks are built from matchers that
        have taken the tokens just read, while the forward runs, and every row is drawn on the device. A
        sequence whose in-flight token is its last by length stays out of the launch; one that finishes
        on a token read back here (a stop, its grammar complete, an abort before) has one step too many in
        flight: its row is drawn unmasked and its token dropped (its pages are freed now; the device
        writes to them in stream order, before any later step can use them again). Returns what it
        launched (None: the batch changes, so the caller schedules) and the outputs read back."""
        previous, self.in_flight = self.in_flight, None
        scheduled = self.scheduler.schedule_pipelined(previous.seqs)
        if scheduled is None:
            return None, update(SchedulerOutput(), previous.read())
        try:
            logits = self.runner.forward(scheduled, previous)
        except Exception:
            self.in_flight = previous  # nothing was appended: a retry starts from here
            raise
        outputs = update(scheduled, previous.read())
        result = self.runner.sample(scheduled, logits, defer=True)
        # drawing on the device failed: sampled on the host, appended after the tokens before them
        outputs += update(SchedulerOutput(), self.hold(result))
        return scheduled, outputs
