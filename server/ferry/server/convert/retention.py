"""Which uploads the retention rule removes: bounded by default, oldest first, never one in use.

Uploads are kept until deleted, so a busy afternoon of re-uploads filled a disk (6.8 GB). The rule
bounds them two ways, each off at 0: the total bytes kept (``--upload-retention-bytes``) and their
age (``--upload-retention-seconds``). It only ever removes an upload that no queued or running job
reads (the store's order already leaves those out) and none the caller names in ``keep``: the
upload just received (its id was never seen by its client yet) and those a ``Convert`` call is
queueing. A removed upload is remembered (``removed_uploads``) so that using its id again says
what removed it and which setting to change. Pure: the service applies the plan.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from ferry.server.convert.store import UploadRecord


@dataclass(frozen=True)
class RetentionRule:
    max_bytes: int  # 0: no limit
    max_age_s: float  # 0: no limit

    @property
    def active(self) -> bool:
        return self.max_bytes > 0 or self.max_age_s > 0


def plan(
    rule: RetentionRule,
    total_bytes: int,
    candidates: Iterable[UploadRecord],
    now_ms: int,
    keep: Collection[str] = (),
) -> list[tuple[UploadRecord, str]]:
    """The uploads to remove, each with the reason its client will be told, oldest first.

    ``total_bytes`` counts every kept upload, those in use included (they take disk space too);
    ``candidates`` are the removable ones, oldest first, read only as far as needed: the first
    one that stays ends the plan (every later one is younger, and the total only went down).
    Read to the end, every upload cost a pass over all kept records, on the server's event
    loop: 6 s per upload with 200,000 kept."""
    removals: list[tuple[UploadRecord, str]] = []
    for record in candidates:
        if record.upload_id in keep:
            continue
        age_s = (now_ms - record.created_ms) / 1000
        if rule.max_age_s > 0 and age_s > rule.max_age_s:
            reason = f"it was {age_s:.0f} s old, over --upload-retention-seconds {rule.max_age_s:g}"
        elif rule.max_bytes > 0 and total_bytes > rule.max_bytes:
            reason = (
                f"uploads held {total_bytes} bytes, over --upload-retention-bytes "
                f"{rule.max_bytes}, and it was the oldest one no job was reading"
            )
        else:
            break
        removals.append((record, reason))
        total_bytes -= record.size_bytes
    return removals
