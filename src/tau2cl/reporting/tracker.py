"""Rank-0 reporting of a run: what is recorded and printed when, handed to one writer per output.

The lines come from the pure formatters in formats.py; the writers (writers/) put them on the
console (tqdm bar, compact lines), in train.log, metrics.jsonl, summary.json and wandb. Only the
main process writes; on every other rank each method is a no-op.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TextIO

from tau2cl.evaluation.stats import EvalSummary
from tau2cl.reporting.formats import (
    HeldoutResults,
    HeldoutStage,
    format_banner,
    format_bar_label,
    format_domain_rows,
    format_eval_detail,
    format_eval_line,
    format_final_summary,
    format_heldout_rows,
    format_initial_block,
    format_initial_header,
    format_postfix,
    format_sft_line,
    format_sft_postfix,
    format_train_detail,
    format_train_line,
    format_transfer_block,
    with_separator,
)
from tau2cl.reporting.writers.console import ConsoleWriter
from tau2cl.reporting.writers.jsonl import JsonlWriter
from tau2cl.reporting.writers.log_file import LogFileWriter
from tau2cl.reporting.writers.summary_file import SummaryFileWriter
from tau2cl.reporting.writers.wandb_writer import NullWandbWriter, open_wandb
from tau2cl.runs.files import LOG_FILE, METRICS_FILE, SUMMARY_FILE


def _main_only(method):
    """Run the method on the main process only; elsewhere it does nothing and returns None."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.is_main:
            return None
        return method(self, *args, **kwargs)

    return wrapper


SFT_PHASE, GRPO_PHASE = "SFT", "GRPO"  # the step bar's phases, named in its label


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal (a bar redraws in place there; in a file it leaves debris)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


