"""``ferry models list | describe | stats``: what a server serves, and how it has been doing;
``ferry models refresh | load | unload``: change what it serves, on the management listener.

The first three talk to the inference listener (FERRY_TARGET), the last three to the management
listener (FERRY_MANAGEMENT_TARGET, 127.0.0.1:8003 by default), each with its own defaults, so that
one command line never sends a token to the wrong listener."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Mapping
from typing import Any

from ferry.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    connect,
    connection_parent,
    json_text,
    make_client,
    management_hint,
    management_parent,
    print_table,
    version_number,
)
from ferry.client import BatchingPolicy, ModelMetadata, ModelStatistics, RepositoryClient


def register(sub: Any) -> None:
    conn = connection_parent()
    models = sub.add_parser(
        "models",
        help="list, describe, show statistics; refresh, load or unload (management)",
        description="List the served models, describe one (inputs, outputs, batching), or "
        "show its statistics (inference listener); re-read the repository, load or unload a "
        "model (management listener).",
    )
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")

    p = msub.add_parser(
        "list",
        parents=[conn],
        help="every model version and its state",
        description="Every model version the server knows, with its state (READY, FAILED, ...) "
        "and why it failed; a model with no version at all (its version folders deleted) is "
        "one row, version '-', UNLOADED, saying why.",
    )
    p.add_argument("model", nargs="?", default="", help="only this model's versions")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list)

    p = msub.add_parser(
        "describe",
        parents=[conn],
        help="inputs, outputs and batching of a model",
        description="A model's inputs and outputs (name, datatype, shape; -1 is dynamic), its "
        "versions and its batching policy.",
    )
    p.add_argument("model")
    p.add_argument(
        "--version", type=version_number, help="a specific version (default: the default one)"
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_describe)

    p = msub.add_parser(
        "stats",
        parents=[conn],
        help="request counts and time spent, per model version",
        description="Cumulative statistics since each version loaded: requests, executions, "
        "mean queue and compute time of successful requests, batch sizes, rejections.",
    )
    p.add_argument("model", nargs="?", default="", help="only this model (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    manage = management_parent(timeout=120.0)
    p = msub.add_parser(
        "refresh",
        parents=[manage],
        help="re-read the repository folder (management listener)",
        description="Re-read the repository folder: load new versions, unload removed ones, "
        "retry failed ones; prints what changed. Exits 1 when a version failed to load.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_refresh, hint=management_hint)

    p = msub.add_parser(
        "load",
        parents=[manage],
        help="load (or reload) a model's versions (management listener)",
        description="Load, or reload, one model's versions per its config and version policy.",
    )
    p.add_argument("model")
    p.set_defaults(func=cmd_load, hint=management_hint)

    p = msub.add_parser(
        "unload",
        parents=[manage],
        help="stop serving a model; its files stay (management listener)",
        description="Stop serving a model. Its files stay in the repository: `ferry models "
        "load MODEL` serves it again.",
    )
    p.add_argument("model")
    p.set_defaults(func=cmd_unload, hint=management_hint)

    p = msub.add_parser(
        "rollout",
        parents=[manage],
        help="show or set a model's live traffic split between versions (management listener)",
        description="Split a model's live traffic between versions by weight, e.g. "
        "`ferry models rollout m 1=9 2=1 --reason 'int8 canary'`; a request's id decides its "
        "version, and a request naming a version bypasses the split. Without weights: show the "
        "split and its history. Weights replace the whole rollout: a live shadow ends unless "
        "--shadow gives it again (--shadow alone keeps the split). --end: every request goes "
        "to the default version again.",
    )
    p.add_argument("model")
    p.add_argument("weights", nargs="*", metavar="VERSION=WEIGHT", type=_weight)
    # Weights after an option (`m --target h:p 1=1`) are still weights (cli.main).
    p.set_defaults(trailing_positionals=("weights", _weight))
    p.add_argument("--reason", default="", help="recorded with the change")
    p.add_argument(
        "--shadow",
        type=_weight,
        metavar="VERSION=FRACTION",
        help="also run this fraction (0..1] of requests on a candidate version, after the "
        "caller's answer, and compare the outputs (e.g. 3=0.1)",
    )
    p.add_argument(
        "--promote-after",
        type=int,
        help="rule: promote the shadow candidate after N comparisons within the bounds",
    )
    p.add_argument("--min-cosine", type=float, help="rule: roll back below this cosine")
    p.add_argument("--max-error-rate", type=float, help="rule: roll back above this error rate")
    p.add_argument(
        "--max-latency-ratio", type=float, help="rule: candidate latency / served latency bound"
    )
    p.add_argument("--end", action="store_true", help="end the split and the shadow")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_rollout, hint=management_hint)


# The figures of a shadow's comparison, which describe nothing before its first comparison.
COMPARISON_FIGURES = frozenset(
    {
        "mean_cosine",
        "min_cosine",
        "max_abs_diff",
        "top1_agreement",
        "rel_error",
        "spread_error",
        "label_agreement",
    }
)


def _weight(text: str) -> tuple[int, float]:
    version, sep, weight = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(version), float(weight)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected VERSION=WEIGHT, e.g. 2=0.1") from None


def cmd_list(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        models = client.list_models(args.model)
    if args.json:
        print(json_text([dataclasses.asdict(m) for m in models]))
        return EXIT_OK
    if not models:
        print("no models are served" + (f" under the name {args.model!r}" if args.model else ""))
        return EXIT_OK
    rows = [
        [m.name, m.version or "-", m.state, "*" if m.is_default else "", m.reason] for m in models
    ]
    print_table(rows, ["MODEL", "VERSION", "STATE", "DEFAULT", "REASON"])
    return EXIT_OK


def describe_text(meta: ModelMetadata) -> str:
    b = meta.batching
    lines = [
        f"{meta.name} version {meta.version} ({meta.platform}); ready versions "
        f"{list(meta.versions)}, default {meta.default_version}",
    ]
    for title, tensors in (("inputs", meta.inputs), ("outputs", meta.outputs)):
        lines.append(f"{title}:")
        lines += [f"  {t.name:<24} {t.datatype:<6} {list(t.shape)}" for t in tensors]
    if b.max_batch_size and not b.combine_requests:
        # The config's setting, or what the server found while serving (a batch showed the
        # rows mixing): "combine_requests = false" sent the owner to a config that never said so.
        why = b.run_alone_reason or "combine_requests = false"
        lines.append(
            f"batching: up to {b.max_batch_size} rows per request, each request run alone "
            f"({why}), queue size {b.max_queue_size}, {_instances(b)}"
        )
    elif b.max_batch_size:
        timeout = f"{b.default_timeout * 1e3:g} ms" if b.default_timeout else "none"
        lines.append(
            f"batching: up to {b.max_batch_size} per batch, max queue delay "
            f"{b.max_queue_delay * 1e3:g} ms, queue size {b.max_queue_size}, default timeout "
            f"{timeout}, {_instances(b)}"
        )
    else:
        lines.append(f"batching: none (no batch dimension), {_instances(b)}")
    return "\n".join(lines)


def _instances(b: BatchingPolicy) -> str:
    if not b.device_ids:
        return f"{b.instance_count} instance(s)"
    return f"{b.instance_count} instance(s) on each of GPUs {list(b.device_ids)}"


def cmd_describe(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        meta = client.model_metadata(args.model, version=args.version)
    if args.json:
        print(json_text(dataclasses.asdict(meta)))
    else:
        print(describe_text(meta))
    return EXIT_OK


def _ms(ns: int, count: int) -> str:
    return f"{ns / count / 1e6:.3f}" if count else "-"


def _stats_row(s: ModelStatistics) -> list[Any]:
    compute = s.compute_input.ns + s.compute_infer.ns + s.compute_output.ns
    mean_batch = f"{s.inference_count / s.execution_count:.2f}" if s.execution_count else "-"
    return [
        s.name,
        s.version,
        s.success.count,
        s.fail.count,
        s.execution_count,
        mean_batch,
        _ms(s.queue.ns, s.queue.count),
        _ms(compute, s.compute_infer.count),
        s.rejected_count,
        s.expired_count,
        s.queue_depth,
    ]


def cmd_stats(args: argparse.Namespace) -> int:
    with make_client(args) as client:
        stats = client.statistics(args.model)
    if args.json:
        print(json_text([dataclasses.asdict(s) for s in stats]))
        return EXIT_OK
    print_table(
        [_stats_row(s) for s in stats],
        [
            "MODEL",
            "VERSION",
            "OK",
            "FAILED",
            "EXECUTIONS",
            "BATCH",
            "QUEUE_MS",
            "COMPUTE_MS",
            "REJECTED",
            "EXPIRED",
            "QUEUED",
        ],
    )
    for s in stats:
        for line in _placement_lines(s):
            print(line)
    return EXIT_OK


def _counts(counts: dict[int, int]) -> str:
    return " ".join(f"{key}:{n}" for key, n in sorted(counts.items()))


def _placement_lines(s: ModelStatistics) -> list[str]:
    """What the table has no column for: how a planned version's batches fell on its planned
    sizes (plan changes 0 is the proof that steady state never re-plans), and how a placed
    version's executions spread over its GPUs. Nothing for a version with neither."""
    lines = []
    if s.planned_executions:
        lines.append(
            f"{s.name}/{s.version} executions per planned size: "
            f"{_counts(s.planned_executions)}; plan changes: {s.plan_changes}"
        )
    if s.device_executions:
        lines.append(f"{s.name}/{s.version} executions per device: {_counts(s.device_executions)}")
    return lines


