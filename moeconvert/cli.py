"""The ``moeconvert`` command line: parse, call the library, print, exit.

Errors the user can fix print one line on stderr and exit 2 (1 for a failed check, 130 on Ctrl-C).

Each command imports the library (torch, transformers) when it runs, not before: ``--help``, ``--version``
and a mistyped option answer at once instead of after seconds of imports.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__
from .errors import MoeConvertError
from .recipe import Recipe, load_recipe
from .units import params_text, size_text

if TYPE_CHECKING:
    from .inspection import ModelSummary

F = TypeVar("F", bound=Callable[..., Any])

# torch puts CPU tensors of 2 MB and more on transparent huge pages when this is "1", read once, at its
# first allocation. Every layer's passes allocate GBs of fresh memory (sums, working weights, codes,
# activations), and first touches of 4 KiB pages cost 0.35 s per GiB on a 2-core guest, 2 MiB ones
# 0.07-0.1 s: quantize and verify ran 8-22% faster, with the same bytes out (docs/PERFORMANCE.md,
# "Huge pages for the command line"). Set before any command imports torch; "0" in the environment
# keeps 4 KiB pages.
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"


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
        except OSError as err:  # a path the library did not anticipate: still one line, not a traceback
            click.echo(f"error: {err.strerror or err}: {err.filename or ''}".rstrip(": "), err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


def _emit_report(data: dict[str, Any], as_json: bool, report: Path | None, table: Callable[[], str]) -> None:
    from .verify import report_json

    text = report_json(data)
    if report is not None:
        report.write_text(text + "\n")
    click.echo(text if as_json else table())


def _report_folder_exists(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """--report is checked before the work, which may take hours, not after it."""
    if value is not None and not value.resolve().parent.is_dir():
        raise click.BadParameter(f"{value.parent} is not a folder")
    return value


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


def _output_path(ctx: click.Context, param: click.Parameter, value: str | None) -> Path | None:
    """An empty output (``-o "$UNSET"``) is a mistake, not the current folder."""
    if value is not None and not value.strip():
        raise click.BadParameter("is empty: give a folder name")
    return None if value is None else Path(value)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moeconvert")
def main() -> None:
    """Convert, quantize and verify Mixture-of-Experts checkpoints, one layer at a time.

    MODEL is a local folder or a Hugging Face Hub id (org/name or org/name@revision).
    """
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


@main.command("inspect")
@click.argument("model")
@revision_option
@token_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_report_folder_exists,
    help="Also write the JSON here.",
)
@_friendly_errors
def inspect_cmd(
    model: str, revision: str | None, token: str | None, as_json: bool, report: Path | None
) -> None:
    """Family, experts, total vs active parameters and the memory floor (reads headers only)."""
    from .inspection import inspect_model

    summary = inspect_model(model, revision, token)
    _emit_report(summary.to_dict(), as_json, report, lambda: _summary_table(summary))


def _summary_table(s: ModelSummary) -> str:
    rows = [
        ("model", s.model),
        ("family", f"{s.family} ({s.layout} layout)"),
        ("layers", f"{s.num_layers}: {len(s.moe_layers)} MoE, {len(s.dense_layers)} dense{_mtp(s)}"),
        ("experts", f"{s.num_experts} routed, top-{s.top_k}, {s.shared_experts} shared"),
        *(
            [("vision encoder", f"{params_text(s.tower_params)} (carried, not active)")]
            if s.tower_params
            else []
        ),
        ("dtype", ", ".join(f"{d} ({params_text(n)})" for d, n in s.dtypes.items())),
        ("shards", str(s.shards)),
        ("total params", params_text(s.total_params)),
        (
            "active params/token",
            f"{params_text(s.active_params)} ({100 * s.active_params / s.total_params:.1f}%)",
        ),
    ]
    for label in ("bf16", "int8", "int4"):
        rows.append(
            (
                f"weights {label}",
                f"{size_text(s.weight_bytes[label])} in memory, {size_text(s.active_bytes_per_token[label])} read per token",
            )
        )
    disk = s.disk_bytes
    if s.quantization:  # parameters from the config's model; fuse and quantize refuse such a source
        rows.append(("quantized", f"{s.quantization}, {size_text(disk['fused_output'])} stored"))
    else:
        rows.append(
            ("disk to fuse", f"{size_text(disk['download'] + disk['fused_output'])} (download + output)")
        )
        rows.append(
            (
                "disk to quantize w4",
                f"{size_text(disk['download'] + disk['int4_output'])} (download + output)",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _mtp(s: ModelSummary) -> str:
    count = len(s.mtp_layers)
    what = f"{count} MTP layer{'s' * (count > 1)}" if count else "MTP modules"
    return f", and {what} of {params_text(s.mtp_params)} (carried, not active)" if s.mtp_params else ""


def _relayout_command(name: str, doc: str) -> None:
    """``fuse`` or ``unfuse``: the function of that name in :mod:`moeconvert.relayout`."""

    @main.command(name, help=doc)
    @click.argument("model")
    @click.option(
        "-o", "--output", required=True, callback=_output_path, metavar="FOLDER", help="Output folder."
    )
    @revision_option
    @token_option
    @shard_option
    @force_option
    @_friendly_errors
    def command(
        model: str, output: Path, revision: str | None, token: str | None, max_shard_size: str, force: bool
    ) -> None:
        from . import relayout

        func = getattr(relayout, name)
        path = func(model, output, revision=revision, token=token, max_shard_size=max_shard_size, force=force)
        click.echo(f"wrote {path}")


_relayout_command(
    "fuse",
    "Re-lay every MoE layer's experts into stacked tensors (transformers 5 layout), losslessly.",
)
_relayout_command("unfuse", "Restore per-expert tensors and original names from a fused checkpoint.")


@main.command("quantize")
@click.argument("model")
@click.option(
    "-o",
    "--output",
    callback=_output_path,
    metavar="FOLDER",
    help="Output folder [default: ./<model>-<scheme>].",
)
@click.option(
    "--recipe",
    "recipe_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML recipe; flags override it.",
)
@click.option("--bits", type=click.Choice(["4", "8"]), default="4", show_default=True)
@click.option("--method", type=click.Choice(["gptq", "rtn"]), default="gptq", show_default=True)
@click.option(
    "--group-size", type=int, default=128, show_default=True, help="-1: one scale per output channel."
)
@click.option(
    "--sym/--asym",
    default=True,
    show_default=True,
    help="--asym stores zero points; vLLM's and transformers' MoE loaders take symmetric experts only.",
)
@click.option(
    "--act-order/--no-act-order",
    default=True,
    show_default=True,
    help="GPTQ: quantize columns by decreasing Hessian diagonal (the largest errors are fed back most).",
)
@click.option(
    "--static-groups/--dynamic-groups",
    default=True,
    show_default=True,
    help="GPTQ: group scales from the weights before the solve, so act-order keeps plain groups (no "
    "g_idx, every kernel); dynamic: scales as the solve reaches a group (act-order then needs --format gptq).",
)
@click.option(
    "--damp", type=float, default=0.01, show_default=True, help="GPTQ dampening (fraction of mean diag)."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["compressed-tensors", "gptq", "fused"]),
    default="compressed-tensors",
    show_default=True,
)
@click.option(
    "--calib",
    default=None,
    help="Calibration text: .txt/.jsonl file, org/name[:config]:split:column, or the built-in corpus.",
)
@click.option("--samples", type=int, default=128, show_default=True)
@click.option("--seq-len", type=int, default=2048, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--batch-tokens",
    type=click.IntRange(min=1),
    default=8192,
    show_default=True,
    help="Calibration tokens per forward batch (memory; in expert-parallel runs, the unit split across ranks).",
)
@click.option("--calibrate-all-experts", is_flag=True, help="Every token updates every expert's statistics.")
@click.option(
    "--min-tokens",
    type=click.IntRange(min=0),
    default=128,
    show_default=True,
    help="Experts with fewer get layer-wide prior rows.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--experts-per-chunk",
    type=click.IntRange(min=1),
    default=None,
    help="GPTQ problems solved at once [default: as many as fit].",
)
@click.option(
    "--forward-dtype",
    type=click.Choice(["float32", "checkpoint"]),
    default="float32",
    show_default=True,
    help="dtype of the calibration forward passes; checkpoint (e.g. bf16) halves the layer in memory and "
    "runs faster on CPUs with bf16 matmuls.",
)
@click.option(
    "--expert-statistics",
    type=click.Choice(["auto", "held", "replayed"]),
    default="auto",
    show_default=True,
    help="held: running gate/up sums of every expert; replayed: keep the experts' inputs and sum a chunk of "
    "experts at a time (same output, far less memory for wide layers such as DeepSeek-V3's); auto: "
    "replayed where a layer would not fit in memory with them held.",
)
@click.option("--dry-run", is_flag=True, help="Print the plan and estimates; write nothing.")
@click.option("--no-verify", is_flag=True, help="Skip the parity check of the fresh output.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_report_folder_exists,
    help="Also write the JSON report here.",
)
@click.option(
    "--push-to-hub", "push_to", metavar="ORG/NAME", help="Upload the verified output to this Hub repo."
)
@click.option("--push-branch", default=None, help="Hub branch to upload to [default: main].")
@click.option("--private", is_flag=True, help="Create the Hub repo as private (with --push-to-hub).")
@click.option(
    "--nproc-per-node",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Expert-parallel: run N ranks on this machine, as torchrun does (see docs/DISTRIBUTED.md).",
)
@revision_option
@token_option
@shard_option
@force_option
@_friendly_errors
def quantize_cmd(
    model: str,
    output: Path | None,
    recipe_path: Path | None,
    bits: str,
    method: str,
    group_size: int,
    sym: bool,
    act_order: bool,
    static_groups: bool,
    damp: float,
    fmt: str,
    calib: str | None,
    samples: int,
    seq_len: int,
    seed: int,
    batch_tokens: int,
    calibrate_all_experts: bool,
    min_tokens: int,
    device: str,
    experts_per_chunk: int | None,
    forward_dtype: str,
    expert_statistics: str,
    dry_run: bool,
    no_verify: bool,
    as_json: bool,
    report: Path | None,
    nproc_per_node: int,
    push_to: str | None,
    push_branch: str | None,
    private: bool,
    revision: str | None,
    token: str | None,
    max_shard_size: str,
    force: bool,
) -> None:
    """Quantize MODEL per expert (GPTQ with routed calibration, or round-to-nearest)."""
    from .inspection import inspect_model
    from .pipeline import QuantizeOptions, quantize

    recipe = load_recipe(recipe_path) if recipe_path else Recipe()
    given = _given_flags()
    flags = {
        "bits": int(bits),
        "group_size": group_size,
        "sym": sym,
        "method": method,
        "act_order": act_order,
        "static_groups": static_groups,
        "damp": damp,
    }
    scheme = replace(recipe.scheme, **{k: v for k, v in flags.items() if given(k) or not recipe_path})
    calibration = {"calib": calib, "samples": samples, "seq_len": seq_len, "seed": seed, "min_tokens": min_tokens,
                   "calibrate_all_experts": calibrate_all_experts}  # fmt: skip
    for key, value in recipe.calibration.items():
        name = "calib" if key == "source" else key
        if not given(name):
            calibration[name] = None if value == "default" else value
    options = QuantizeOptions(
        format=fmt if given("fmt") or not recipe.format else recipe.format, device=device,
        max_shard_size=max_shard_size, experts_per_chunk=experts_per_chunk, verify_thresholds=dict(recipe.verify),
        batch_tokens=batch_tokens, forward_dtype=forward_dtype, expert_statistics=expert_statistics,
        **calibration,
    )  # fmt: skip
    if options.format not in ("compressed-tensors", "gptq", "fused"):
        raise click.BadParameter(
            f"recipe format {options.format!r} is not one of compressed-tensors, gptq, fused"
        )
    if not scheme.sym and options.format == "compressed-tensors":
        click.echo(
            "note: vLLM's and transformers' MoE loaders read symmetric experts only; "
            "this asymmetric output loads in moeconvert verify and engines that take zero points",
            err=True,
        )
    if dry_run:
        summary = inspect_model(model, revision, token)
    if nproc_per_node > 1:
        from .distributed import check_gpus
        from .pipeline import resolve_device

        check_gpus(resolve_device(device), nproc_per_node)
        _relaunch_with_torchrun(nproc_per_node)
    result = quantize(
        model, scheme, output=output, rules=recipe.rules, options=options, revision=revision, token=token, force=force, dry_run=dry_run,
        verify=not no_verify, progress=not as_json,
    )  # fmt: skip
    if not _is_rank_zero():
        return  # rank 0 reports (and pushes) for the whole job
    data = result.to_dict()
    if dry_run:
        data["estimates"] = _estimates(summary, result.sizes)
    _emit_report(data, as_json, report, lambda: _quantize_table(data, dry_run))
    if result.verify is not None and not result.verify["passed"]:
        unpushed = f" (not pushed to {push_to})" if push_to else ""
        click.echo(
            f"error: the output failed its parity check{unpushed}: {'; '.join(result.verify['failures'])}",
            err=True,
        )
        sys.exit(1)
    if push_to and not dry_run:
        _push_and_say(Path(result.output), push_to, private, push_branch, None, token)


@main.command("push")
@click.argument("folder", type=click.Path(path_type=Path))
@click.argument("repo_id", metavar="ORG/NAME")
@click.option(
    "--private", is_flag=True, help="Create the repo as private (an existing repo keeps its setting)."
)
@click.option(
    "--branch", default=None, help="Branch to upload to, created from main if missing [default: main]."
)
@click.option(
    "--commit-message", default=None, help="Commit message [default: Upload <folder> with moeconvert]."
)
@click.option(
    "--allow-failed",
    is_flag=True,
    help="Publish a folder whose stored parity report failed (its model card says so).",
)
@token_option
@_friendly_errors
def push_cmd(
    folder: Path,
    repo_id: str,
    private: bool,
    branch: str | None,
    commit_message: str | None,
    allow_failed: bool,
    token: str | None,
) -> None:
    """Upload a converted FOLDER to the Hub repo ORG/NAME (created if needed), model card included."""
    _push_and_say(folder, repo_id, private, branch, commit_message, token, allow_failed)


def _push_and_say(
    folder: Path,
    repo_id: str,
    private: bool,
    branch: str | None,
    message: str | None,
    token: str | None,
    allow_failed: bool = False,
) -> None:
    from .card import REPORT_NAME
    from .publish import push
    from .verify import report_path

    result = push(
        folder, repo_id, private=private, branch=branch, commit_message=message, token=token,
        allow_failed=allow_failed,
    )  # fmt: skip
    click.echo(
        f"pushed {result.files} files ({size_text(result.bytes)}) to {result.repo_id}@{result.branch}: {result.commit_url}"
    )
    if (folder / REPORT_NAME).is_file() and not report_path(folder).is_file():
        click.echo(
            f"note: {folder} has no parity report, so its model card says it was not verified; "
            f"`moeconvert verify ORIGINAL {folder} --store` records one (then push again)",
            err=True,
        )


def _relaunch_with_torchrun(nproc: int) -> None:
    """Run this same command as ``nproc`` ranks through PyTorch's own launcher (torch.distributed.run),
    with a rendezvous on 127.0.0.1; exits with the job's status."""
    from torch.distributed import run

    argv = sys.argv[1:]
    for i, arg in enumerate(argv):  # drop our own flag so the ranks run the plain command
        if arg.startswith("--nproc-per-node"):
            del argv[i : i + (1 if "=" in arg else 2)]
            break
    launcher = ["--nproc-per-node", str(nproc), "--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0"]
    try:
        run.main([*launcher, "-m", "moeconvert", *argv])
    except Exception as err:  # torchrun's ChildFailedError: the failing rank has printed its own line
        click.echo(f"error: a rank of the distributed job failed ({type(err).__name__})", err=True)
        sys.exit(1)
    sys.exit(0)


