"""``ferry uploads list | delete``: the uploaded sources the server keeps for ``ferry convert``.

Uploads stay in the server's state folder until deleted or removed by its retention rule (a
version can be converted again from the same upload with other options). Like ``upload``
and ``convert`` these talk to the management listener.
"""

from __future__ import annotations

import argparse
from typing import Any

from ferry.cli._common import (
    EXIT_FAILED,
    EXIT_OK,
    UsageError,
    add_listing_flags,
    connect,
    json_text,
    management_parent,
    print_table,
    report_error,
    utc_time,
)
from ferry.cli.conversion import conversion_hint
from ferry.client import (
    ConversionClient,
    FailedPreconditionError,
    InvalidInputError,
    JobNotFoundError,
)


def register(sub: Any) -> None:
    parent = management_parent()
    uploads = sub.add_parser(
        "uploads",
        help="list or delete the uploads the server keeps (management listener)",
        description="List or delete the uploaded model files the server keeps for "
        "`ferry convert`; they stay until deleted, or until the server's retention rule "
        "(--upload-retention-bytes, --upload-retention-seconds: 7 days by default) removes "
        "those no queued or running job reads.",
    )
    usub = uploads.add_subparsers(dest="uploads_command", required=True, metavar="ACTION")

    p = usub.add_parser(
        "list",
        parents=[parent],
        help="every upload, newest first",
        description="Every upload the server keeps, newest first, with its size and model.",
    )
    add_listing_flags(p, "uploads")
    p.set_defaults(func=cmd_list, hint=conversion_hint)

    p = usub.add_parser(
        "delete",
        parents=[parent],
        help="remove uploads (refused while a job converts one)",
        description="Remove uploads from the server. One that a queued or running job still "
        "reads is refused; finished jobs keep their history.",
        epilog="examples:\n  ferry uploads delete 3f2a...e1\n  ferry uploads delete --all mlp",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("upload_ids", nargs="*", metavar="UPLOAD_ID", help="the uploads to delete")
    p.add_argument(
        "--all",
        metavar="MODEL",
        nargs="?",
        const="",
        dest="all_of",
        help="every upload (of MODEL, when given) that no live job reads",
    )
    p.set_defaults(func=cmd_delete, hint=conversion_hint)


def cmd_list(args: argparse.Namespace) -> int:
    with connect(ConversionClient, args) as client:
        uploads = client.list_uploads(args.model or None, limit=args.limit)
    if args.json:
        rows = [
            {
                "upload_id": u.upload_id,
                "model": u.model,
                "format": u.format,
                "size_bytes": u.size_bytes,
                "sha256": u.sha256,
                "architecture": u.architecture,
                "description": u.description,
                "created": u.created,
            }
            for u in uploads
        ]
        print(json_text(rows))
        return EXIT_OK
    if not uploads:
        print("no uploads" + (f" for {args.model!r}" if args.model else ""))
        return EXIT_OK
    print_table(
        [
            [
                u.upload_id,
                u.model,
                u.format,
                f"{u.size_bytes:,}",
                utc_time(u.created),
                u.architecture,
            ]
            for u in uploads
        ],
        ["UPLOAD_ID", "MODEL", "FORMAT", "BYTES", "CREATED", "ARCHITECTURE"],
    )
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    if bool(args.upload_ids) == (args.all_of is not None):
        raise UsageError("name the uploads to delete, or pass --all [MODEL] (not both)")
    failed = 0
    with connect(ConversionClient, args) as client:
        ids = args.upload_ids
        if args.all_of is not None:
            ids = [u.upload_id for u in client.list_uploads(args.all_of or None, limit=None)]
        for upload_id in ids:
            try:
                client.delete_upload(upload_id)
            except (FailedPreconditionError, JobNotFoundError, InvalidInputError) as exc:
                # One in use (or already gone, or a mistyped id) must not stop the others: a
                # malformed id left every id after it undeleted, and unmentioned.
                # --all skips those in use.
                if args.all_of is not None and isinstance(exc, FailedPreconditionError):
                    print(f"kept    {upload_id}: {exc.message}")
                    continue
                failed += 1
                report_error("ferry uploads delete", str(exc), conversion_hint(exc, args) or "")
                continue
            print(f"deleted {upload_id}")
    if not ids:
        print("no uploads to delete")
    return EXIT_FAILED if failed else EXIT_OK
