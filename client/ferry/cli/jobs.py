"""``ferry jobs list | show | wait | cancel``: the conversion jobs the server runs and keeps.

``ferry convert`` follows its job to the end, but a conversion outlives the command that started
it: ``--no-wait``, a closed terminal or a Ctrl-C leave it running on the server. Without these a
CLI user could neither find it again, follow it, nor stop it (only the SDK could). Like
``convert`` they talk to the management listener.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ferry.cli._common import (
    EXIT_OK,
    add_listing_flags,
    add_progress_flags,
    connect,
    json_text,
    management_parent,
    print_table,
    utc_time,
)
from ferry.cli.conversion import conversion_hint, follow, job_summary
from ferry.client import ConversionClient, Job


def register(sub: Any) -> None:
    parent = management_parent()
    jobs = sub.add_parser(
        "jobs",
        help="list, show, follow or cancel conversion jobs (management listener)",
        description="The conversion jobs the server runs and keeps: list them, show one, follow "
        "one to its end, or cancel it.",
    )
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")

    p = jsub.add_parser(
        "list",
        parents=[parent],
        help="every job, newest first",
        description="Every conversion job the server keeps, newest first, with its state.",
    )
    add_listing_flags(p, "jobs")
    p.set_defaults(func=cmd_list, hint=conversion_hint)

    p = jsub.add_parser(
        "show",
        parents=[parent],
        help="one job: its state, stage and outcome",
        description="One job as the server keeps it; --json adds its report.",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--json", action="store_true", help="print the job and its report as JSON")
    p.set_defaults(func=cmd_show, hint=conversion_hint)

    p = jsub.add_parser(
        "wait",
        parents=[parent],
        help="follow a job to its end, with a progress bar",
        description="Follow a job (its events so far, then live ones) until it ends; exit 0 when "
        "it SUCCEEDED, 1 when it FAILED or was CANCELLED.",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    add_progress_flags(p)
    p.add_argument("--json", action="store_true", help="print the final job as JSON")
    p.set_defaults(func=cmd_wait, hint=conversion_hint)

    p = jsub.add_parser(
        "cancel",
        parents=[parent],
        help="stop a queued or running job",
        description="Stop a queued or running job; returns once nothing of it remains. A job that "
        "has ended is left as it is.",
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.set_defaults(func=cmd_cancel, hint=conversion_hint)


def _as_json(job: Job, report: bool = True) -> dict[str, Any]:
    row: dict[str, Any] = {
        "job_id": job.id,
        "model": job.model,
        "state": job.state,
        "stage": job.stage,
        "fraction": job.fraction,
        "message": job.message,
        "version": job.version,
        "upload_id": job.upload_id,
        "error_code": job.error_code.name if job.error_code is not None else None,
        "error_kind": job.error_kind,
        "error_message": job.error_message,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
    }
    if report:
        row["report"] = json.loads(job.report_json) if job.report_json else None
    return row


def cmd_list(args: argparse.Namespace) -> int:
    with connect(ConversionClient, args) as client:
        jobs = client.list_jobs(args.model or None, limit=args.limit)
    if args.json:
        print(json_text([_as_json(j, report=False) for j in jobs]))
        return EXIT_OK
    if not jobs:
        print("no jobs" + (f" for {args.model!r}" if args.model else ""))
        return EXIT_OK
    print_table(
        [
            [
                j.id,
                j.model,
                j.state,
                "" if j.done else f"{j.stage} {j.fraction:.0%}",
                "" if j.version is None else j.version,
                utc_time(j.created),
            ]
            for j in jobs
        ],
        ["JOB_ID", "MODEL", "STATE", "STAGE", "VERSION", "CREATED"],
    )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    with connect(ConversionClient, args) as client:
        job = client.job(args.job_id)
    if args.json:
        print(json_text(_as_json(job)))
        return EXIT_OK
    print(job_summary(job))
    if not job.done:
        print(f"  {job.stage} {job.fraction:.0%}: {job.message}".rstrip(": "))
    elif job.error_message:
        print(f"  {job.error_kind or job.state}: {job.error_message}")
    created, ended = utc_time(job.created), utc_time(job.finished)
    print(f"  upload {job.upload_id}, created {created}, ended {ended}")
    return EXIT_OK


def cmd_wait(args: argparse.Namespace) -> int:
    with connect(ConversionClient, args) as client:
        job = client.job(args.job_id)
        follow(job, args, _as_json)  # JobFailedError when it did not succeed
    if args.json:
        print(json_text(_as_json(job)))
    else:
        print(job_summary(job))
    return EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with connect(ConversionClient, args) as client:
        job = client.cancel(args.job_id)
    print(f"job {job.id} {job.state}")
    return EXIT_OK