def cmd_refresh(args: argparse.Namespace) -> int:
    with connect(RepositoryClient, args) as repo:
        result = repo.refresh()
    if args.json:
        print(json_text(dataclasses.asdict(result)))
    elif not result.changed:
        print("nothing changed: every version on disk is already served as configured")
    else:
        for version in result.loaded:
            print(f"loaded    {version}")
        for version in result.unloaded:
            print(f"unloaded  {version}")
        for version, reason in result.failed.items():
            print(f"FAILED    {version}: {reason}")
    return EXIT_FAILED if result.failed else EXIT_OK


def cmd_load(args: argparse.Namespace) -> int:
    with connect(RepositoryClient, args) as repo:
        repo.load_model(args.model)
    print(f"{args.model}: loaded (`ferry models list {args.model}` shows its versions)")
    return EXIT_OK


def cmd_rollout(args: argparse.Namespace) -> int:
    if args.end and (args.weights or args.shadow):
        raise UsageError("give weights or --shadow, or --end")
    rules = {
        name: value
        for name in ("promote_after", "min_cosine", "max_error_rate", "max_latency_ratio")
        if (value := getattr(args, name)) is not None
    }
    if rules and not (args.weights or args.shadow):
        # Without them the command only showed the rollout (or, with --end, ended it) and
        # dropped the rules without a word: exit 0, and no rule was ever set.
        flags = ", ".join("--" + name.replace("_", "-") for name in rules)
        raise UsageError(
            f"{flags} set rules of a split or a shadow: give the weights "
            "or --shadow they judge (e.g. `1=1 --shadow 2=0.1`)"
        )
    if args.reason and not (args.weights or args.shadow or args.end):
        # Without a change the command only showed the rollout: exit 0, and the reason, which
        # the user meant for the history, was recorded nowhere.
        raise UsageError(
            "--reason is recorded with a change: give the weights, --shadow or --end it explains"
        )
    named = [version for version, _ in args.weights]
    twice = sorted({v for v in named if named.count(v) > 1})
    if twice:
        # Each weight replaced the one before: `1=9 1=1` (meant `1=9 2=1`) sent every request
        # to version 1 without a word.
        raise UsageError(f"version(s) {twice} given more than once; give each version one weight")
    with connect(RepositoryClient, args) as repo:
        if args.end:
            view = repo.set_rollout(args.model, None, reason=args.reason)
        elif args.weights or args.shadow:
            weights: Mapping[int, float] = dict(args.weights)
            if not weights:  # --shadow alone adds a shadow: the live split stays as it is
                live = repo.get_rollout(args.model)
                weights = live.split
                # With its max_error_rate, as a conversion's --rollout shadow keeps it: left
                # out, adding a shadow to a guarded canary ended the canary's guard unasked.
                guard = live.rules.get("max_error_rate")
                if weights and guard and "max_error_rate" not in rules:
                    rules["max_error_rate"] = guard
            view = repo.set_rollout(
                args.model,
                weights,
                shadow=args.shadow,
                rules=rules or None,
                reason=args.reason,
            )
        else:
            view = repo.get_rollout(args.model)
    if args.json:
        document = dataclasses.asdict(view)
        if not view.shadow.get("compared", 0):
            document["shadow"] = {
                k: None if k in COMPARISON_FIGURES else v for k, v in view.shadow.items()
            }
        print(json_text(document))
        return EXIT_OK
    if view.error:
        # Why the stored split cannot be used, or what else is wrong with the rollout in force
        # (a shadow compared with itself, a rule's decision not yet written): the text says.
        print(f"{view.model}: {view.error}")
    total = sum(view.split.values())
    if not view.split:
        print(f"{view.model}: no split; every request goes to the default version")
    for version, weight in sorted(view.split.items()):
        print(f"version {version}: {100 * weight / total:.1f}% of requests that name no version")
    if view.shadow_version:
        s = view.shadow
        head = (
            f"shadow: {100 * view.shadow_fraction:g}% of requests also run on version "
            f"{view.shadow_version}: {s.get('compared', 0):.0f} compared, "
            f"{s.get('errors', 0):.0f} errors, {s.get('shed', 0):.0f} shed"
        )
        if not s.get("compared", 0):
            # The server's figures of no comparison read as a perfect candidate (cosine 1).
            print(f"{head}; no outputs compared yet")
        else:
            _print_comparison(head, s)
    if view.rules:
        print("rules: " + ", ".join(f"{k} {v:g}" for k, v in view.rules.items()))
    for change in view.history[-10:]:
        parts = [f"{v}={w:g}" for v, w in sorted(change.split.items())]
        if change.shadow_version:  # a change that set a shadow read "ended"
            parts.append(f"shadow {change.shadow_version}={change.shadow_fraction:g}")
        # As the file holds them (a hand edit may hold anything): a line break forged an entry.
        at, by, reason = (_one_line(t) for t in (change.at, change.by, change.reason))
        print(f"  {at}  {', '.join(parts) or 'ended'}  by {by}: {reason or '-'}")
    return EXIT_OK


def _one_line(text: str) -> str:
    """``text`` with every character that is not printable (line breaks, a terminal's
    escapes) written as its escape, so a history entry prints as the one line it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cmd_unload(args: argparse.Namespace) -> int:
    with connect(RepositoryClient, args) as repo:
        repo.unload_model(args.model)
    print(f"{args.model}: unloaded; its files stay (`ferry models load {args.model}` serves it)")
    return EXIT_OK


def _print_comparison(head: str, s: Mapping[str, float]) -> None:
    """The shadow line with the comparison's figures, once there is at least one comparison."""
    print(
        f"{head}; cosine mean "
        f"{s.get('mean_cosine', 1):.6f}, min {s.get('min_cosine', 1):.6f}; max |diff| "
        f"{s.get('max_abs_diff', 0):.3g}, relative error {s.get('rel_error', 0):.3g}"
        + (
            f"; ids equal {100 * s['label_agreement']:.2f}%"
            if s.get("label_agreement", 1) < 1
            else ""
        )
        + (
            f"; top-1 agreement {100 * s['top1_agreement']:.2f}%"
            if s.get("top1_agreement", -1) >= 0
            else ""
        )
    )
