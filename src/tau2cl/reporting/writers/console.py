"""The console: lines printed through tqdm, a domain's step bar and an evaluation's episode bar."""

from __future__ import annotations

from typing import TextIO

from tqdm import tqdm

# The bar has no rate field: "100/100 [10:23<00:00, loss: 2.1234, reward: 0.456, kl: ...]".
BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"
# An untimed bar (the warm start's steps, far shorter than the GRPO steps after them on the same bar)
# shows no remaining time: its rate would not say when the bar ends.
UNTIMED_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
EVAL_BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} episodes [{elapsed}<{remaining}]"


class ConsoleWriter:
    """Prints lines to `stream` without garbling a live bar, and draws the bars.

    A line goes through tqdm.write, which lifts any bar, prints, and redraws the bar below.
    """

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.bar: tqdm | None = None  # the current domain's steps
        self.eval_bar: tqdm | None = None  # the running evaluation's episodes

    def write_line(self, text: str) -> None:
        tqdm.write(text, file=self.stream)
        self.stream.flush()

    def open_bar(self, desc: str, total: int, initial: int, *, timed: bool = True) -> None:
        """A new step bar at `initial` of `total`; `timed` adds the remaining-time estimate."""
        self.close_bar()
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            file=self.stream,
            bar_format=BAR_FORMAT if timed else UNTIMED_BAR_FORMAT,
            dynamic_ncols=True,
            mininterval=0.1,  # a step takes seconds: redraw on every one
            miniters=1,
            leave=True,
        )

    def move_bar(self, desc: str, position: int, total: int, postfix: str, *, timed: bool = True) -> bool:
        """Show `position` of `total` steps under `desc`, `postfix` the last step's figures; True
        when the bar is full.

        The next step under the same label advances the bar. Anything else (a new phase, a jump
        after a resume or a skipped phase) redraws it in place from `position` with fresh timers,
        so its rate and remaining time count only the steps taken under its label.
        """
        bar = self.bar
        if bar is not None and (bar.desc, bar.total, bar.n + 1) == (desc, total, position):
            bar.set_postfix_str(postfix, refresh=False)
            bar.update(1)
        else:
            self.relabel_bar(desc, position, total, timed=timed)
            self.bar.set_postfix_str(postfix)
        return position >= total

    def relabel_bar(self, desc: str, position: int, total: int, *, timed: bool = True) -> None:
        """The step bar from `position` under a new label, drawn where the old one was."""
        if self.bar is not None:
            self.bar.leave = False  # cleared, not kept: the new bar takes its line
            self.bar.close()
            self.bar = None
        self.open_bar(desc, total, position, timed=timed)

    def close_bar(self) -> bool:
        """Close the step bar; True when one was open. The finished bar stays on screen."""
        if self.bar is None:
            return False
        self.bar.close()
        self.bar = None
        return True

    def show_eval_progress(self, desc: str, done: int, total: int) -> None:
        """`done` of `total` episodes; done=0 starts a new bar, done=total closes it."""
        if done == 0 or self.eval_bar is None:
            self.close_eval_bar()
            self.eval_bar = tqdm(
                total=total, desc=desc, file=self.stream, bar_format=EVAL_BAR_FORMAT,
                dynamic_ncols=True, mininterval=0, miniters=1, leave=False,  # a batch takes seconds
            )
        self.eval_bar.update(done - self.eval_bar.n)
        if done >= total:
            self.close_eval_bar()

    def close_eval_bar(self) -> None:
        if self.eval_bar is not None:
            self.eval_bar.close()  # leave=False: the [EVAL] line that follows stays instead
            self.eval_bar = None

    def close(self) -> None:
        self.close_eval_bar()
        self.close_bar()