def _is_rank_zero() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def _given_flags() -> Callable[[str], bool]:
    """Whether a parameter of the running command was given on the command line (not a default)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return lambda name: (
        ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    )


def _estimates(summary: ModelSummary, sizes: dict[str, int]) -> dict[str, int]:
    return {
        "output_bytes": sizes["output_bytes"],  # the plan's targets and schemes, from the headers
        "disk_bytes": sizes["disk_bytes"],  # at the peak: shards in flight and the calibration record too
        "download_bytes": summary.disk_bytes["download"],
        "peak_memory_bytes": sizes["peak_memory_bytes"],  # see moeconvert.estimate
        "activation_bytes": sizes.get("activation_bytes", 0),  # calibration hidden states, in the peak
        "replayed_layers": sizes.get("replayed_layers", 0),  # layers whose gate/up sums are replayed
    }


def _quantize_table(data: dict[str, Any], dry_run: bool) -> str:
    s = data["scheme"]
    group = "per channel" if s["group_size"] == -1 else f"group {s['group_size']}"
    lines = [
        f"{'plan for' if dry_run else 'wrote'} {data['output']}",
        f"scheme   {s['method']} {s['bits']}-bit, {group}, {'sym' if s['sym'] else 'asym'}, format {data['format']}",
        f"modules  {data['quantized_modules']} quantized, {len(data['kept_modules'])} kept in full precision (+ routers, lm_head)",
    ]
    if dry_run:
        e = data["estimates"]
        lines.append(
            f"needs    {size_text(e['output_bytes'])} output ({size_text(e['disk_bytes'])} of disk at the peak), "
            f"{size_text(e['download_bytes'])} download, "
            f"~{size_text(e['peak_memory_bytes'])} memory at the peak (the widest layer's solve or calibration)"
        )
        if e.get("activation_bytes") and data.get("device") == "cpu":
            lines.append(
                f"memory   {size_text(e['activation_bytes'])} of that is calibration activations, mapped from disk: "
                "where memory is short the OS pages them out, and the run goes on"
            )
        if e.get("replayed_layers"):
            lines.append(
                f"memory   gate/up statistics replayed from the kept inputs in {e['replayed_layers']} layers "
                "(--expert-statistics)"
            )
        return "\n".join(lines)
    if data.get("verify"):
        v = data["verify"]
        lines.append(
            f"verify   {'passed' if v['passed'] else 'FAILED'}: mean KL {v['kl_mean']:.2e}, top-1 {v['top1_agreement']:.4f}, "
            f"perplexity {v['perplexity_original']:.3f} -> {v['perplexity_converted']:.3f}"
        )
    starved = {r["layer"]: r["starved_experts"] for r in data["layers"] if r["starved_experts"]}
    lines.append(f"time     {data['seconds']:.1f} s on {data['device']}")
    if starved:
        lines.append(f"starved  experts below --min-tokens got layer-wide prior rows: {starved}")
    return "\n".join(lines)


@main.command("verify")
@click.argument("original")
@click.argument("converted")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--calib", default=None, help="Evaluation text (as for quantize; default: the built-in corpus)."
)
@click.option("--samples", type=int, default=8, show_default=True)
@click.option("--seq-len", type=int, default=256, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--max-kl", type=float, default=None, help="Fail above this mean KL [default: by kind].")
@click.option(
    "--min-top1", type=float, default=None, help="Fail below this top-1 agreement [default: by kind]."
)
@click.option(
    "--max-layer-error",
    type=float,
    default=None,
    help="Fail when a layer errs by more than this fraction of its own output [default: by kind].",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--report",
    type=click.Path(dir_okay=False, path_type=Path),
    callback=_report_folder_exists,
    help="Also write the JSON here.",
)
@click.option(
    "--store",
    is_flag=True,
    help="CONVERTED is a local quantize output: keep the report in it and quote it on its model card.",
)
@revision_option
@token_option
@_friendly_errors
def verify_cmd(
    original: str,
    converted: str,
    device: str,
    calib: str | None,
    samples: int,
    seq_len: int,
    seed: int,
    max_kl: float | None,
    min_top1: float | None,
    max_layer_error: float | None,
    as_json: bool,
    report: Path | None,
    store: bool,
    revision: str | None,
    token: str | None,
) -> None:
    """Compare CONVERTED with ORIGINAL layer by layer; exit 1 past the thresholds."""
    from .verify import verify

    result = verify(
        original, converted, device=device, calib=calib, samples=samples, seq_len=seq_len, seed=seed,
        max_kl=max_kl, min_top1=min_top1, max_layer_error=max_layer_error, revision=revision, token=token,
        progress=not as_json, store=store,
    )  # fmt: skip
    data = result.to_dict()
    _emit_report(data, as_json, report, lambda: _parity_table(data))
    if not result.passed:
        click.echo(f"error: parity check failed: {'; '.join(result.failures)}", err=True)
        sys.exit(1)


def _parity_table(d: dict[str, Any]) -> str:
    lines = [
        f"{'layer':>5}  {'layer error':>11}  {'drift':>9}"
        + ("  identical" if d["kind"] == "lossless" else "")
    ]
    for p in d["layers"]:
        same = "" if p["identical_tensors"] is None else f"  {'yes' if p['identical_tensors'] else 'NO'}"
        lines.append(f"{p['layer']:>5}  {p['layer_error']:>11.3e}  {p['drift']:>9.3e}{same}")
    t = d["thresholds"]
    lines += [
        f"kind: {d['kind']} on {d['device']}, {d['tokens']} tokens",
        f"logits: max |diff| {d['logits_max_abs_diff']:.3e}, mean |diff| {d['logits_mean_abs_diff']:.3e}",
        f"KL(original||converted): mean {d['kl_mean']:.3e} (max allowed {t['max_kl']:g}), "
        f"median {d.get('kl_median', 0.0):.3e}, p99 {d.get('kl_p99', 0.0):.3e}, max {d['kl_max']:.3e}",
        f"top-1 agreement: {d['top1_agreement']:.4f} (min {t['min_top1']:g})",
        f"perplexity: {d['perplexity_original']:.4f} -> {d['perplexity_converted']:.4f}",
        "PASSED" if d["passed"] else "FAILED: " + "; ".join(d["failures"]),
    ]
    return "\n".join(lines)


@main.command("check")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@_friendly_errors
def check_cmd(folder: Path, as_json: bool) -> None:
    """Re-hash every file of an output FOLDER against its SHA256SUMS; exit 1 on any difference."""
    from dataclasses import asdict

    from .manifest import check

    result = check(folder, progress=not as_json)
    if as_json:
        click.echo(json.dumps({**asdict(result), "passed": result.passed}, indent=2))
    if not result.passed:
        click.echo(f"error: {folder} differs from its manifest: {result.problems()}", err=True)
        sys.exit(1)
    if not as_json:
        click.echo(f"ok: {result.files} files, {size_text(result.bytes)} match {folder}/SHA256SUMS")


@main.command("tiny")
@click.argument("family")
@click.option("-o", "--output", required=True, callback=_output_path, metavar="FOLDER", help="Output folder.")
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--train-steps", default=200, show_default=True, help="Brief training so outputs are peaked (0: random)."
)
@force_option
@_friendly_errors
def tiny_cmd(family: str, output: Path, seed: int, train_steps: int, force: bool) -> None:
    """Build a tiny MoE of FAMILY, briefly trained, for trying the tool without a download."""
    from .manifest import write_manifest
    from .output_folder import OutputFolder
    from .tiny import TINY_CONFIGS, build_tiny_model

    if family not in TINY_CONFIGS:
        raise click.BadParameter(f"choose from {', '.join(sorted(TINY_CONFIGS))}", param_hint="FAMILY")
    with OutputFolder(output, force=force) as staging:
        build_tiny_model(family, staging, seed=seed, train_steps=train_steps)
        write_manifest(staging)
    click.echo(f"wrote {output}")


if __name__ == "__main__":
    main()