class MetricsTracker:
    """Console, files and wandb of one run. Only the main process reports; elsewhere all no-ops.

    `step` is the number of steps done in the current domain (1..num_steps); `global_step` counts
    steps over the whole run and is the monotone wandb step.

    The step bar (`use_progress_bar`; None: only when the console stream is a terminal) counts a
    domain's `sft_steps` supervised warm-start steps, then its GRPO steps, its label naming the phase.
    """

    def __init__(
        self,
        log_dir: str,
        config_dict: dict,
        *,
        is_main: bool = True,
        use_progress_bar: bool | None = True,
        sft_steps: int = 0,
        log_interval: int = 10,
        verbose: bool = False,
        wandb_project: str | None = None,
        wandb_run_name: str | None = None,
        wandb_run_id: str | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.is_main = is_main
        self.log_dir = log_dir
        self._console = ConsoleWriter(stream if stream is not None else sys.stdout)
        if use_progress_bar is None:
            use_progress_bar = is_terminal(self._console.stream)
        self.use_progress_bar = use_progress_bar
        self.log_interval = max(1, log_interval)
        self.verbose = verbose
        self._domain, self._num_steps, self._step = None, None, 0
        self._domain_idx = 0
        self.sft_steps = self._domain_sft_steps = max(0, sft_steps)  # the bar's supervised part
        self._initial_announced = False  # the row-0 header is out; its rows follow alone
        self._mixes_domains = False  # the run's stages mix all domains: rows are named by part
        self._heldout_results: Callable[[], HeldoutResults] | None = None  # for the final summary
        self._last_kind: str | None = None  # what was printed last; decides blank separator lines
        self._log_file: LogFileWriter | None = None
        self._jsonl: JsonlWriter | None = None
        self._summary_file = SummaryFileWriter(os.path.join(log_dir, SUMMARY_FILE))
        self._wandb: Any = NullWandbWriter()
        self._wandb_run_id: str | None = None
        if not is_main:
            return
        os.makedirs(log_dir, exist_ok=True)
        self._jsonl = JsonlWriter(os.path.join(log_dir, METRICS_FILE))
        self._log_file = LogFileWriter(os.path.join(log_dir, LOG_FILE))
        if wandb_project:
            self._wandb = open_wandb(wandb_project, wandb_run_name, wandb_run_id, config_dict, log_dir)
            self._wandb_run_id = self._wandb.run_id

    @classmethod
    def from_config(cls, config, *, is_main: bool, wandb_run_id: str | None = None, stream=None):
        """Build from a GRPOConfig (its logging fields and to_dict())."""
        return cls(
            config.log_dir,
            config.to_dict(),
            is_main=is_main,
            use_progress_bar=config.use_progress_bar,
            sft_steps=config.sft_steps_per_task,
            log_interval=config.log_interval,
            verbose=config.verbose,
            wandb_project=config.wandb_project,
            wandb_run_name=config.wandb_run_name,
            wandb_run_id=wandb_run_id,
            stream=stream,
        )

    @property
    def wandb_run_id(self) -> str | None:
        """The wandb run's id (keep it in the checkpoint to resume the same run); else None."""
        return self._wandb_run_id

    def describe_matrix(
        self, *, mixes_domains: bool, heldout_results: Callable[[], HeldoutResults] | None = None
    ) -> None:
        """How the accuracy matrix is shown: `mixes_domains` names the stages by part (a run whose
        every stage trains on all domains mixed); `heldout_results`, when given, returns the held-out
        matrix as it stands, which the final summary shows under the main one."""
        self._mixes_domains = mixes_domains
        self._heldout_results = heldout_results

    # ------------------------------------------------------------ handing out lines and records

    def _show(self, text: str, kind: str) -> None:
        """A console line, also kept in train.log; `kind` decides the blank line above it."""
        text = with_separator(text, kind, self._last_kind)
        self._console.write_line(text)
        self._log_file.write_line(text)
        self._last_kind = kind

    def _record(self, header: dict, figures: Mapping[str, Any]) -> None:
        """One metrics.jsonl record: header keys first (they win a clash), then figures."""
        record = {**header, "time": time.time()}
        record.update((k, v) for k, v in figures.items() if k not in record)
        self._jsonl.write_record(record)

    def _close_bar(self) -> None:
        if self._console.close_bar():
            self._last_kind = "bar"

    def _is_log_step(self, step: int, num_steps: int | None) -> bool:
        return step % self.log_interval == 0 or step == num_steps

    def _bar_total(self) -> int:
        return self._domain_sft_steps + (self._num_steps or 0)

    def _move_bar(self, phase: str, position: int, postfix: str) -> bool:
        """The step bar at `position` in `phase`; True when it is full."""
        label = format_bar_label(phase, self._domain_idx, self._domain)
        return self._console.move_bar(label, position, self._bar_total(), postfix, timed=phase == GRPO_PHASE)

    # ------------------------------------------------------------ the trainer's calls

    @_main_only
    def start_domain(
        self, domain_idx: int, domain: str, num_train_tasks: int, num_steps: int, start_step: int = 0,
        sft_step: int = 0,
    ) -> None:
        """The domain's banner and bar; `start_step` GRPO steps and `sft_step` supervised steps are
        already done (a resumed run), so the bar starts from them."""
        self._close_bar()
        self._domain, self._num_steps, self._step = domain, num_steps, start_step
        self._domain_idx, self._domain_sft_steps = domain_idx, self.sft_steps
        self._show(format_banner(domain_idx, domain, num_train_tasks), "block")
        if not self.use_progress_bar:
            return
        in_warm_start = start_step == 0 and sft_step < self.sft_steps
        phase = SFT_PHASE if in_warm_start else GRPO_PHASE
        position = sft_step if in_warm_start else self.sft_steps + start_step
        label = format_bar_label(phase, domain_idx, domain)
        self._console.open_bar(label, self._bar_total(), position, timed=phase == GRPO_PHASE)

    @_main_only
    def log_train(
        self, domain_idx: int, domain: str, step: int, global_step: int, stats: Mapping[str, Any]
    ) -> None:
        self._step = step
        header = {
            "type": "train",
            "task_idx": domain_idx,
            "domain": domain,
            "step": step,
            "global_step": global_step,
        }
        self._record(header, stats)
        self._wandb.write_record("train", stats, global_step)
        if self._console.bar is not None:
            if self._move_bar(GRPO_PHASE, self._domain_sft_steps + step, format_postfix(stats)):
                self._close_bar()  # so the domain's last [EVAL] prints below a finished bar
            if not self.verbose:  # the bar shows loss, reward and kl; the log file gets the line
                if self._is_log_step(step, self._num_steps):
                    self._log_file.write_line(format_train_line(domain_idx, step, self._num_steps, stats))
                return
        if self._is_log_step(step, self._num_steps):
            self._show(format_train_line(domain_idx, step, self._num_steps, stats), "train")
            if self.verbose:
                self._show(format_train_detail(stats), "train")

    @_main_only
    def log_sft(
        self, domain_idx: int, domain: str, step: int, num_steps: int, global_step: int, stats: Mapping[str, Any]
    ) -> None:
        """A supervised warm-start step: its own record type; a line every log_interval steps; on
        the bar, step `step` of the SFT phase, which hands over to GRPO after the last one."""
        header = {"type": "sft", "task_idx": domain_idx, "domain": domain, "step": step, "global_step": global_step}
        self._record(header, stats)
        self._wandb.write_record("sft", stats, global_step)
        if self._is_log_step(step, num_steps):
            self._show(format_sft_line(domain_idx, step, num_steps, stats), "train")
        if self._console.bar is None:
            return
        self._domain_sft_steps = num_steps
        full = self._move_bar(SFT_PHASE, step, format_sft_postfix(stats))
        if full:
            self._close_bar()  # a domain of supervised steps only
        elif step == num_steps:  # the GRPO steps take over the bar, with their own clock
            label = format_bar_label(GRPO_PHASE, domain_idx, self._domain)
            self._console.relabel_bar(label, step, self._bar_total())

    @_main_only
    def log_eval(
        self,
        domain_idx: int,
        step: int,
        global_step: int,
        summary: EvalSummary,
        current_domain: str,
        *,
        echo: bool = True,
        stage: int | None = None,
        split: str | None = None,
        heldout: bool = False,
    ) -> None:
        """Record an evaluation; `echo` prints the [EVAL] line; `stage` = its accuracy-matrix row;
        `split` = the split it ran on; `heldout`: a stage's held-out evaluation (its line is marked,
        its wandb figures go under eval_heldout/)."""
        self._step = step
        if echo:
            line = format_eval_line(domain_idx, step, summary, current_domain, split if heldout else None)
            self._show(line, "eval")
            if self.verbose:
                self._show(format_eval_detail(summary), "eval")
        figures = summary.to_dict()
        del figures["domain"]
        figures["pass_hat_k"] = {str(k): v for k, v in summary.pass_hat_k.items()}
        header = {
            "type": "eval",
            "task_idx": domain_idx,
            "domain": current_domain,
            "eval_domain": summary.domain,
            "step": step,
            "global_step": global_step,
            "stage": stage,
            "split": split,
        }
        self._record(header, figures)
        wandb_figures = {**figures, **{f"pass_hat_{k}": v for k, v in summary.pass_hat_k.items()}}
        namespace = "eval_heldout" if heldout else "eval"
        self._wandb.write_record(f"{namespace}/{summary.domain}", wandb_figures, global_step)

    @_main_only
    def announce_initial_eval(self) -> None:
        """The header of the evaluation before training, before that evaluation runs."""
        self._show(format_initial_header(), "block")
        self._initial_announced = True

    @_main_only
    def log_initial_eval(
        self, global_step: int, summaries: Mapping[str, EvalSummary], split: str | None = None,
        heldout: HeldoutStage | None = None,
    ) -> None:
        """Row 0: print every domain's scores before training (under its header), then the held-out
        ones under theirs, and record them."""
        lines = format_domain_rows(summaries, None) if self._initial_announced else [format_initial_block(summaries)]
        if heldout is not None:
            lines += format_heldout_rows(heldout.summaries, None, heldout.split)
        self._show("\n".join(lines), "block")
        first = next(iter(summaries))
        for summary in summaries.values():
            self.log_eval(0, 0, global_step, summary, first, echo=False, stage=0, split=split)
        for summary in (heldout.summaries if heldout is not None else {}).values():
            self.log_eval(0, 0, global_step, summary, first, echo=False, stage=0, split=heldout.split, heldout=True)

    @_main_only
    def log_strategy(
        self, strategy: str, domain_idx: int, domain: str, global_step: int, figures: Mapping[str, Any], line: str
    ) -> None:
        """A strategy's own record (e.g. the α a search chose) and its console line."""
        header = {
            "type": "strategy",
            "strategy": strategy,
            "task_idx": domain_idx,
            "domain": domain,
            "step": self._step,
            "global_step": global_step,
        }
        self._record(header, figures)
        self._wandb.write_record(f"strategy/{strategy}", figures, global_step)
        self._show(line, "message")

    @_main_only
    def end_domain(self) -> None:
        self._close_bar()

    @_main_only
    def log_transfer(
        self,
        domain_idx: int,
        global_step: int,
        summaries: Mapping[str, EvalSummary],
        seen: Sequence[str],
        measures: Mapping[str, float | None],
        split: str | None = None,
        heldout: HeldoutStage | None = None,
    ) -> None:
        """A stage's block and its `transfer` record (`split` = the split evaluated); with
        `heldout`, its rows and measures in the block and a second record for its split."""
        self._close_bar()
        self._show(format_transfer_block(domain_idx, summaries, seen, measures, heldout, self._mixes_domains), "block")
        self._record_transfer(domain_idx, global_step, summaries, seen, measures, split, "transfer")
        if heldout is not None:
            self._record_transfer(domain_idx, global_step, heldout.summaries, seen, heldout.measures,
                                  heldout.split, "transfer_heldout")

    def _record_transfer(
        self, domain_idx: int, global_step: int, summaries: Mapping[str, EvalSummary], seen: Sequence[str],
        measures: Mapping[str, float | None], split: str | None, namespace: str,
    ) -> None:
        domain = self._domain if self._domain is not None else (seen[-1] if seen else None)
        header = {
            "type": "transfer",
            "task_idx": domain_idx,
            "domain": domain,
            "step": self._step,
            "global_step": global_step,
            "split": split,
        }
        scores = {name: s.reward_mean for name, s in summaries.items()}
        self._record(header, {**measures, "seen": list(seen), "scores": scores})
        per_domain = {f"{name}/reward_mean": v for name, v in scores.items()}
        self._wandb.write_record(namespace, {**measures, **per_domain}, global_step)

    @_main_only
    def log_final_summary(
        self,
        domains: Sequence[str],
        matrix: Sequence[Sequence[float | None]],
        measures: Mapping[str, float | None],
        split: str = "test",
        floor: Mapping[str, float] | None = None,
    ) -> None:
        """The Final Summary block; with a held-out matrix (describe_matrix), that one under it."""
        self._close_bar()
        heldout = self._heldout_results() if self._heldout_results is not None else None
        self._show(format_final_summary(domains, matrix, measures, split, floor, self._mixes_domains, heldout), "block")
        self._wandb.write_summary("final", measures)
        if heldout is not None:
            self._wandb.write_summary("final_heldout", heldout.measures)

    @_main_only
    def write_summary(self, summary: dict) -> None:
        """Write log_dir/summary.json atomically, so a reader never sees half a file."""
        self._summary_file.write_record(summary)

    @_main_only
    def eval_progress(self, label: str, domain: str, done: int, total: int) -> None:
        """An evaluation's episodes as they finish: a bar, or one compact line per batch.

        Called with done=0 before the first episode (so its header comes before the work) and after
        every batch; the bar closes itself when done reaches total.
        """
        if not self.use_progress_bar:
            self._show(f"[EVAL] {domain} ({label}): {done}/{total} episodes", "progress")
            return
        self._console.show_eval_progress(f"Eval {domain} ({label})", done, total)

    @_main_only
    def log_message(self, text: str) -> None:
        """Any other line from the trainer, printed without garbling the bar."""
        self._show(text, "message")

    @_main_only
    def close(self) -> None:
        """Close the bars, the files and the wandb run; safe to call twice."""
        self._console.close_eval_bar()
        self._close_bar()
        for writer in (self._jsonl, self._log_file, self._summary_file, self._wandb):
            writer.close()
        self._wandb = NullWandbWriter()

    def __enter__(self) -> MetricsTracker:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
