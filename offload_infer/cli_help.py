"""Plain help for the CLI: the non-rich formatter (wraps to the terminal, never cuts an option's name)
with the options grouped into panels (each option's ``rich_help_panel``), so ``--help`` reads well at
80 columns and when piped."""

from __future__ import annotations

from typing import Any

from typer.core import TyperCommand, TyperGroup


class PanelCommand(TyperCommand):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None  # typer's plain formatting, which calls format_options below

    def format_options(self, ctx: Any, formatter: Any) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            default = "Arguments" if param.param_type_name == "argument" else "Options"
            panels.setdefault(getattr(param, "rich_help_panel", None) or default, []).append(record)
        for name, rows in panels.items():
            with formatter.section(name):
                formatter.write_dl(rows)


class PanelGroup(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rich_markup_mode = None
