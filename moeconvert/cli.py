"""The ``moeconvert`` command line: parse, call the library, print, exit.

Errors the user can fix print one line on stderr and exit 2 (1 for a failed check, 130 on Ctrl-C).
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .errors import MoeConvertError
from .inspection import ModelSummary, inspect_model
from .relayout import fuse, unfuse

F = TypeVar("F", bound=Callable[..., Any])


def _friendly_errors(func: F) -> F:
    """Print MoeConvertError and invalid-value errors as one line and exit with their code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MoeConvertError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except ValueError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _emit_report(data: dict[str, Any], as_json: bool, report: Path | None, table: Callable[[], str]) -> None:
    text = json.dumps(data, indent=2)
    if report is not None:
        report.write_text(text + "\n")
    click.echo(text if as_json else table())


token_option = click.option(
    "--token", envvar="HF_TOKEN", default=None, show_envvar=True, help="Hub token (default: saved login)."
)
revision_option = click.option(
    "--revision", default=None, help="Hub revision (branch, tag or commit); or MODEL@rev."
)
shard_option = click.option(
    "--max-shard-size", default="5GB", show_default=True, help="Cap per output shard."
)
force_option = click.option("--force", is_flag=True, help="Replace an existing output folder.")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moeconvert")
def main() -> None:
    """Convert, quantize and verify Mixture-of-Experts checkpoints, one layer at a time.

    MODEL is a local folder or a Hugging Face Hub id (org/name or org/name@revision).
    """


@main.command("inspect")
@click.argument("model")
@revision_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="Also write the JSON here.")
@_friendly_errors
def inspect_cmd(
    model: str, revision: str | None, token: str | None, as_json: bool, report: Path | None
) -> None:
    """Family, experts, total vs active parameters and the memory floor (reads headers only)."""
    summary = inspect_model(model, revision, token)
    _emit_report(summary.to_dict(), as_json, report, lambda: _summary_table(summary))


def _summary_table(s: ModelSummary) -> str:
    rows = [
        ("model", s.model),
        ("family", f"{s.family} ({s.layout} layout)"),
        ("layers", f"{s.num_layers}: {len(s.moe_layers)} MoE, {len(s.dense_layers)} dense"),
        ("experts", f"{s.num_experts} routed, top-{s.top_k}, {s.shared_experts} shared"),
        ("dtype", ", ".join(f"{d} ({_params(n)})" for d, n in s.dtypes.items())),
        ("shards", str(s.shards)),
        ("total params", _params(s.total_params)),
        (
            "active params/token",
            f"{_params(s.active_params)} ({100 * s.active_params / s.total_params:.1f}%)",
        ),
    ]
    for label in ("bf16", "int8", "int4"):
        rows.append(
            (
                f"weights {label}",
                f"{_gb(s.weight_bytes[label])} in memory, {_gb(s.active_bytes_per_token[label])} read per token",
            )
        )
    disk = s.disk_bytes
    rows.append(("disk to fuse", f"{_gb(disk['download'] + disk['fused_output'])} (download + output)"))
    rows.append(("disk to quantize w4", f"{_gb(disk['download'] + disk['int4_output'])} (download + output)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _relayout_command(name: str, func: Callable[..., Path], doc: str) -> None:
    @main.command(name, help=doc)
    @click.argument("model")
    @click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
    @revision_option
    @token_option
    @shard_option
    @force_option
    @_friendly_errors
    def command(
        model: str, output: Path, revision: str | None, token: str | None, max_shard_size: str, force: bool
    ) -> None:
        path = func(model, output, revision=revision, token=token, max_shard_size=max_shard_size, force=force)
        click.echo(f"wrote {path}")


_relayout_command(
    "fuse",
    fuse,
    "Re-lay every MoE layer's experts into stacked tensors (transformers 5 layout), losslessly.",
)
_relayout_command("unfuse", unfuse, "Restore per-expert tensors and original names from a fused checkpoint.")


@main.command("tiny")
@click.argument("family")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="Output folder.")
@click.option("--seed", default=0, show_default=True)
@force_option
@_friendly_errors
def tiny_cmd(family: str, output: Path, seed: int, force: bool) -> None:
    """Build a tiny random MoE of FAMILY (for trying the tool without a download)."""
    from .checkpoint import OutputFolder
    from .tiny import TINY_CONFIGS, build_tiny_model

    if family not in TINY_CONFIGS:
        raise click.BadParameter(f"choose from {', '.join(sorted(TINY_CONFIGS))}", param_hint="FAMILY")
    with OutputFolder(output, force=force) as staging:
        build_tiny_model(family, staging, seed=seed)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
