"""The model summary printed as fit starts, with the training FLOPs per token where Lightning printed "Total FLOPs: 0".

Why: Lightning counts FLOPs by running the LightningModule's `example_input_array` through the model. lmforge's
stages define none (that would be a forward pass at start-up, on a model that may be sharded or still on the meta
device), so Lightning's FLOPs column and total read 0 in every run. What a user plans a run with is the training
cost per token, 6N + 12·L·d·T (`lmforge.flops`, at the data's block size), the figure perf/mfu divides by: that is printed instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import (
    get_formatted_model_size,
    get_human_readable_count,
)

from lmforge.callbacks.throughput import run_flops_per_token


class ModelSummary(RichModelSummary):
    """Lightning's RichModelSummary: the per-module table and the totals, FLOPs as training FLOPs per token."""

    def __init__(self, max_depth: int = 1, **summarize_kwargs: Any) -> None:
        super().__init__(max_depth, **summarize_kwargs)
        self.flops_per_token: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._max_depth and hasattr(pl_module, "model_cfg"):  # an lmforge stage: its model has a family config
            self.flops_per_token = run_flops_per_token(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    def summarize(  # type: ignore[override] - an instance method: it prints what on_fit_start counted
        self,
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        # Lightning's FLOPs column is all zeros without an example input: left out then
        columns = [(name, values) for name, values in summary_data if not (name == "FLOPs" and not total_flops)]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            left = name in ("Name", "Type", "Mode")
            table.add_column(name, justify="left" if left else "right", style="dim" if name == " " else None,
                             no_wrap=name == "Name")
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)

        grid = Table.grid(expand=True)
        grid.add_column()
        lines = [
            ("Trainable params", get_human_readable_count(int(trainable_parameters))),
            ("Non-trainable params", get_human_readable_count(int(total_parameters - trainable_parameters))),
            ("Total params", get_human_readable_count(int(total_parameters))),
            ("Total estimated model params size (MB)", get_formatted_model_size(model_size)),
            ("Modules in train mode", str(total_training_modes["train"])),
            ("Modules in eval mode", str(total_training_modes["eval"])),
        ]
        if total_flops:  # an example input was run: Lightning's forward count
            lines.append(("Forward FLOPs of the example input", get_human_readable_count(total_flops)))
        if self.flops_per_token:
            lines.append(("Training FLOPs per token (6N + 12·L·d·T)", get_human_readable_count(int(self.flops_per_token))))
        for label, value in lines:
            grid.add_row(f"[bold]{label}[/]: {value}")
        console.print(grid)
